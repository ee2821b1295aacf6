"""
C{pacs-appliance restore SRC}: a backup onto a freshly installed appliance,
and C{pacs-appliance verify SRC}.

The restore puts the configuration files back where they were (a file of
the fresh installation in the way is kept as C{FILE.before-restore}), the
audit trail and the accounts, then runs an Orthanc of its own on the
restored configuration and stores every instance in it, each checked
against the backup's SHA-256 first: Orthanc indexes them again, in SQLite
or PostgreSQL.  It goes onto an empty state folder only (its own marker,
C{restore.unfinished}, aside: an interrupted restore is run again and goes
on, Orthanc storing no instance twice), and hands the folder to its owner
in the backup when run as root.
"""

import grp
import json
import os
import pwd
import shutil
import sqlite3
import sys
from pathlib import Path
from typing import List, Sequence, TextIO

from twisted.internet.defer import DeferredSemaphore, gatherResults, inlineCallbacks
from twisted.internet.threads import deferToThread

from appliance.audit.trail import auditFolder
from appliance.backup.manifest import (
    ACCOUNTS_FILE,
    AUDIT,
    CONFIG,
    DATABASE,
    INSTANCE,
    BackupFailed,
    Entry,
    Manifest,
    entryProblem,
    findBackup,
    verifyBackup,
)
from appliance.config import Config, ConfigError, loadConfig
from appliance.orthanc.archive import (
    OrthancClient,
    Progress,
    freePorts,
    privateOrthancConfig,
    privateSupervisor,
    runArchiveCommand,
    startPrivate,
    storeInstance,
)
from appliance.state.database import SQLITE, SQLITE_FILE, DatabaseUnavailable, Statements, interactOnce, migrate
from appliance.web.pages import describeSize
from appliance.web.sharedaccounts import writeAccount
from appliance.web.users import parseLine

#: Instances stored at once (Orthanc's index takes one write at a time).
PARALLEL = 4
MARKER = "restore.unfinished"
BEFORE_RESTORE = ".before-restore"


def checkTarget(manifest: Manifest, configPath: Path) -> Path:
    """
    The state folder to restore into, once it is known to be the right one
    and empty.
    """
    if str(configPath.absolute()) != manifest.config:
        raise BackupFailed(
            f"this backup is of the appliance configured by {manifest.config}: restore it with --config"
            f" {manifest.config} (the configuration goes back where it was)"
        )
    state = Path(manifest.state_dir)
    if state.exists() and not (state / MARKER).exists() and any(state.iterdir()):
        raise BackupFailed(
            f"the state folder {state} is not empty: restore goes onto a freshly installed appliance."
            " Stop it (systemctl stop pacs-appliance) and empty the folder first"
        )
    return state


def _chown(path: Path, user: str, group: str) -> None:
    if os.geteuid() != 0:
        return
    try:
        os.chown(path, pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid, follow_symlinks=False)
    except KeyError:
        pass  # no such user here: the file stays root's, as the restore's


def _placeFile(source: Path, target: Path, mode: int) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".restoring")
    with source.open("rb") as reading, open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
        shutil.copyfileobj(reading, out)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(temporary, mode)
    os.replace(temporary, target)


def restoreConfiguration(folder: Path, entries: List[Entry], out: TextIO) -> None:
    for entry in entries:
        target = Path(entry.original)
        source = folder / entry.path
        if target.exists() and target.read_bytes() != source.read_bytes():
            kept = target.with_name(target.name + BEFORE_RESTORE)
            os.replace(target, kept)
            print(f"Kept the installed {target} as {kept}", file=out)
        _placeFile(source, target, entry.mode)
        _chown(target, entry.user, entry.group)


def restoreAuditTrail(folder: Path, entries: List[Entry], config: Config) -> None:
    trail = auditFolder(config)
    trail.mkdir(mode=0o700, parents=True, exist_ok=True)
    for entry in entries:
        target = trail / entry.path.removeprefix("audit/")
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _placeFile(folder / entry.path, target, 0o600)
        os.utime(target, ns=(entry.mtime_ns, entry.mtime_ns))


def _writeRows(statements: Statements, rows: List[list]) -> None:
    for name, passwordHash, roles, changed in rows:
        writeAccount(statements, parseLine(f"{name}:{passwordHash}:{roles}"), changed)


def restoreAccounts(folder: Path, config: Config) -> int:
    rows = json.loads((folder / ACCOUNTS_FILE).read_text())
    if not rows:
        return 0
    if config.database.host:
        try:
            interactOnce(config.database, _writeRows, rows)
        except DatabaseUnavailable as error:
            raise BackupFailed(f"the accounts cannot be restored: {error}") from None
        return len(rows)
    path = config.appliance.state_dir / SQLITE_FILE
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    with sqlite3.connect(path, isolation_level=None) as connection:
        cursor = connection.cursor()
        cursor.execute("BEGIN IMMEDIATE")
        statements = Statements(cursor, SQLITE)
        migrate(statements)
        _writeRows(statements, rows)
        cursor.execute("COMMIT")
    return len(rows)


class ArchiveRestore:
    """
    Stores the backup's instances in an Orthanc of the restore's own.
    """

    def __init__(self, config: Config, folder: Path, entries: List[Entry], reactor, out: TextIO) -> None:
        self._folder = folder
        self._entries = entries
        self._reactor = reactor
        self._out = out
        self._parallel = DeferredSemaphore(PARALLEL)
        private = privateOrthancConfig(config, "restore", freePorts(2), config.appliance.runtime_dir / "restore")
        self._supervisor = privateSupervisor(private, reactor)
        self._client = OrthancClient(
            reactor, lambda: self._supervisor.credentials.authorization(), private.orthanc.http_port, PARALLEL
        )
        self.damaged: List[str] = []
        self.progress = Progress(reactor, out, "Restored", "instances", "stored", len(entries))

    @inlineCallbacks
    def run(self):
        yield startPrivate(self._supervisor, "restored configuration")
        showing = self.progress.every()
        try:
            yield gatherResults(
                [self._parallel.run(self._instance, entry) for entry in self._entries], consumeErrors=True
            ).addErrback(lambda failure: failure.value.subFailure)
        finally:
            showing.stop()
            self.progress.end()

    @inlineCallbacks
    def _instance(self, entry: Entry):
        problem = yield deferToThread(entryProblem, self._folder, entry)
        if problem is not None:
            self.damaged.append(problem)
        else:
            path = self._folder / entry.path
            yield storeInstance(self._reactor, self._client, lambda: path.open("rb"), entry.instance)
            self.progress.instances += 1
            self.progress.bytes += entry.size
        self.progress.done += 1

    def stop(self):
        stopping = self._supervisor.stopService() if self._supervisor.running else None
        closing = self._client.close()
        return closing if stopping is None else stopping.addBoth(lambda ignored: closing)


def handOver(folders: Sequence[Path], manifest: Manifest) -> None:
    """
    Give the restored state folder and audit trail (C{folders}) to the
    state folder's owner in the backup: the restore and its Orthanc ran as
    root, the appliance does not.
    """
    if os.geteuid() != 0:
        return
    for folder in folders:
        for top, children, files in os.walk(folder):
            for name in [top, *(os.path.join(top, child) for child in children + files)]:
                _chown(Path(name), manifest.state_user, manifest.state_group)


def restoreCommand(configPath: Path, source: Path, out: TextIO = sys.stdout) -> int:
    """
    Restore the backup C{source} names (see the module's docstring); the
    exit status.
    """
    from twisted.internet import reactor

    folder = findBackup(source)
    manifest = Manifest.read(folder)
    state = checkTarget(manifest, configPath)
    small = [entry for entry in manifest.entries if entry.kind != INSTANCE]
    problems = [problem for entry in small if (problem := entryProblem(folder, entry)) is not None]
    if problems:
        raise BackupFailed(f"the backup {folder} is damaged, nothing was restored:\n" + "\n".join(problems))
    print(f"Restoring {folder} (made {manifest.created} on {manifest.node})", file=out)
    # The marker first: a file the configuration names may live in the
    # state folder, and a restore interrupted after it must go on.
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    (state / MARKER).touch()
    restoreConfiguration(folder, manifest.of(CONFIG), out)
    try:
        config = loadConfig(configPath)
    except ConfigError as error:
        raise BackupFailed("the restored configuration has problems:\n" + "\n".join(error.problems)) from None
    restoreAuditTrail(folder, manifest.of(AUDIT), config)
    accounts = restoreAccounts(folder, config) if manifest.of(DATABASE) else 0
    archive = ArchiveRestore(config, folder, manifest.of(INSTANCE), reactor, out)

    @inlineCallbacks
    def work():
        yield archive.run()
        yield archive.stop()
        yield deferToThread(handOver, [state, auditFolder(config)], manifest)
        if archive.damaged:
            raise BackupFailed(
                f"{len(archive.damaged)} instances of the backup are damaged and were not restored:\n"
                + "\n".join(archive.damaged)
            )
        (state / MARKER).unlink()
        return (
            f"Restored {archive.progress.instances} instances ({describeSize(archive.progress.bytes, rounded=True)}),"
            f" {accounts} database accounts, {len(manifest.of(CONFIG))} configuration files and"
            f" {len(manifest.of(AUDIT))} audit files. Start the appliance: systemctl start pacs-appliance"
        )

    return runArchiveCommand(
        "restore",
        work,
        archive.stop,
        lambda: f"{archive.progress.done} instances restored. Run the same command again to go on.",
        "Run the same command again to go on.",
        out,
    )


def verifyCommand(source: Path, out: TextIO = sys.stdout) -> int:
    """
    Check every file of the backup C{source} names against its manifest;
    the exit status.
    """
    folder = findBackup(source)
    problems = verifyBackup(folder)
    for problem in problems:
        print(f"{folder}: {problem}", file=sys.stderr)
    if problems:
        print(f"pacs-appliance verify: the backup {folder} has {len(problems)} problems", file=sys.stderr)
        return 1
    manifest = Manifest.read(folder)
    size = sum(entry.size for entry in manifest.entries)
    print(
        f"{folder}: OK, {len(manifest.entries)} files ({describeSize(size, rounded=True)}): {len(manifest.of(INSTANCE))}"
        f" instances, {len(manifest.of(CONFIG))} configuration files, {len(manifest.of(AUDIT))} audit files"
        f" and the accounts, as backed up {manifest.created}",
        file=out,
    )
    return 0
