"""
The sd_notify side of the daemon, against a real AF_UNIX datagram socket, and
reload on SIGHUP against real TLS handshakes.
"""

import os
import signal
import sqlite3

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase

from appliance.orthanc.space import StorageSpace
from appliance.orthanc.supervisor import OrthancSupervisor
from appliance.reload import ReloadOnSighup
from appliance.systemd import Notifier, SystemdNotifyService, watchdogInterval
from tests.orthancfakes import ProcessReactor, ScriptedProbe
from tests.support import TestAuthority, inlineStateDatabase, temporaryFolder, testConfig, webTLS, writeTestConfig
from tests.tlsclients import NotifySocket, peerCertificateSubject


def notifySocket(case, abstract: bool = False) -> NotifySocket:
    listener = NotifySocket(None if abstract else temporaryFolder(case) / "notify")
    case.addCleanup(listener.close)
    return listener


def capturedLog(case, level=LogLevel.warn):
    events = []

    def observer(event):
        if event["log_level"] >= level:
            events.append(event)

    globalLogPublisher.addObserver(observer)
    case.addCleanup(globalLogPublisher.removeObserver, observer)
    return events


class NotifierTests(SynchronousTestCase):
    def test_sendsAssignmentsAsOneDatagram(self):
        listener = notifySocket(self)
        Notifier(listener.address).notify(ready="1", status="Orthanc is ready")
        self.assertEqual(listener.messages(), [{"READY": "1", "STATUS": "Orthanc is ready"}])

    def test_abstractSocket(self):
        listener = notifySocket(self, abstract=True)
        Notifier(listener.address).notify(watchdog="1")
        self.assertEqual(listener.messages(), [{"WATCHDOG": "1"}])

    def test_statusIsOneLine(self):
        listener = notifySocket(self)
        Notifier(listener.address).notify(status="failed:\n    last line\n")
        self.assertEqual(listener.messages(), [{"STATUS": "failed: last line"}])

    def test_withoutSocketNothingIsSent(self):
        events = capturedLog(self)
        Notifier.fromEnvironment({}).notify(ready="1")
        Notifier.fromEnvironment({"NOTIFY_SOCKET": ""}).notify(ready="1")
        self.assertEqual(events, [])

    def test_unreachableSocketIsLoggedNotRaised(self):
        events = capturedLog(self)
        Notifier(str(temporaryFolder(self) / "nobody")).notify(ready="1")
        [event] = events
        self.assertIn("Cannot notify systemd", event["log_format"])


class WatchdogIntervalTests(SynchronousTestCase):
    def test_halfOfWatchdogUsec(self):
        self.assertEqual(watchdogInterval({"WATCHDOG_USEC": "10000000"}), 5.0)

    def test_forThisProcessOnly(self):
        environ = {"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}
        self.assertIsNone(watchdogInterval(environ, pid=2))
        self.assertEqual(watchdogInterval(environ, pid=1), 5.0)

    def test_offWithoutOrBadValue(self):
        self.assertIsNone(watchdogInterval({}))
        self.assertIsNone(watchdogInterval({"WATCHDOG_USEC": "soon"}))
        self.assertIsNone(watchdogInterval({"WATCHDOG_USEC": "0"}))


class SystemdNotifyServiceTests(SynchronousTestCase):
    """
    The service with the real supervisor, driven by a fake process and a clock.
    """

    def setUp(self):
        self.reactor = ProcessReactor()
        self.probe = ScriptedProbe()
        config = testConfig(temporaryFolder(self), orthanc={"health_interval": "5s"})
        self.supervisor = OrthancSupervisor(config, self.reactor, probe=self.probe, space=StorageSpace.forOrthanc(config))
        self.listener = notifySocket(self)
        self.service = SystemdNotifyService(
            Notifier(self.listener.address), self.supervisor, self.reactor, watchdogInterval=10.0
        )
        self.supervisor.startService()
        self.service.startService()

    def orthancAnswers(self):
        self.reactor.advance(0.2)
        self.probe.answer(ok=True)

    def test_readyOnlyOnceOrthancIsReady(self):
        messages = self.listener.messages()
        self.assertNotIn("READY", {key for message in messages for key in message})
        self.orthancAnswers()
        [ready] = [message for message in self.listener.messages() if "READY" in message]
        self.assertEqual(ready["READY"], "1")
        self.assertTrue(ready["STATUS"].startswith("Orthanc is ready: answering on 127.0.0.1:"))

    def test_statusFollowsTheSupervisor(self):
        self.orthancAnswers()
        self.listener.messages()
        self.reactor.processes[0].end(signal=9)
        [status] = self.listener.messages()
        self.assertEqual(
            status, {"STATUS": "Orthanc is restarting: Orthanc was killed by signal 9; restarting in 1s"}
        )

    def test_watchdogPingsAtTheInterval(self):
        def pings():
            return sum(1 for message in self.listener.messages() if message.get("WATCHDOG") == "1")

        self.assertEqual(pings(), 1)  # at once
        self.reactor.advance(9.9)
        self.assertEqual(pings(), 0)
        self.reactor.advance(0.1)
        self.assertEqual(pings(), 1)

    def test_stoppingStopsThePings(self):
        self.listener.messages()
        self.service.stopService()
        self.assertEqual(self.listener.messages(), [{"STOPPING": "1", "STATUS": "Stopping"}])
        self.reactor.advance(30)
        self.assertEqual(self.listener.messages(), [])

    def test_nothingFollowsStopping(self):
        self.orthancAnswers()
        self.service.stopService()
        self.listener.messages()
        self.service.reloaded("Reloaded")
        self.supervisor.stopService()
        self.assertEqual(self.listener.messages(), [])

    def test_reloadEndsWithReadyOnlyOnceStarted(self):
        self.service.reloading()
        self.service.reloaded("Reloaded")
        reloading, ended = self.listener.messages()[-2:]
        self.assertEqual(reloading["RELOADING"], "1")
        self.assertGreater(int(reloading["MONOTONIC_USEC"]), 0)
        self.assertNotIn("READY", ended)
        self.orthancAnswers()
        self.service.reloading()
        self.service.reloaded("Reloaded")
        ended = self.listener.messages()[-1]
        self.assertEqual(ended["READY"], "1")
        self.assertTrue(ended["STATUS"].startswith("Reloaded; Orthanc is ready"))


class DatabaseStatusTests(SynchronousTestCase):
    """
    STATUS= names the state database's state beside Orthanc's, and changes
    when the database goes away and comes back.
    """

    def setUp(self):
        self.reactor = ProcessReactor()
        self.probe = ScriptedProbe()
        config = testConfig(temporaryFolder(self))
        self.supervisor = OrthancSupervisor(config, self.reactor, probe=self.probe, space=StorageSpace.forOrthanc(config))
        self.database = inlineStateDatabase(self.reactor)
        self.listener = notifySocket(self)
        SystemdNotifyService(Notifier(self.listener.address), self.supervisor, self.reactor, database=self.database).startService()
        self.supervisor.startService()
        self.reactor.advance(0.2)
        self.probe.answer(ok=True)

    def statuses(self):
        return [message["STATUS"] for message in self.listener.messages() if "STATUS" in message]

    def test_theDatabaseComesAndGoesInTheStatus(self):
        self.assertTrue(
            self.statuses()[-1].endswith("; the state database (:memory:) is available"), self.statuses()
        )
        self.database._pool.broken = sqlite3.OperationalError("disk I/O error")
        self.database.interact(lambda statements: None).addErrback(lambda failure: None)
        [status] = self.statuses()
        self.assertTrue(status.startswith("Orthanc is ready: "), status)
        self.assertTrue(
            status.endswith("; the state database (:memory:) is not available: disk I/O error"), status
        )
        self.database._pool.broken = None
        self.reactor.advance(1)
        [status] = self.statuses()
        self.assertTrue(status.endswith("; the state database (:memory:) is available"), status)


class ReloadTests(TestCase):
    """
    ReloadOnSighup with the real reactor, a real TLS listener and real signals.
    """

    def setUp(self):
        self.folder = temporaryFolder(self)
        self.authority = TestAuthority(self.folder / "ca")
        self.installCertificate("first.example")
        self.configPath = writeTestConfig(self.folder)
        from appliance.config import loadConfig

        self.config = loadConfig(self.configPath)
        self.tls = webTLS(self.config)
        self.listener = notifySocket(self)
        supervisor = OrthancSupervisor(
            self.config, ProcessReactor(), probe=ScriptedProbe(), space=StorageSpace.forOrthanc(self.config)
        )
        self.notify = SystemdNotifyService(Notifier(self.listener.address), supervisor, reactor)
        self.notify.startService()
        self.addCleanup(self.notify.stopService)
        self.listener.messages()
        self.reloader = ReloadOnSighup(self.config, [self.tls], self.notify, reactor)
        self.reloader.startService()
        self.addCleanup(self.reloader.stopService)
        self.log = capturedLog(self, LogLevel.info)

    def installCertificate(self, commonName: str) -> None:
        certificate, key = self.authority.issue(commonName, commonName, server=True)
        tlsFolder = self.folder / "tls"
        tlsFolder.mkdir(exist_ok=True)
        (tlsFolder / "cert.pem").write_bytes(certificate.read_bytes())
        (tlsFolder / "key.pem").write_bytes(key.read_bytes())

    def listen(self):
        class Echo(Protocol):
            def dataReceived(self, data):
                self.transport.write(data)

        factory = TLSMemoryBIOFactory(self.tls, False, Factory.forProtocol(Echo))
        listening = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)

        def listened(port):
            self.addCleanup(port.stopListening)
            return port.getHost().port

        return listening.addCallback(listened)

    def waitForReload(self) -> Deferred:
        """
        Fires with the outcome of the reload the next SIGHUP starts.
        """
        ended = Deferred()
        original = self.notify.reloaded

        def reloaded(outcome):
            original(outcome)
            self.notify.reloaded = original
            ended.callback(outcome)

        self.notify.reloaded = reloaded
        return ended

    @inlineCallbacks
    def test_sighupSwapsTheCertificateForNewConnections(self):
        port = yield self.listen()
        self.assertEqual((yield deferToThread(peerCertificateSubject, port)), "first.example")
        self.installCertificate("second.example")
        ended = self.waitForReload()
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual((yield ended), "Reloaded")
        self.assertEqual((yield deferToThread(peerCertificateSubject, port)), "second.example")
        reloading, ready = self.listener.messages()
        self.assertEqual(reloading["RELOADING"], "1")
        self.assertTrue(ready["STATUS"].startswith("Reloaded"))

    @inlineCallbacks
    def test_brokenConfigurationIsRefusedAndLogged(self):
        port = yield self.listen()
        self.installCertificate("second.example")
        good = self.configPath.read_text()
        self.configPath.write_text(good.replace("[web]\n", "[web]\ncolour = blue\n", 1))
        outcome = yield self.reloader.reload()
        self.assertEqual(outcome, "Reload refused (see the log)")
        self.assertIs(self.reloader.config, self.config)
        self.assertEqual((yield deferToThread(peerCertificateSubject, port)), "first.example")
        [refusal] = [event for event in self.log if event["log_level"] == LogLevel.error]
        self.assertIn(f"{self.configPath}: [web] colour: unknown key", refusal["problems"])

    @inlineCallbacks
    def test_unusableCertificateIsRefused(self):
        (self.folder / "tls" / "key.pem").write_text("not a key")
        outcome = yield self.reloader.reload()
        self.assertEqual(outcome, "Reload refused (see the log)")
        [refusal] = [event for event in self.log if event["log_level"] == LogLevel.error]
        self.assertIn("key.pem", refusal["problems"])

    @inlineCallbacks
    def test_changesNeedingARestartAreNamed(self):
        self.configPath.write_text(
            self.configPath.read_text().replace("[orthanc]\n", "[orthanc]\nverbose = yes\n", 1)
        )
        outcome = yield self.reloader.reload()
        self.assertEqual(outcome, "Reloaded")
        [warning] = [event for event in self.log if event["log_level"] == LogLevel.warn]
        self.assertEqual(warning["sections"], "[orthanc]")

    @inlineCallbacks
    def test_reloadsDuringAReloadAreCoalescedIntoOneMore(self):
        first = self.reloader.reload()
        second = self.reloader.reload()
        third = self.reloader.reload()
        yield first
        self.assertEqual((yield second), "Reloaded")
        yield third
        starts = [message for message in self.listener.messages() if "RELOADING" in message]
        self.assertEqual(len(starts), 2)
