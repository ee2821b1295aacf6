"""
Orthanc's own ports closed to other hosts (appliance.orthanc.firewall).

Orthanc 1.10 listens on every interface and an idle connection from another
host holds it: one to its DICOM port held every association for
about 30 s, three made the supervisor restart Orthanc.  From another host (a
second network namespace), both ports refuse the connection while the
forwarder and /pacs serve that host promptly, with the daemon run the way the
unit runs it (rules applied by ExecStartPre as root, the daemon unprivileged)
and the way `pacs-appliance run` runs as root.
"""

import json
import os
import shlex
import subprocess
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from appliance.orthanc import firewall
from appliance.orthanc.firewall import FirewallError, OrthancFirewall, OrthancPortGuard
from tests.daemon import EXECUTABLE, DaemonClient, addUser, orthancPid, startDaemon
from tests.support import (
    OtherHost,
    basicAuthorization,
    ctSeries,
    freePort,
    temporaryFolder,
    testConfig,
    unitSettings,
)

#: How long a peer on the other host waits for an answer before the test
#: fails: Orthanc held by idle connections answers after about 30 s.
PEER_TIMEOUT = 10

#: Idle connections tried to each of Orthanc's ports (three starved it).
IDLE_CONNECTIONS = 3


def tableExists(table: str) -> bool:
    listed = subprocess.run([str(firewall.NFT), "list", "table", "inet", table], capture_output=True)
    return listed.returncode == 0


#: The drop-in that has nftables.service restore the appliance's rules.
NFTABLES_DROP_IN = Path(__file__).resolve().parent.parent / "systemd" / "nftables.service.d" / "pacs-appliance.conf"


def dropInCommand(key: str, configPath: Path) -> list:
    """
    The drop-in's C{key} command line ("-" dropped), with the checkout's
    program and the test's configuration.
    """
    [line] = [line.split("=", 1)[1] for line in NFTABLES_DROP_IN.read_text().splitlines() if line.startswith(key + "=")]
    return localCommand(line.removeprefix("-"), configPath)


def localCommand(line: str, configPath: Path) -> list:
    return [
        str(EXECUTABLE) if word == "/usr/bin/pacs-appliance" else str(configPath) if word == "/etc/pacs-appliance/appliance.ini" else word
        for word in shlex.split(line)
    ]


def unitCommand(key: str, configPath: Path) -> list:
    """
    The unit's C{key} command line (the "+" of privilege dropped: this test
    runs as root), with the checkout's program and the test's configuration.
    """
    line = unitSettings()[key]
    assert line.startswith("+"), f"{key} must run with privilege: {line}"
    return localCommand(line[1:], configPath)


class RulesTests(SynchronousTestCase):
    def setUp(self):
        self.folder = temporaryFolder(self)
        self.config = testConfig(self.folder)
        self.firewall = OrthancFirewall.fromConfig(self.config)

    def test_onlyLoopbackReachesTheTwoPorts(self):
        ports = self.config.orthanc.http_port, self.config.orthanc.dicom_port
        self.assertEqual(self.firewall.table, "pacs_appliance_orthanc_%d_%d" % ports)
        self.assertIn('iif != "lo" tcp dport { %d, %d } counter reject with tcp reset' % ports, self.firewall.ruleset())
        # The table is replaced whole, whether it existed or not.
        self.assertTrue(self.firewall.ruleset().startswith(f"add table inet {self.firewall.table}; delete table"))

    def test_recordNamesThePortsInForce(self):
        self.assertFalse(self.firewall.inForce())
        self.firewall.record()
        self.assertTrue(self.firewall.inForce())
        self.assertEqual(oct(self.firewall.recordPath.stat().st_mode & 0o777), "0o644")
        self.assertEqual(json.loads(self.firewall.recordPath.read_text()), {"ports": list(self.firewall.ports)})
        moved = OrthancFirewall(freePort(), self.firewall.dicomPort, self.firewall.runtimeDir)
        self.assertFalse(moved.inForce())
        # The rules applied are removed even after the ports were edited.
        self.assertIn(f"delete table inet {self.firewall.table}", moved.removal())
        self.assertIn(f"delete table inet {moved.table}", moved.removal())
        self.firewall.forget()
        self.assertFalse(self.firewall.inForce())


    def test_recordCannotBecomeAnNftCommand(self):
        """
        Root reads the record back from a folder the daemon's user owns: what
        that user writes there never becomes a word of an nft command.
        """
        self.firewall.runtimeDir.mkdir(parents=True, exist_ok=True)
        for forged in (
            {"table": "x; flush ruleset", "ports": list(self.firewall.ports)},
            {"ports": ["1; flush ruleset", 2]},
            {"ports": [0, 70000]},
            {"ports": [1, 2, 3]},
            "not json",
        ):
            self.firewall.recordPath.write_text(json.dumps(forged) if not isinstance(forged, str) else forged)
            self.assertNotIn("flush", self.firewall.removal())
            recorded = self.firewall.recorded()
            self.assertIn(recorded, (None, self.firewall), forged)

    def test_recordWrittenThroughNoLink(self):
        """
        A link left at the record's names by the daemon's user is replaced,
        never written through (root writes the record).
        """
        target = temporaryFolder(self) / "precious"
        target.write_text("precious")
        self.firewall.runtimeDir.mkdir(parents=True, exist_ok=True)
        for name in (self.firewall.recordPath, self.firewall.recordPath.with_suffix(".tmp")):
            name.symlink_to(target)
        self.firewall.record()
        self.assertEqual(target.read_text(), "precious")
        self.assertFalse(self.firewall.recordPath.is_symlink())
        self.assertTrue(self.firewall.inForce())
        self.firewall.recordPath.unlink()
        self.firewall.recordPath.symlink_to(target)
        self.assertIsNone(self.firewall.recorded())


class GuardReportTests(SynchronousTestCase):
    """
    One line says whether other hosts can reach Orthanc.
    """

    def report(self, privileged=False, **orthanc):
        config = testConfig(temporaryFolder(self), orthanc=orthanc)
        guard = OrthancPortGuard(config, reactor, privileged=privileged)
        return guard, config

    def started(self, guard):
        with capturedLogs() as events:
            guard.startService()
        self.addCleanup(guard.stopService)
        [event] = [event for event in events if "Orthanc's ports" in event["log_format"]]
        return event["log_level"], formatEvent(event)

    def test_warnsWhenItMayNotCloseThem(self):
        guard, config = self.report()
        guard.privilegedStartService()
        level, line = self.started(guard)
        self.assertEqual(level, LogLevel.warn)
        self.assertIn(f"Other hosts can reach Orthanc's ports {config.orthanc.http_port} (HTTP)", line)

    def test_namesTheRulesTheUnitApplied(self):
        guard, config = self.report()
        guard.firewall.record()
        level, line = self.started(guard)
        self.assertEqual(level, LogLevel.info)
        self.assertIn(f"closed to other hosts (nftables table inet {guard.firewall.table})", line)

    def test_warnsWhenLeftToTheBoxsFirewall(self):
        guard, config = self.report(firewall="no")
        guard.firewall.record()
        level, line = self.started(guard)
        self.assertEqual(level, LogLevel.warn)
        self.assertIn("left to this box's firewall ([orthanc] firewall = no)", line)

    def test_refusesToStartWhenTheRulesFail(self):
        guard, config = self.report(privileged=True)
        self.patch(firewall, "NFT", Path("/nonexistent/nft"))
        with self.assertRaises(FirewallError) as raised:
            guard.privilegedStartService()
        message = str(raised.exception)
        self.assertIn("/nonexistent/nft is missing (install the nftables package)", message)
        self.assertIn("Orthanc is not started exposed to other hosts", message)
        self.assertFalse(guard.firewall.inForce())


def needsRoot(case):
    if os.geteuid() != 0:
        case.skipTest("changing the firewall and network namespaces need root")
    if not os.access(firewall.NFT, os.X_OK):
        case.skipTest("nftables is not installed")


class CommandLineTests(SynchronousTestCase):
    def setUp(self):
        needsRoot(self)
        self.config = testConfig(temporaryFolder(self))
        self.rules = OrthancFirewall.fromConfig(self.config)
        self.addCleanup(subprocess.run, [str(firewall.NFT), self.rules.removal()], capture_output=True)

    def command(self, action):
        return subprocess.run(
            [str(EXECUTABLE), "firewall", action, "--config", str(self.config.sources[0])],
            capture_output=True, text=True, timeout=60,
        )

    def test_applyAndRemove(self):
        for attempt in range(2):
            applied = self.command("apply")
            self.assertEqual(applied.returncode, 0, applied.stderr)
            self.assertIn(f"are closed to other hosts (nftables table inet {self.rules.table})", applied.stdout)
        listed = subprocess.run([str(firewall.NFT), "list", "table", "inet", self.rules.table], capture_output=True, text=True)
        ports = ", ".join(str(port) for port in sorted(self.rules.ports))
        self.assertIn(f'iif != "lo" tcp dport {{ {ports} }}', listed.stdout)
        self.assertIn("reject with tcp reset", listed.stdout)
        self.assertTrue(self.rules.inForce())
        removed = self.command("remove")
        self.assertEqual(removed.returncode, 0, removed.stderr)
        self.assertFalse(tableExists(self.rules.table))
        self.assertFalse(self.rules.recordPath.exists())
        # Removing what is not there is no error (ExecStopPost after a failed start).
        self.assertEqual(self.command("remove").returncode, 0)

    def test_restoredAfterTheBoxsFirewallFlushesIt(self):
        """
        nftables.service flushes the whole ruleset when it reloads: its
        drop-in puts the rules of a running appliance back, and does nothing
        for a stopped one.
        """
        self.assertEqual(self.command("apply").returncode, 0)
        subprocess.run([str(firewall.NFT), "delete", "table", "inet", self.rules.table], check=True)
        reload = dropInCommand("ExecReload", self.config.sources[0])
        restored = subprocess.run(reload, capture_output=True, text=True, timeout=60)
        self.assertEqual(restored.returncode, 0, restored.stderr)
        self.assertIn("closed to other hosts again", restored.stdout)
        self.assertTrue(tableExists(self.rules.table))
        self.assertEqual(self.command("remove").returncode, 0)
        restored = subprocess.run(reload, capture_output=True, text=True, timeout=60)
        self.assertIn("nothing to restore", restored.stdout)
        self.assertFalse(tableExists(self.rules.table))

    def test_removedEvenWithABrokenConfiguration(self):
        self.assertEqual(self.command("apply").returncode, 0)
        path = self.config.sources[0]
        path.write_text(path.read_text() + "\n[orthanc]\nhttp_port = none\n")
        removed = self.command("remove")
        self.assertEqual(removed.returncode, 0, removed.stderr)
        self.assertIn(self.rules.table, removed.stdout)
        self.assertFalse(tableExists(self.rules.table))


class OtherHostCase(TestCase, DaemonClient):
    """
    The daemon serving another host (L{OtherHost}) on every interface.
    """

    timeout = 300

    def setUp(self):
        needsRoot(self)
        self.otherHost = OtherHost(self)
        self.folder = temporaryFolder(self)
        self.password = "other-host-viewer"
        self.config = testConfig(
            self.folder,
            web={"listen_https": str(freePort()), "listen_http": ""},
            dicom={"listen": str(freePort())},
            auth={"users_file": self.folder / "users"},
            **{"modality:ct1": {"aet": "CT1", "host": self.otherHost.address}},
        )
        addUser(self.folder / "users", "viewer", self.password, ["viewer", "uploader"])
        self.rules = OrthancFirewall.fromConfig(self.config)
        self.addCleanup(subprocess.run, [str(firewall.NFT), self.rules.removal()], capture_output=True)
        self.idle = []
        self.addCleanup(lambda: [connection.close() for connection in self.idle])

    async def assertOrthancRefusesTheOtherHost(self):
        for port in (self.config.orthanc.http_port, self.config.orthanc.dicom_port):
            attempts = [deferToThread(self.otherHost.connect, port) for _ in range(IDLE_CONNECTIONS)]
            connections = await gatherResults(attempts)
            # Those that got through stay open, idle, as an attacker's would.
            self.idle.extend(connection for connection in connections if connection is not None)
            self.assertEqual(connections, [None] * IDLE_CONNECTIONS, f"another host connected to Orthanc's port {port}")

    async def assertServedFromTheOtherHost(self):
        """
        C-ECHO and C-STORE through the forwarder and a QIDO through /pacs,
        from the other host, each answered within L{PEER_TIMEOUT}.
        """
        address, timeouts = self.otherHost.applianceAddress, ("-to", str(PEER_TIMEOUT), "-ta", str(PEER_TIMEOUT), "-td", str(PEER_TIMEOUT))
        forwarder = str(self.config.dicom.listen.port)
        out, err, code = await self.otherHost.run(
            "/usr/bin/echoscu", *timeouts, "+tla", "-ic", "-aet", "CT1", "-aec", "PACS", address, forwarder
        )
        self.assertEqual(code, 0, err.decode())
        [instance] = ctSeries(1)
        path = self.folder / "other-host.dcm"
        instance.save_as(path, enforce_file_format=True)
        os.chmod(path, 0o644)
        out, err, code = await self.otherHost.run(
            "/usr/bin/storescu", *timeouts, "+tla", "-ic", "-aet", "CT1", "-aec", "PACS", address, forwarder, str(path)
        )
        self.assertEqual(code, 0, err.decode())
        out, err, code = await self.otherHost.run(
            "/usr/bin/curl", "-sS", "-k", "-m", str(PEER_TIMEOUT), "-o", "-", "-w", "\n%{http_code}",
            "-H", "Authorization: " + basicAuthorization("viewer", self.password),
            f"https://{address}:{self.config.web.listen_https.port}/pacs/studies?StudyInstanceUID={instance.StudyInstanceUID}",
        )
        self.assertEqual(code, 0, err.decode())
        body, _, status = out.rpartition(b"\n")
        self.assertEqual(status, b"200", body)
        self.assertIn(instance.StudyInstanceUID.encode(), body)

    def assertNeverRestarted(self, pid):
        self.assertEqual(self.linesSince(0, "Orthanc is restarting"), [])
        self.assertEqual(orthancPid(self.output, self.process), pid)


class AsTheUnitRunsItTests(OtherHostCase):
    """
    ExecStartPre applies the rules as root; the daemon runs as an unprivileged
    user with CAP_NET_BIND_SERVICE only; ExecStopPost removes them.
    """

    async def test_orthancClosedToAnotherHostThatTheApplianceServes(self):
        startPre = subprocess.run(unitCommand("ExecStartPre", self.config.sources[0]), capture_output=True, text=True)
        self.assertEqual(startPre.returncode, 0, startPre.stderr)
        self.assertTrue(tableExists(self.rules.table))
        # The unit's user: here nobody, owning the daemon's folders.
        subprocess.run(["chown", "-R", "nobody:nogroup", str(self.folder)], check=True)
        os.chmod(self.folder, 0o755)
        unprivileged = [
            "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
            "--inh-caps=-all,+net_bind_service", "--ambient-caps=-all,+net_bind_service",
            "--bounding-set=-all,+net_bind_service", "--no-new-privs", "--",
        ]
        self.output, self.process = await startDaemon(self, self.config, prefix=unprivileged)
        self.assertEqual(len(self.linesSince(0, f"are closed to other hosts (nftables table inet {self.rules.table})")), 1)
        pid = orthancPid(self.output, self.process)
        await self.assertOrthancRefusesTheOtherHost()
        await self.assertServedFromTheOtherHost()
        self.assertNeverRestarted(pid)

        self.process.signalProcess("TERM")
        await self.output.ended
        stopPost = subprocess.run(unitCommand("ExecStopPost", self.config.sources[0]), capture_output=True, text=True)
        self.assertEqual(stopPost.returncode, 0, stopPost.stderr)
        self.assertFalse(tableExists(self.rules.table))


class RunAsRootTests(OtherHostCase):
    """
    `pacs-appliance run` as root applies the rules itself, around Orthanc's life.
    """

    async def test_rulesLastAsLongAsOrthanc(self):
        self.output, self.process = await startDaemon(self, self.config)
        self.assertTrue(tableExists(self.rules.table))
        self.assertEqual(len(self.linesSince(0, "are closed to other hosts")), 1)
        pid = orthancPid(self.output, self.process)
        await self.assertOrthancRefusesTheOtherHost()
        # The forwarder still reaches Orthanc over loopback.
        out, err, code = await self.otherHost.run(
            "/usr/bin/echoscu", "-to", str(PEER_TIMEOUT), "+tla", "-ic", "-aet", "CT1", "-aec", "PACS",
            self.otherHost.applianceAddress, str(self.config.dicom.listen.port),
        )
        self.assertEqual(code, 0, err.decode())
        self.assertNeverRestarted(pid)
        self.process.signalProcess("TERM")
        await self.output.ended
        self.assertFalse(tableExists(self.rules.table))
        self.assertFalse(self.rules.recordPath.exists())
        self.assertFalse(os.path.exists(f"/proc/{pid}"))
