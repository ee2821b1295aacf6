"""
C{pacs-appliance backup DEST}: a backup of the appliance while it serves.

Orthanc 1.10 opens its SQLite index with C{PRAGMA LOCKING_MODE=EXCLUSIVE}:
no other process can read it, not even with SQLite's online backup, while
Orthanc runs.  So the archive is taken through the running Orthanc's REST
API, whatever its index and storage (SQLite, PostgreSQL, files): the list of
instances in one answer (every instance acknowledged before the backup began
is in it), then each instance's DICOM file, byte for byte as Orthanc keeps
it.  Restoring has Orthanc index the files again (the Orthanc Book's way of
moving an archive between back-ends).  Orthanc's C{/changes} say which
instances were stored again since the previous backup; every other one
already in it is linked, not copied.

With the archive: the configuration files and every file they name
(certificates, keys, the users file, password files), the audit trail,
and the accounts of the appliance's database (a cluster keeps them there).
Its sessions, metadata cache and sign-ins under way are left out: users
log in again, and the cache fills again.
"""

import dataclasses
import datetime
import fcntl
import grp
import json
import os
import pwd
import shutil
import sqlite3
import sys
from pathlib import Path
from typing import BinaryIO, Callable, Dict, Iterator, List, Optional, Set, TextIO, Tuple

from twisted.internet.defer import DeferredSemaphore, gatherResults, inlineCallbacks
from twisted.internet.threads import deferToThread

import appliance
from appliance.audit.trail import auditFolder
from appliance.backup.manifest import (
    ACCOUNTS_FILE,
    AUDIT,
    CONFIG,
    DATABASE,
    INSTANCE,
    PARTIAL_SUFFIX,
    BackupFailed,
    Entry,
    Manifest,
    backups,
    fileDigest,
    syncFolder,
)
from appliance.config import Config
from appliance.orthanc.archive import OrthancClient, Progress, runArchiveCommand
from appliance.orthanc.settings import OrthancCredentials, orthancConfigurationPath
from appliance.state.database import SQLITE_FILE, DatabaseUnavailable, interactOnce
from appliance.web.pages import describeSize

#: Instances read at once from the serving Orthanc.
PARALLEL = 4
#: Changes read at a time.
CHANGES_PAGE = 1000
#: The file of a backup folder locked while a backup is made into it.
LOCK = ".lock"

#: Keys naming folders, programs or state, not configuration files.
NOT_CONFIGURATION = {
    ("appliance", "state_dir"),
    ("appliance", "runtime_dir"),
    ("orthanc", "executable"),
    ("orthanc", "plugins"),
    ("orthanc", "storage_dir"),
    ("web", "ohif_root"),
    ("audit", "folder"),
}


def instancePath(instance: str) -> str:
    return f"instances/{instance[:2]}/{instance}.dcm"


def ownerNames(path: Path) -> Dict[str, str]:
    status = path.stat()
    try:
        user = pwd.getpwuid(status.st_uid).pw_name
    except KeyError:
        user = str(status.st_uid)
    try:
        group = grp.getgrgid(status.st_gid).gr_name
    except KeyError:
        group = str(status.st_gid)
    return {"user": user, "group": group}


def configurationFiles(config: Config) -> List[Path]:
    """
    The configuration's files, and every file a key of it names.
    """
    found: List[Path] = list(config.sources)
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        sections = value if isinstance(value, tuple) else (value,)
        for each in sections:
            if not dataclasses.is_dataclass(each):
                continue
            for key in dataclasses.fields(each):
                path = getattr(each, key.name)
                if isinstance(path, Path) and (section.name, key.name) not in NOT_CONFIGURATION:
                    if path.is_file() and path not in found:
                        found.append(path)
    return found


def readAccountRows(config: Config) -> List[list]:
    """
    The rows of the accounts table (blocking): a cluster's accounts, in its
    PostgreSQL; a single box keeps its accounts in the users file, and its
    SQLite table is empty.
    """

    def rows(statements) -> List[list]:
        return [list(row) for row in statements.rows("SELECT name, password_hash, roles, changed FROM accounts")]

    if config.database.host:
        try:
            return interactOnce(config.database, rows)
        except DatabaseUnavailable as error:
            raise BackupFailed(f"the accounts cannot be read: {error}") from None
    path = config.appliance.state_dir / SQLITE_FILE
    if not path.exists():
        return []
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
        try:
            found = connection.execute("SELECT name, password_hash, roles, changed FROM accounts").fetchall()
        except sqlite3.OperationalError:
            return []  # a database of an appliance that never started
    return [list(row) for row in found]


class Snapshot:
    """
    One backup being made in C{folder}, next to the previous one.
    """

    def __init__(self, folder: Path, previous: Optional[Manifest], previousFolder: Optional[Path]) -> None:
        self.folder = folder
        self.previous = previous
        self.previousFolder = previousFolder
        self.entries: List[Entry] = []
        self._previousByPath = {entry.path: entry for entry in previous.entries} if previous else {}

    def create(self, relative: str) -> Path:
        path = self.folder / relative
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path

    def linkPrevious(self, relative: str, unchanged: Callable[[Entry], bool] = lambda entry: True) -> Optional[Entry]:
        """
        Link the previous backup's copy of C{relative}, if it has one and it
        is C{unchanged}; its entry.
        """
        entry = self._previousByPath.get(relative)
        if entry is None or self.previousFolder is None or not unchanged(entry):
            return None
        source = self.previousFolder / relative
        target = self.create(relative)
        try:
            os.link(source, target)
        except FileNotFoundError:
            return None
        except OSError:
            # A file system without hard links: a copy.
            shutil.copyfile(source, target)
            os.chmod(target, 0o600)
        return entry

    def copy(self, source: Path, relative: str, kind: str, **details) -> Entry:
        target = self.create(relative)
        with source.open("rb") as reading, open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
            shutil.copyfileobj(reading, out)
            out.flush()
            os.fsync(out.fileno())
        size = target.stat().st_size
        entry = Entry(relative, kind, size, fileDigest(target), **details)
        self.entries.append(entry)
        return entry


def copyConfiguration(config: Config, snapshot: Snapshot) -> None:
    for path in configurationFiles(config):
        status = path.stat()
        try:
            snapshot.copy(path, "config" + str(path), CONFIG, original=str(path), mode=status.st_mode & 0o7777, **ownerNames(path))
        except PermissionError:
            raise BackupFailed(
                f"cannot read {path}: run the backup as root (sudo pacs-appliance backup) or as the appliance's user"
            ) from None


def copyAuditTrail(config: Config, snapshot: Snapshot) -> None:
    folder = auditFolder(config)
    if not folder.is_dir():
        return
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        relative = "audit/" + path.relative_to(folder).as_posix()
        status = path.stat()
        previous = snapshot.linkPrevious(
            relative, lambda entry: (entry.size, entry.mtime_ns) == (status.st_size, status.st_mtime_ns)
        )
        if previous is not None:
            snapshot.entries.append(previous)
        else:
            snapshot.copy(path, relative, AUDIT, mtime_ns=status.st_mtime_ns)


def writeAccounts(rows: List[list], snapshot: Snapshot) -> None:
    path = snapshot.create(ACCOUNTS_FILE)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        json.dump(rows, out)
        out.flush()
        os.fsync(out.fileno())
    snapshot.entries.append(Entry(ACCOUNTS_FILE, DATABASE, path.stat().st_size, fileDigest(path)))


def servingOrthanc(config: Config):
    """
    The port and the authorization of the Orthanc the running appliance
    supervises, from the configuration it rendered for it.
    """
    path = orthancConfigurationPath(config)
    try:
        rendered = json.loads(path.read_text())
    except FileNotFoundError:
        raise BackupFailed(
            f"the appliance is not running ({path} is missing): start it (systemctl start pacs-appliance);"
            " the backup reads the archive through its Orthanc"
        ) from None
    except PermissionError:
        raise BackupFailed(f"cannot read {path}: run the backup as root or as the appliance's user") from None
    ((user, password),) = rendered["RegisteredUsers"].items()
    return rendered["HttpPort"], OrthancCredentials(user, password).authorization()


class ArchiveBackup:
    """
    Reads the archive of the serving Orthanc into a snapshot.
    """

    def __init__(self, client: OrthancClient, snapshot: Snapshot, reactor, out: TextIO) -> None:
        self._client = client
        self._snapshot = snapshot
        self._reactor = reactor
        self._out = out
        self._parallel = DeferredSemaphore(PARALLEL)
        self.lastChange = 0
        self.deleted = 0
        self.progress: Optional[Progress] = None

    @inlineCallbacks
    def _storedAgain(self, since: int):
        """
        The instances stored since change C{since} (up to L{lastChange}), or
        L{None} when Orthanc's changes do not go back that far (another
        database since): then nothing of the previous backup is trusted.
        """
        if since > self.lastChange:
            return None
        stored: Set[str] = set()
        while since < self.lastChange:
            page = yield self._client.json(f"/changes?since={since}&limit={CHANGES_PAGE}")
            for change in page["Changes"]:
                if change["ChangeType"] == "NewInstance":
                    stored.add(change["ID"])
            if page["Last"] <= since or page["Done"]:
                break
            since = page["Last"]
        return stored

    @inlineCallbacks
    def run(self):
        self.lastChange = (yield self._client.json("/changes?last"))["Last"]
        instances = yield self._client.json("/instances")
        previous = self._snapshot.previous
        storedAgain = (yield self._storedAgain(previous.orthanc_last_change)) if previous else None
        self.progress = Progress(self._reactor, self._out, "Backed up", "instances", "new", len(instances))
        showing = self.progress.every()
        try:
            yield gatherResults(
                [self._parallel.run(self._instance, instance, storedAgain) for instance in instances],
                consumeErrors=True,
            ).addErrback(lambda failure: failure.value.subFailure)
        finally:
            showing.stop()
            self.progress.end()

    @inlineCallbacks
    def _instance(self, instance: str, storedAgain: Optional[Set[str]]):
        relative = instancePath(instance)
        if storedAgain is not None and instance not in storedAgain:
            entry = self._snapshot.linkPrevious(relative)
            if entry is not None:
                self._snapshot.entries.append(entry)
                self.progress.done += 1
                return
        target = self._snapshot.create(relative)
        with open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
            status, size, digest = yield self._client.download(f"/instances/{instance}/file", out)
            if status == 200:
                out.flush()
                os.fsync(out.fileno())
        if status == 404:
            # Deleted since the list was taken: as if the backup began after.
            target.unlink()
            self.deleted += 1
        elif status != 200:
            raise BackupFailed(f"Orthanc answered {status} for instance {instance}: run the backup again")
        else:
            self._snapshot.entries.append(Entry(relative, INSTANCE, size, digest, instance=instance))
            self.progress.instances += 1
            self.progress.bytes += size
        self.progress.done += 1


def snapshotName(now: datetime.datetime) -> str:
    # To the millisecond: two backups a second apart sort, and do not meet.
    return now.strftime("%Y-%m-%dT%H-%M-%S.") + f"{now.microsecond // 1000:03d}Z"


def lockFolder(destination: Path) -> BinaryIO:
    """
    The open lock file of the backup folder C{destination}, locked (until
    it is closed, or the process ends): another backup into it would take
    this one's unfinished folder for an abandoned one.
    """
    lock = open(os.open(destination / LOCK, os.O_WRONLY | os.O_CREAT, 0o600), "wb")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise BackupFailed(f"another backup into {destination} is under way: wait for it to end") from None
    return lock


def removeUnfinished(destination: Path, out: TextIO) -> None:
    for child in sorted(destination.glob("*" + PARTIAL_SUFFIX)):
        print(f"Removing the unfinished backup {child}", file=out)
        shutil.rmtree(child)


def backupCommand(config: Config, destination: Path, out: TextIO = sys.stdout) -> int:
    """
    Make a backup in C{destination} (see the module's docstring); the exit
    status.
    """
    orthanc = servingOrthanc(config)
    destination.mkdir(mode=0o700, parents=True, exist_ok=True)
    with lockFolder(destination):
        return _backupInto(config, destination, orthanc, out)


def _backupInto(config: Config, destination: Path, orthanc: Tuple[int, bytes], out: TextIO) -> int:
    from twisted.internet import reactor

    port, authorization = orthanc
    removeUnfinished(destination, out)
    found = backups(destination)
    previousFolder = found[-1] if found else None
    previous = Manifest.read(previousFolder) if previousFolder else None
    now = datetime.datetime.now(datetime.timezone.utc)
    name = snapshotName(now)
    if (destination / name).exists():
        raise BackupFailed(f"{destination / name} exists already: run the backup again")
    partial = destination / (name + PARTIAL_SUFFIX)
    partial.mkdir(mode=0o700)
    snapshot = Snapshot(partial, previous, previousFolder)
    state = ownerNames(config.appliance.state_dir)
    client = OrthancClient(reactor, lambda: authorization, port, PARALLEL)
    archive = ArchiveBackup(client, snapshot, reactor, out)

    def finish() -> Manifest:
        # After the archive, so that the trail holds its last records; on a
        # thread: it reads and writes files.
        copyConfiguration(config, snapshot)
        copyAuditTrail(config, snapshot)
        writeAccounts(readAccountRows(config), snapshot)
        manifest = Manifest(
            created=now.isoformat(),
            appliance=appliance.__version__,
            node=config.appliance.node_name,
            config=str(config.sources[0]),
            state_dir=str(config.appliance.state_dir),
            state_user=state["user"],
            state_group=state["group"],
            orthanc_last_change=archive.lastChange,
            entries=sorted(snapshot.entries, key=lambda entry: entry.path),
        )
        for folder in _folders(partial):
            syncFolder(folder)
        manifest.write(partial)
        partial.rename(destination / name)
        syncFolder(destination)
        return manifest

    @inlineCallbacks
    def work():
        yield archive.run()
        manifest = yield deferToThread(finish)
        instances = manifest.of(INSTANCE)
        total = sum(entry.size for entry in instances)
        deleted = f"; {archive.deleted} deleted while it ran" if archive.deleted else ""
        return (
            f"Backed up {len(instances)} instances ({describeSize(total, rounded=True)}, {archive.progress.instances}"
            f" new{deleted}), {len(manifest.of(CONFIG))} configuration files, {len(manifest.of(AUDIT))} audit files"
            f" and the accounts in {destination / name}"
        )

    return runArchiveCommand(
        "backup",
        work,
        client.close,
        lambda: f"the unfinished backup {partial} is removed by the next one.",
        f"The unfinished backup {partial} is removed by the next one; run the backup again.",
        out,
    )


def _folders(top: Path) -> Iterator[Path]:
    yield top
    for path in top.rglob("*"):
        if path.is_dir():
            yield path
