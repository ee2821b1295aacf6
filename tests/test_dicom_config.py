"""
The [dicom] and [modality:NAME] sections, and what they render into Orthanc's
configuration.
"""

import ipaddress

import pytest
from cryptography import x509

from appliance.config import ConfigError, loadConfig
from appliance.preflight import loadChecked
from appliance.orthanc.settings import PROBE_AET, newCredentials, renderOrthancConfiguration
from tests.support import testConfig, writeTestConfig


def problemsOf(folder, **sections) -> list:
    with pytest.raises(ConfigError) as raised:
        loadChecked(writeTestConfig(folder, **sections))
    return raised.value.problems


def test_defaults(tmp_path):
    config = testConfig(tmp_path)
    assert config.dicom.tls_profile == "bcp195-nd"
    assert not config.dicom.require_client_certificate
    assert config.dicom.max_first_pdu == 64 * 1024
    assert config.modalities == ()


def test_modalities(tmp_path):
    config = testConfig(
        tmp_path,
        dicom={"listen": "", "require_client_certificate": "yes", "client_ca": __file__},
        **{
            "modality:ct-1": {"aet": "CT1", "host": "10.1.2.3", "port": "104"},
            "modality:wards": {
                "aet": "WARDS",
                "host": "10.9.0.0/16",
                "certificate_subject": "CN=wards.example.org,O=Hospital",
            },
        },
    )
    assert config.dicom.listen is None
    ct, wards = config.modalities
    assert (ct.name, ct.aet, ct.host, ct.port) == (
        "ct-1", "CT1", ipaddress.ip_network("10.1.2.3/32"), 104
    )
    assert wards.port is None and wards.host.num_addresses == 65536
    assert wards.certificate_subject == x509.Name.from_rfc4514_string(
        "CN=wards.example.org,O=Hospital"
    )


def test_modalityProblems(tmp_path):
    path = writeTestConfig(
        tmp_path,
        dicom={"tls_profile": "ssl3", "require_client_certificate": "yes"},
        **{
            "modality:a": {"aet": "CT1", "host": "ct1.example.org", "colour": "red"},
            "modality:b": {"aet": "ct1", "host": "10.0.0.0/8", "port": "104"},
            "modality:c": {"aet": "PACS", "host": "10.0.0.1", "certificate_subject": "CN"},
            "modality:bad name": {"aet": "X", "host": "10.0.0.2"},
            "modality:empty": {},
        },
    )
    with pytest.raises(ConfigError) as raised:
        loadConfig(path)
    assert raised.value.problems == [
        f"{path}: [modality:a] colour: unknown key",
        f"{path}: [modality:bad name]: a modality name is 1 to 64 letters, digits, - or _",
        f"{path}: [dicom] tls_profile: 'ssl3' is not one of: bcp195-nd, legacy",
        f"{path}: [modality:a] host: 'ct1.example.org' is not an IP address or network"
        " (give an address or a CIDR like 10.1.2.0/24, not a name)",
        f"{path}: [modality:c] certificate_subject: 'CN' is not a certificate subject"
        " (write it as in RFC 4514, like CN=ct1.example.org,O=Hospital)",
        f"{path}: [modality:empty] aet: '' is not an AE title (1 to 16 characters)",
        f"{path}: [modality:empty] host: an IP address or network (CIDR, like 10.1.2.0/24)"
        " is required",
    ]


def test_crossChecks(tmp_path):
    path = writeTestConfig(
        tmp_path,
        dicom={"listen": "8042", "require_client_certificate": "yes"},
        orthanc={"http_port": "8042"},
        **{
            "modality:a": {"aet": "CT1", "host": "10.0.0.1"},
            "modality:b": {"aet": "ct1", "host": "10.0.0.0/8", "port": "104"},
            "modality:c": {"aet": "PACS", "host": "10.0.0.2"},
        },
    )
    with pytest.raises(ConfigError) as raised:
        loadConfig(path)
    problems = raised.value.problems
    assert f"{path}: [dicom] client_ca: mutual TLS needs the certificate authority that" \
        " signs the modalities' certificates (set client_ca to its PEM file)" in problems
    assert f"{path}: [modality:b] aet: 'ct1' is already the AE title of [modality:a]" \
        " (each modality needs its own)" in problems
    assert f"{path}: [modality:b] host: a C-MOVE destination (a modality with a port) needs" \
        " one address, not the network 10.0.0.0/8" in problems
    assert f"{path}: [modality:c] aet: 'PACS' is the archive's own AE title ([orthanc] aet)" \
        in problems
    assert f"{path}: [dicom] listen: port 8042 is already used by [orthanc] http_port" in problems


def test_subjectNeedsMutualTLS(tmp_path):
    problems = problemsOf(
        tmp_path,
        **{"modality:a": {"aet": "CT1", "host": "10.0.0.1", "certificate_subject": "CN=ct1"}},
    )
    assert problems == [
        f"{tmp_path / 'appliance.ini'}: [modality:a] certificate_subject: a certificate subject"
        " is only checked under mutual TLS (set [dicom] require_client_certificate = yes)"
    ]


def test_orthancKnowsModalitiesOnlyOnLoopback(tmp_path):
    """
    Orthanc accepts associations only from 127.0.0.1 and reaches each
    modality through its relay.
    """
    config = testConfig(
        tmp_path,
        **{
            "modality:ct1": {"aet": "CT1", "host": "10.1.2.3", "port": "104"},
            "modality:wards": {"aet": "WARDS", "host": "10.9.0.0/16"},
        },
    )
    document = renderOrthancConfiguration(config, newCredentials(), {"ct1": 40001})
    assert document["DicomCheckModalityHost"] is True
    assert not any(value for key, value in document.items() if key.startswith("DicomAlwaysAllow"))
    modalities = document["DicomModalities"]
    assert modalities["ct1"] == {"AET": "CT1", "Host": "127.0.0.1", "Port": 40001}
    assert modalities["wards"]["Host"] == "127.0.0.1"
    assert modalities["appliance-probe"]["AET"] == PROBE_AET
    assert modalities["appliance-probe"]["AllowEcho"] is True
    assert modalities["appliance-probe"]["AllowStore"] is False
