"""
What becomes an audit record, from where it happens: logins and logouts (the
authenticator and the single sign-on), DICOMweb searches, retrieves and
uploads (each request's end, as the site logs it), and DICOM nodes refused
at the TLS port (the forwarder).

A retrieve names its study and the study's patient, which the URL does not
say: they are asked of Orthanc (once a study, then remembered), and one
record stands for a user's retrieves of a study from one address within
L{RETRIEVE_WINDOW} (a viewer opening a study makes hundreds of requests).
"""

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.logger import Logger

from appliance.audit.messages import (
    MINOR_FAILURE,
    SUCCESS,
    Participant,
    Study,
    deleted,
    instancesTransferred,
    nodeAuthenticationFailure,
    person,
    query,
    userAuthentication,
)
from appliance.audit.trail import AuditTrail
from appliance.connections import clientKey
from appliance.paths import DICOMWEB_MOUNT

#: One record for a user's retrieves of one study from one address within
#: this many seconds.
RETRIEVE_WINDOW = 600.0

#: Studies whose patient is remembered, at most.
MAX_REMEMBERED_STUDIES = 10000

#: What an administrator deletes under /pacs-admin/, by Orthanc's path: a
#: whole study (or a patient's studies), or some of a study's instances.
DELETABLE = {b"patients": True, b"studies": True, b"series": False, b"instances": False}

#: The resource levels a DICOMweb search ends with.
SEARCH_LEVELS = (b"studies", b"series", b"instances")

#: What Orthanc's /tools/find is asked as: the appliance's own share of turns.
AUDIT_ACCOUNT = "pacs-appliance:audit"


def _host(client) -> str:
    return getattr(client, "host", None) or clientKey(client)


def dicomwebKind(method: bytes, path: bytes) -> Tuple[Optional[str], Optional[str]]:
    """
    What a request to C{path} is for the trail: C{("query", None)}, a
    retrieve of a study C{("retrieve", uid)}, an upload C{("store", uid or
    None)}, or C{(None, None)}.
    """
    segments = [segment for segment in path.split(b"/") if segment]
    if segments[:1] != [DICOMWEB_MOUNT.encode("ascii")]:
        return None, None
    rest = segments[1:]
    if method == b"POST" and rest[:1] == [b"studies"] and len(rest) <= 2:
        return "store", rest[1].decode("ascii", "replace") if len(rest) == 2 else None
    if method not in (b"GET", b"HEAD"):
        return None, None
    if rest and rest[-1] in SEARCH_LEVELS and len(rest) % 2 == 1:
        return "query", None
    if rest[:1] == [b"studies"] and len(rest) >= 2:
        return "retrieve", rest[1].decode("ascii", "replace")
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

    # --- DICOMweb -------------------------------------------------------------

    def beforeDeletion(self, segments: Sequence[bytes]) -> Optional[Deferred]:
        """
        If C{segments} (of a path under /pacs-admin/) name something an
        administrator deletes, find the studies it holds before it goes;
        the Deferred fires with what L{requestEnded} needs to know of it
        (or L{None} if Orthanc cannot say), never fails.
        """
        if len(segments) != 2 or segments[0] not in DELETABLE:
            return None
        level, resource = segments[0], segments[1].decode("ascii", "replace")
        finding = self._studies.holding(level.decode("ascii"), resource)
        return finding.addCallback(lambda studies: (DELETABLE[level], studies))

    def requestEnded(self, request) -> None:
        """
        A request has been answered: a search, a retrieve or an upload
        under /pacs/ becomes a record (the upload names the studies its
        answer lists), and so does a deletion under /pacs-admin/ (the
        studies found before it, L{beforeDeletion}).
        """
        account = getattr(request, "account", None)
        if account is None:
            return
        deletion = getattr(request, "auditedDeletion", None)
        if deletion is not None:
            whole, studies = deletion
            user = person(account.label, account.name, _host(request.getClientAddress()))
            outcome = SUCCESS if request.code < 400 else MINOR_FAILURE
            self._trail.record(deleted(self._source, self._clock.seconds(), user, studies, whole, outcome))
            return
        kind, studyUID = dicomwebKind(request.method, request.path)
        if kind is None:
            return
        now = self._clock.seconds()
        user = person(account.label, account.name, _host(request.getClientAddress()))
        outcome = SUCCESS if request.code < 400 else MINOR_FAILURE
        if kind == "query":
            queryString = request.uri.partition(b"?")[2]
            self._trail.record(query(self._source, now, user, request.path.decode("latin-1"), queryString, outcome))
        elif kind == "retrieve" and studyUID and request.code < 400:
            key = (account.label, studyUID, user.networkAccessPoint or "")
            last = self._retrieves.get(key)
            if last is not None and now - last < RETRIEVE_WINDOW:
                return
            self._retrieves[key] = now
            self._retrieves.move_to_end(key)
            while len(self._retrieves) > MAX_REMEMBERED_STUDIES:
                self._retrieves.popitem(last=False)
            self._withStudies([studyUID], user, stored=False, outcome=outcome, when=now)
        elif kind == "store":
            # The studies the answer lists (STOW-RS names them in its
            # Retrieve URLs), else the one of the path, if any.
            uids = list(getattr(request, "storedStudies", ()) or ([studyUID] if studyUID else []))
            self._withStudies(uids, user, stored=True, outcome=outcome, when=now)

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

    def study(self, uid: str) -> "Deferred[Study]":
        known = self._known.get(uid)
        if known is not None:
            return succeed(known)
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
