"""
The audit trail's files: each record one line (one DICOM audit message) in
C{[audit] folder}, a file a day (C{audit-YYYY-MM-DD.log}, UTC), mode 0600
in a folder of mode 0700, only ever appended to: the appliance never
truncates, rewrites or deletes them (their retention is the hospital's).

Lines are written in the reactor's thread as they come (a short append to
the page cache, as the journal's lines are), to the file of the day they
are written on, and made durable by an C{fsync} on a thread at most a
second later.  The syslog forwarder
(L{appliance.audit.syslog}) reads the same files: they are its queue.
"""

import datetime
import os
from pathlib import Path
from typing import Callable, List, Optional

from twisted.application.service import Service
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from appliance import __version__
from appliance.audit.messages import AuditEvent, AuditSource, applicationActivity, configurationReloaded, render

#: How long a written record may wait for its fsync.
SYNC_DELAY = 1.0

FILE_PREFIX, FILE_SUFFIX = "audit-", ".log"


def auditFolder(config) -> Path:
    """
    The folder of the audit trail's files: [audit] folder, state_dir/audit
    by default.
    """
    return config.audit.folder or config.appliance.state_dir / "audit"


def recordFiles(folder: Path) -> List[Path]:
    """
    The trail's files in C{folder}, oldest first.
    """
    return sorted(folder.glob(f"{FILE_PREFIX}*{FILE_SUFFIX}"))


def _writeAll(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


class AuditTrail(Service):
    """
    Appends each event to the day's file, and tells its listeners (the
    syslog forwarder) that there is more.  Records the appliance's start
    and stop, and each reload of its configuration (as a reload observer).
    """

    log = Logger()

    def __init__(self, folder: Path, source: AuditSource, configPath: Path, reactor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self.folder = folder
        self.source = source
        self._configPath = configPath
        self._reactor = reactor
        self._day: Optional[str] = None
        self._fd: Optional[int] = None
        self._syncing = None
        self._failing = False
        self._listeners: List[Callable[[], None]] = []

    def listen(self, listener: Callable[[], None]) -> None:
        """
        Call C{listener()} after each record is written.
        """
        self._listeners.append(listener)

    def startService(self) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.folder.chmod(0o700)
        super().startService()
        self.record(applicationActivity(self.source, self._reactor.seconds(), True, __version__))

    def stopService(self) -> None:
        self.record(applicationActivity(self.source, self._reactor.seconds(), False, __version__))
        super().stopService()
        if self._syncing is not None and self._syncing.active():
            self._syncing.cancel()
        if self._fd is not None:
            # The last records are made durable before the process ends.
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None

    def record(self, event: AuditEvent) -> None:
        """
        Append C{event} to the trail.
        """
        line = (render(event, self.source) + "\n").encode("utf-8", "replace")
        try:
            # Today's file, whatever the record's own time (a record whose
            # study took a moment to look up may come after midnight): the
            # forwarder has moved on from yesterday's.
            fd = self._file(self._reactor.seconds())
            _writeAll(fd, line)
        except OSError as error:
            # Nothing else holds the record: the journal must say so, every time.
            self.log.critical(
                "Could not write an audit record to {folder}: {error}; the record was: {line}",
                folder=str(self.folder),
                error=error.strerror,
                line=line.decode("utf-8").rstrip(),
            )
            self._failing = True
            return
        if self._failing:
            self._failing = False
            self.log.info("Audit records are written to {folder} again", folder=str(self.folder))
        if self._syncing is None or not self._syncing.active():
            self._syncing = self._reactor.callLater(SYNC_DELAY, self._sync)
        for listener in self._listeners:
            listener()

    def _file(self, when: float) -> int:
        day = datetime.datetime.fromtimestamp(when, datetime.timezone.utc).strftime("%Y-%m-%d")
        if self._fd is None or day != self._day:
            if self._fd is not None:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None
            path = self.folder / f"{FILE_PREFIX}{day}{FILE_SUFFIX}"
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            # A record cut off by a crash ends here, not inside the next one.
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                _writeAll(fd, b"\n")
            self._fd, self._day = fd, day
        return self._fd

    def _sync(self) -> None:
        if self._fd is None:
            return
        # Its own descriptor: the file may be closed meanwhile (a new day).
        fd = os.dup(self._fd)

        def sync() -> None:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        syncing = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), sync)
        syncing.addErrback(lambda failure: self.log.failure("Could not make the audit records durable", failure))

    # --- as a reload observer -------------------------------------------------

    def reloading(self) -> None:
        pass

    def reloaded(self, outcome: str) -> None:
        self.record(
            configurationReloaded(
                self.source, self._reactor.seconds(), str(self._configPath), outcome, outcome.startswith("Reloaded")
            )
        )
