"""
The few DICOM upper-layer PDUs (PS3.8 section 9.3) the forwarder must understand
itself: the A-ASSOCIATE-RQ it checks before anything reaches Orthanc, and the
A-ASSOCIATE-RJ it answers a refusal with.  Decoding and encoding are pynetdicom's.
"""

import struct
from dataclasses import dataclass
from enum import IntEnum

from pynetdicom.pdu import A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE

#: Every PDU starts with its type (1 byte), a reserved byte and its length
#: (4 bytes, big endian) not counting these 6 bytes.
PDU_HEADER = struct.Struct(">BBL")

ASSOCIATE_RQ_TYPE = 0x01


class RejectResult(IntEnum):
    PERMANENT = 1
    TRANSIENT = 2


class RejectSource(IntEnum):
    SERVICE_USER = 1
    SERVICE_PROVIDER_ACSE = 2
    SERVICE_PROVIDER_PRESENTATION = 3


@dataclass(frozen=True)
class Rejection:
    """
    Why an association is refused: the three fields of the A-ASSOCIATE-RJ, and
    a sentence for the log.
    """

    result: RejectResult
    source: RejectSource
    reason: int
    why: str

    def encode(self) -> bytes:
        primitive = A_ASSOCIATE()
        primitive.result = int(self.result)
        primitive.result_source = int(self.source)
        primitive.diagnostic = self.reason
        pdu = A_ASSOCIATE_RJ()
        pdu.from_primitive(primitive)
        return pdu.encode()


# The reasons of PS3.8 table 9-21, by source.
CALLING_AE_NOT_RECOGNIZED = 3  # service user
CALLED_AE_NOT_RECOGNIZED = 7  # service user
NO_REASON_GIVEN = 1  # service user, and service provider (ACSE)
PROTOCOL_VERSION_NOT_SUPPORTED = 2  # service provider (ACSE)
TEMPORARY_CONGESTION = 1  # service provider (presentation)


class NotAnAssociationRequest(Exception):
    """
    The bytes are not a well-formed A-ASSOCIATE-RQ.
    """


@dataclass(frozen=True)
class AssociationRequest:
    callingAET: str
    calledAET: str
    protocolVersion: int


def decodeAssociationRequest(pdu: bytes) -> AssociationRequest:
    """
    Decode one whole A-ASSOCIATE-RQ PDU, header included.

    @raise NotAnAssociationRequest: if it is malformed.
    """
    request = A_ASSOCIATE_RQ()
    try:
        request.decode(pdu)
        calling, called = request.calling_ae_title, request.called_ae_title
    except Exception as error:
        # pynetdicom raises whatever its parsers hit (struct.error, ValueError,
        # IndexError...) on malformed input: they all mean the same here.
        raise NotAnAssociationRequest(f"malformed A-ASSOCIATE-RQ ({error})") from error
    return AssociationRequest(
        callingAET=calling.strip(),
        calledAET=called.strip(),
        protocolVersion=request.protocol_version,
    )
