"""
The Orthanc supervisor: starts Orthanc, waits until it answers, keeps it alive, and
stops it without ever leaving it behind.

    stopped ──start──▶ starting ──/system answers──▶ ready
                          │  ▲                          │ exits, or stops answering
        exits before ready│  └───── backoff delay ──── restarting
                          ▼
                        failed  (after max_start_failures in a row, or no executable)

A start that fails while Orthanc's storage is full does not count towards
max_start_failures: Orthanc 1.10 cannot open its SQLite index on a full disk,
and starts by itself once space is freed (see L{appliance.orthanc.space}).

Unlike L{twisted.runner.procmon.ProcessMonitor}, it gives Orthanc an explicit
environment, backs off exponentially, notices a hung Orthanc, gives up on one that
can never start, and its C{stopService} waits for the child to be gone.
"""

import os
from typing import Callable, Dict, List, Mapping, Optional, Set, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from appliance.config import Config
from appliance.orthanc.process import OrthancProcessProtocol
from appliance.orthanc.settings import (
    ORTHANC_HTTP_THREADS,
    OrthancCredentials,
    newCredentials,
    orthancConfigurationPath,
    orthancHome,
    orthancStorageFolder,
    renderOrthancConfiguration,
    writeOrthancConfiguration,
)
from appliance.orthanc.space import StorageSpace
from appliance.orthanc.state import IOrthanc, OrthancState

#: How often Orthanc is asked whether it is up yet while it starts.
STARTUP_POLL_INTERVAL = 0.2

#: The first restart delay; it doubles up to [orthanc] restart_max_delay.
INITIAL_RESTART_DELAY = 1.0


def describeExit(reason: Failure) -> str:
    value = reason.value
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            return f"Orthanc was killed by signal {value.signal}"
        return f"Orthanc exited with status {value.exitCode}"
    return "Orthanc exited with status 0"


@implementer(IOrthanc)
class OrthancSupervisor(Service):
    """
    Runs one Orthanc process configured from the appliance's configuration.

    @ivar state: the current L{OrthancState}.
    @ivar reason: a sentence explaining the state, for the log and /healthz.
    @ivar credentials: what the proxy uses to reach Orthanc's REST API; new at
        every start of Orthanc.
    @ivar dicomStatus: a sentence on the last C-ECHO to Orthanc's DICOM port,
        for /healthz; readiness needs both the REST API and the C-ECHO.
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor=None,
        *,
        probe,
        space: StorageSpace,
        echoProbe=None,
        relayPorts: Optional[Mapping[str, int]] = None,
        httpThreads: int = ORTHANC_HTTP_THREADS,
    ) -> None:
        """
        @param probe: asks Orthanc's REST API, given the credentials
            (L{appliance.orthanc.probe.RestProbe}).
        @param space: the free space of Orthanc's storage.
        @param echoProbe: asks its DICOM port (a C-ECHO,
            L{appliance.orthanc.probe.DicomEchoProbe}); L{None}: not asked.
        @param relayPorts: the loopback ports through which Orthanc reaches the
            modalities, by name (see L{appliance.dicom.destinations}).
        @param httpThreads: Orthanc's HTTP worker threads; the proxy's limit
            must leave some of them free (see L{appliance.web.turns}).
        """
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self._config = config
        self._settings = config.orthanc
        self._reactor = reactor
        self._probe = probe
        self._echoProbe = echoProbe
        self._relayPorts = relayPorts if relayPorts is not None else {}
        self._httpThreads = httpThreads
        self._space = space
        self.dicomStatus = "not checked yet"
        #: How many times Orthanc was started (the first start and every restart).
        self.starts = 0
        self.state = OrthancState.STOPPED
        self.reason = "not started"
        self.credentials: Optional[OrthancCredentials] = None
        self._process = None
        self._protocol: Optional[OrthancProcessProtocol] = None
        self._becameReady = False
        self._stopped: Optional[Deferred] = None
        self._restartDelay = INITIAL_RESTART_DELAY
        self._startFailures = 0
        self._probeFailures = 0
        self._probeInFlight: Optional[Deferred] = None
        self._timers: Dict[str, IDelayedCall] = {}
        self._waiters: List[Tuple[Set[OrthancState], Deferred]] = []
        self._observers: List[Callable[[OrthancState, str], None]] = []

    # --- what the rest of the appliance sees

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self._process is not None else None

    def subscribe(self, observer: Callable[[OrthancState, str], None]) -> None:
        """
        Call C{observer(state, reason)} at every change of state.
        """
        self._observers.append(observer)

    def whenState(self, *states: OrthancState) -> Deferred:
        """
        A Deferred that fires with the state as soon as it is one of C{states}
        (at once if it already is).
        """
        if self.state in states:
            return succeed(self.state)
        waiter: Deferred = Deferred()
        self._waiters.append((set(states), waiter))
        return waiter

    # --- IService

    def startService(self) -> None:
        Service.startService(self)
        self._restartDelay = INITIAL_RESTART_DELAY
        self._startFailures = 0
        for folder in (orthancHome(self._config), orthancStorageFolder(self._config), self._config.appliance.runtime_dir):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._launch()

    def stopService(self) -> Deferred:
        Service.stopService(self)
        self._cancelTimers("restart", "probe", "startTimeout", "resetBackoff")
        self._cancelProbe()
        if self._process is None:
            self._setState(OrthancState.STOPPED, "stopped")
            return succeed(None)
        self.log.info("Stopping Orthanc (pid {pid})", pid=self.pid)
        self._stopped = Deferred()
        self._terminate()
        return self._stopped

    # --- the life of one Orthanc process

    def _launch(self) -> None:
        executable = self._settings.executable
        if not os.access(executable, os.X_OK):
            self._fail(f"{executable} is not an executable file")
            return
        self.credentials = newCredentials()
        configurationPath = orthancConfigurationPath(self._config)
        try:
            writeOrthancConfiguration(
                self._config,
                renderOrthancConfiguration(self._config, self.credentials, self._relayPorts, self._httpThreads),
            )
        except OSError as error:
            self._fail(f"cannot write Orthanc's configuration: {error}")
            return
        arguments = [str(executable), str(configurationPath)]
        if self._settings.verbose:
            arguments.append("--verbose")
        self._becameReady = False
        self._probeFailures = 0
        self._protocol = OrthancProcessProtocol(self._processEnded)
        try:
            self._process = self._reactor.spawnProcess(
                self._protocol,
                str(executable),
                arguments,
                env=self._environment(),
                path=str(orthancHome(self._config)),
                childFDs={0: "w", 1: "r", 2: "r"},
            )
        except OSError as error:
            self._fail(f"cannot start {executable}: {error}")
            return
        self.starts += 1
        self._setState(OrthancState.STARTING, f"started as pid {self.pid}")
        self._schedule("startTimeout", self._settings.start_timeout, self._startTimedOut)
        self._schedule("probe", STARTUP_POLL_INTERVAL, self._runProbe)

    def _environment(self) -> Dict[str, str]:
        """
        Orthanc's whole environment: nothing of ours leaks into it.
        """
        environment = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "HOME": str(orthancHome(self._config)),
        }
        if "TZ" in os.environ:
            environment["TZ"] = os.environ["TZ"]
        return environment

    def _runProbe(self) -> None:
        process = self._process
        probe = self._checkReadiness()
        self._probeInFlight = probe
        probe.addCallbacks(
            self._probeAnswered,
            self._probeFailed,
            callbackArgs=(process,),
            errbackArgs=(process,),
        )
        probe.addErrback(
            lambda failure: self.log.failure("Error while handling an Orthanc probe", failure)
        )

    def _checkReadiness(self) -> Deferred:
        """
        Ask the REST API, then the DICOM port.
        """
        checking = maybeDeferred(self._probe, self.credentials)
        if self._echoProbe is not None:
            checking.addCallback(lambda _: self._echoDicom())
        return checking

    def _echoDicom(self) -> Deferred:
        port = self._settings.dicom_port

        def answered(_: object) -> None:
            self.dicomStatus = f"answers C-ECHO on 127.0.0.1:{port}"

        def failed(failure: Failure) -> Failure:
            error = failure.getErrorMessage() or failure.type.__name__
            self.dicomStatus = f"no C-ECHO answer on 127.0.0.1:{port}: {error}"
            return failure

        return maybeDeferred(self._echoProbe).addCallbacks(answered, failed)

    def _probeAnswered(self, _: object, process: object) -> None:
        self._probeInFlight = None
        if process is not self._process or not self.running:
            return
        self._probeFailures = 0
        if self.state is OrthancState.STARTING:
            self._cancelTimers("startTimeout")
            self._becameReady = True
            self._startFailures = 0
            answering = f"answering on 127.0.0.1:{self._settings.http_port}"
            if self._echoProbe is not None:
                answering += f" (HTTP) and 127.0.0.1:{self._settings.dicom_port} (DICOM)"
            self._setState(OrthancState.READY, answering)
            self._schedule("resetBackoff", self._settings.backoff_reset_after, self._resetBackoff)
        self._schedule("probe", self._settings.health_interval, self._runProbe)

    def _probeFailed(self, failure: Failure, process: object) -> None:
        self._probeInFlight = None
        if process is not self._process or not self.running:
            return
        if self.state is OrthancState.STARTING:
            # Refused connections are expected until Orthanc has opened its port.
            self._schedule("probe", STARTUP_POLL_INTERVAL, self._runProbe)
            return
        self._probeFailures += 1
        self.log.warn(
            "Orthanc did not answer a health check ({count} of {limit}): {error}",
            count=self._probeFailures,
            limit=self._settings.unresponsive_after,
            error=failure.getErrorMessage() or failure.type.__name__,
        )
        if self._probeFailures >= self._settings.unresponsive_after:
            self._setState(OrthancState.RESTARTING, "Orthanc stopped answering; restarting it")
            self._terminate()
        else:
            self._schedule("probe", self._settings.health_interval, self._runProbe)

    def _startTimedOut(self) -> None:
        self.log.error(
            "Orthanc did not answer within {timeout}s of its start; stopping it",
            timeout=self._settings.start_timeout,
        )
        self._terminate()

    def _resetBackoff(self) -> None:
        self._restartDelay = INITIAL_RESTART_DELAY

    def _terminate(self) -> None:
        """
        SIGTERM now, SIGKILL if Orthanc is still there after stop_timeout.
        """
        self._signal("TERM")
        self._schedule("kill", self._settings.stop_timeout, self._kill)

    def _kill(self) -> None:
        self.log.warn(
            "Orthanc did not stop within {timeout}s of SIGTERM; killing it",
            timeout=self._settings.stop_timeout,
        )
        self._signal("KILL")

    def _signal(self, name: str) -> None:
        if self._process is None:
            return
        try:
            self._process.signalProcess(name)
        except ProcessExitedAlready:
            pass

    def _processEnded(self, reason: Failure, lastLines: List[str]) -> None:
        self._process = None
        self._cancelTimers("probe", "startTimeout", "resetBackoff", "kill")
        self._cancelProbe()
        exit = describeExit(reason)
        if self._stopped is not None:
            stopped, self._stopped = self._stopped, None
            self._setState(OrthancState.STOPPED, exit)
            stopped.callback(None)
            return
        if not self._becameReady and self._space.full():
            exit += " before it was ready: the archive's storage is full, free space for it to start"
        elif not self._becameReady:
            self._startFailures += 1
            if self._startFailures >= self._settings.max_start_failures:
                lines = "\n".join(f"    {line}" for line in lastLines[-10:])
                self._fail(
                    f"{exit} before it was ready, {self._startFailures} times in a row;"
                    f" giving up. Its last lines were:\n{lines}"
                )
                return
        delay = self._restartDelay
        self._restartDelay = min(delay * 2, self._settings.restart_max_delay)
        self._setState(OrthancState.RESTARTING, f"{exit}; restarting in {delay:g}s")
        self._schedule("restart", delay, self._launch)

    def _fail(self, reason: str) -> None:
        self._setState(OrthancState.FAILED, reason)

    # --- plumbing

    def _setState(self, state: OrthancState, reason: str) -> None:
        changed = state is not self.state
        self.state, self.reason = state, reason
        if not changed:
            return
        if state is OrthancState.FAILED:
            self.log.critical("Orthanc failed: {reason}", reason=reason)
        elif state is OrthancState.RESTARTING:
            self.log.warn("Orthanc is restarting: {reason}", reason=reason)
        else:
            self.log.info("Orthanc is {state}: {reason}", state=state.value, reason=reason)
        for observer in list(self._observers):
            observer(state, reason)
        waiting, self._waiters = self._waiters, []
        for states, waiter in waiting:
            if state in states:
                waiter.callback(state)
            else:
                self._waiters.append((states, waiter))

    def _schedule(self, name: str, delay: float, function: Callable[[], None]) -> None:
        self._cancelTimers(name)
        self._timers[name] = self._reactor.callLater(delay, self._fire, name, function)

    def _fire(self, name: str, function: Callable[[], None]) -> None:
        del self._timers[name]
        function()

    def _cancelTimers(self, *names: str) -> None:
        for name in names:
            timer = self._timers.pop(name, None)
            if timer is not None and timer.active():
                timer.cancel()

    def _cancelProbe(self) -> None:
        probe, self._probeInFlight = self._probeInFlight, None
        if probe is not None:
            probe.cancel()
