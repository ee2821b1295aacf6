"""
Two whole appliances (`pacs-appliance run`, each supervising its own real
Orthanc) on one PostgreSQL database (tests/postgres.py) and one storage
folder, behind a real load balancer in TCP mode (tests/haproxy.py), as a
hospital would run them: uploads through the balancer (STOW-RS and DICOM TLS
C-STORE) land on both nodes and are one archive, found and read back through
either; a browser session opened on one node holds on the other and a logout
ends it on both; failed logins count across nodes.
"""

import http.client
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from urllib.parse import urlencode

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from appliance.orthanc.settings import POSTGRESQL_INDEX_PLUGIN
from appliance.state.database import interactOnce
from appliance.web.passwords import hashPassword
from appliance.web.sessions import RECHECK_AFTER
from appliance.web.sharedaccounts import CHECK_INTERVAL, writeAccount
from appliance.web.users import UserEntry
from tests.commandline import COMMAND
from tests.browser import logIn, viewStudy
from tests.daemon import RECOVERY_TIMEOUT, orthancPid, startDaemon
from tests.haproxy import HAPROXY, LoadBalancer
from tests.postgres import requirePostgres
from tests.support import (
    TEST_SCRYPT,
    TestAuthority,
    basicAuthorization,
    ctSeries,
    storeInstances,
    temporaryFolder,
    testConfig,
)
from tests.test_faults import ADMIN as FAULT_ADMIN
from tests.test_faults import UPLOADER as FAULT_UPLOADER
from tests.test_faults import UploadsUnderFaults
from tests.tlsclients import clientContext
from tests.viewerbuild import ARTIFACTS, requireViewer, startChromium
from tests.viewerbuild import VIEWER as OHIF_BUILD
from tests.webclients import DICOM_JSON, UPLOADER, VIEWER, stowBody, stowOutcome

NODES = ("node1", "node2")

#: How long a test waits for the cluster to settle (a node taken in by the
#: balancer, a logout reaching the other node).
SETTLE_TIMEOUT = 30.0


#: A real serialization failure (SQLSTATE 40001) on every resource Orthanc's
#: index creates while the table holds a row: what plugin 4.0 meets when two
#: nodes' parallel writes collide, made certain.  Orthanc retries the
#: transaction (about 5 s) and gives up.
SERIALIZATION_FAILURES = """
CREATE TABLE serialization_fault (reason text);
INSERT INTO serialization_fault VALUES ('injected by the test');
GRANT SELECT ON serialization_fault TO PUBLIC;
CREATE FUNCTION serialization_fault() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM serialization_fault) THEN
    RAISE EXCEPTION 'could not serialize access (injected)' USING ERRCODE = 'serialization_failure';
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER serialization_fault BEFORE INSERT ON Resources
  FOR EACH ROW EXECUTE FUNCTION serialization_fault();
"""


class ClusterCase(TestCase):
    """
    Two appliances on one database and one storage folder behind haproxy,
    started for each test; the accounts of C{accounts} (name, password,
    roles) written where C{passwd --config} writes them.
    """

    timeout = 600
    accounts = (VIEWER, UPLOADER)

    @inlineCallbacks
    def setUp(self):
        if not POSTGRESQL_INDEX_PLUGIN.exists():
            self.skipTest("Debian's orthanc-postgresql package is not installed")
        if not Path(HAPROXY).exists():
            self.skipTest("Debian's haproxy package is not installed")
        self.server = requirePostgres(self.skipTest)
        self.database = self.server.newDatabase(self.addCleanup)
        shared = temporaryFolder(self)
        authority = TestAuthority(shared / "ca")
        # One certificate on every node, as behind any load balancer.
        certificate, key = authority.issue("appliance", "localhost", server=True)
        self.certificate = certificate
        self.configs = [
            testConfig(
                temporaryFolder(self),
                appliance={"node_name": node},
                database=self.database.section(),
                orthanc={"storage_dir": shared / "storage"},
                tls={"certificate": certificate, "private_key": key},
                web={"ohif_root": OHIF_BUILD},
                auth={"max_login_failures": 4},
                **{"modality:ct": {"aet": "CT1", "host": "127.0.0.1"}},
            )
            for node in NODES
        ]
        # The cluster's accounts, written where passwd writes them.
        for name, password, roles in self.accounts:
            entry = UserEntry(name, hashPassword(password, TEST_SCRYPT), frozenset(roles))
            interactOnce(self.configs[0].database, writeAccount, entry, 0.0)
        self.context = clientContext(cafile=authority.path)
        # The modality checks the certificate, not the name (it calls an address).
        self.dicomContext = clientContext(cafile=authority.path)
        self.dicomContext.check_hostname = False
        self.outputs, self.processes = [], []
        # One after the other: the first creates Orthanc's tables.
        for config in self.configs:
            output, process = yield startDaemon(self, config)
            self.outputs.append(output)
            self.processes.append(process)
        self.balancer = LoadBalancer(
            shared,
            {
                "https": [config.web.listen_https.port for config in self.configs],
                "dicom": [config.dicom.listen.port for config in self.configs],
            },
            health=[config.web.listen_https.port for config in self.configs],
        )
        self.balancer.start()
        self.addCleanup(self.balancer.stop)
        yield self.settle(lambda: self.nodesReached() == set(NODES), "the balancer to send to both nodes")

    # --- clients (blocking: run them in threads)

    def request(
        self, method: str, path: str, headers: Dict[str, str], body: Optional[bytes] = None, port: Optional[int] = None
    ) -> Tuple[int, Dict[str, str], bytes]:
        """
        One request on a new connection, through the balancer unless C{port}
        names a node's.
        """
        connection = http.client.HTTPSConnection(
            "127.0.0.1", port or self.balancer.ports["https"], context=self.context, timeout=60
        )
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, dict(response.headers), response.read()
        finally:
            connection.close()

    def nodesReached(self) -> set:
        """
        The nodes that answer /healthz through the balancer over four
        connections.
        """
        reached = set()
        for _ in range(4):
            try:
                status, _, body = self.request("GET", "/healthz", {})
            except (OSError, http.client.HTTPException):
                continue
            if status == 200:
                reached.add(json.loads(body)["node"])
        return reached

    @inlineCallbacks
    def settle(self, condition, what: str, timeout: float = SETTLE_TIMEOUT, interval: float = 0.1):
        """
        Poll C{condition} (blocking, in a thread) every C{interval} seconds
        until it holds.
        """
        deadline = reactor.seconds() + timeout
        while not (yield deferToThread(condition)):
            if reactor.seconds() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            yield deferLater(reactor, interval, lambda: None)

    def stow(self, instance) -> Optional[str]:
        contentType, body = stowBody(instance)
        status, _, answer = self.request(
            "POST",
            "/pacs/studies",
            {"Authorization": basicAuthorization(*UPLOADER[:2]), "Content-Type": contentType, "Accept": DICOM_JSON},
            body,
        )
        return stowOutcome(status, answer, instance.SOPInstanceUID)

    def instancesThrough(self, config, studyUID: str) -> List[str]:
        status, _, body = self.request(
            "GET",
            f"/pacs/studies/{studyUID}/instances",
            {"Authorization": basicAuthorization(*VIEWER[:2]), "Accept": DICOM_JSON},
            port=config.web.listen_https.port,
        )
        self.assertEqual(status, 200, config.appliance.node_name)
        return [item["00080018"]["Value"][0] for item in json.loads(body)]

    def logIn(self, name: str, password: str) -> Tuple[int, Optional[str]]:
        status, headers, _ = self.request(
            "POST",
            "/login",
            {"Content-Type": "application/x-www-form-urlencoded", "Sec-Fetch-Site": "same-origin"},
            urlencode({"user": name, "password": password, "next": "/"}).encode("ascii"),
        )
        cookie = headers.get("Set-Cookie")
        return status, cookie.split(";", 1)[0] if cookie else None

    def accessLines(self, text: str) -> List[int]:
        """
        How many access-log lines of each node contain C{text}.
        """
        return [sum(1 for line in output.lines if "appliance.web.access" in line and text in line) for output in self.outputs]


class ClusterTests(ClusterCase):
    @inlineCallbacks
    def test_uploadsThroughTheBalancerAreOneArchive(self):
        series = ctSeries(10)
        study = series[0].StudyInstanceUID
        outcomes = []
        for instance in series[:6]:
            outcomes.append((yield deferToThread(self.stow, instance)))
        self.assertEqual(outcomes, [None] * 6, "every STOW-RS acknowledged")
        # Two associations: one to each node.
        for part in (series[6:8], series[8:]):
            statuses = yield storeInstances(self.balancer.ports["dicom"], part, callingAET="CT1", sslContext=self.dicomContext)
            self.assertEqual(statuses, [0, 0])
        self.assertEqual([count > 0 for count in self.accessLines('"POST /pacs/studies HTTP/1.1" 200')], [True, True])
        expected = sorted(instance.SOPInstanceUID for instance in series)
        for config in self.configs:
            found = yield deferToThread(self.instancesThrough, config, study)
            self.assertEqual(sorted(found), expected, f"each once, through {config.appliance.node_name}")
        self.assertEqual(
            self.server.sql("SELECT count(*) FROM Resources WHERE resourceType = 3", self.database.name).split(), ["10"]
        )
        # An instance read back through each node, whichever stored it.
        for instance, config in ((series[0], self.configs[1]), (series[9], self.configs[0])):
            status, headers, body = yield deferToThread(
                self.request,
                "GET",
                f"/pacs/studies/{study}/series/{instance.SeriesInstanceUID}/instances/{instance.SOPInstanceUID}",
                {"Authorization": basicAuthorization(*VIEWER[:2]), "Accept": 'multipart/related; type="application/dicom"'},
                None,
                config.web.listen_https.port,
            )
            self.assertEqual(status, 200)
            self.assertIn(instance.SOPInstanceUID.encode("ascii"), body)

    @inlineCallbacks
    def test_aWriteTheDatabaseCannotSerialiseIsRefusedNotAcknowledged(self):
        database = self.database.name
        self.server.sql(SERIALIZATION_FAILURES, database)
        series = ctSeries(2)
        contentType, body = stowBody(series[0])
        headers = {"Authorization": basicAuthorization(*UPLOADER[:2]), "Content-Type": contentType, "Accept": DICOM_JSON}
        status, answerHeaders, answer = yield deferToThread(self.request, "POST", "/pacs/studies", headers, body)
        self.assertEqual((status, answerHeaders.get("Retry-After")), (503, "5"), answer)
        self.assertIn("could not store 1 of the 1 instances", json.loads(answer)["error"])
        statuses = yield storeInstances(self.balancer.ports["dicom"], series[1:], callingAET="CT1", sslContext=self.dicomContext)
        self.assertEqual(statuses, [0xA700], "C-STORE: out of resources, which modalities send again")
        self.assertEqual(self.server.sql("SELECT count(*) FROM Resources", database).split(), ["0"])
        self.assertEqual(
            sum(1 for output in self.outputs for line in output.lines if "accounted for 0 of the 1 instances" in line), 1
        )
        # The database serialises again: the senders' second tries are stored, once.
        self.server.sql("TRUNCATE serialization_fault", database)
        self.assertIsNone((yield deferToThread(self.stow, series[0])))
        statuses = yield storeInstances(self.balancer.ports["dicom"], series[1:], callingAET="CT1", sslContext=self.dicomContext)
        self.assertEqual(statuses, [0])
        self.assertEqual(
            self.server.sql("SELECT count(*) FROM Resources WHERE resourceType = 3", database).split(), ["2"]
        )

    @inlineCallbacks
    def test_aSessionHoldsOnEveryNodeAndALogoutEndsItOnAll(self):
        status, cookie = yield deferToThread(self.logIn, *VIEWER[:2])
        self.assertEqual(status, 303)
        for _ in range(4):
            status, _, _ = yield deferToThread(self.request, "GET", "/pacs/studies", {"Cookie": cookie, "Accept": DICOM_JSON})
            self.assertEqual(status, 200)
        self.assertEqual([count > 0 for count in self.accessLines(f' - local:{VIEWER[0]} ')], [True, True])
        status, headers, _ = yield deferToThread(self.request, "POST", "/logout", {"Cookie": cookie, "Sec-Fetch-Site": "same-origin"})
        self.assertEqual(status, 303)

        def refusedByBoth() -> bool:
            return all(
                self.request("GET", "/pacs/studies", {"Cookie": cookie, "Accept": DICOM_JSON}, port=config.web.listen_https.port)[0]
                == 401
                for config in self.configs
            )

        yield self.settle(refusedByBoth, f"both nodes to end the session (within {RECHECK_AFTER:.0f}s)")

    @inlineCallbacks
    def test_failedLoginsCountOnEveryNode(self):
        name = VIEWER[0]
        answers = []
        for attempt in range(4):
            status, _ = yield deferToThread(self.logIn, name, f"wrong guess {attempt}")
            answers.append(status)
        self.assertEqual(answers, [401] * 4)
        self.assertEqual([count > 0 for count in self.accessLines('"POST /login HTTP/1.1" 401')], [True, True])
        # Each node counted two and hears of the other two.
        for output in self.outputs:
            yield output.waitFor(f"Refusing logins as '{name}' from 127.0.0.1").addTimeout(SETTLE_TIMEOUT, reactor)
        for config in self.configs:
            status, _, _ = yield deferToThread(
                self.request,
                "POST",
                "/login",
                {"Content-Type": "application/x-www-form-urlencoded", "Sec-Fetch-Site": "same-origin"},
                urlencode({"user": name, "password": VIEWER[1], "next": "/"}).encode("ascii"),
                config.web.listen_https.port,
            )
            self.assertEqual(status, 429, f"{config.appliance.node_name} refuses the guesser, even the right password")

    @inlineCallbacks
    def test_anAccountSetOnOneNodeIsInForceOnAll(self):
        """
        pacs-appliance passwd --config of one node writes the account where
        every node reads it: within a few seconds both let it in, and its
        removal shuts it out of both.
        """
        added = yield deferToThread(
            subprocess.run,
            [COMMAND, "passwd", "--config", str(self.configs[0].sources[0]), "night-shift", "--roles", "viewer", "--password-stdin"],
            input="night shift password\n",
            capture_output=True,
            text=True,
        )
        self.assertEqual(added.returncode, 0, added.stderr)
        headers = {"Authorization": basicAuthorization("night-shift", "night shift password"), "Accept": DICOM_JSON}

        @inlineCallbacks
        def answeredByBoth(status: int, what: str):
            # One node after the other, four times a check interval, and never
            # again once it answered: a refused password is a failed login
            # that both nodes count, and polling faster (or a node that had
            # already refused) would reach the throttle's limit and its 429s.
            for config in self.configs:
                port = config.web.listen_https.port
                yield self.settle(
                    lambda: self.request("GET", "/pacs/studies", headers, port=port)[0] == status,
                    f"{config.appliance.node_name} {what}",
                    interval=CHECK_INTERVAL / 4,
                )

        yield answeredByBoth(200, "to know the new account")
        removed = yield deferToThread(
            subprocess.run,
            [COMMAND, "passwd", "--config", str(self.configs[1].sources[0]), "night-shift", "--delete"],
            capture_output=True,
            text=True,
        )
        self.assertEqual(removed.returncode, 0, removed.stderr)
        yield answeredByBoth(401, "to forget the account")

    @inlineCallbacks
    def test_theViewerOnOneNodeOpensAStudyStoredThroughTheOther(self):
        requireViewer(self)
        series = ctSeries(6, rows=256, columns=256)
        first, second = self.configs
        statuses = yield storeInstances(first.dicom.listen.port, series, callingAET="CT1", sslContext=self.dicomContext)
        self.assertEqual(statuses, [0] * len(series))
        base = f"https://localhost:{second.web.listen_https.port}"
        profile = temporaryFolder(self) / "chromium"

        def browse():
            browser = startChromium(self.certificate, str(profile))
            try:
                logIn(browser, base, VIEWER)
                return viewStudy(browser, base, series[0].StudyInstanceUID)
            except Exception:
                ARTIFACTS.mkdir(exist_ok=True)
                browser.save_screenshot(str(ARTIFACTS / "cluster-viewer-failure.png"))
                raise
            finally:
                browser.quit()

        self.assertTrue((yield deferToThread(browse)))
        # The viewer's DICOMweb requests went to node2 alone.
        node1, node2 = self.accessLines('"GET /pacs/studies')
        self.assertEqual(node1, 0)
        self.assertGreater(node2, 0)


class NodeKilledTests(UploadsUnderFaults, ClusterCase):
    """
    One node killed in the middle of uploads through the balancer: the
    daemon and its Orthanc with SIGKILL, as a power cut or the kernel's OOM
    killer would, then started again as systemd's Restart= does.
    """

    accounts = (
        VIEWER,
        UPLOADER,
        (FAULT_UPLOADER[0], FAULT_UPLOADER[1], ["uploader"]),
        (FAULT_ADMIN[0], FAULT_ADMIN[1], ["admin"]),
    )

    @inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.dicomPort = self.balancer.ports["dicom"]
        # The modality's context: it checks the certificate, not the name.
        self.context = self.dicomContext

    def archiveRequest(self, method: str, path: str, headers: Dict[str, str], body: Optional[bytes] = None):
        status, _, answer = self.request(method, path, headers, body)
        return status, answer

    def poll(self, condition, what: str, blocking: bool = True):
        return self.settle(condition, what, RECOVERY_TIMEOUT)

    def nodeHealthy(self, config) -> bool:
        try:
            return self.request("GET", "/healthz", {}, port=config.web.listen_https.port)[0] == 200
        except (OSError, http.client.HTTPException):
            return False

    @inlineCallbacks
    def assertRecovered(self):
        for config, output in zip(self.configs, self.outputs):
            self.assertTrue((yield deferToThread(self.nodeHealthy, config)), config.appliance.node_name)
            self.assertFalse(output.ended.called, "a daemon ended:\n" + "\n".join(output.lines))

    @inlineCallbacks
    def killFirstNode(self):
        output, process = self.outputs[0], self.processes[0]
        orthanc = orthancPid(output, process)
        os.kill(process.pid, signal.SIGKILL)
        os.kill(orthanc, signal.SIGKILL)
        yield output.ended
        # The senders go on through the other node meanwhile.
        yield self.settle(lambda: self.nodesReached() == {"node2"}, "the balancer to take node1 out")
        self.outputs[0], self.processes[0] = yield startDaemon(self, self.configs[0])
        yield self.settle(lambda: self.nodesReached() == set(NODES), "the balancer to take node1 in again")

    def test_nothingAcknowledgedIsLostWhenANodeDies(self):
        return self.underLoad(self.killFirstNode)
