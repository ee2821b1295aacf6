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

import os
import sys
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path
from typing import List, Optional, Set, TextIO

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, gatherResults, inlineCallbacks

from appliance.config import Config, OrthancStorage
from appliance.orthanc.archive import (
    ArchiveCommandFailed,
    OrthancClient,
    Progress,
    freePorts,
    privateOrthancConfig,
    privateSupervisor,
    runArchiveCommand,
    startPrivate,
    storeInstance,
)
from appliance.orthanc.settings import orthancHome

#: Instances copied at once: Orthanc's index takes one write at a time, and
#: a few transfers in flight keep it busy while the next files are read.
DEFAULT_PARALLEL = 4

class MoveFailed(ArchiveCommandFailed):
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

    noDatabase = replace(config.database, host="")
    old = privateOrthancConfig(
        config,
        "old",
        ports[0:2],
        runtime,
        # orthancHome() is state_dir/orthanc.
        appliance={"state_dir": oldHome.parent} if oldHome.name == "orthanc" else {},
        orthanc={"storage_dir": oldStorage, "storage": OrthancStorage.FILESYSTEM},
        database=noDatabase,
    )
    if orthancHome(old) != oldHome:
        raise MoveFailed(f"The old Orthanc folder must be named orthanc (as state_dir/orthanc is): {oldHome}")
    return ArchiveEnds(old, privateOrthancConfig(config, "move", ports[2:4], runtime))


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
        self._supervisors = [privateSupervisor(end, reactor) for end in (ends.old, ends.new)]
        self.old, self.new = (
            OrthancClient(
                reactor, lambda supervisor=supervisor: supervisor.credentials.authorization(), end.orthanc.http_port, parallel
            )
            for supervisor, end in zip(self._supervisors, (ends.old, ends.new))
        )
        self.progress: Optional[Progress] = None

    @inlineCallbacks
    def run(self):
        """
        Start both Orthancs, move every study not yet moved, and say so;
        fires with the number of instances in the old archive.
        """
        for supervisor, what in zip(self._supervisors, ("old archive", "new archive")):
            yield startPrivate(supervisor, what)
        studies = yield self.old.json("/studies")
        statistics = yield self.old.json("/statistics")
        left = [study for study in studies if study not in self._done.studies]
        self.progress = Progress(
            self._reactor, self._out, "Moved", "studies", "instances", len(studies), len(studies) - len(left)
        )
        showing = self.progress.every()
        try:
            for study in left:
                yield self._moveStudy(study)
                self._done.add(study)
                self.progress.done += 1
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
        yield storeInstance(self._reactor, self.new, lambda: BytesIO(dicom), instance)
        self.progress.instances += 1
        self.progress.bytes += len(dicom)

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
        return DeferredList(stopping + [self.old.close(), self.new.close()])


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

    @inlineCallbacks
    def work():
        count = yield move.run()
        yield move.verify(count)
        return (
            f"The archive is in PostgreSQL: all {count} instances of {oldHome / 'index'} are in the new archive."
            f" The old index and files are untouched; remove them once the appliance runs on the new one."
        )

    return runArchiveCommand(
        "move",
        work,
        move.stop,
        lambda: f"{len(done.studies)} studies moved. Run the same command again to go on.",
        "Run the same command again to go on from the studies already moved.",
        out,
    )
