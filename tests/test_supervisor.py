"""
The Orthanc supervisor's state machine, driven with a fake process and a clock.
"""

import json
import math
import stat

from twisted.internet.error import ProcessDone
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from appliance.orthanc.process import OrthancProcessProtocol
from appliance.orthanc.settings import (
    ORTHANC_HTTP_THREADS,
    ORTHANC_USER,
    orthancConfigurationPath,
    postgresqlPasswordPath,
)
from appliance.orthanc.space import StorageSpace
from appliance.orthanc.state import OrthancState
from appliance.orthanc.supervisor import OrthancSupervisor
from tests.orthancfakes import ProcessReactor, ScriptedProbe
from tests.support import FakeFileSystem, temporaryFolder, testConfig


class SupervisorTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = ProcessReactor()
        self.probe = ScriptedProbe()
        self.config = testConfig(
            temporaryFolder(self),
            orthanc={
                "restart_max_delay": "8s",
                "backoff_reset_after": "60s",
                "health_interval": "5s",
                "stop_timeout": "30s",
                "start_timeout": "120s",
                "unresponsive_after": "2",
                "max_start_failures": "3",
            },
        )
        self.supervisor = OrthancSupervisor(
            self.config, self.reactor, probe=self.probe, space=StorageSpace.forOrthanc(self.config)
        )
        self.states = []
        self.supervisor.subscribe(lambda state, reason: self.states.append(state.value))

    def becomeReady(self):
        """
        Let the current process answer its first probe.
        """
        self.reactor.advance(0.2)
        self.probe.answer(ok=True)
        self.assertEqual(self.supervisor.state, OrthancState.READY)

    def test_startWritesAPrivateConfigurationAndSpawnsOrthanc(self):
        self.supervisor.startService()
        [process] = self.reactor.processes
        path = orthancConfigurationPath(self.config)
        self.assertEqual(process.args, [str(self.config.orthanc.executable), str(path)])
        self.assertEqual(process.env["PATH"], "/usr/sbin:/usr/bin:/sbin:/bin")
        self.assertNotIn("PYTHONPATH", process.env)
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        document = json.loads(path.read_text())
        credentials = self.supervisor.credentials
        self.assertEqual(document["RegisteredUsers"], {ORTHANC_USER: credentials.password})
        self.assertGreaterEqual(len(credentials.password), 32)
        self.assertNotIn(credentials.password, repr(credentials))
        self.assertEqual(document["RemoteAccessAllowed"], False)
        self.assertEqual(document["DicomWeb"]["Root"], "/pacs/")
        self.assertEqual(document["ExecuteLuaEnabled"], False)
        self.assertEqual(document["OverwriteInstances"], False)
        # The proxy's limit is derived from it: never Orthanc's default.
        self.assertEqual(document["HttpThreadsCount"], ORTHANC_HTTP_THREADS)
        # Orthanc must not give up on a send before the appliance gives up on
        # the client that holds it back (Orthanc's default is 30 s).
        self.assertEqual(document["HttpRequestTimeout"], math.ceil(self.config.web.idle_timeout) + 30)
        self.assertGreater(document["HttpRequestTimeout"], self.config.web.idle_timeout)
        self.assertEqual(self.states, ["starting"])

    def test_httpThreadsCanBeFewer(self):
        supervisor = OrthancSupervisor(
            self.config, self.reactor, probe=self.probe, space=StorageSpace.forOrthanc(self.config), httpThreads=3
        )
        supervisor.startService()
        document = json.loads(orthancConfigurationPath(self.config).read_text())
        self.assertEqual(document["HttpThreadsCount"], 3)

    def test_readyOnlyWhenTheProbeAnswers(self):
        self.supervisor.startService()
        self.reactor.advance(0.2)
        self.probe.answer(ok=False)
        self.assertEqual(self.supervisor.state, OrthancState.STARTING)
        self.reactor.advance(0.2)
        ready = self.supervisor.whenState(OrthancState.READY)
        self.probe.answer(ok=True)
        self.assertEqual(self.successResultOf(ready), OrthancState.READY)
        self.assertEqual(self.states, ["starting", "ready"])

    def test_passwordChangesAtEveryStart(self):
        self.supervisor.startService()
        first = self.supervisor.credentials
        self.becomeReady()
        self.reactor.processes[0].end(signal=9)
        self.reactor.advance(1)
        self.assertNotEqual(self.supervisor.credentials.password, first.password)

    def test_backoffDoublesToTheMaximum(self):
        self.supervisor.startService()
        delays = []
        for attempt in range(5):
            self.becomeReady()
            self.reactor.processes[-1].end(exitCode=1)
            self.assertEqual(self.supervisor.state, OrthancState.RESTARTING)
            spawned = len(self.reactor.processes)
            delay = 0.0
            while len(self.reactor.processes) == spawned:
                self.reactor.advance(0.5)
                delay += 0.5
            delays.append(delay)
        self.assertEqual(delays, [1, 2, 4, 8, 8])

    def test_backoffResetsAfterBeingReadyForAWhile(self):
        self.supervisor.startService()
        for _ in range(3):
            self.becomeReady()
            self.reactor.processes[-1].end(exitCode=1)
            self.reactor.advance(8)
        self.becomeReady()
        for _ in range(12):  # stays healthy for a minute
            self.reactor.advance(5)
            self.probe.answer(ok=True)
        self.reactor.processes[-1].end(exitCode=1)
        self.reactor.advance(1)
        self.assertEqual(self.supervisor.state, OrthancState.STARTING)

    def test_repeatedFailedStartsEndInFailed(self):
        self.supervisor.startService()
        for attempt in range(3):
            self.reactor.processes[-1].protocol.childDataReceived(
                2, b"E1123 10:00:00.000000 main.cpp:1] Bad file format in the configuration\n"
            )
            self.reactor.processes[-1].end(exitCode=255)
            self.reactor.advance(10)
        self.assertEqual(self.supervisor.state, OrthancState.FAILED)
        self.assertEqual(len(self.reactor.processes), 3, "no restart after failing")
        self.assertIn("Bad file format in the configuration", self.supervisor.reason)
        self.assertIn("3 times in a row", self.supervisor.reason)
        self.reactor.advance(3600)
        self.assertEqual(len(self.reactor.processes), 3)

    def test_failedStartsOnAFullDiskAreNotCounted(self):
        """
        Orthanc cannot open its index on a full disk: its failed starts wait
        for space, at the longest restart delay, and it starts once space is
        freed; then failed starts count again.
        """
        disk = FakeFileSystem(free=0)
        self.supervisor = OrthancSupervisor(
            self.config, self.reactor, probe=self.probe, space=StorageSpace(temporaryFolder(self), 1024 * 1024, disk)
        )
        self.supervisor.startService()
        for attempt in range(6):
            self.reactor.processes[-1].end(exitCode=255)
            self.assertEqual(self.supervisor.state, OrthancState.RESTARTING)
            self.assertIn("the archive's storage is full", self.supervisor.reason)
            self.reactor.advance(8)
        self.assertEqual(len(self.reactor.processes), 7)
        disk.free = 1024 * 1024
        self.becomeReady()
        self.reactor.processes[-1].end(exitCode=255)
        for attempt in range(3):
            self.reactor.advance(8)
            self.reactor.processes[-1].end(exitCode=255)
        self.assertEqual(self.supervisor.state, OrthancState.FAILED)

    def test_missingExecutableFailsAtOnce(self):
        folder = temporaryFolder(self)
        executable = folder / "Orthanc"
        executable.write_text("#!/bin/sh\n")
        executable.chmod(0o755)
        config = testConfig(folder, orthanc={"executable": executable})
        executable.unlink()  # removed after the configuration was checked
        self.supervisor = OrthancSupervisor(config, self.reactor, probe=self.probe, space=StorageSpace.forOrthanc(config))
        self.supervisor.startService()
        self.assertEqual(self.supervisor.state, OrthancState.FAILED)
        self.assertIn("is not an executable file", self.supervisor.reason)
        self.assertEqual(self.reactor.processes, [])

    def test_databasePasswordIsReadAtEveryStartAndKeptOutOfTheConfiguration(self):
        """
        With [database], Orthanc's plugins find the password in a private
        libpq password file written from password_file at each start (a new
        password is taken at Orthanc's next start); a file that cannot be
        read fails the start with the reason.
        """
        folder = temporaryFolder(self)
        password = folder / "password"
        password.write_text("first:secret\\\n")
        config = testConfig(
            folder, database={"host": "127.0.0.1", "ssl_mode": "disable", "password_file": password, "name": "archive"}
        )
        supervisor = OrthancSupervisor(config, self.reactor, probe=self.probe, space=StorageSpace.forOrthanc(config))
        supervisor.startService()
        passfile = postgresqlPasswordPath(config)
        self.assertEqual(passfile.read_text(), "127.0.0.1:5432:archive:pacs_appliance:first\\:secret\\\\\n")
        self.assertEqual(stat.S_IMODE(passfile.stat().st_mode), 0o600)
        document = orthancConfigurationPath(config).read_text()
        self.assertNotIn("secret", document)
        self.assertIn(f"passfile={passfile}", json.loads(document)["PostgreSQL"]["ConnectionUri"])
        password.write_text("second\n")
        self.reactor.processes[-1].end(exitCode=255)
        self.reactor.advance(1)
        self.assertTrue(passfile.read_text().endswith(":second\n"))
        password.unlink()
        self.reactor.processes[-1].end(exitCode=255)
        self.reactor.advance(2)
        self.assertEqual(supervisor.state, OrthancState.FAILED)
        self.assertIn("cannot write Orthanc's configuration", supervisor.reason)
        self.assertIn(str(password), supervisor.reason)

    def test_startTimeoutStopsAHungStart(self):
        self.supervisor.startService()
        process = self.reactor.processes[0]
        for _ in range(600):
            self.reactor.advance(0.2)
            if self.probe.calls:
                self.probe.answer(ok=False)
        self.assertEqual(process.signals, ["TERM"])
        process.end(signal=15)
        self.assertEqual(self.supervisor.state, OrthancState.RESTARTING)

    def test_unresponsiveOrthancIsRestarted(self):
        self.supervisor.startService()
        self.becomeReady()
        process = self.reactor.processes[0]
        self.reactor.advance(5)
        self.probe.answer(ok=False)
        self.assertEqual(self.supervisor.state, OrthancState.READY)
        self.reactor.advance(5)
        self.probe.answer(ok=False)
        self.assertEqual(self.supervisor.state, OrthancState.RESTARTING)
        self.assertEqual(process.signals, ["TERM"])
        self.reactor.advance(30)
        self.assertEqual(process.signals, ["TERM", "KILL"])
        process.end(signal=9)
        self.reactor.advance(1)
        self.assertEqual(len(self.reactor.processes), 2)

    def test_stopWaitsForTheChildAndEscalatesToKill(self):
        self.supervisor.startService()
        self.becomeReady()
        process = self.reactor.processes[0]
        stopped = self.supervisor.stopService()
        self.assertNoResult(stopped)
        self.assertEqual(process.signals, ["TERM"])
        self.reactor.advance(29)
        self.assertEqual(process.signals, ["TERM"])
        self.reactor.advance(1)
        self.assertEqual(process.signals, ["TERM", "KILL"])
        self.assertNoResult(stopped)
        process.end(signal=9)
        self.successResultOf(stopped)
        self.assertEqual(self.supervisor.state, OrthancState.STOPPED)
        self.reactor.advance(3600)
        self.assertEqual(len(self.reactor.processes), 1, "nothing restarted after stop")
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stopWhileWaitingToRestart(self):
        self.supervisor.startService()
        self.becomeReady()
        self.reactor.processes[0].end(exitCode=1)
        self.successResultOf(self.supervisor.stopService())
        self.assertEqual(self.supervisor.state, OrthancState.STOPPED)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stopCancelsAProbeInFlight(self):
        self.supervisor.startService()
        self.becomeReady()
        self.reactor.advance(5)
        [(credentials, pending)] = self.probe.calls
        stopped = self.supervisor.stopService()
        self.assertTrue(pending.called, "the probe was cancelled")
        self.reactor.processes[0].end()
        self.successResultOf(stopped)
        self.assertEqual(self.states, ["starting", "ready", "stopped"])


class OrthancOutputTests(SynchronousTestCase):
    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.ended = []
        self.protocol = OrthancProcessProtocol(lambda reason, lines: self.ended.append(lines))

    def orthancEvents(self):
        return [
            (event["log_level"], event["line"])
            for event in self.events
            if event.get("log_namespace") == "orthanc"
        ]

    def test_linesAreForwardedWithTheirLevel(self):
        self.protocol.childDataReceived(2, b"W1123 10:00:00.1 main.cpp:9] Orthanc has ")
        self.protocol.childDataReceived(2, b"started\nE1123 10:00:01.2 x.cpp:1] broken\nplain\n")
        self.assertEqual(
            self.orthancEvents(),
            [
                (LogLevel.warn, "main.cpp:9] Orthanc has started"),
                (LogLevel.error, "x.cpp:1] broken"),
                (LogLevel.info, "plain"),
            ],
        )

    def test_unfinishedLineIsFlushedAtExit(self):
        self.protocol.childDataReceived(1, b"last words")
        self.protocol.processEnded(Failure(ProcessDone(0)))
        self.assertEqual(self.orthancEvents(), [(LogLevel.info, "last words")])
        self.assertEqual(self.ended, [["last words"]])

    def test_endlessLineIsCutNotBuffered(self):
        self.protocol.childDataReceived(2, b"x" * (64 * 1024))
        [(level, line)] = self.orthancEvents()
        self.assertEqual(len(line), 16 * 1024)
        self.assertEqual(self.protocol._partial, {})
