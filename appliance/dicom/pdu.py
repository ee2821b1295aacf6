"""
The few DICOM upper-layer PDUs (PS3.8 section 9.3) the forwarder must understand
itself: the A-ASSOCIATE-RQ it checks before anything reaches Orthanc, the
A-ASSOCIATE-RJ it answers a refusal with, and the A-ABORT it sends when Orthanc's
connection ends under an association.  Decoding and encoding are pynetdicom's;
L{PDUBoundaries} follows where the PDUs of a relayed stream begin and end.
"""

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import FrozenSet, Optional

from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, A_P_ABORT
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

#: Every PDU starts with its type (1 byte), a reserved byte and its length
#: (4 bytes, big endian) not counting these 6 bytes.
PDU_HEADER = struct.Struct(">BBL")

ASSOCIATE_RQ_TYPE = 0x01
ASSOCIATE_RJ_TYPE = 0x03
RELEASE_RP_TYPE = 0x06
ABORT_TYPE = 0x07

#: The PDUs after which an association is over for the peer that receives them.
ENDING_TYPES = frozenset({ASSOCIATE_RJ_TYPE, RELEASE_RP_TYPE, ABORT_TYPE})


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
LOCAL_LIMIT_EXCEEDED = 2  # service provider (presentation)


def _providerAbort() -> bytes:
    # An A-P-ABORT primitive makes the A-ABORT PDU of source 2 (PS3.8 table
    # 9-26: the upper-layer service provider initiated it), reason 0 (not
    # specified): the forwarder aborts for the network, not for either AE.
    primitive = A_P_ABORT()
    primitive.provider_reason = 0
    return A_ABORT_RQ(primitive).encode()


#: The A-ABORT PDU the forwarder sends when Orthanc's connection ends under an
#: association: 07 00 00000004 00 00 02 00.
PROVIDER_ABORT = _providerAbort()


class PDUBoundaries:
    """
    Follows a stream of PDUs, chunk by chunk as it is relayed, reading nothing
    but their 6-byte headers, to tell whether the stream so far ends between
    two PDUs (L{atBoundary}) and the type of the last PDU whose header came
    whole (L{lastType}).

    A chunk inside a PDU costs one comparison and one subtraction; a chunk
    costs one header decoding more for each PDU that begins in it.  Nothing is
    copied but the start of a header split across chunks (at most 5 bytes).
    """

    __slots__ = ("_owed", "_header", "lastType")

    def __init__(self) -> None:
        #: Bytes of the current PDU still to come, once its header is whole.
        self._owed = 0
        #: The start of a header that the last chunk cut.
        self._header = b""
        #: The type of the last PDU whose header came whole, None before.
        self.lastType: Optional[int] = None

    @property
    def atBoundary(self) -> bool:
        """
        Whether the stream so far is made of whole PDUs.
        """
        return self._owed == 0 and not self._header

    def feed(self, data: bytes) -> None:
        """
        Account for C{data}, the next chunk of the stream.
        """
        size = len(data)
        position = self._owed
        if position >= size:
            self._owed = position - size
            return
        if self._header:
            # position is 0: no PDU is owed while its header is incomplete.
            missing = PDU_HEADER.size - len(self._header)
            if size < missing:
                self._header += data
                return
            self.lastType, _, length = PDU_HEADER.unpack(self._header + data[:missing])
            self._header = b""
            position = missing + length
        while position < size:
            if size - position < PDU_HEADER.size:
                self._header = data[position:]
                self._owed = 0
                return
            self.lastType, _, length = PDU_HEADER.unpack_from(data, position)
            position += PDU_HEADER.size + length
        self._owed = position - size


class NotAnAssociationRequest(Exception):
    """
    The bytes are not a well-formed A-ASSOCIATE-RQ.
    """


@dataclass(frozen=True)
class AssociationRequest:
    callingAET: str
    calledAET: str
    protocolVersion: int
    #: The SOP classes of its presentation contexts.
    abstractSyntaxes: FrozenSet[str] = frozenset()
    #: The SOP classes for which the requester asks to be the SCP only
    #: (role selection, PS3.7 D.3.3.4): those it receives, as with C-GET.
    receivedOnly: FrozenSet[str] = frozenset()

    @property
    def mayStore(self) -> bool:
        """
        Whether it proposes to send a storage SOP class, or one unknown to
        pynetdicom (private SOP classes are nearly always storage ones).
        """
        for uid in self.abstractSyntaxes - self.receivedOnly:
            service = uid_to_service_class(uid)
            if service is ServiceClass or issubclass(service, StorageServiceClass):
                return True
        return False


def _receivedOnly(request: A_ASSOCIATE_RQ) -> FrozenSet[str]:
    information = request.user_information
    roles = information.role_selection if information is not None else {}
    return frozenset(uid for uid, role in roles.items() if role.scp_role and not role.scu_role)


#: Where the AE titles lie in an A-ASSOCIATE-RQ (PS3.8 table 9-11): 16 bytes
#: each, padded with spaces.
CALLED_AE_FIELD = slice(10, 26)
CALLING_AE_FIELD = slice(26, 42)


def _aeTitle(pdu: bytes, field: slice) -> str:
    """
    An AE title as Orthanc reads it: without the spaces that pad it, but
    with any it starts with.  PS3.8 calls leading spaces non-significant,
    and pynetdicom drops them; Orthanc 1.10 does not, and refuses the title
    after the forwarder admitted it: compared as Orthanc compares, such a
    title is refused here, with the A-ASSOCIATE-RJ a modality understands.
    """
    return pdu[field].decode("latin-1").rstrip(" ")


def decodeAssociationRequest(pdu: bytes) -> AssociationRequest:
    """
    Decode one whole A-ASSOCIATE-RQ PDU, header included.

    @raise NotAnAssociationRequest: if it is malformed.
    """
    request = A_ASSOCIATE_RQ()
    try:
        request.decode(pdu)
        abstractSyntaxes = frozenset(str(context.abstract_syntax) for context in request.presentation_context)
        receivedOnly = _receivedOnly(request)
    except Exception as error:
        # pynetdicom raises whatever its parsers hit (struct.error, ValueError,
        # IndexError...) on malformed input: they all mean the same here.
        raise NotAnAssociationRequest(f"malformed A-ASSOCIATE-RQ ({error})") from error
    return AssociationRequest(
        callingAET=_aeTitle(pdu, CALLING_AE_FIELD),
        calledAET=_aeTitle(pdu, CALLED_AE_FIELD),
        protocolVersion=request.protocol_version,
        abstractSyntaxes=abstractSyntaxes,
        receivedOnly=receivedOnly,
    )
