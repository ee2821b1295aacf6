"""
What becomes an audit record, from where it happens: logins and logouts (the
authenticator and the single sign-on), DICOMweb searches, retrieves and
uploads under /pacs/ and /pacs-admin/pacs/, reads of Orthanc's
resources under /pacs-admin/ (each request's end, as the site logs it),
deletions, modifications and anonymisations under /pacs-admin/ (the
studies found before they are forwarded), and DICOM nodes refused at the
TLS port (the forwarder).

A retrieve names its study and the study's patient, which the URL does not
say: they are asked of Orthanc (once a study, then remembered), and one
record stands for a user's retrieves of a study from one address within
L{RETRIEVE_WINDOW} (a viewer opening a study makes hundreds of requests,
Orthanc Explorer a few for each of its pages).
"""

from collections import OrderedDict
from io import BytesIO
from typing import Dict, List, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.logger import Logger

from appliance.audit.messages import (
    MINOR_FAILURE,
    SUCCESS,
    Participant,
    Study,
    dicomQuery,
    instancesTransferred,
    nodeAuthenticationFailure,
    person,
    query,
    studiesChanged,
    userAuthentication,
)
from appliance.audit.trail import AuditTrail
from appliance.connections import clientKey
from appliance.deferreds import SharedOutcome
from appliance.paths import ADMIN_MOUNT, DICOMWEB_MOUNT

#: One record for a user's retrieves of one study from one address within
#: this many seconds.
RETRIEVE_WINDOW = 600.0

#: Studies whose patient is remembered, at most.
MAX_REMEMBERED_STUDIES = 10000

#: Orthanc's resources under /pacs-admin/, by their path's first segment,
#: and whether one is whole studies (a study, or a patient's studies) or
#: some of a study's instances.
RESOURCES = {b"patients": True, b"studies": True, b"series": False, b"instances": False}

#: What a POST to a resource's C{modify} or C{anonymize} does, as an
#: audit event's action: update it, or create an anonymised copy of it.
CHANGES = {b"modify": "U", b"anonymize": "C"}

#: The most of a query's body an audit record holds.
MAX_QUERY_BODY = 64 * 1024

#: Orthanc's DICOMweb root (as the appliance renders it), under /pacs-admin/.
ADMIN_DICOMWEB = DICOMWEB_MOUNT.encode("ascii")

#: The resource levels a DICOMweb search ends with.
SEARCH_LEVELS = (b"studies", b"series", b"instances")

#: What Orthanc's /tools/find is asked as: the appliance's own share of turns.
AUDIT_ACCOUNT = "pacs-appliance:audit"


def _host(client) -> str:
    return getattr(client, "host", None) or clientKey(client)


def dicomwebKind(method: bytes, segments: Sequence[bytes]) -> Tuple[Optional[str], Optional[str]]:
    """
    What a DICOMweb request to C{segments} (below its root) is for the
    trail: C{("query", None)}, a retrieve of a study C{("retrieve", uid)},
    an upload C{("store", uid or None)}, or C{(None, None)}.
    """
    if method == b"POST" and segments[:1] == [b"studies"] and len(segments) <= 2:
        return "store", segments[1].decode("ascii", "replace") if len(segments) == 2 else None
    if method not in (b"GET", b"HEAD"):
        return None, None
    if segments and segments[-1] in SEARCH_LEVELS and len(segments) % 2 == 1:
        return "query", None
    if segments[:1] == [b"studies"] and len(segments) >= 2:
        return "retrieve", segments[1].decode("ascii", "replace")
    return None, None


def requestKind(method: bytes, path: bytes) -> Tuple[Optional[str], Optional[str]]:
    """
    What a request to C{path} is for the trail: a DICOMweb request's kind
    (L{dicomwebKind}); under /pacs-admin/, a list of Orthanc's resources or
    its C{/tools/find} (queries), or a read of one of its resources
    (C{("read", "LEVEL/ID")}); or C{(None, None)}.
    """
    segments = [segment for segment in path.split(b"/") if segment]
    if segments[:1] == [DICOMWEB_MOUNT.encode("ascii")]:
        return dicomwebKind(method, segments[1:])
    if segments[:1] != [ADMIN_MOUNT.encode("ascii")]:
        return None, None
    rest = segments[1:]
    if rest[:1] == [ADMIN_DICOMWEB]:
        return dicomwebKind(method, rest[1:])
    if method == b"POST" and rest == [b"tools", b"find"]:
        return "query", None
    if method in (b"GET", b"HEAD") and rest[:1] and rest[0] in RESOURCES:
        if len(rest) == 1:
            # A list of studies or patients (?expand gives their patients).
            return "query", None
        return "read", b"/".join(rest[:2]).decode("ascii", "replace")
    return None, None


class AuditEvents:
    """
    Turns what happens into records of C{trail}; C{studies} looks up a
    study's description and patient (L{OrthancStudies}).
    """

    log = Logger()

    def __init__(self, trail: AuditTrail, studies: "OrthancStudies", clock) -> None:
        self._trail = trail
        self._source = trail.source
        self._studies = studies
        self._clock = clock
        self._retrieves: "OrderedDict[Tuple[str, str, str], float]" = OrderedDict()

    # --- logging in and out --------------------------------------------------

    def loggedIn(self, label: str, name: str, client) -> None:
        self._trail.record(userAuthentication(self._source, self._clock.seconds(), person(label, name, _host(client))))

    def loginRefused(self, name: str, client, reason: str) -> None:
        self._trail.record(
            userAuthentication(self._source, self._clock.seconds(), person(name, name, _host(client)), failure=reason)
        )

    def loggedOut(self, label: str, name: str, client) -> None:
        self._trail.record(
            userAuthentication(self._source, self._clock.seconds(), person(label, name, _host(client)), logout=True)
        )

    # --- the DICOM port -------------------------------------------------------

    def nodeRefused(self, address: str, callingAET: str, why: str) -> None:
        self._trail.record(nodeAuthenticationFailure(self._source, self._clock.seconds(), address, callingAET, why))

    def dicomQueried(self, requestor: Participant, sopClass: str, identifier: bytes, transferSyntax: str) -> None:
        self._trail.record(dicomQuery(self._source, self._clock.seconds(), requestor, sopClass, identifier, transferSyntax))

    def dicomStored(self, sender: Participant, studies: Sequence[Tuple[Study, int, int]]) -> None:
        """
        What an association stored: each study, with how many of its
        instances Orthanc kept and refused.
        """
        stored = sum(count for _, count, _ in studies)
        refused = sum(count for _, _, count in studies)
        outcome = MINOR_FAILURE if refused else SUCCESS
        description = f"{refused} of {stored + refused} instances refused" if refused else None
        self._trail.record(
            instancesTransferred(
                self._source, self._clock.seconds(), sender, [study for study, _, _ in studies], True, outcome,
                description=description,
            )
        )

    def dicomRetrieved(
        self, requestor: Participant, destination: Participant, uids: Sequence[str], patientID: str, outcome: int,
        why: Optional[str],
    ) -> None:
        """
        A C-MOVE or C-GET has ended: its studies (their patient asked of
        Orthanc), or the patient it asked for.
        """
        when = self._clock.seconds()
        looking = gatherResults([self._studies.study(uid) for uid in uids], consumeErrors=True)

        def found(studies: List[Study]) -> None:
            named = studies or [Study("", patientID=patientID, patientName=patientID)]
            self._trail.record(
                instancesTransferred(self._source, when, requestor, named, False, outcome, destination, why)
            )

        looking.addCallback(found)
        looking.addErrback(lambda failure: self.log.failure("Could not write an audit record of a retrieve", failure))

    # --- DICOMweb -------------------------------------------------------------

    def beforeChange(self, method: bytes, segments: Sequence[bytes]) -> Optional[Deferred]:
        """
        If C{method} on C{segments} (of a path under /pacs-admin/) deletes,
        modifies or anonymises one of Orthanc's resources, find the studies
        it holds before it changes; the Deferred fires with what
        L{requestEnded} needs to know of it (or L{None} if Orthanc cannot
        say), never fails.
        """
        if len(segments) < 2 or segments[0] not in RESOURCES:
            return None
        if method == b"DELETE" and len(segments) == 2:
            action = "D"
        elif method == b"POST" and len(segments) == 3 and segments[2] in CHANGES:
            action = CHANGES[segments[2]]
        else:
            return None
        level, resource = segments[0], segments[1].decode("ascii", "replace")
        finding = self._studies.holding(level.decode("ascii"), resource)
        return finding.addCallback(lambda studies: (action, RESOURCES[level], studies))

    def beforeForwarding(self, request, segments: Sequence[bytes]) -> None:
        """
        Keep the keys of a query whose body holds them (Orthanc's
        C{/tools/find} under /pacs-admin/, C{segments}) before the body is
        forwarded: bodies of a query's size are kept in memory, and the
        forwarding closes them.
        """
        content = getattr(request, "content", None)
        if request.method == b"POST" and list(segments) == [b"tools", b"find"] and isinstance(content, BytesIO):
            request.auditedQuery = content.getvalue()[:MAX_QUERY_BODY]

    def requestEnded(self, request) -> None:
        """
        A request has been answered: a search, a retrieve or an upload
        under /pacs/ or /pacs-admin/pacs/, or a read of a resource
        under /pacs-admin/, becomes a record (the upload names the studies
        its answer lists), and so does a change under /pacs-admin/ (the
        studies found before it, L{beforeChange}).
        """
        account = getattr(request, "account", None)
        if account is None:
            return
        now = self._clock.seconds()
        user = person(account.label, account.name, _host(request.getClientAddress()))
        outcome = SUCCESS if request.code < 400 else MINOR_FAILURE
        change = getattr(request, "auditedChange", None)
        if change is not None:
            action, whole, studies = change
            self._trail.record(studiesChanged(self._source, now, user, studies, action, whole, outcome))
            return
        kind, subject = requestKind(request.method, request.path)
        if kind == "query":
            # The query string, else the keys in the body; a query without
            # keys (all of a level) is its path, as the record needs one.
            asked = request.uri.partition(b"?")[2] or getattr(request, "auditedQuery", b"") or request.path
            self._trail.record(query(self._source, now, user, request.path.decode("latin-1"), asked, outcome))
        elif kind == "retrieve" and subject and request.code < 400:
            if self._firstRetrieve(account.label, subject, user, now):
                self._withStudies([subject], user, stored=False, outcome=outcome, when=now)
        elif kind == "read" and request.code < 400:
            level, resource = subject.split("/")
            self._studies.holding(level, resource).addCallback(self._read, account.label, user, now)
        elif kind == "store":
            # The studies the answer lists (STOW-RS names them in its
            # Retrieve URLs), else the one of the path, if any.
            uids = list(getattr(request, "storedStudies", ()) or ([subject] if subject else []))
            self._withStudies(uids, user, stored=True, outcome=outcome, when=now)

    def _firstRetrieve(self, label: str, studyUID: str, user: Participant, now: float) -> bool:
        """
        Whether this retrieve of a study is the first of its user, from its
        address, within L{RETRIEVE_WINDOW}.
        """
        key = (label, studyUID, user.networkAccessPoint or "")
        last = self._retrieves.get(key)
        if last is not None and now - last < RETRIEVE_WINDOW:
            return False
        self._retrieves[key] = now
        self._retrieves.move_to_end(key)
        while len(self._retrieves) > MAX_REMEMBERED_STUDIES:
            self._retrieves.popitem(last=False)
        return True

    def _read(self, studies: List[Study], label: str, user: Participant, now: float) -> None:
        first = [study for study in studies if self._firstRetrieve(label, study.uid, user, now)]
        if first:
            self._trail.record(instancesTransferred(self._source, now, user, first, False, SUCCESS))

    def _withStudies(self, uids: Sequence[str], user: Participant, stored: bool, outcome: int, when: float) -> None:
        looking = gatherResults([self._studies.study(uid) for uid in uids], consumeErrors=True)

        def found(studies: List[Study]) -> None:
            self._trail.record(instancesTransferred(self._source, when, user, studies, stored, outcome))

        looking.addCallback(found)
        looking.addErrback(lambda failure: self.log.failure("Could not write an audit record of a transfer", failure))


class OrthancStudies:
    """
    A study's description and patient, asked of Orthanc's REST API
    (C{/tools/find}) and remembered; a study Orthanc cannot say (yet, or
    at all) is named by its UID alone.
    """

    log = Logger()

    def __init__(self, rest) -> None:
        self._rest = rest
        self._known: "OrderedDict[str, Study]" = OrderedDict()
        self._asking: Dict[str, SharedOutcome] = {}

    def study(self, uid: str) -> "Deferred[Study]":
        known = self._known.get(uid)
        if known is not None:
            return succeed(known)
        # Records of one study made together (a viewer's first requests)
        # share one question to Orthanc.
        asking = self._asking.get(uid)
        if asking is None:
            lookup = self._ask(uid)
            asking = self._asking[uid] = SharedOutcome(lookup)
            lookup.addBoth(lambda ignored: self._asking.pop(uid, None))
        return asking.follow()

    def _ask(self, uid: str) -> "Deferred[Study]":
        asking = self._rest.json(b"/tools/find", AUDIT_ACCOUNT, {"Level": "Study", "Query": {"StudyInstanceUID": uid}, "Expand": True})

        def answered(found: list) -> Study:
            if not found:
                return Study(uid)
            study = _studyOf(uid, found[0])
            self._known[uid] = study
            while len(self._known) > MAX_REMEMBERED_STUDIES:
                self._known.popitem(last=False)
            return study

        def unknown(failure) -> Study:
            self.log.warn(
                "Could not ask Orthanc about study {uid} for its audit record: {error}", uid=uid, error=failure.getErrorMessage()
            )
            return Study(uid)

        return asking.addCallbacks(answered, unknown)

    def holding(self, level: str, resource: str) -> "Deferred[List[Study]]":
        """
        The studies Orthanc's C{level} resource (its Orthanc id) is or is
        in; none if Orthanc cannot say.
        """
        looking = self._holding(level, resource)

        def unknown(failure) -> List[Study]:
            self.log.warn(
                "Could not ask Orthanc what {level} {resource} holds for its audit record: {error}",
                level=level,
                resource=resource,
                error=failure.getErrorMessage(),
            )
            return []

        return looking.addErrback(unknown)

    @inlineCallbacks
    def _holding(self, level: str, resource: str):
        found = yield self._rest.json(f"/{level}/{resource}".encode("ascii", "replace"), AUDIT_ACCOUNT)
        if level == "patients":
            studies = []
            for study in found.get("Studies", []):
                answer = yield self._rest.json(f"/studies/{study}".encode("ascii", "replace"), AUDIT_ACCOUNT)
                studies.append(_studyOf(answer.get("MainDicomTags", {}).get("StudyInstanceUID", study), answer))
            return studies
        while level != "studies":
            level, resource = ("series", found["ParentSeries"]) if level == "instances" else ("studies", found["ParentStudy"])
            found = yield self._rest.json(f"/{level}/{resource}".encode("ascii", "replace"), AUDIT_ACCOUNT)
        return [_studyOf(found.get("MainDicomTags", {}).get("StudyInstanceUID", resource), found)]


def _studyOf(uid: str, found: Dict) -> Study:
    tags = found.get("MainDicomTags", {})
    patient = found.get("PatientMainDicomTags", {})
    return Study(uid, tags.get("StudyDescription", ""), patient.get("PatientID", ""), patient.get("PatientName", ""))
