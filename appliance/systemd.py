"""
The daemon's side of systemd's notification protocol (C{sd_notify}).

Under C{Type=notify} systemd gives us C{NOTIFY_SOCKET}, an AF_UNIX datagram
socket, and reads newline-separated C{KEY=VALUE} assignments from it:

    READY=1        the listeners are bound and Orthanc answers: start is done
    STATUS=...     one line for C{systemctl status}: the supervisor's state,
                   then the state database's (available, or why not)
    WATCHDOG=1     the reactor is alive; sent at half of C{WATCHDOG_USEC}
    RELOADING=1    a reload (SIGHUP) has begun; READY=1 ends it
    STOPPING=1     the daemon is shutting down

Without C{NOTIFY_SOCKET} (a terminal, twistd by hand, tests) nothing is sent.
"""

import os
import socket
import time
from typing import Mapping, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.orthanc.state import IOrthanc, OrthancState
from appliance.state.database import StateDatabase


class Notifier:
    """
    Sends notifications to the socket systemd named, or nowhere.

    Each notification is one datagram sent without blocking: systemd reads
    its socket promptly, and the reactor must never wait on it.
    """

    log = Logger()

    def __init__(self, address: Optional[str]) -> None:
        """
        @param address: C{NOTIFY_SOCKET}: a path, or an abstract socket
            name starting with C{@}; L{None} or empty to send nothing.
        """
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self._address = address or None

    @classmethod
    def fromEnvironment(cls, environ: Mapping[str, str] = os.environ) -> "Notifier":
        return cls(environ.get("NOTIFY_SOCKET"))

    def notify(self, **assignments: str) -> None:
        """
        Send C{KEY=VALUE} assignments as one datagram, keys upper-cased:
        C{notify(ready="1", status="Orthanc is ready")}.
        """
        if self._address is None:
            return
        # A STATUS= value is one line: newlines would start new assignments.
        message = "\n".join(
            f"{key.upper()}={' '.join(str(value).split())}" for key, value in assignments.items()
        )
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sender:
            sender.setblocking(False)
            try:
                sender.sendto(message.encode("utf-8"), self._address)
            except OSError as error:
                self.log.warn(
                    "Cannot notify systemd through {address}: {error}",
                    address=self._address,
                    error=error.strerror or str(error),
                )


def watchdogInterval(environ: Mapping[str, str] = os.environ, pid: Optional[int] = None) -> Optional[float]:
    """
    How often to send WATCHDOG=1, in seconds: half of C{WATCHDOG_USEC}, as
    systemd advises; L{None} when the watchdog is off or meant for another
    process (C{WATCHDOG_PID}).
    """
    try:
        microseconds = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if microseconds <= 0:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    return microseconds / 2_000_000


def orthancStatus(state: OrthancState, reason: str) -> str:
    """
    The STATUS= line for the supervisor's state.
    """
    return f"Orthanc is {state.value}: {reason}"


class SystemdNotifyService(Service):
    """
    Tells systemd how the daemon is doing.

    It must be the last child of the service tree: a L{MultiService} starts
    its children in order, and the TCP listeners bind synchronously when they
    start (a web port that cannot be bound ends the start; the DICOM listener
    logs it as critical), so by the time this one starts the listeners are
    bound, and READY=1 waits only for Orthanc.  Children stop in reverse
    order, so STOPPING=1 is the first thing said on the way down.
    """

    log = Logger()

    def __init__(
        self,
        notifier: Notifier,
        orthanc: IOrthanc,
        reactor=None,
        watchdogInterval: Optional[float] = None,
        database: Optional[StateDatabase] = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self._notifier = notifier
        self._orthanc = orthanc
        self._database = database
        self._reactor = reactor
        self._watchdogInterval = watchdogInterval
        self._watchdog: Optional[LoopingCall] = None
        self._waitingForOrthanc: Optional[Deferred] = None
        self.ready = False
        orthanc.subscribe(self._orthancChanged)
        if database is not None:
            database.subscribe(self._databaseChanged)

    def _status(self, state: OrthancState, reason: str) -> str:
        """
        The STATUS= line: Orthanc's state, then the state database's.
        """
        status = orthancStatus(state, reason)
        if self._database is None:
            return status
        return f"{status}; {self._database.describe()}"

    def startService(self) -> None:
        Service.startService(self)
        self._notifier.notify(status="Starting Orthanc")
        if self._watchdogInterval is not None:
            self._watchdog = LoopingCall(self._notifier.notify, watchdog="1")
            self._watchdog.clock = self._reactor
            self._watchdog.start(self._watchdogInterval, now=True).addErrback(
                self._watchdogFailed
            )
        self._waitingForOrthanc = self._orthanc.whenState(OrthancState.READY)
        self._waitingForOrthanc.addCallback(self._orthancReady)
        self._waitingForOrthanc.addErrback(self._logFailure, "Error while waiting for Orthanc")

    def stopService(self) -> None:
        Service.stopService(self)
        self._notifier.notify(stopping="1", status="Stopping")
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self._watchdog = None

    def reloading(self) -> None:
        """
        A reload has begun; L{reloaded} ends it.
        """
        self._notifier.notify(
            reloading="1",
            # systemd 253 and later want the time the reload began.
            monotonic_usec=str(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000),
            status="Reloading the configuration",
        )

    def reloaded(self, outcome: str) -> None:
        """
        The reload has ended (applied or refused, as C{outcome} says).
        """
        if not self.running:
            return  # STOPPING=1 has been sent: nothing else should follow it
        status = f"{outcome}; {self._status(self._orthanc.state, self._orthanc.reason)}"
        if self.ready:
            self._notifier.notify(ready="1", status=status)
        else:
            # A reload during the start: READY=1 must still wait for Orthanc.
            self._notifier.notify(status=status)

    def _orthancReady(self, state: OrthancState) -> None:
        self._waitingForOrthanc = None
        if not self.running:
            return
        self.ready = True
        self.log.info("Listening and Orthanc is ready: notifying systemd")
        self._notifier.notify(ready="1", status=self._status(self._orthanc.state, self._orthanc.reason))

    def _orthancChanged(self, state: OrthancState, reason: str) -> None:
        if self.running:
            self._notifier.notify(status=self._status(state, reason))

    def _databaseChanged(self) -> None:
        if self.running:
            self._notifier.notify(status=self._status(self._orthanc.state, self._orthanc.reason))

    def _watchdogFailed(self, failure: Failure) -> None:
        self._logFailure(failure, "The systemd watchdog pings stopped")

    def _logFailure(self, failure: Failure, why: str) -> None:
        self.log.failure(why, failure)
