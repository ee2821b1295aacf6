"""
Following the DIMSE messages of a relayed association, for the audit trail:
which instances a modality stores, what it queries, and what it retrieves.

L{MessageFollower} reads one direction's stream chunk by chunk as it is
relayed, without holding it up or copying it: it decodes the P-DATA-TF
PDUs' PDV headers (PS3.8 9.3.5), keeps each message's command set (tens of
bytes: PS3.7 section 9.3 says which fields) and, where its owner asks, the
first L{DATA_PREFIX} bytes of the message's data set (a C-STORE's patient
and study come before its pixels; a query's identifier is small), and
skips the rest by arithmetic.  From Orthanc's side it also keeps the
A-ASSOCIATE-AC, whose transfer syntaxes say how each context's data sets
are encoded.
"""

import warnings
import zlib
from dataclasses import dataclass
from io import BytesIO
from typing import Callable, Dict, Optional

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian
from pynetdicom.pdu import A_ASSOCIATE_AC
from twisted.logger import Logger

from appliance.dicom.pdu import PDU_HEADER

ASSOCIATE_AC_TYPE = 0x02
P_DATA_TYPE = 0x04

#: A PDV item's header: its length (4 bytes), its presentation context (1)
#: and its message control header (1: bit 0 command, bit 1 last fragment).
PDV_HEADER_SIZE = 6
COMMAND_BIT, LAST_BIT = 0x01, 0x02

#: The most of a command set kept (a command set is tens of bytes; one
#: this large is no DIMSE command, and following ends).
MAX_COMMAND = 64 * 1024
#: The most of a data set kept: a C-STORE's patient and study tags come
#: before it ends (groups 0008 to 0020), a query's identifier within it.
DATA_PREFIX = 64 * 1024
#: The most of an A-ASSOCIATE-AC kept (one holds a few contexts).
MAX_ACCEPT = 256 * 1024

#: The last tag of a stored instance the trail needs: Study Instance UID.
LAST_WANTED_TAG = Tag(0x0020, 0x000D)

#: CommandDataSetType when no data set follows the command.
NO_DATA_SET = 0x0101

_PDU_HEADER, _PDV_HEADER, _BODY = range(3)


@dataclass
class Message:
    """
    One DIMSE message: its presentation context, its command set and the
    fields of it that say what it is, and the start of its data set when
    one was asked for.
    """

    context: int
    command: Dataset
    field: int
    messageID: int
    #: A response's: the request it answers, and its status.
    answered: int
    status: int
    data: bytes = b""


def _number(command: Dataset, keyword: str, default: int) -> int:
    try:
        value = command.get(keyword, default)
        return default if value is None else int(value)
    except Exception:  # a value of another VR, or several: pydicom's errors vary
        raise FollowingEnded(f"a command set whose {keyword} is no number") from None


def commandText(dataset: Dataset, keyword: str) -> str:
    """
    A text value of a data set from a peer, or an empty string if it has
    none or one that cannot be read.
    """
    try:
        value = dataset.get(keyword, "")
        return "" if value is None else str(value)
    except Exception:  # decoded only now, from whatever the peer sent
        return ""


def decodeCommand(raw: bytes) -> Dataset:
    """
    A command set: always Implicit VR Little Endian (PS3.7 6.3.1).
    """
    with warnings.catch_warnings():
        # pydicom warns of what a broken command set lacks; the caller says it.
        warnings.simplefilter("ignore")
        return read_dataset(BytesIO(raw), is_implicit_VR=True, is_little_endian=True)


def decodeDataSetStart(prefix: bytes, transferSyntax: str) -> Dataset:
    """
    What the first bytes of a data set in C{transferSyntax} say, up to
    Study Instance UID (the prefix may end in the middle of a later
    element); an empty data set if they cannot be read.
    """
    if transferSyntax == DeflatedExplicitVRLittleEndian:
        prefix = zlib.decompressobj(-zlib.MAX_WBITS).decompress(prefix)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a prefix ends in the middle of the data set
            return read_dataset(
                BytesIO(prefix),
                is_implicit_VR=transferSyntax == ImplicitVRLittleEndian,
                is_little_endian=transferSyntax != ExplicitVRBigEndian,
                stop_when=lambda tag, vr, length: tag > LAST_WANTED_TAG,
            )
    except Exception:  # what a peer's bytes make pydicom raise varies
        return Dataset()


class FollowingEnded(Exception):
    """
    The stream is not what a DIMSE follower can read.
    """


class MessageFollower:
    """
    Follows one direction of a relayed association (see the module's
    docstring); C{received(message)} is called with each whole message, and
    C{wantsData(message)} (given the message whose command set just came)
    says whether its data set's start is kept.  A stream that is not
    DIMSE ends the following, not the relaying: C{ended} says why.
    """

    log = Logger()

    def __init__(self, received: Callable[[Message], None], wantsData: Callable[[Message], bool]) -> None:
        self._received = received
        self._wantsData = wantsData
        self._state = _PDU_HEADER
        self._header = bytearray()
        #: Bytes of the current P-DATA-TF PDU after the current PDV.
        self._pduLeft = 0
        #: Bytes of the current body (PDV fragment, or PDU kept or skipped).
        self._bodyLeft = 0
        self._bodyPDU = False
        self._keep: Optional[bytearray] = None
        self._keepLimit = 0
        self._fragmentContext = 0
        self._fragmentFlags = 0
        self._command = bytearray()
        self._data = bytearray()
        self._pending: Optional[Message] = None
        self._wantData = False
        self._acceptHeader = b""
        #: The A-ASSOCIATE-AC, whole, once it has come.
        self.accept: Optional[bytes] = None
        self.ended: Optional[str] = None

    def feed(self, data: bytes) -> None:
        if self.ended is not None:
            return
        try:
            self._feed(memoryview(data))
        except FollowingEnded as reason:
            self.ended = str(reason)
        except Exception:
            # Whatever a peer sends, the association is relayed as it was:
            # following it is the audit's business alone.
            self.log.failure("Stopped following an association's messages")
            self.ended = "an error (logged)"

    def _feed(self, data: memoryview) -> None:
        position, size = 0, len(data)
        while position < size:
            if self._state == _BODY:
                take = min(self._bodyLeft, size - position)
                if self._keep is not None and len(self._keep) < self._keepLimit:
                    self._keep += data[position : position + min(take, self._keepLimit - len(self._keep))]
                self._bodyLeft -= take
                position += take
                if self._bodyLeft == 0:
                    self._bodyEnded()
                continue
            wanted = (PDU_HEADER.size if self._state == _PDU_HEADER else PDV_HEADER_SIZE) - len(self._header)
            self._header += data[position : position + wanted]
            position += min(wanted, size - position)
            if len(self._header) == (PDU_HEADER.size if self._state == _PDU_HEADER else PDV_HEADER_SIZE):
                header, self._header = bytes(self._header), bytearray()
                self._pduHeader(header) if self._state == _PDU_HEADER else self._pdvHeader(header)

    def _body(self, length: int, keep: Optional[bytearray], limit: int, pdu: bool) -> None:
        self._state = _BODY
        self._bodyLeft = length
        self._keep = keep
        self._keepLimit = limit
        self._bodyPDU = pdu
        if length == 0:
            self._bodyEnded()

    def _pduHeader(self, header: bytes) -> None:
        pduType, _, length = PDU_HEADER.unpack(header)
        if pduType == P_DATA_TYPE:
            self._pduLeft = length
            self._state = _PDV_HEADER if length else _PDU_HEADER
        elif pduType == ASSOCIATE_AC_TYPE and self.accept is None:
            self._acceptHeader = header
            self._body(length, bytearray(), MAX_ACCEPT, pdu=True)
        else:
            self._body(length, None, 0, pdu=True)

    def _pdvHeader(self, header: bytes) -> None:
        length = int.from_bytes(header[:4], "big")
        if length < 2 or length + 4 > self._pduLeft:
            raise FollowingEnded("a PDV item longer than its PDU")
        self._pduLeft -= 4 + length
        self._fragmentContext, self._fragmentFlags = header[4], header[5]
        if self._fragmentFlags & COMMAND_BIT:
            self._body(length - 2, self._command, MAX_COMMAND + 1, pdu=False)
        else:
            self._body(length - 2, self._data if self._wantData else None, DATA_PREFIX, pdu=False)

    def _bodyEnded(self) -> None:
        if self._bodyPDU:
            if self._keep is not None and self.accept is None:
                self.accept = self._acceptHeader + bytes(self._keep)
            self._state = _PDU_HEADER
            return
        self._state = _PDV_HEADER if self._pduLeft else _PDU_HEADER
        if not self._fragmentFlags & LAST_BIT:
            return
        if self._fragmentFlags & COMMAND_BIT:
            if len(self._command) > MAX_COMMAND:
                raise FollowingEnded("a command set larger than any DIMSE command")
            try:
                command = decodeCommand(bytes(self._command))
            except Exception as error:  # pydicom's errors on a broken command set are many
                raise FollowingEnded(f"a command set that cannot be read ({error})")
            if "CommandField" not in command:
                raise FollowingEnded("a command set that names no command")
            self._command = bytearray()
            message = Message(
                self._fragmentContext,
                command,
                _number(command, "CommandField", 0),
                _number(command, "MessageID", 0),
                _number(command, "MessageIDBeingRespondedTo", 0),
                _number(command, "Status", 0),
            )
            if _number(command, "CommandDataSetType", NO_DATA_SET) == NO_DATA_SET:
                self._received(message)
            else:
                self._pending = message
                self._wantData = self._wantsData(message)
        elif self._pending is not None:
            message, self._pending = self._pending, None
            message.data = bytes(self._data)
            self._data = bytearray()
            self._wantData = False
            self._received(message)


def acceptedTransferSyntaxes(accept: bytes) -> Dict[int, str]:
    """
    The transfer syntax of each presentation context an A-ASSOCIATE-AC
    accepts.
    """
    pdu = A_ASSOCIATE_AC()
    pdu.decode(accept)
    return {
        item.context_id: str(item.transfer_syntax)
        for item in pdu.presentation_context
        if item.result == 0 and item.transfer_syntax is not None
    }
