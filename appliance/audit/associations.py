"""
What an accepted DICOM association does, for the audit trail: the
forwarder relays its PDUs untouched, and two L{MessageFollower}s read them
on the way (appliance.dicom.dimse).

- C-STORE: the instances a modality stores, by study (patient and study
  from the start of each data set), and those Orthanc refused (its
  C-STORE-RSP statuses): one record for the association's stores when it
  ends (DICOM Instances Transferred, action C).
- C-FIND: one record each (Query), with its identifier.
- C-MOVE and C-GET: one record each when its final response comes (DICOM
  Instances Transferred, action R), naming the studies it asked for and
  where they went, with its outcome.
"""

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from twisted.logger import Logger

from appliance.audit.messages import MINOR_FAILURE, SUCCESS, Participant, Study
from appliance.dicom.dimse import (
    Message,
    MessageFollower,
    acceptedTransferSyntaxes,
    commandText,
    decodeDataSetStart,
)

C_STORE, C_GET, C_FIND, C_MOVE = 0x0001, 0x0010, 0x0020, 0x0021
RESPONSE = 0x8000

#: The statuses of a response that says more are to come (PS3.7 C).
PENDING = frozenset({0xFF00, 0xFF01})
#: The statuses of a C-STORE-RSP whose instance was stored: success, and
#: the warnings (coerced, elements discarded, does not match the SOP class).
STORED = frozenset({0x0000, 0xB000, 0xB006, 0xB007})

#: Requests remembered until their response, at most (a peer that never
#: waits for answers cannot grow this without bound).
MAX_OUTSTANDING = 10000


@dataclass
class StoredStudy:
    study: Study
    stored: int = 0
    refused: int = 0


@dataclass
class Retrieve:
    #: C-MOVE's destination, or the requestor for C-GET.
    destination: Participant
    studies: List[str] = field(default_factory=list)
    patientID: str = ""


class AssociationAudit:
    """
    Follows one association (see the module's docstring) for C{events}
    (L{appliance.audit.events.AuditEvents}); C{node} is the peer;
    C{destination(aet)} the participant a C-MOVE sends to.
    """

    log = Logger()

    def __init__(self, events, node: Participant, destination: Callable[[str], Participant]) -> None:
        self._events = events
        self._node = node
        self._destination = destination
        self.requests = MessageFollower(self._request, self._wantsData)
        self.responses = MessageFollower(self._response, lambda message: False)
        self._syntaxes: Optional[Dict[int, str]] = None
        self._stores: "OrderedDict[int, str]" = OrderedDict()
        self._stored: Dict[str, StoredStudy] = {}
        self._retrieves: "OrderedDict[int, Retrieve]" = OrderedDict()

    def _syntax(self, context: int) -> Optional[str]:
        if self._syntaxes is None and self.responses.accept is not None:
            try:
                self._syntaxes = acceptedTransferSyntaxes(self.responses.accept)
            except Exception as error:  # a broken AC: Orthanc's, so unlikely
                self.log.warn("Could not read Orthanc's A-ASSOCIATE-AC for the audit trail: {error}", error=error)
                self._syntaxes = {}
        return (self._syntaxes or {}).get(context)

    def _wantsData(self, message: Message) -> bool:
        return message.field in (C_STORE, C_FIND, C_MOVE, C_GET)

    def _identifier(self, message: Message):
        syntax = self._syntax(message.context)
        return decodeDataSetStart(message.data, syntax) if syntax else None

    @staticmethod
    def _remember(table: OrderedDict, key: int, value) -> None:
        table[key] = value
        while len(table) > MAX_OUTSTANDING:
            table.popitem(last=False)

    def _request(self, message: Message) -> None:
        messageID = message.messageID
        if message.field == C_STORE:
            dataset = self._identifier(message)
            uid = commandText(dataset, "StudyInstanceUID") if dataset is not None else ""
            if uid not in self._stored:
                self._stored[uid] = StoredStudy(
                    Study(uid, commandText(dataset, "StudyDescription"), commandText(dataset, "PatientID"), commandText(dataset, "PatientName"))
                    if dataset is not None
                    else Study(uid)
                )
            self._stored[uid].stored += 1
            self._remember(self._stores, messageID, uid)
        elif message.field == C_FIND:
            sopClass = commandText(message.command, "AffectedSOPClassUID")
            self._events.dicomQueried(self._node, sopClass, message.data, self._syntax(message.context) or "")
        elif message.field in (C_MOVE, C_GET):
            dataset = self._identifier(message)
            if message.field == C_MOVE:
                destination = self._destination(commandText(message.command, "MoveDestination").strip())
            else:
                destination = self._node
            retrieve = Retrieve(destination)
            if dataset is not None:
                retrieve.studies = [uid for uid in commandText(dataset, "StudyInstanceUID").split("\\") if uid]
                retrieve.patientID = commandText(dataset, "PatientID")
            self._remember(self._retrieves, messageID, retrieve)

    def _response(self, message: Message) -> None:
        answered, status = message.answered, message.status
        if message.field == C_STORE | RESPONSE:
            uid = self._stores.pop(answered, None)
            if uid is not None and status not in STORED:
                self._stored[uid].stored -= 1
                self._stored[uid].refused += 1
        elif message.field in (C_MOVE | RESPONSE, C_GET | RESPONSE) and status not in PENDING:
            retrieve = self._retrieves.pop(answered, None)
            if retrieve is not None:
                outcome = SUCCESS if status == 0x0000 else MINOR_FAILURE
                self._retrieved(retrieve, outcome, None if outcome == SUCCESS else f"status 0x{status:04X}")

    def _retrieved(self, retrieve: Retrieve, outcome: int, why: Optional[str]) -> None:
        self._events.dicomRetrieved(self._node, retrieve.destination, retrieve.studies, retrieve.patientID, outcome, why)

    def ended(self) -> None:
        """
        The association's connection has ended: its stores become one
        record, and retrieves that never finished theirs.
        """
        for problem in {self.requests.ended, self.responses.ended} - {None}:
            self.log.warn("The audit trail stopped following an association's messages: {problem}", problem=problem)
        if self._stored:
            stores: List[Tuple[Study, int, int]] = [(s.study, s.stored, s.refused) for s in self._stored.values()]
            self._events.dicomStored(self._node, stores)
        for retrieve in self._retrieves.values():
            self._retrieved(retrieve, MINOR_FAILURE, "the association ended before the retrieve finished")
