"""
The configuration parser: every class of error gets its message, all at once.
"""

import re
import socket
from dataclasses import replace
from pathlib import Path

import pytest

from appliance.config import (
    SCHEMA,
    ConfigError,
    ListenAddress,
    loadConfig,
    parseDuration,
    parseListen,
    parseSize,
)
from appliance.preflight import loadChecked
from tests.commandline import REPOSITORY, SHIPPED
from tests.support import writeConfig

DEVELOPMENT = REPOSITORY / "etc" / "dev" / "appliance.ini"


def problemsOf(path: Path) -> list:
    """
    The problems the daemon reports with the configuration at C{path}, at
    start-up, in check-config and at reload alike.
    """
    with pytest.raises(ConfigError) as raised:
        loadChecked(path)
    return raised.value.problems


def test_shippedConfigValidates():
    config = loadConfig(SHIPPED)
    assert config.appliance.state_dir == Path("/var/lib/pacs-appliance")
    assert config.orthanc.http_port == 8042
    assert config.sources == (SHIPPED,)


def test_developmentConfigKeepsStateInTheCheckout():
    config = loadConfig(DEVELOPMENT)
    assert config.appliance.state_dir == REPOSITORY / "var" / "state"
    assert config.appliance.runtime_dir == REPOSITORY / "var" / "run"


def test_shippedDefaultsRoundTrip(tmp_path):
    """
    Every key the shipped file documents, uncommented, gives exactly the
    defaults: the file tells the truth about them.
    """
    uncommented = re.sub(r"(?m)^;(\w+ = )", r"\1", SHIPPED.read_text())
    assert uncommented != SHIPPED.read_text()
    explicit = tmp_path / "appliance.ini"
    explicit.write_text(uncommented)
    empty = tmp_path / "empty" / "appliance.ini"
    empty.parent.mkdir()
    empty.write_text("")
    assert replace(loadConfig(explicit), sources=()) == replace(loadConfig(empty), sources=())


def test_everyKeyDocumented():
    """
    The shipped file documents every key of every section, with its default.
    """
    sections = dict(re.findall(r"(?ms)^\[([a-z]+)\]\n(.*?)(?=^\[|\Z)", SHIPPED.read_text()))
    missing = [
        f"[{section}] {key}"
        for section, keys in SCHEMA.items()
        for key in keys
        if not re.search(rf"(?m)^;{key} =", sections.get(section, ""))
    ]
    assert missing == []


def test_unknownSectionAndKey(tmp_path):
    path = writeConfig(tmp_path, {"orthanc": {"htp_port": "1"}, "webb": {"x": "1"}})
    key, section = problemsOf(path)
    assert key == f"{path}: [orthanc] htp_port: unknown key"
    assert section.startswith(f"{path}: [webb]: unknown section (known: appliance, orthanc, ")


def test_everyProblemReportedInOneRun(tmp_path):
    path = writeConfig(
        tmp_path,
        {
            "orthanc": {
                "http_port": "99999",
                "dicom_port": "http",
                "stop_timeout": "soon",
                "aet": "A\\B",
                "unresponsive_after": "0",
                "verbose": "maybe",
            }
        },
    )
    problems = problemsOf(path)
    assert problems == [
        f"{path}: [orthanc] http_port: '99999' is not a port number (1-65535)",
        f"{path}: [orthanc] dicom_port: 'http' is not a port number (1-65535)",
        f"{path}: [orthanc] aet: 'A\\\\B' is not an AE title (printable ASCII without backslash)",
        f"{path}: [orthanc] verbose: 'maybe' is not yes or no",
        f"{path}: [orthanc] stop_timeout: 'soon' is not a duration"
        " (a number with a unit: 500ms, 30s, 5m, 1h)",
        f"{path}: [orthanc] unresponsive_after: '0' is not a whole number of at least 1",
    ]


def test_missingFilesThatMustExist(tmp_path):
    path = writeConfig(
        tmp_path,
        {"orthanc": {"executable": "bin/nothing", "plugins": "/nowhere/libOrthancDicomWeb.so"}},
    )
    assert problemsOf(path) == [
        f"{path}: [orthanc] executable: {tmp_path}/bin/nothing is not an executable file"
        " (install the orthanc package, or point this key at Orthanc)",
        f"{path}: [orthanc] plugins: /nowhere/libOrthancDicomWeb.so does not exist"
        " (install the orthanc-dicomweb package)",
    ]


def test_loadingReadsNothingButTheConfiguration(tmp_path):
    """
    Parsing alone accepts what names missing files: the pre-flight checks
    refuse it, with the files' problems after those of the keys.
    """
    path = writeConfig(
        tmp_path,
        {
            "orthanc": {"executable": "bin/nothing", "http_port": "99999"},
            "tls": {"private_key": "key.pem"},
        },
    )
    (tmp_path / "key.pem").write_text("a key")
    assert problemsOf(path) == [f"{path}: [orthanc] http_port: '99999' is not a port number (1-65535)"]
    fixed = writeConfig(tmp_path, {"orthanc": {"executable": "bin/nothing"}, "tls": {"private_key": "key.pem"}})
    config = loadConfig(fixed)
    assert config.orthanc.executable == tmp_path / "bin" / "nothing"
    assert problemsOf(fixed) == [
        f"{fixed}: [orthanc] executable: {tmp_path}/bin/nothing is not an executable file"
        " (install the orthanc package, or point this key at Orthanc)",
        f"{fixed}: [tls] certificate: {config.tls.certificate} does not exist but [tls] private_key does"
        " (install both files, or remove both to use a generated self-signed certificate)",
    ]


def test_twoListenersOnOnePort(tmp_path):
    path = writeConfig(tmp_path, {"orthanc": {"http_port": "4242"}})
    assert problemsOf(path) == [
        f"{path}: [orthanc] dicom_port: port 4242 is already used by [orthanc] http_port"
    ]


def test_missingMainFile(tmp_path):
    missing = tmp_path / "nothing.ini"
    assert problemsOf(missing) == [
        f"{missing}: cannot read the file: No such file or directory"
    ]


def test_syntaxErrorNamesTheFile(tmp_path):
    path = tmp_path / "appliance.ini"
    path.write_text("state_dir = /x\n")
    [problem] = problemsOf(path)
    assert problem.startswith(f"{path}: ")
    assert "no section headers" in problem


def test_duplicateKeyInOneFile(tmp_path):
    path = tmp_path / "appliance.ini"
    path.write_text("[orthanc]\nhttp_port = 1000\nhttp_port = 1001\n")
    [problem] = problemsOf(path)
    assert problem.startswith(f"{path}: ")
    assert "'http_port'" in problem and "already exists" in problem


def test_confDOverridesInNameOrderAndNamesItsFile(tmp_path):
    main = writeConfig(tmp_path, {"orthanc": {"http_port": "9000", "aet": "MAIN"}})
    confd = tmp_path / "conf.d"
    writeConfig(confd, {"orthanc": {"http_port": "9001"}}, name="10-first.ini")
    second = writeConfig(confd, {"orthanc": {"http_port": "9002", "dicom_port": "0"}}, name="20-second.ini")
    writeConfig(confd, {"orthanc": {"http_port": "9999"}}, name="ignored.conf")
    assert problemsOf(main) == [
        f"{second}: [orthanc] dicom_port: '0' is not a port number (1-65535)"
    ]
    (confd / "20-second.ini").write_text("[orthanc]\nhttp_port = 9002\n")
    config = loadConfig(main)
    assert config.orthanc.http_port == 9002
    assert config.orthanc.aet == "MAIN"
    assert [path.name for path in config.sources] == ["appliance.ini", "10-first.ini", "20-second.ini"]


def test_relativePathsFollowTheirFile(tmp_path):
    main = writeConfig(tmp_path / "etc", {"appliance": {"state_dir": "../state"}})
    writeConfig(tmp_path / "etc" / "conf.d", {"appliance": {"runtime_dir": "run"}}, name="a.ini")
    config = loadConfig(main)
    assert config.appliance.state_dir == tmp_path / "state"
    assert config.appliance.runtime_dir == tmp_path / "etc" / "conf.d" / "run"


def test_inlineCommentsAreNotValues(tmp_path):
    path = tmp_path / "appliance.ini"
    path.write_text("[orthanc]\nhttp_port = 9000 ; Orthanc's port\naet = ARCHIVE # ours\n")
    config = loadConfig(path)
    assert (config.orthanc.http_port, config.orthanc.aet) == (9000, "ARCHIVE")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("443", ListenAddress("", 443)),
        ("127.0.0.1:8443", ListenAddress("127.0.0.1", 8443)),
        ("[::1]:11112", ListenAddress("::1", 11112)),
        ("[::]:80", ListenAddress("::", 80)),
    ],
)
def test_listenAddresses(text, expected):
    assert parseListen(text, Path("/")) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("::1:443", "is not [HOST:]PORT"),
        ("localhost:443", "is not an IP address"),
        ("[127.0.0.1]:443", "must be an IPv6 address"),
        ("1.2.3.4:0", "is not a port number"),
        ("", "is not [HOST:]PORT"),
    ],
)
def test_badListenAddresses(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parseListen(text, Path("/"))


def test_endpointDescriptions():
    assert ListenAddress("", 443).endpointDescription() == "tcp:443"
    assert ListenAddress("10.0.0.1", 443).endpointDescription() == "tcp:443:interface=10.0.0.1"
    assert ListenAddress("::1", 443).endpointDescription() == r"tcp6:443:interface=\:\:1"


def test_sizesAndDurations():
    assert parseSize("512", Path("/")) == 512
    assert parseSize("64K", Path("/")) == 64 * 1024
    assert parseSize("2g", Path("/")) == 2 * 1024**3
    assert parseDuration("30", Path("/")) == 30
    assert parseDuration("500ms", Path("/")) == 0.5
    assert parseDuration("5m", Path("/")) == 300
    assert parseDuration("1.5h", Path("/")) == 5400
    for bad in ("1T", "-1", "K"):
        with pytest.raises(ValueError, match="is not a size"):
            parseSize(bad, Path("/"))
    for bad in ("1d", "-1s", "s"):
        with pytest.raises(ValueError, match="is not a duration"):
            parseDuration(bad, Path("/"))


def test_databaseSection(tmp_path):
    """
    PostgreSQL needs its password file; verify-full its authority; traffic
    in the clear only to this machine.  Without a host, nothing is asked.
    """
    assert loadChecked(writeConfig(tmp_path, {"database": {"ssl_mode": "disable"}})).database.host == ""
    path = writeConfig(tmp_path, {"database": {"host": "db.hospital.example"}})
    assert problemsOf(path) == [
        f"{path}: [database] password_file: PostgreSQL needs the file that holds the password",
        f"{path}: [database] ca_file: verify-full needs the certificate authority that signs the"
        " PostgreSQL server's certificate (set ca_file to its PEM file)",
    ]
    password = tmp_path / "password"
    path = writeConfig(
        tmp_path,
        {"database": {"host": "10.0.0.5", "ssl_mode": "disable", "password_file": password, "ca_file": "nowhere.pem"}},
    )
    assert problemsOf(path) == [
        f"{path}: [database] ssl_mode: disable sends passwords and patient data in the clear: only for a"
        " server on this machine, and 10.0.0.5 is not (use verify-full)",
        f"{path}: [database] password_file: {password} cannot be read (it must exist, readable by the"
        " daemon's group)",
        f"{path}: [database] ca_file: {tmp_path}/nowhere.pem does not exist",
    ]
    password.write_text("secret\n")
    for host in ("localhost", "127.0.0.1", "::1"):
        path = writeConfig(tmp_path, {"database": {"host": host, "ssl_mode": "disable", "password_file": password}})
        assert loadChecked(path).database.host == host
    path = writeConfig(tmp_path, {"database": {"host": "db host", "name": "pacs-db", "ssl_mode": "prefer"}})
    assert problemsOf(path) == [
        f"{path}: [database] host: 'db host' is not a host name or IP address",
        f"{path}: [database] name: 'pacs-db' is not a name (letters, digits and _, at most 63, not starting"
        " with a digit)",
        f"{path}: [database] ssl_mode: 'prefer' is not one of: verify-full, require, disable",
    ]


def test_nodeName(tmp_path):
    assert loadConfig(writeConfig(tmp_path, {})).appliance.node_name == socket.gethostname()
    assert loadConfig(writeConfig(tmp_path, {"appliance": {"node_name": "node-2.ward"}})).appliance.node_name == "node-2.ward"
    path = writeConfig(tmp_path, {"appliance": {"node_name": "-node"}})
    assert problemsOf(path) == [
        f"{path}: [appliance] node_name: '-node' is not a node name (1 to 64 letters, digits, '.', '-' or '_',"
        " starting with a letter or digit)"
    ]


def test_orthancStorage(tmp_path):
    config = loadConfig(writeConfig(tmp_path, {}))
    assert (config.orthanc.storage.value, config.orthanc.storage_dir) == ("filesystem", None)
    path = writeConfig(tmp_path, {"orthanc": {"storage": "postgresql"}})
    assert problemsOf(path) == [
        f"{path}: [orthanc] storage: postgresql needs the PostgreSQL server of [database] (set its host)"
    ]
    path = writeConfig(tmp_path, {"orthanc": {"storage": "s3"}})
    assert problemsOf(path) == [f"{path}: [orthanc] storage: 's3' is not one of: filesystem, postgresql"]
