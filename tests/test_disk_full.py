"""
Disk full and bad state, against the whole daemon.

The daemon's state directory (Orthanc's storage and SQLite index, the upload
spool, the generated certificate: all of [appliance] state_dir, as on an
appliance) is a small tmpfs, filled to the last byte.  Measured with Orthanc
1.10.1 on such a disk:

  - a STOW-RS it cannot write is answered 200 with neither a reference nor a
    failure, and POST /instances 500 ("Cannot write to file", or "SQLite:
    Cannot run a cached statement" when the index is what is full);
  - a C-STORE of an instance larger than its 4 KiB write buffer is answered
    0xA700 (out of resources); a smaller one (a structured report, a key
    object) can be answered success while its file stays empty, which
    Orthanc's cache hides until it restarts;
  - killed, it cannot start again ("SQLite: disk I/O error") until space is
    freed.

So below [orthanc] min_free_space the appliance answers uploads 507 itself and
refuses DICOM associations that may store (a transient A-ASSOCIATE-RJ), and its
supervisor keeps restarting an Orthanc that cannot start on a full
disk instead of giving up on it.  Also here: a users file turned into garbage
or made unreadable while the daemon serves.
"""

import errno
import json
import os
import signal
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.sop_class import (
    BasicTextSRStorage,
    CTImageStorage,
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)
from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from appliance.dicom.forwarder import ForwarderFactory
from appliance.orthanc.space import StorageSpace
from appliance.web.proxy import STORAGE_FULL
from tests.daemon import DaemonClient, orthancPid, startDaemon
from tests.dicompeers import NegotiatedTransport, associateRequest, decodeRejection
from tests.support import (
    FakeFileSystem,
    basicAuthorization,
    ctSeries,
    storeInstances,
    temporaryFolder,
    testConfig,
    tinyTmpfs,
    writeUser,
)
from tests.webclients import DICOM_JSON, stowBody, stowOutcome

UPLOADER = ("uploader", "uploader password for the disk-full test")
ADMIN = ("imaging-admin", "admin password for the disk-full test")
#: The file system of the state directory, and the free space below which
#: the appliance refuses uploads: the certificate, an empty Orthanc and a few
#: instances take about 1 MiB.
STATE_SIZE = "16m"
MIN_FREE_SPACE = "2M"
SUCCESS = 0x0000
WADO_INSTANCE = 'multipart/related; type="application/dicom"'


def instance(size: int) -> Dataset:
    """
    One CT instance of C{size} x C{size} pixels in a study of its own: 16
    gives about 1.2 KiB, less than Orthanc's 4 KiB write buffer; 64 about
    9 KiB, more; 800 about 1.2 MiB, more than a request body held in memory.
    """
    return ctSeries(1, rows=size, columns=size, patientID="DISK-FULL")[0]


def fill(folder: Path) -> Path:
    """
    Write a file into C{folder} until its file system has not one byte
    left; its path (blocking: run in a thread).
    """
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as stream:
        for size in (64 * 1024, 4096, 1):
            while True:
                try:
                    stream.write(bytes(size))
                except OSError as error:
                    if error.errno != errno.ENOSPC:
                        raise
                    break
    return filler


class FullStorageTests(DaemonClient, TestCase):
    """
    The whole daemon with its state directory on a small file system that
    fills up, and is freed again.
    """

    timeout = 240

    @inlineCallbacks
    def setUp(self):
        state = tinyTmpfs(self, STATE_SIZE)
        if state is None:
            raise SkipTest(
                "cannot mount a tmpfs for the state directory: this test needs root with"
                " CAP_SYS_ADMIN (in a container: --privileged, or --cap-add SYS_ADMIN with"
                " AppArmor unconfined)"
            )
        self.state = state
        folder = temporaryFolder(self)
        users = folder / "users"
        writeUser(users, *UPLOADER, ["uploader"])
        writeUser(users, *ADMIN, ["admin"])
        self.config = testConfig(
            folder,
            appliance={"state_dir": state, "runtime_dir": folder / "run"},
            orthanc={"min_free_space": MIN_FREE_SPACE, "restart_max_delay": "2s"},
            auth={"users_file": users},
            **{"modality:ct1": {"aet": "CT1", "host": "127.0.0.0/8"}},
        )
        self.output, self.process = yield startDaemon(self, self.config)
        self.trustDaemon()

    def stow(self, dataset: Dataset) -> Tuple[int, bytes]:
        contentType, body = stowBody(dataset)
        headers = {"Authorization": basicAuthorization(*UPLOADER), "Accept": DICOM_JSON, "Content-Type": contentType}
        return self.request("POST", "/pacs/studies", headers, body)

    def cStore(self, dataset: Dataset):
        """
        A Deferred firing with the status of a C-STORE of C{dataset} over
        DICOM TLS as the modality CT1.
        """
        storing = storeInstances(
            self.config.dicom.listen.port, [dataset], calledAET="PACS", callingAET="CT1", sslContext=self.context
        )
        return storing.addCallback(lambda statuses: statuses[0])

    def associationRejection(self) -> Optional[Tuple[int, int, int]]:
        """
        The (result, source, reason) of the A-ASSOCIATE-RJ a C-STORE
        association as the modality CT1 gets, L{None} if it is accepted
        (blocking).
        """
        received = []
        ae = AE(ae_title="CT1")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        association = ae.associate(
            "127.0.0.1",
            self.config.dicom.listen.port,
            ae_title="PACS",
            tls_args=(self.context, None),
            evt_handlers=[(evt.EVT_PDU_RECV, lambda event: received.append(event.pdu))],
        )
        if association.is_established:
            association.release()
            return None
        [rejection] = [pdu for pdu in received if isinstance(pdu, A_ASSOCIATE_RJ)]
        return rejection.result, rejection.source, rejection.reason_diagnostic

    def retrieve(self, dataset: Dataset) -> Tuple[int, bytes]:
        """
        WADO-RS of the whole instance C{dataset}, as an administrator.
        """
        path = (
            f"/pacs/studies/{dataset.StudyInstanceUID}/series/{dataset.SeriesInstanceUID}"
            f"/instances/{dataset.SOPInstanceUID}"
        )
        headers = {"Authorization": basicAuthorization(*ADMIN), "Accept": WADO_INSTANCE}
        return self.request("GET", path, headers)

    def isStored(self, dataset: Dataset) -> bool:
        """
        Whether Orthanc serves the instance with its pixel data.
        """
        status, body = self.retrieve(dataset)
        self.assertIn(status, (200, 404), body[:300])
        return status == 200 and dataset.SOPInstanceUID.encode("ascii") in body and dataset.PixelData in body

    @inlineCallbacks
    def storeBoth(self, acknowledged: List[Dataset]):
        """
        STOW and C-STORE an instance below and one above Orthanc's write
        buffer, each of which must be acknowledged.
        """
        for size in (16, 64):
            dataset = instance(size)
            status, body = yield deferToThread(self.stow, dataset)
            self.assertIsNone(stowOutcome(status, body, dataset.SOPInstanceUID), body[:300])
            acknowledged.append(dataset)
            dataset = instance(size)
            self.assertEqual((yield self.cStore(dataset)), SUCCESS)
            acknowledged.append(dataset)

    @inlineCallbacks
    def test_fullStorageRefusesAndRecovers(self):
        acknowledged: List[Dataset] = []
        refused: Dict[str, Tuple[Dataset, str]] = {}
        yield self.storeBoth(acknowledged)

        seen = len(self.output.lines)
        filler = yield deferToThread(fill, self.state)
        self.assertEqual(os.statvfs(self.state).f_bavail, 0)
        # STOW-RS: refused by the appliance, whatever the size.
        for size in (16, 64):
            dataset = instance(size)
            status, body = yield deferToThread(self.stow, dataset)
            self.assertEqual((status, json.loads(body)), (507, {"error": STORAGE_FULL}))
            refused[f"STOW-RS {size}x{size}"] = (dataset, f"HTTP {status}")
        # A body too large to be held in memory does not even fit in the
        # upload spool, which is in the state directory too.
        dataset = instance(800)
        status, body = yield deferToThread(self.stow, dataset)
        self.assertEqual(status, 507)
        self.assertIn(b"no disk space left for this upload", body)
        refused["STOW-RS 800x800 (spooled)"] = (dataset, f"HTTP {status}")
        # C-STORE: the association is refused, transient, before Orthanc
        # could acknowledge a small instance into an empty file.
        for size in (16, 64):
            dataset = instance(size)
            rejection = yield deferToThread(self.associationRejection)
            self.assertEqual(rejection, (2, 3, 2))
            refused[f"C-STORE {size}x{size}"] = (dataset, "A-ASSOCIATE-RJ (transient, local limit exceeded)")
        # Reading goes on.
        self.assertTrue((yield deferToThread(self.healthy)))
        self.assertTrue((yield deferToThread(self.isStored, acknowledged[-1])))
        [full] = self.linesSince(seen, "The archive's storage is full")
        self.assertIn("uploads are refused (507, and a transient A-ASSOCIATE-RJ for DICOM stores)", full)

        # Orthanc dies on the full disk: it cannot start again, and the
        # supervisor keeps trying rather than give up after max_start_failures.
        os.kill(orthancPid(self.output, self.process), signal.SIGKILL)
        yield self.poll(
            lambda: len(self.linesSince(seen, "free space for it to start")) > self.config.orthanc.max_start_failures,
            "Orthanc's failed starts on the full disk",
            blocking=False,
        )
        self.assertEqual(self.linesSince(seen, "Orthanc failed"), [])

        # Space returns: ready again without help, and both doors store.
        filler.unlink()
        yield self.poll(self.healthy, "/healthz to say ready once space was freed")
        yield self.storeBoth(acknowledged)
        [room] = self.linesSince(seen, "The archive's storage has room again")
        self.assertIn("uploads are accepted", room)

        # Everything acknowledged is in the archive with its pixels, read
        # back from disk (Orthanc restarted since the first ones); nothing
        # refused is.
        lost, storedAnyway = [], []
        for dataset in acknowledged:
            if not (yield deferToThread(self.isStored, dataset)):
                lost.append(dataset.SOPInstanceUID)
        for what, (dataset, _) in refused.items():
            if (yield deferToThread(self.isStored, dataset)):
                storedAnyway.append(what)
        report = (
            f"{len(acknowledged)} acknowledged ({len(acknowledged) - len(lost)} stored); refused while full: "
            + ", ".join(f"{what} {answer}" for what, (_, answer) in refused.items())
        )
        print(f"\nDisk full: {report}")
        self.assertEqual(lost, [], report)
        self.assertEqual(storedAnyway, [], report)


class StorageSpaceTests(SynchronousTestCase):
    def setUp(self):
        self.events: List[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_noMinimumNeverRefuses(self):
        def statvfs(folder):
            raise AssertionError("measured without a minimum")

        self.assertFalse(StorageSpace(Path("/var/lib/pacs-appliance/orthanc"), 0, statvfs).full())

    def test_fullBelowTheMinimumOnly(self):
        disk = FakeFileSystem(free=2 * 2**20)
        space = StorageSpace(Path("/var/lib/pacs-appliance/orthanc"), 2 * 2**20, disk)
        self.assertFalse(space.full())
        disk.free -= 4096
        self.assertTrue(space.full())

    def test_unmeasurableFolderDoesNotRefuse(self):
        space = StorageSpace(temporaryFolder(self) / "not yet created", 2**30)
        self.assertFalse(space.full())
        # Said once, not at every upload.
        self.assertFalse(space.full())
        [warning] = [formatEvent(event) for event in self.events if event["log_level"] == LogLevel.warn]
        self.assertIn("Cannot measure the free space of", warning)


class FullStorageAssociationTests(SynchronousTestCase):
    """
    The forwarder, in memory, while Orthanc's storage is short of space:
    associations that may store are refused (transient: the modality keeps
    its images and sends them again later), the others reach Orthanc.
    """

    def setUp(self):
        self.disk = FakeFileSystem(free=2**20)
        config = testConfig(temporaryFolder(self), **{"modality:ct1": {"aet": "CT1", "host": "127.0.0.0/8"}})
        self.reactor = MemoryReactorClock()
        self.factory = ForwarderFactory(config, self.reactor, StorageSpace(Path("/orthanc"), 2 * 2**20, self.disk))
        self.port = config.dicom.listen.port

    def associate(self, abstractSyntax: str, receives=()) -> StringTransport:
        modality = NegotiatedTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", self.port),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 50000),
        )
        connection = self.factory.buildProtocol(modality.getPeer())
        connection.makeConnection(modality)
        connection.dataReceived(associateRequest("CT1", abstractSyntax=abstractSyntax, receives=receives))
        return modality

    def test_storageRefusedWhileFull(self):
        for syntax in (CTImageStorage, BasicTextSRStorage, "1.2.3.4.5.6"):  # private: storage too
            modality = self.associate(syntax)
            self.assertEqual(decodeRejection(modality.value()), (2, 3, 2), syntax)
            self.assertTrue(modality.disconnecting)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_othersGoThroughWhileFull(self):
        for syntax in (Verification, StudyRootQueryRetrieveInformationModelFind):
            modality = self.associate(syntax)
            self.assertEqual(modality.value(), b"", syntax)
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_retrievalWithCGetGoesThroughWhileFull(self):
        """
        C-GET proposes the storage SOP classes it receives (as their SCP
        only): reading, not storing.
        """
        modality = self.associate(StudyRootQueryRetrieveInformationModelGet, receives=[CTImageStorage])
        self.assertEqual(modality.value(), b"")
        self.assertEqual(len(self.reactor.tcpClients), 1)
        # Receiving one class while sending another is storing.
        self.assertEqual(decodeRejection(self.associate(MRImageStorage, receives=[CTImageStorage]).value()), (2, 3, 2))

    def test_storageGoesThroughWithRoom(self):
        self.disk.free = 4 * 2**20
        self.assertEqual(self.associate(CTImageStorage).value(), b"")
        self.assertEqual(len(self.reactor.tcpClients), 1)


VIEWER = ("vera", "viewer password for the bad-state test")
NEW_VIEWER = ("ada", "another viewer password for the bad-state test")


class BadUsersFileTests(DaemonClient, TestCase):
    """
    The users file of a serving daemon turned into garbage, then into a
    folder, then fixed: the accounts read before keep working meanwhile,
    each refused read is one log line, and the fixed file is read.
    """

    timeout = 120

    @inlineCallbacks
    def setUp(self):
        folder = temporaryFolder(self)
        self.usersFile = folder / "users"
        writeUser(self.usersFile, *VIEWER, ["viewer"])
        self.config = testConfig(folder, auth={"users_file": self.usersFile})
        self.output, self.process = yield startDaemon(self, self.config)
        self.trustDaemon()

    def answers(self, account: Tuple[str, str]) -> int:
        """
        The status of a QIDO-RS query as C{account}.
        """
        headers = {"Authorization": basicAuthorization(*account), "Accept": DICOM_JSON}
        return self.request("GET", "/pacs/studies", headers)[0]

    @inlineCallbacks
    def refusalLines(self, seen: int):
        """
        Wait for the log to say the users file was refused after line
        C{seen}; the lines about the users file since then.
        """
        yield self.poll(
            lambda: self.linesSince(seen, "users read before stay in force"), "the refusal of the users file", timeout=10, blocking=False
        )
        return self.linesSince(seen, str(self.usersFile))

    @inlineCallbacks
    def reload(self) -> int:
        """
        SIGHUP the daemon and wait until its reload ended; the log line
        from which it is logged.
        """
        seen = len(self.output.lines)
        self.process.signalProcess("HUP")
        yield self.poll(lambda: self.linesSince(seen, "Reloaded:"), "the reload", blocking=False)
        return seen

    @inlineCallbacks
    def test_badUsersFileKeepsTheAccountsServing(self):
        self.assertEqual((yield deferToThread(self.answers, VIEWER)), 200)

        # Garbage, noticed by the daemon's watch on the file.
        seen = len(self.output.lines)
        self.usersFile.write_text("[auth]\nusers_file = /etc/pacs-appliance/users\n", encoding="utf-8")
        [refusal] = yield self.refusalLines(seen)
        self.assertIn(f"ERROR [appliance.web.users.UsersFile] {self.usersFile} holds no valid user line", refusal)
        self.assertIn("the 1 users read before stay in force", refusal)
        self.assertEqual((yield deferToThread(self.answers, VIEWER)), 200)
        # Read again at SIGHUP: refused again, once.
        seen = yield self.reload()
        [again] = self.linesSince(seen, str(self.usersFile))
        self.assertIn("holds no valid user line", again)
        self.assertEqual((yield deferToThread(self.answers, VIEWER)), 200)

        # A folder in its place: unreadable.
        seen = len(self.output.lines)
        self.usersFile.unlink()
        self.usersFile.mkdir()
        [refusal] = yield self.refusalLines(seen)
        self.assertIn(f"cannot read {self.usersFile}: Is a directory", refusal)
        self.assertEqual((yield deferToThread(self.answers, VIEWER)), 200)

        # Fixed, with another account: read, and only it logs in.
        self.usersFile.rmdir()
        writeUser(self.usersFile, *NEW_VIEWER, ["viewer"])
        yield self.poll(lambda: self.answers(NEW_VIEWER) == 200, "the new account to log in")
        self.assertEqual((yield deferToThread(self.answers, VIEWER)), 401)
