"""
Faults with accounting ("nothing lost"): while a web client STOWs instances
and a modality C-STOREs over DICOM TLS, both without pause, Orthanc is killed
with SIGKILL twice and the daemon reloads on SIGHUP once; on a node whose
state and index are in PostgreSQL, the same, and PostgreSQL stopped for 20 s.
Afterwards every instance whose store was acknowledged as successful is in
the archive, every other store was reported to its sender as a failure, and
the daemon is ready again without anyone's help.  The counts are printed.
"""

import http.client
import json
import os
import signal
import threading
import uuid
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set
from urllib.parse import quote

from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from appliance.config import Config
from appliance.state.database import interactOnce
from appliance.web.passwords import hashPassword
from appliance.web.sharedaccounts import writeAccount
from appliance.web.users import UserEntry
from tests.daemon import POLL_INTERVAL, DaemonClient, addUser, orthancPid, startDaemon
from tests.postgres import requirePostgres
from tests.support import TEST_SCRYPT, basicAuthorization, ctSeries, temporaryFolder, testConfig
from tests.webclients import DICOM_JSON, stowBody, stowOutcome

UPLOADER = ("uploader", "uploader password for the fault test")
ADMIN = ("imaging-admin", "admin password for the fault test")
#: The modality that stores over DICOM TLS.
CT1 = {"aet": "CT1", "host": "127.0.0.0/8"}
#: How long one request or one DICOM exchange may take before its sender
#: counts it as failed.
PEER_TIMEOUT = 20
#: How long PostgreSQL stays away in the outage test.
OUTAGE = 20.0
SOP_INSTANCE_UID = "00080018"


@dataclass
class Ledger:
    """
    What one sender was told about each instance it tried to store:
    C{succeeded} holds the acknowledged SOP Instance UIDs, C{failed} the
    others with how the failure was reported.
    """

    sender: str
    succeeded: List[str] = field(default_factory=list)
    failed: Dict[str, str] = field(default_factory=dict)

    def record(self, uid: str, failure: Optional[str]) -> None:
        if failure is None:
            self.succeeded.append(uid)
        else:
            self.failed[uid] = failure

    def failureKinds(self) -> Dict[str, int]:
        kinds: Dict[str, int] = {}
        for failure in self.failed.values():
            kinds[failure] = kinds.get(failure, 0) + 1
        return kinds


def newInstance(studyUID: str, patientID: str):
    """
    One small CT instance of the study C{studyUID}, with its own series.
    """
    return ctSeries(1, rows=16, columns=16, studyUID=studyUID, patientID=patientID)[0]


class UploadsUnderFaults:
    """
    Faults under load, with accounting: a web client STOWs and a modality
    C-STOREs over DICOM TLS without pause while a test's faults happen, then
    every acknowledged instance must be in the archive.

    A test case using it provides C{archiveRequest} (one HTTPS request to the
    archive, blocking), C{dicomPort} and C{context} (where the modality
    associates, and its TLS context), C{poll} (as L{DaemonClient.poll}) and
    C{assertRecovered} (a Deferred: the archive is ready again by itself).
    """

    log = Logger()

    # --- the senders

    def stowContinuously(self, ledger: Ledger, studyUID: str, stop: threading.Event) -> None:
        """
        STOW one instance per request over HTTPS with Basic until C{stop} is
        set, writing down what each answer said (blocking: run in a thread).
        """
        headers = {"Authorization": basicAuthorization(*UPLOADER), "Accept": DICOM_JSON}
        while not stop.is_set():
            instance = newInstance(studyUID, "FAULT-STOW")
            contentType, body = stowBody(instance)
            uid = instance.SOPInstanceUID
            try:
                status, answer = self.archiveRequest("POST", "/pacs/studies", {**headers, "Content-Type": contentType}, body)
            except (OSError, http.client.HTTPException) as error:
                ledger.record(uid, f"connection error ({type(error).__name__})")
                stop.wait(POLL_INTERVAL)
                continue
            failure = stowOutcome(status, answer, uid)
            ledger.record(uid, failure)
            if failure is not None:
                # The archive is away: do not spin while it comes back.
                stop.wait(POLL_INTERVAL)

    def storeContinuously(self, ledger: Ledger, studyUID: str, stop: threading.Event) -> None:
        """
        C-STORE one instance after another over DICOM TLS as the modality CT1
        until C{stop} is set, associating again after an association ends,
        writing down what each answer said (blocking: run in a thread).
        """
        ae = AE(ae_title="CT1")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = PEER_TIMEOUT
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        while not stop.is_set():
            association = ae.associate("127.0.0.1", self.dicomPort, ae_title="PACS", tls_args=(self.context, None))
            if not association.is_established:
                # Refused while Orthanc is not ready: nothing was sent.
                stop.wait(POLL_INTERVAL)
                continue
            try:
                while not stop.is_set() and association.is_established:
                    instance = newInstance(studyUID, "FAULT-DICOM")
                    uid = instance.SOPInstanceUID
                    try:
                        answer = association.send_c_store(instance)
                    except Exception as error:
                        ledger.record(uid, f"exception ({type(error).__name__})")
                        break
                    status = answer.get("Status") if answer else None
                    if status is None:
                        # pynetdicom hands back an empty answer as soon as an
                        # abort reaches it, before its association thread has
                        # marked the association aborted: wait for that thread,
                        # or the next C-STORE waits out its timeout on a dead
                        # association.
                        association.join(PEER_TIMEOUT)
                        ledger.record(uid, "aborted" if association.is_aborted else "no answer")
                    else:
                        ledger.record(uid, None if status == 0x0000 else f"status 0x{status:04X}")
            finally:
                if association.is_established:
                    association.release()

    # --- the archive, as an administrator sees it

    def storedUIDs(self, studyUID: str) -> Set[str]:
        """
        The SOP Instance UIDs of the study in the archive, by QIDO-RS through
        the appliance (blocking).
        """
        headers = {"Authorization": basicAuthorization(*ADMIN), "Accept": DICOM_JSON}
        status, body = self.archiveRequest("GET", f"/pacs/studies/{studyUID}/instances", headers)
        self.assertIn(status, (200, 204), body[:300])
        return {item[SOP_INSTANCE_UID]["Value"][0] for item in (json.loads(body) if body else [])}

    def isStored(self, uid: str) -> bool:
        """
        Whether the archive has the instance C{uid}, asked alone (blocking).
        """
        headers = {"Authorization": basicAuthorization(*ADMIN), "Accept": DICOM_JSON}
        status, body = self.archiveRequest("GET", f"/pacs/instances?SOPInstanceUID={quote(uid)}", headers)
        self.assertIn(status, (200, 204), body[:300])
        return bool(body) and bool(json.loads(body))

    @inlineCallbacks
    def underLoad(self, faults: Callable[[], Deferred]):
        """
        Run C{faults} while both senders store without pause; afterwards,
        every acknowledged instance must be in the archive, every failure
        told to its sender, and the daemon ready by itself.
        """
        stow, dicom = Ledger("STOW-RS"), Ledger("C-STORE")
        studies = {"STOW-RS": "2.25." + str(uuid.uuid4().int), "C-STORE": "2.25." + str(uuid.uuid4().int)}
        stop = threading.Event()
        senders = [
            deferToThread(self.stowContinuously, stow, studies["STOW-RS"], stop),
            deferToThread(self.storeContinuously, dicom, studies["C-STORE"], stop),
        ]
        try:
            yield self.poll(lambda: stow.succeeded and dicom.succeeded, "both senders to store an instance", blocking=False)
            yield faults()
            # Both doors work again, without help.
            before = len(stow.succeeded), len(dicom.succeeded)
            yield self.poll(
                lambda: len(stow.succeeded) > before[0] and len(dicom.succeeded) > before[1],
                "both senders to store an instance after the faults",
                blocking=False,
            )
        finally:
            stop.set()
            for sender in senders:
                yield sender

        yield self.assertRecovered()

        report = []
        missing: Dict[str, List[str]] = {}
        for ledger in (stow, dicom):
            stored = yield deferToThread(self.storedUIDs, studies[ledger.sender])
            absent = [uid for uid in ledger.succeeded if uid not in stored]
            # Asked alone, in case the study query left some out.
            missing[ledger.sender] = []
            for uid in absent:
                if not (yield deferToThread(self.isStored, uid)):
                    missing[ledger.sender].append(uid)
            storedFailures = sum(1 for uid in ledger.failed if uid in stored)
            report.append(
                f"{ledger.sender}: {len(ledger.succeeded)} acknowledged"
                f" ({len(ledger.succeeded) - len(missing[ledger.sender])} stored),"
                f" {len(ledger.failed)} failed ({storedFailures} of them stored anyway);"
                f" failures: {ledger.failureKinds()}"
            )
        print("\nFaults with accounting:\n  " + "\n  ".join(report))
        for line in report:
            self.log.info("{line}", line=line)

        self.assertEqual(missing, {"STOW-RS": [], "C-STORE": []}, "acknowledged but not in the archive:\n" + "\n".join(report))
        # The archive's faults are the appliance's, never the client's: a
        # refused STOW is a 5xx or a broken connection, never a 4xx.
        blamed = {uid: kind for uid, kind in stow.failed.items() if kind.startswith("HTTP 4")}
        self.assertEqual(blamed, {}, "\n".join(report))


class FaultTests(UploadsUnderFaults, DaemonClient, TestCase):
    """
    The whole daemon under load from both doors while Orthanc dies and the
    configuration is reloaded.
    """

    timeout = 300

    @inlineCallbacks
    def setUp(self):
        self.folder = temporaryFolder(self)
        self.config = self.faultConfig()
        self.output, self.process = yield startDaemon(self, self.config)
        self.dicomPort = self.config.dicom.listen.port
        self.trustDaemon()

    def faultConfig(self) -> Config:
        """
        The daemon's configuration, its accounts written.
        """
        users = self.folder / "users"
        addUser(users, UPLOADER[0], UPLOADER[1], ["uploader"])
        addUser(users, ADMIN[0], ADMIN[1], ["admin"])
        return testConfig(self.folder, auth={"users_file": users}, **{"modality:ct1": CT1})

    @inlineCallbacks
    def killOrthanc(self):
        """
        SIGKILL the daemon's Orthanc, then wait until the daemon has noticed
        and /healthz says it is ready again.
        """
        pid = orthancPid(self.output, self.process)
        seen = len(self.output.lines)
        os.kill(pid, signal.SIGKILL)
        yield self.poll(
            lambda: any("Orthanc is restarting" in line for line in self.output.lines[seen:]),
            f"the daemon to notice that Orthanc (pid {pid}) died",
            blocking=False,
        )
        yield self.poll(self.healthy, "/healthz to say ready after the kill", blocking=True)
        self.log.info("Orthanc (pid {pid}) was killed and replaced by pid {new}", pid=pid, new=orthancPid(self.output, self.process))

    @inlineCallbacks
    def reloadDaemon(self):
        """
        SIGHUP the daemon and wait for the outcome of the reload in its log.
        """
        seen = len(self.output.lines)
        self.process.signalProcess("HUP")
        outcomes = ("Reloaded:", "Reload refused", "Reload failed")

        def outcome() -> Optional[str]:
            for line in self.output.lines[seen:]:
                if any(text in line for text in outcomes):
                    return line
            return None

        yield self.poll(lambda: outcome() is not None, "the outcome of the reload", blocking=False)
        self.assertIn("Reloaded:", outcome())

    def archiveRequest(self, method: str, path: str, headers: Dict[str, str], body: Optional[bytes] = None):
        return self.request(method, path, headers, body)

    @inlineCallbacks
    def assertRecovered(self):
        self.assertTrue((yield deferToThread(self.healthy)), "/healthz does not say ready")
        self.assertFalse(self.output.ended.called, "the daemon ended:\n" + "\n".join(self.output.lines))

    @inlineCallbacks
    def killTwiceAndReload(self):
        yield self.killOrthanc()
        yield self.killOrthanc()
        yield self.reloadDaemon()

    def test_nothingAcknowledgedIsLost(self):
        return self.underLoad(self.killTwiceAndReload)

class PostgreSQLFaultTests(FaultTests):
    """
    The same on a node whose state, accounts and Orthanc index are in
    PostgreSQL (the tests' server), and PostgreSQL stopped for L{OUTAGE}
    seconds under the load.
    """

    timeout = 400

    def faultConfig(self) -> Config:
        self.server = requirePostgres(self.skipTest)
        database = self.server.newDatabase(self.addCleanup)
        config = testConfig(self.folder, database=database.section(), **{"modality:ct1": CT1})
        for (name, password), role in ((UPLOADER, "uploader"), (ADMIN, "admin")):
            entry = UserEntry(name, hashPassword(password, TEST_SCRYPT), frozenset({role}))
            interactOnce(config.database, writeAccount, entry, 0.0)
        return config

    @inlineCallbacks
    def stopPostgreSQL(self):
        yield deferToThread(self.server.stop)
        self.addCleanup(lambda: self.server.process is None and self.server.start())
        yield deferLater(reactor, OUTAGE, lambda: None)
        yield deferToThread(self.server.start)
        yield self.poll(self.healthy, "/healthz to say ready after PostgreSQL came back", blocking=True)

    def test_postgresqlStoppedDuringUploads(self):
        return self.underLoad(self.stopPostgreSQL)
