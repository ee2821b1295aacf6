"""
The study and series metadata that OHIF asks for to open a study
(C{/pacs/studies/S/metadata}, C{/pacs/studies/S/series/s/metadata}),
answered from a cache: Orthanc's DICOMweb plugin builds it by reading every
instance's whole file, pixel data included (0.27-0.36 s for a warm
600-instance series here, 0.87 s cold, seconds on a spinning disk).

    Orthanc /changes ── StableSeries, StableStudy ──▶ MetadataCache: one build at a time
                                                      │ facts, metadata, facts again: equal?
                                                      ▼
                state database: metadata_cache (gzip; URLs under a placeholder origin)
                                                      │
    GET /pacs/.../metadata ──▶ facts from Orthanc's index (one or two finds)
                                 equal to the entry's: the entry, with the request's origin
                                 anything else: Orthanc answers (as if there were no cache)

The I{facts} of a series are what Orthanc's index says of it without reading
a file: its instances and its last update (a study's: all its instances, and
its last update).  A deletion is not in C{/changes}, and the last update of
a series does not change when an instance is deleted, but its instances do;
an instance deleted and stored again changes the last update.  So an entry
is answered only while the index still says what it said when the entry was
built, and a series still being received is never answered from the cache:
its facts change with each instance, and builds wait for Orthanc to call it
stable ([orthanc] stable_age) and check the facts before and after.

Entries live in the state database: a single box's SQLite file, a cluster's
PostgreSQL, so that each node answers from what any node built.  Each node
follows its own Orthanc's C{/changes} (from where it stopped; from the
newest change the first time) and builds what a request found missing; the
oldest entries go when the cache is over [web] metadata_cache_size.
"""

import gzip
import hashlib
import re
from collections import deque
from dataclasses import dataclass
from functools import partial
from io import BytesIO
from typing import Deque, Iterable, Optional, Set, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.protocols.basic import FileSender
from twisted.logger import Logger
from twisted.web import http
from twisted.web.server import NOT_DONE_YET, Request

from appliance.paths import DICOMWEB_ROOT
from appliance.state.database import DatabaseUnavailable, StateDatabase, Statements
from appliance.web.bodies import AnswerTooLarge
from appliance.web.orthancrest import OrthancRest, OrthancUnavailable
from appliance.web.proxy import GZIP_LEVEL, SANDBOXED
from appliance.web.proxyheaders import addVary, publicHost
from appliance.web.static import acceptedValues

#: The origin the cached answers are built for: Orthanc writes it into
#: every URL of an answer (RetrieveURL, BulkDataURI), and each answer from
#: the cache puts the request's own origin there instead.  A reserved name
#: (RFC 2606): no request can bring it.
PLACEHOLDER_HOST = b"metadata-cache.invalid"
PLACEHOLDER_ORIGIN = b"https://" + PLACEHOLDER_HOST

#: Whose turns the cache's own requests to Orthanc take (see
#: L{appliance.web.turns}): at most an account's share, after the others.
ACCOUNT = "(metadata cache)"

#: A DICOM UID (PS3.5 9.1); anything else in a path is left to Orthanc (a
#: wildcard would make a find match other studies).
UID = re.compile(rb"[0-9]+(?:\.[0-9]+)*")
MAX_UID = 64

#: How often each node reads Orthanc's /changes, and how many at a time.
CHANGES_INTERVAL = 2.0
CHANGES_LIMIT = 1000

#: The largest answer cached (uncompressed): a study of about 40 000
#: instances.  A larger one is answered by Orthanc each time.
MAX_ENTRY = 128 * 1024 * 1024

#: How many builds a node keeps waiting (those asked for by requests).
MAX_WAITING = 1000

#: The answers to a DICOMweb client that the cache can give: DICOM JSON.
_JSON_TYPES = (b"application/dicom+json", b"application/json", b"application/*", b"*/*")


@dataclass(frozen=True)
class MetadataKey:
    """
    A study's metadata (C{series} is L{None}) or a series' metadata.
    """

    study: bytes
    series: Optional[bytes] = None

    @classmethod
    def fromSegments(cls, segments: Tuple[bytes, ...]) -> Optional["MetadataKey"]:
        """
        The key of a path under the DICOMweb root (its segments), if it is
        one of the two metadata resources named by valid UIDs.
        """
        if len(segments) == 3 and segments[0] == b"studies" and segments[2] == b"metadata":
            key = cls(segments[1])
        elif (
            len(segments) == 5
            and segments[0] == b"studies"
            and segments[2] == b"series"
            and segments[4] == b"metadata"
        ):
            key = cls(segments[1], segments[3])
        else:
            return None
        uids = (key.study,) if key.series is None else (key.study, key.series)
        if all(len(uid) <= MAX_UID and UID.fullmatch(uid) for uid in uids):
            return key
        return None

    @property
    def resource(self) -> str:
        """
        The key of its entry.
        """
        study = self.study.decode("ascii")
        return study if self.series is None else study + "/" + self.series.decode("ascii")

    @property
    def path(self) -> bytes:
        """
        Its path on Orthanc.
        """
        path = DICOMWEB_ROOT.encode("ascii") + b"studies/" + self.study
        if self.series is not None:
            path += b"/series/" + self.series
        return path + b"/metadata"


@dataclass(frozen=True)
class Facts:
    """
    What Orthanc's index says of a study or series: whether Orthanc calls
    it stable, and a digest of its instances and last update.
    """

    stable: bool
    fingerprint: str


def fingerprint(lastUpdate: str, instances: Iterable[str]) -> str:
    digest = hashlib.sha256(lastUpdate.encode("utf-8"))
    for instance in sorted(instances):
        digest.update(b"\n" + instance.encode("ascii"))
    return digest.hexdigest()


# --- the table ---------------------------------------------------------------


def readEntry(statements: Statements, resource: str) -> Optional[Tuple[str, bytes]]:
    row = statements.row("SELECT fingerprint, body FROM metadata_cache WHERE resource = ?", (resource,))
    return None if row is None else (row[0], bytes(row[1]))


def readFingerprint(statements: Statements, resource: str) -> Optional[str]:
    row = statements.row("SELECT fingerprint FROM metadata_cache WHERE resource = ?", (resource,))
    return None if row is None else row[0]


def writeEntry(statements: Statements, resource: str, facts: str, body: bytes, limit: int) -> int:
    """
    Keep C{body} for C{resource}, then remove the oldest entries while the
    cache holds more than C{limit} bytes; how many were removed.
    """
    statements.execute(
        f"INSERT INTO metadata_cache (resource, fingerprint, size, built, body) VALUES (?, ?, ?, {statements.dialect.now}, ?)"
        " ON CONFLICT (resource) DO UPDATE SET fingerprint = excluded.fingerprint, size = excluded.size,"
        " built = excluded.built, body = excluded.body",
        (resource, facts, len(body), body),
    )
    total = statements.row("SELECT COALESCE(SUM(size), 0) FROM metadata_cache")[0]
    removed = []
    if total > limit:
        for oldest, size in statements.rows("SELECT resource, size FROM metadata_cache ORDER BY built, resource"):
            if total <= limit:
                break
            removed.append(oldest)
            total -= size
        for oldest in removed:
            statements.execute("DELETE FROM metadata_cache WHERE resource = ?", (oldest,))
    return len(removed)


def dropEntry(statements: Statements, resource: str, facts: str) -> int:
    """
    Remove C{resource}'s entry if it was built from C{facts} (not if another
    node has just built a newer one).
    """
    return statements.execute("DELETE FROM metadata_cache WHERE resource = ? AND fingerprint = ?", (resource, facts))


def readChangesRead(statements: Statements, node: str) -> Optional[int]:
    row = statements.row("SELECT seq FROM metadata_changes_read WHERE node = ?", (node,))
    return None if row is None else int(row[0])


def writeChangesRead(statements: Statements, node: str, seq: int) -> None:
    statements.execute(
        "INSERT INTO metadata_changes_read (node, seq) VALUES (?, ?)"
        " ON CONFLICT (node) DO UPDATE SET seq = excluded.seq",
        (node, seq),
    )


# --- answers -----------------------------------------------------------------


def acceptsCachedType(request: Request) -> bool:
    """
    Whether C{request} accepts DICOM JSON (the XML and multipart forms are
    Orthanc's to give).
    """
    accept = request.getHeader(b"Accept")
    if not accept:
        return True
    accepted = acceptedValues(accept)
    return any(accepted.get(mediaRange, 0.0) > 0 for mediaRange in _JSON_TYPES)


def acceptsGzip(request: Request) -> bool:
    accepted = acceptedValues(request.getHeader(b"Accept-Encoding"))
    return accepted.get(b"gzip", accepted.get(b"*", 0.0)) > 0


def render(stored: bytes, origin: bytes, compress: bool) -> bytes:
    """
    A cached answer with C{origin} in its URLs, gzip-compressed or not.
    """
    document = gzip.decompress(stored)
    document = document.replace(b'"' + PLACEHOLDER_ORIGIN + b"/", b'"' + origin + b"/")
    return compressed(document) if compress else document


def compressed(document: bytes) -> bytes:
    return gzip.compress(document, GZIP_LEVEL, mtime=0)


class MetadataCache(Service):
    """
    Answers the metadata resources from the cache when Orthanc's index
    allows it, and builds the cache's entries: see the module's docstring.

    @param rest: Orthanc's REST API.
    @param limit: the cache's size, in bytes (compressed).
    @param node: this node's name (where it is in Orthanc's /changes is kept
        under it).
    @param runInThread: runs a function in a thread and returns a Deferred
        of its result (default: the reactor's thread pool).
    """

    log = Logger()

    def __init__(
        self, rest: OrthancRest, database: StateDatabase, limit: int, node: str, reactor, runInThread=None
    ) -> None:
        if runInThread is None:
            runInThread = partial(deferToThreadPool, reactor, reactor.getThreadPool())
        self._runInThread = runInThread
        self._rest = rest
        self._database = database
        self._limit = limit
        self._node = node
        #: The last change of Orthanc's /changes read, once known.
        self._changesRead: Optional[int] = None
        #: Why the changes could not be read, once the journal has been told.
        self._changesProblem: Optional[str] = None
        self._following = LoopingCall(self._followChanges)
        self._following.clock = reactor
        #: Builds asked for by requests, and by the changes being read.
        self._waiting: Deque[MetadataKey] = deque()
        self._waitingKeys: Set[MetadataKey] = set()
        self._building: Optional[Deferred] = None
        #: The requests answered from the cache, and those it left to Orthanc.
        self.hits = 0
        self.misses = 0

    def startService(self) -> None:
        Service.startService(self)
        self._following.start(CHANGES_INTERVAL, now=True).addErrback(
            lambda failure: self.log.failure("Stopped following Orthanc's changes for the metadata cache", failure)
        )

    def stopService(self) -> None:
        Service.stopService(self)
        if self._following.running:
            self._following.stop()
        self._waiting.clear()
        self._waitingKeys.clear()
        if self._building is not None:
            self._building.cancel()

    # --- answering ------------------------------------------------------------

    def answer(self, request: Request, key: MetadataKey, fallThrough) -> int:
        """
        Answer C{request} for C{key} from the cache if its entry is current,
        else call C{fallThrough()} (which forwards it to Orthanc); for
        C{render}.
        """
        gone = []
        request.notifyFinish().addErrback(gone.append)
        served = self._serve(request, key, gone)

        def failed(failure) -> bool:
            if not failure.check(OrthancUnavailable, DatabaseUnavailable):
                self.log.failure("Could not answer {resource} from the metadata cache", failure, resource=key.resource)
            return False

        served.addErrback(failed)
        served.addCallback(self._served, gone, fallThrough)
        served.addErrback(lambda failure: self.log.failure("Could not forward {path}", failure, path=request.path))
        return NOT_DONE_YET

    def _served(self, answered: bool, gone: list, fallThrough) -> None:
        if answered:
            self.hits += 1
        else:
            self.misses += 1
            if not gone:
                fallThrough()

    @inlineCallbacks
    def _serve(self, request: Request, key: MetadataKey, gone: list):
        if request.method != b"GET" or not acceptsCachedType(request):
            return False
        host = publicHost(request)
        if host is None:
            return False
        account = getattr(request, "account", None)
        facts = yield self.facts(key, account.label if account is not None else "")
        if facts is None or gone:
            return False
        entry = yield self._database.interact(readEntry, key.resource)
        if entry is None or entry[0] != facts.fingerprint:
            if entry is not None:
                self._drop(key, entry[0])
            if facts.stable:
                self.build(key)
            return False
        compress = acceptsGzip(request)
        origin = (b"https://" if request.isSecure() else b"http://") + host
        body = yield self._runInThread(render, entry[1], origin, compress)
        if gone:
            return True
        request.setResponseCode(http.OK)
        request.setHeader(b"Content-Type", b"application/dicom+json")
        request.setHeader(b"Content-Security-Policy", SANDBOXED)
        addVary(request, b"Accept-Encoding")
        if compress:
            request.setHeader(b"Content-Encoding", b"gzip")
        request.setHeader(b"Content-Length", b"%d" % (len(body),))
        # At the client's pace: a study's metadata is megabytes uncompressed.
        # It fails only when the client has left: there is nothing to end.
        sending = FileSender().beginFileTransfer(BytesIO(body), request)
        sending.addCallbacks(lambda ignored: request.finish(), lambda failure: None)
        return True

    def _drop(self, key: MetadataKey, facts: str) -> None:
        dropping = self._database.interact(dropEntry, key.resource, facts)
        dropping.addErrback(self._unexpected, "remove the metadata cache's entry of {resource}", key.resource)

    def _unexpected(self, failure, what: str, resource: str = "") -> None:
        if not failure.check(DatabaseUnavailable):
            self.log.failure("Could not " + what, failure, resource=resource)

    @inlineCallbacks
    def facts(self, key: MetadataKey, account: str):
        """
        The L{Facts} of C{key} in Orthanc's index; L{None} if it holds no
        such study or series (or, for UIDs it cannot tell apart, several).
        """
        study = key.study.decode("ascii")
        if key.series is not None:
            query = {"StudyInstanceUID": study, "SeriesInstanceUID": key.series.decode("ascii")}
            found = yield self._rest.json(b"/tools/find", account, {"Level": "Series", "Query": query, "Expand": True})
            if len(found) != 1:
                return None
            return Facts(found[0]["IsStable"], fingerprint(found[0]["LastUpdate"], found[0]["Instances"]))
        query = {"StudyInstanceUID": study}
        found = yield self._rest.json(b"/tools/find", account, {"Level": "Study", "Query": query, "Expand": True})
        if len(found) != 1:
            return None
        instances = yield self._rest.json(b"/tools/find", account, {"Level": "Instance", "Query": query})
        return Facts(found[0]["IsStable"], fingerprint(found[0]["LastUpdate"], instances))

    # --- building -------------------------------------------------------------

    def build(self, key: MetadataKey) -> None:
        """
        Build C{key}'s entry when its turn comes (one build at a time).
        """
        if key in self._waitingKeys or len(self._waiting) >= MAX_WAITING or not self.running:
            return
        self._waiting.append(key)
        self._waitingKeys.add(key)
        self._buildNext()

    def _buildNext(self) -> None:
        if self._building is not None or not self._waiting:
            return
        key = self._waiting.popleft()
        self._waitingKeys.discard(key)
        self._building = self._build(key)
        self._building.addErrback(self._buildFailed, key)
        self._building.addBoth(self._built)

    def _built(self, ignored: None) -> None:
        self._building = None
        if self.running:
            self._buildNext()

    def _buildFailed(self, failure, key: MetadataKey) -> None:
        if failure.check(OrthancUnavailable, DatabaseUnavailable):
            self.log.info(
                "Did not cache the metadata of {resource}: {why}", resource=key.resource, why=failure.getErrorMessage()
            )
        elif failure.check(AnswerTooLarge):
            self.log.info("Did not cache the metadata of {resource}: it is over 128 MiB", resource=key.resource)
        elif not self.running:
            return
        else:
            self.log.failure("Could not cache the metadata of {resource}", failure, resource=key.resource)

    @inlineCallbacks
    def _build(self, key: MetadataKey):
        before = yield self.facts(key, ACCOUNT)
        if before is None or not before.stable:
            return
        cached = yield self._database.interact(readFingerprint, key.resource)
        if cached == before.fingerprint:
            return
        answer = yield self._rest.request(
            b"GET",
            key.path,
            ACCOUNT,
            [(b"Accept", b"application/dicom+json"), (b"Forwarded", b"host=%s;proto=https" % (PLACEHOLDER_HOST,))],
            limit=MAX_ENTRY,
        )
        if answer.code != http.OK or answer.contentType != b"application/dicom+json":
            raise OrthancUnavailable(f"Orthanc answered its metadata with {answer.code}")
        after = yield self.facts(key, ACCOUNT)
        if after != before:
            # Changed while it was read: the next stable event builds it.
            return
        stored = yield self._runInThread(compressed, answer.body)
        removed = yield self._database.interact(writeEntry, key.resource, before.fingerprint, stored, self._limit)
        if removed:
            self.log.info("Removed the {count} oldest entries of the metadata cache to make room", count=removed)

    # --- following Orthanc's changes -----------------------------------------

    @inlineCallbacks
    def _followChanges(self):
        """
        Read Orthanc's new changes and build what became stable; after a
        failure (Orthanc or the database away), the next round tries again.
        """
        try:
            yield self._readChanges()
        except (OrthancUnavailable, DatabaseUnavailable):
            # Said by the supervisor and the database themselves.
            return
        except Exception as error:
            # Once per problem: Orthanc may hang for minutes before the
            # supervisor restarts it.
            problem = str(error) or type(error).__name__
            if problem != self._changesProblem:
                self._changesProblem = problem
                self.log.warn("Could not read Orthanc's changes for the metadata cache: {problem}", problem=problem)
            return
        if self._changesProblem is not None:
            self._changesProblem = None
            self.log.info("Reading Orthanc's changes for the metadata cache again")

    @inlineCallbacks
    def _readChanges(self):
        if self._changesRead is None:
            self._changesRead = yield self._database.interact(readChangesRead, self._node)
        while self.running:
            since = self._changesRead
            if since is None:
                # The first start: the last changes only (what became stable
                # while the daemon started); what was already in the archive
                # is cached when it is first asked for, not read all at once.
                newest = yield self._rest.json(b"/changes?last", ACCOUNT)
                yield self._recordChangesRead(max(0, newest["Last"] - CHANGES_LIMIT))
                continue
            changes = yield self._rest.json(b"/changes?since=%d&limit=%d" % (since, CHANGES_LIMIT), ACCOUNT)
            if changes["Last"] < since:
                # Another index (the archive moved): read it from its start.
                yield self._recordChangesRead(0)
                continue
            for change in changes["Changes"]:
                kind = change["ChangeType"]
                if kind in ("StableSeries", "StableStudy"):
                    key = yield self._keyOf(kind, change["ID"])
                    if key is not None:
                        self.build(key)
            if changes["Last"] != since:
                yield self._recordChangesRead(changes["Last"])
            if changes["Done"]:
                return

    def _recordChangesRead(self, seq: int) -> Deferred:
        self._changesRead = seq
        return self._database.interact(writeChangesRead, self._node, seq)

    @inlineCallbacks
    def _keyOf(self, kind: str, orthancID: str):
        """
        The key of a series or study that Orthanc names by its own
        identifier; L{None} if it is gone.
        """
        level = b"series" if kind == "StableSeries" else b"studies"
        try:
            resource = yield self._rest.json(b"/%s/%s" % (level, orthancID.encode("ascii")), ACCOUNT)
            if kind == "StableStudy":
                return MetadataKey(resource["MainDicomTags"]["StudyInstanceUID"].encode("ascii"))
            study = yield self._rest.json(b"/studies/%s" % (resource["ParentStudy"].encode("ascii"),), ACCOUNT)
        except OrthancUnavailable:
            return None
        return MetadataKey(
            study["MainDicomTags"]["StudyInstanceUID"].encode("ascii"),
            resource["MainDicomTags"]["SeriesInstanceUID"].encode("ascii"),
        )
