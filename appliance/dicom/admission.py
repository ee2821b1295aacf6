"""
Which associations may reach Orthanc: the calling AE title, the called AE title,
the peer's address and, under mutual TLS, its certificate's subject are checked
against the [modality:NAME] sections before a byte is forwarded.
"""

import ipaddress
from typing import Iterable, Optional, Union

from cryptography import x509

from appliance.config import ModalitySection
from appliance.dicom.pdu import (
    CALLED_AE_NOT_RECOGNIZED,
    CALLING_AE_NOT_RECOGNIZED,
    PROTOCOL_VERSION_NOT_SUPPORTED,
    AssociationRequest,
    RejectResult,
    RejectSource,
    Rejection,
)

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def _notRecognised(why: str) -> Rejection:
    # Wrong address and wrong certificate answer like an unknown calling AE: a
    # peer learns nothing about which modalities exist, the log says why.
    return Rejection(
        RejectResult.PERMANENT, RejectSource.SERVICE_USER, CALLING_AE_NOT_RECOGNIZED, why
    )


def describeSubject(subject: Optional[x509.Name]) -> str:
    return subject.rfc4514_string() if subject is not None else "-"


def sameSubject(subject: Optional[x509.Name], expected: x509.Name) -> bool:
    """
    Whether C{subject} has exactly the attributes of C{expected}, in any order:
    RFC 4514 writes a name last attribute first, tools differ in which order
    they print, and the order does not change who the certificate names.
    """
    if subject is None:
        return False

    def attributes(name: x509.Name):
        return sorted((each.oid.dotted_string, each.value) for each in name)

    return attributes(subject) == attributes(expected)


def admit(
    modalities: Iterable[ModalitySection],
    archiveAET: str,
    request: AssociationRequest,
    peer: IPAddress,
    subject: Optional[x509.Name],
) -> Union[ModalitySection, Rejection]:
    """
    The modality C{request} comes from, or why it is refused.

    @param archiveAET: the only called AE title there is (Orthanc's).
    @param peer: the address the connection comes from.
    @param subject: the subject of the peer's verified certificate, under
        mutual TLS.
    """
    if not request.protocolVersion & 1:
        return Rejection(
            RejectResult.PERMANENT,
            RejectSource.SERVICE_PROVIDER_ACSE,
            PROTOCOL_VERSION_NOT_SUPPORTED,
            f"protocol version {request.protocolVersion} is not supported",
        )
    if request.calledAET != archiveAET:
        return Rejection(
            RejectResult.PERMANENT,
            RejectSource.SERVICE_USER,
            CALLED_AE_NOT_RECOGNIZED,
            f"called AE {request.calledAET!r} is not the archive's ({archiveAET!r})",
        )
    modality = next((each for each in modalities if each.aet == request.callingAET), None)
    if modality is None:
        return _notRecognised(f"calling AE {request.callingAET!r} is not a configured modality")
    if peer.version != modality.host.version or peer not in modality.host:
        return _notRecognised(
            f"[modality:{modality.name}] connects from {modality.host}, not from {peer}"
        )
    expected = modality.certificate_subject
    if expected is not None and not sameSubject(subject, expected):
        return _notRecognised(
            f"[modality:{modality.name}] must present a certificate for"
            f" {describeSubject(expected)}, not {describeSubject(subject)}"
        )
    return modality
