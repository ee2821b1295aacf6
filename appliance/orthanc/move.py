"""
Growing from one box: C{pacs-appliance move-archive} moves a single
appliance's archive (Orthanc's index in SQLite under C{state_dir}, its files
in a local folder) into the PostgreSQL of C{[database]}.

The command runs two Orthancs of its own, supervised as the daemon supervises
its one, on free ports with fresh credentials (rendered as the daemon's are:
HTTP for loopback only, no modality known; the firewall table of
L{appliance.orthanc.firewall} covers the configured ports, not these): the
old one on the
old index and files, the new one as the configuration renders it
(PostgreSQL, C{[orthanc] storage} and C{storage_dir}), named
C{NODE-move} among the nodes of the database.  It copies every instance from
the first to the second through their REST APIs (the Orthanc Book's way of
moving an archive between database back-ends), study after study, a few
instances at a time.

Nothing is lost or stored twice: Orthanc names an instance by a hash of its
UIDs and does not store it again (C{AlreadyStored}), and each instance's
answer is checked (the same identifier, stored or already there).  Each
study moved whole is written down (C{state_dir/move-archive.done}, synced to
disk), so a move that is interrupted (Ctrl-C, SIGTERM, a reboot) goes on
from the studies it finished when run again, redoing at most the study it
was in.  The old index and files are left as they were: removing them is
the operator's call, once the move has said it is complete.

The appliance may serve on the new configuration meanwhile (its Orthanc and
this command's new one are two nodes of one database); the old index must
not be in use (SQLite refuses a second Orthanc on it).
"""

import json
import os
import socket
import sys
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path
from typing import Dict, List, Optional, Set, TextIO

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, gatherResults, inlineCallbacks
from twisted.internet.task import LoopingCall, deferLater
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from appliance.config import Config, OrthancStorage
from appliance.orthanc.probe import RestProbe
from appliance.orthanc.settings import orthancHome
from appliance.orthanc.space import StorageSpace
from appliance.orthanc.state import OrthancState
from appliance.orthanc.supervisor import OrthancSupervisor
from appliance.web.pages import describeSize

#: Instances copied at once: Orthanc's index takes one write at a time, and
#: a few transfers in flight keep it busy while the next files are read.
DEFAULT_PARALLEL = 4

#: Tries of one instance before the move stops (a busy database answers 503).
TRIES = 5
RETRY_DELAY = 2.0

#: How often the progress line is written (on a terminal it is rewritten in
#: place; otherwise, for the journal, one line at this interval).
PROGRESS_INTERVAL = 1.0
PROGRESS_LOG_INTERVAL = 10.0

#: The exit status of a move that was interrupted or failed: run it again.
UNFINISHED = 1


class MoveFailed(Exception):
    """
    The move cannot go on; the message says why and what to do.
    """


@dataclass(frozen=True)
class ArchiveEnds:
    """
    The configurations of the two Orthancs of a move.
    """

    old: Config
    new: Config


def archiveEnds(config: Config, oldHome: Path, oldStorage: Path, ports: List[int], runtime: Path) -> ArchiveEnds:
    """
    The old Orthanc on the index under C{oldHome} (its C{index} folder) and
    the files in C{oldStorage}, without [database]; the new one as C{config}
    renders it.  Each on two of C{ports}, with a runtime folder of its own
    under C{runtime} and no modalities; a start that fails is not tried again.
    """
    if not config.database.host:
        raise MoveFailed("[database] names no PostgreSQL server: there is nowhere to move the archive to.")
    if not (oldHome / "index" / "index").is_file():
        raise MoveFailed(f"There is no Orthanc index in {oldHome / 'index'}: give the old Orthanc folder with --from.")
    if not oldStorage.is_dir():
        raise MoveFailed(f"{oldStorage} is not a folder: give the old storage folder with --from-storage.")

    def end(name: str, httpPort: int, dicomPort: int, **sections) -> Config:
        folder = runtime / name
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        return replace(
            config,
            appliance=replace(
                config.appliance,
                runtime_dir=folder,
                node_name=f"{config.appliance.node_name}-move",
                **sections.pop("appliance", {}),
            ),
            orthanc=replace(
                config.orthanc,
                http_port=httpPort,
                dicom_port=dicomPort,
                max_start_failures=1,
                **sections.pop("orthanc", {}),
            ),
            modalities=(),
            **sections,
        )

    noDatabase = replace(config.database, host="")
    old = end(
        "old",
        ports[0],
        ports[1],
        # orthancHome() is state_dir/orthanc.
        appliance={"state_dir": oldHome.parent} if oldHome.name == "orthanc" else {},
        orthanc={"storage_dir": oldStorage, "storage": OrthancStorage.FILESYSTEM},
        database=noDatabase,
    )
    if orthancHome(old) != oldHome:
        raise MoveFailed(f"The old Orthanc folder must be named orthanc (as state_dir/orthanc is): {oldHome}")
    return ArchiveEnds(old, end("new", ports[2], ports[3]))


class DoneStudies:
    """
    The studies moved whole, one Orthanc identifier a line, each synced to
    disk before the next study begins.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.studies: Set[str] = set()
        if path.exists():
            self.studies = {line.strip() for line in path.read_text().splitlines() if line.strip()}

    def add(self, study: str) -> None:
        with self.path.open("a") as done:
            done.write(study + "\n")
            done.flush()
            os.fsync(done.fileno())
        self.studies.add(study)


class Progress:
    """
    The progress line: studies, instances and bytes moved, and the rate.
    """

    def __init__(self, clock, out: TextIO, studies: int, already: int) -> None:
        self._clock = clock
        self._out = out
        self._tty = out.isatty()
        self.studies = studies
        self.studiesDone = already
        self.instances = 0
        self.bytes = 0
        self._started = clock.seconds()
        self._lastLogged = self._started

    def line(self) -> str:
        elapsed = max(self._clock.seconds() - self._started, 1e-6)
        return (
            f"Moved {self.studiesDone} of {self.studies} studies: {self.instances} instances,"
            f" {describeSize(self.bytes, rounded=True)} ({describeSize(int(self.bytes / elapsed), rounded=True)}/s)"
        )

    def show(self) -> None:
        now = self._clock.seconds()
        if self._tty:
            self._out.write("\r" + self.line() + "\033[K")
            self._out.flush()
        elif now - self._lastLogged >= PROGRESS_LOG_INTERVAL:
            self._lastLogged = now
            print(self.line(), file=self._out, flush=True)

    def end(self) -> None:
        if self._tty:
            self._out.write("\r\033[K")
        print(self.line(), file=self._out, flush=True)


class OrthancClient:
    """
    The REST API of one of the move's Orthancs.
    """

    def __init__(self, agent: Agent, supervisor: OrthancSupervisor, port: int) -> None:
        self._agent = agent
        self._supervisor = supervisor
        self._origin = b"http://127.0.0.1:%d" % (port,)

    @inlineCallbacks
    def request(self, method: bytes, path: str, body: Optional[bytes] = None, contentType: bytes = b"application/dicom"):
        """
        Fires with (status, body).
        """
        headers = Headers({b"Authorization": [self._supervisor.credentials.authorization()]})
        producer = None
        if body is not None:
            headers.addRawHeader(b"Content-Type", contentType)
            producer = FileBodyProducer(BytesIO(body))
        response = yield self._agent.request(method, self._origin + path.encode("ascii"), headers, producer)
        answer = yield readBody(response)
        return response.code, answer

    @inlineCallbacks
    def json(self, path: str):
        status, body = yield self.request(b"GET", path)
        if status != 200:
            raise MoveFailed(f"Orthanc answered {path} with {status}: {body[:200]!r}")
        return json.loads(body)


class ArchiveMove:
    """
    One run of the move (see the module's docstring).
    """

    def __init__(self, ends: ArchiveEnds, done: DoneStudies, reactor, out: TextIO, parallel: int) -> None:
        self._ends = ends
        self._done = done
        self._reactor = reactor
        self._out = out
        self._parallel = DeferredSemaphore(parallel)
        self._pool = HTTPConnectionPool(reactor)
        self._pool.maxPersistentPerHost = parallel + 1
        agent = Agent(reactor, pool=self._pool)
        self._supervisors = [self._supervisor(end) for end in (ends.old, ends.new)]
        self.old, self.new = (
            OrthancClient(agent, supervisor, end.orthanc.http_port)
            for supervisor, end in zip(self._supervisors, (ends.old, ends.new))
        )
        self.progress: Optional[Progress] = None

    def _supervisor(self, config: Config) -> OrthancSupervisor:
        probe = RestProbe(self._reactor, config.orthanc.http_port, config.orthanc.health_timeout)
        return OrthancSupervisor(config, self._reactor, probe=probe, space=StorageSpace.forOrthanc(config))

    @inlineCallbacks
    def run(self):
        """
        Start both Orthancs, move every study not yet moved, and say so;
        fires with the number of instances in the old archive.
        """
        for supervisor, what in zip(self._supervisors, ("old archive", "new archive")):
            supervisor.startService()
            state = yield supervisor.whenState(OrthancState.READY, OrthancState.FAILED)
            if state is not OrthancState.READY:
                raise MoveFailed(f"Orthanc could not be started on the {what}: {supervisor.reason}")
        studies = yield self.old.json("/studies")
        statistics = yield self.old.json("/statistics")
        left = [study for study in studies if study not in self._done.studies]
        self.progress = Progress(self._reactor, self._out, len(studies), len(studies) - len(left))
        showing = LoopingCall(self.progress.show)
        showing.clock = self._reactor
        showing.start(PROGRESS_INTERVAL, now=False)
        try:
            for study in left:
                yield self._moveStudy(study)
                self._done.add(study)
                self.progress.studiesDone += 1
        finally:
            showing.stop()
            self.progress.end()
        return int(statistics["CountInstances"])

    @inlineCallbacks
    def _moveStudy(self, study: str):
        instances = yield self.old.json(f"/studies/{study}/instances")
        yield gatherResults(
            [self._parallel.run(self._moveInstance, instance["ID"]) for instance in instances], consumeErrors=True
        ).addErrback(lambda failure: failure.value.subFailure)

    @inlineCallbacks
    def _moveInstance(self, instance: str):
        status, dicom = yield self.old.request(b"GET", f"/instances/{instance}/file")
        if status != 200:
            raise MoveFailed(f"The old archive could not read instance {instance}: {status}")
        for attempt in range(1, TRIES + 1):
            status, body = yield self.new.request(b"POST", "/instances", dicom)
            answer = json.loads(body) if status == 200 else {}
            if answer.get("Status") in ("Success", "AlreadyStored"):
                if answer.get("ID") != instance:
                    raise MoveFailed(f"Instance {instance} was stored in the new archive as {answer.get('ID')}")
                self.progress.instances += 1
                self.progress.bytes += len(dicom)
                return
            if attempt < TRIES:
                yield deferLater(self._reactor, RETRY_DELAY, lambda: None)
        raise MoveFailed(f"The new archive did not store instance {instance}: {status} {body[:300]!r}")

    @inlineCallbacks
    def verify(self, count: int):
        """
        Every instance of the old archive is in the new one.
        """
        missing = []
        for study in (yield self.old.json("/studies")):
            new = {instance["ID"] for instance in (yield self.new.json(f"/studies/{study}/instances"))}
            missing += [i["ID"] for i in (yield self.old.json(f"/studies/{study}/instances")) if i["ID"] not in new]
        if missing:
            raise MoveFailed(f"{len(missing)} of the {count} instances are not in the new archive, {missing[0]} first")

    def stop(self) -> Deferred:
        """
        Stop both Orthancs (at the end, or when the command is interrupted).
        """
        stopping = [supervisor.stopService() for supervisor in self._supervisors if supervisor.running]
        return DeferredList(stopping + [self._pool.closeCachedConnections()])


def freePorts(count: int) -> List[int]:
    """
    C{count} different TCP ports nothing listens on right now (all held open
    together while chosen, so no two are the same), on every interface: Orthanc
    listens on all of them.
    """
    probes = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def moveArchive(
    config: Config,
    oldHome: Path,
    oldStorage: Path,
    parallel: int = DEFAULT_PARALLEL,
    out: TextIO = sys.stdout,
) -> int:
    """
    Run the move to its end or its interruption; the exit status.
    """
    from twisted.internet import reactor

    runtime = config.appliance.runtime_dir / "move-archive"
    ends = archiveEnds(config, oldHome, oldStorage, freePorts(4), runtime)
    done = DoneStudies(config.appliance.state_dir / "move-archive.done")
    move = ArchiveMove(ends, done, reactor, out, parallel)
    outcome: Dict[str, int] = {}
    stopping: List[bool] = []

    def interrupt() -> Deferred:
        # Ctrl-C, SIGTERM, or the end of the work: the Orthancs stop first.
        stopping.append(True)
        return move.stop()

    @inlineCallbacks
    def work():
        try:
            count = yield move.run()
            yield move.verify(count)
        except Exception:
            if stopping:
                return  # interrupted: what stopped short is said below
            report(Failure())
        else:
            print(
                f"The archive is in PostgreSQL: all {count} instances of {oldHome / 'index'} are in the new archive."
                f" The old index and files are untouched; remove them once the appliance runs on the new one.",
                file=out,
            )
            outcome["status"] = 0
        if not stopping:
            reactor.stop()

    def report(failure: Failure) -> None:
        if failure.check(MoveFailed):
            print(f"pacs-appliance: {failure.value}", file=sys.stderr)
        else:
            print("pacs-appliance: the move failed:", file=sys.stderr)
            failure.printTraceback(sys.stderr)
        print("Run the same command again to go on from the studies already moved.", file=sys.stderr)
        outcome["status"] = UNFINISHED

    reactor.addSystemEventTrigger("before", "shutdown", interrupt)
    reactor.callWhenRunning(work)
    reactor.run()
    if "status" not in outcome:
        print(
            f"Interrupted: {len(done.studies)} studies moved. Run the same command again to go on.", file=sys.stderr
        )
        return UNFINISHED
    return outcome["status"]
