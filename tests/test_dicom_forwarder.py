"""
The DICOM TLS forwarder in front of the real Orthanc, with real peers: dcmtk's
echoscu and storescu, and pynetdicom over an ssl.SSLContext.  Every refusal is
checked on the wire (the A-ASSOCIATE-RJ is decoded) and followed by a
successful association: the forwarder keeps serving.
"""

import json
import os
import socket
import ssl
import struct
import warnings
from pathlib import Path
from typing import List, Optional, Sequence

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.pdu import A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from appliance.dicom.destinations import DestinationRelays
from appliance.dicom.forwarder import DicomForwarderService
from appliance.orthanc.state import OrthancState
from appliance.orthanc.space import StorageSpace
from tests.support import (
    serverCertificate,
    realSupervisor,
    TestAuthority,
    ctSeries,
    freePort,
    httpGet,
    storeInstances,
    temporaryFolder,
    testConfig,
)

READY_TIMEOUT = 120
#: How long a peer waits for an answer before the test fails.
PEER_TIMEOUT = 20


def associateRequest(
    callingAET: str, calledAET: str = "PACS", abstractSyntax: str = Verification, receives: Sequence[str] = ()
) -> bytes:
    """
    A well-formed A-ASSOCIATE-RQ proposing C{abstractSyntax} (Verification),
    and the SOP classes it C{receives} (as the SCP only, as C-GET does),
    encoded by pynetdicom.
    """
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = callingAET
    primitive.called_ae_title = calledAET
    contexts = [build_context(syntax) for syntax in (abstractSyntax, *receives)]
    for number, context in enumerate(contexts):
        context.context_id = 2 * number + 1
    primitive.presentation_context_definition_list = contexts
    maximumLength = MaximumLengthNotification()
    maximumLength.maximum_length_received = 16382
    primitive.user_information = [maximumLength, *(build_role(syntax, scp_role=True) for syntax in receives)]
    request = A_ASSOCIATE_RQ()
    request.from_primitive(primitive)
    return request.encode()


def decodeRejection(answer: bytes):
    """
    The (result, source, reason) of the A-ASSOCIATE-RJ C{answer} is.
    """
    assert answer[:1] == b"\x03", f"not an A-ASSOCIATE-RJ: {answer[:16]!r}"
    rejection = A_ASSOCIATE_RJ()
    rejection.decode(answer)
    return rejection.result, rejection.source, rejection.reason_diagnostic


def exchange(port: int, payload: bytes, context: Optional[ssl.SSLContext]):
    """
    In a thread: connect (over TLS if C{context}), send C{payload}, and read
    until the forwarder closes; a Deferred firing with what it answered.
    """

    def run() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=PEER_TIMEOUT) as raw:
            stream = context.wrap_socket(raw) if context is not None else raw
            if payload:
                stream.sendall(payload)
            answer = b""
            while True:
                try:
                    chunk = stream.recv(65536)
                except (ConnectionResetError, ssl.SSLError):
                    return answer
                if not chunk:
                    return answer
                answer += chunk

    return deferToThread(run)



class Appliance:
    """
    The DICOM half of the service tree, as buildService assembles it: the
    destination relays, the Orthanc supervisor and the forwarder.
    """

    def __init__(self, config) -> None:
        self.config = config
        self.root = MultiService()
        self.relays = DestinationRelays(config, reactor)
        self.relays.setServiceParent(self.root)
        self.orthanc = realSupervisor(config, relayPorts=self.relays.ports)
        self.orthanc.setServiceParent(self.root)
        self.forwarder = DicomForwarderService(
            config, serverCertificate(config), reactor, StorageSpace.forOrthanc(config)
        )
        self.forwarder.setServiceParent(self.root)

    def start(self):
        self.root.startService()
        return self.orthanc.whenState(OrthancState.READY).addTimeout(READY_TIMEOUT, reactor)

    def stop(self):
        return self.root.stopService()

    @property
    def port(self) -> int:
        return self.config.dicom.listen.port

    def restCredentials(self):
        return {"Authorization": self.orthanc.credentials.authorization().decode("ascii")}

    def rest(self, path: str):
        url = f"http://127.0.0.1:{self.config.orthanc.http_port}{path}"
        return httpGet(url, self.restCredentials())


class ForwarderTestCase(TestCase):
    """
    Starts Orthanc behind the forwarder with certificates of a test authority.
    """

    timeout = 300
    dicom: dict = {}
    modalities: dict = {
        "modality:ct1": {"aet": "CT1", "host": "127.0.0.0/8"},
        "modality:faraway": {"aet": "FARAWAY", "host": "10.255.0.0/16"},
    }

    def associateAsCT1(self, abstractSyntax):
        """
        An association through the forwarder, as the modality CT1 over TLS
        (blocking: call it in a thread).
        """
        ae = AE(ae_title="CT1")
        ae.add_requested_context(abstractSyntax)
        association = ae.associate(
            "127.0.0.1", self.appliance.port, ae_title="PACS",
            tls_args=(self.clientContext(), None),
        )
        assert association.is_established
        return association

    def setUp(self):
        self.folder = temporaryFolder(self)
        self.authority = self.sharedAuthority()
        self.serverCertificate, self.serverKey = self.authority.issue(
            "server", "localhost", server=True
        )
        self.events: List[dict] = []
        self.waiting: List[tuple] = []
        globalLogPublisher.addObserver(self.observe)
        self.addCleanup(globalLogPublisher.removeObserver, self.observe)
        self.appliance = Appliance(self.makeConfig())
        self.addCleanup(self.appliance.stop)
        return self.appliance.start()

    @classmethod
    def sharedAuthority(cls) -> TestAuthority:
        # RSA keys are slow to make: one authority per class is enough.
        if "_authority" not in cls.__dict__:
            import tempfile

            folder = Path(tempfile.mkdtemp(prefix="pacs-appliance-ca-"))
            cls._authority = TestAuthority(folder)
        return cls._authority

    def makeConfig(self, **overrides):
        sections = {
            "tls": {"certificate": self.serverCertificate, "private_key": self.serverKey},
            "dicom": {"listen": f"127.0.0.1:{freePort()}", **self.dicom},
            **self.modalities,
        }
        sections.update(overrides)
        return testConfig(self.folder, **sections)

    # --- peers

    def clientContext(self, certificate=None, key=None, **versions) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_verify_locations(str(self.authority.path))
        if certificate is not None:
            context.load_cert_chain(str(certificate), str(key))
        with warnings.catch_warnings():
            # Old TLS versions are asked for on purpose, to be refused.
            warnings.simplefilter("ignore", DeprecationWarning)
            for name, value in versions.items():
                setattr(context, name, value)
        if versions:
            # Let this client offer what OpenSSL would otherwise refuse to.
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
        return context

    def echo(self, callingAET="CT1", context="default") -> "Deferred":
        """
        A C-ECHO through the forwarder with pynetdicom; fires with its status,
        or None if no association was established.
        """
        if context == "default":
            context = self.clientContext()

        def run():
            ae = AE(ae_title=callingAET)
            ae.acse_timeout = ae.network_timeout = ae.connection_timeout = PEER_TIMEOUT
            ae.add_requested_context(Verification)
            tls = (context, None) if context is not None else None
            association = ae.associate(
                "127.0.0.1", self.appliance.port, ae_title="PACS", tls_args=tls
            )
            if not association.is_established:
                return None
            try:
                return association.send_c_echo().Status
            finally:
                association.release()

        return deferToThread(run)

    async def assertStillServing(self):
        self.assertEqual(await self.echo(), 0x0000)

    def dcmtk(self, program: str, *arguments: str):
        return getProcessOutputAndValue(
            f"/usr/bin/{program}",
            ["-to", str(PEER_TIMEOUT), "-ta", str(PEER_TIMEOUT), "-td", str(PEER_TIMEOUT), *arguments],
            env={"PATH": "/usr/bin:/bin"},
        )

    def connectionLogs(self) -> List[dict]:
        return [event for event in self.events if "outcome" in event and "calling" in event]

    def observe(self, event: dict) -> None:
        self.events.append(event)
        waiting, self.waiting = self.waiting, []
        for count, waiter in waiting:
            if len(self.connectionLogs()) >= count:
                waiter.callback(self.connectionLogs())
            else:
                self.waiting.append((count, waiter))

    def logged(self, count: int) -> Deferred:
        """
        Fires with the connection log lines once there are C{count} of them:
        the line is written when the forwarder has seen the connection close,
        which may be just after the peer has.
        """
        if len(self.connectionLogs()) >= count:
            return succeed(self.connectionLogs())
        waiter: Deferred = Deferred()
        self.waiting.append((count, waiter))
        return waiter.addTimeout(PEER_TIMEOUT, reactor)

    async def lastOutcome(self) -> str:
        """
        The outcome of the connection that just closed (the first of the test
        unless others were waited for).
        """
        self.seen = getattr(self, "seen", 0) + 1
        logs = await self.logged(self.seen)
        return logs[self.seen - 1]["outcome"]


class ForwarderTests(ForwarderTestCase):
    async def test_dcmtkEchoWithEachBCP195Profile(self):
        """
        echoscu with a client certificate and each BCP 195 profile, and
        anonymously (+tla), associates through the forwarder.
        """
        certificate, key = self.authority.issue("ct1", "ct1.test")
        for tls in (
            ["+tls", str(key), str(certificate), "+py"],
            ["+tls", str(key), str(certificate), "+px"],
            ["+tla", "+py"],
            ["+tla", "+px"],
        ):
            out, err, code = await self.dcmtk(
                "echoscu", *tls, "+cf", str(self.authority.path),
                "-aet", "CT1", "-aec", "PACS", "127.0.0.1", str(self.appliance.port),
            )
            self.assertEqual(code, 0, f"echoscu {' '.join(tls)}: {err.decode()}")

    async def test_retiredAESProfileRefusedByDefault(self):
        out, err, code = await self.dcmtk(
            "echoscu", "+tla", "+pa", "+cf", str(self.authority.path),
            "-aet", "CT1", "-aec", "PACS", "127.0.0.1", str(self.appliance.port),
        )
        self.assertNotEqual(code, 0)
        self.assertIn("TLS handshake failed", await self.lastOutcome())
        await self.assertStillServing()

    async def test_dcmtkStoresAStudyThatOrthancHolds(self):
        series = ctSeries(4)
        files = []
        for number, instance in enumerate(series):
            path = self.folder / f"ct{number}.dcm"
            instance.save_as(path, enforce_file_format=True)
            files.append(str(path))
        out, err, code = await self.dcmtk(
            "storescu", "+tla", "+px", "+cf", str(self.authority.path),
            "-aet", "CT1", "-aec", "PACS", "127.0.0.1", str(self.appliance.port), *files,
        )
        self.assertEqual(code, 0, err.decode())
        status, _, body = await self.appliance.rest("/studies?expand")
        self.assertEqual(status, 200)
        [study] = json.loads(body)
        self.assertEqual(study["MainDicomTags"]["StudyInstanceUID"], series[0].StudyInstanceUID)
        status, _, body = await self.appliance.rest(f"/studies/{study['ID']}/instances")
        self.assertEqual(len(json.loads(body)), 4)
        [event] = await self.logged(1)
        self.assertEqual(event["outcome"], "accepted as [modality:ct1]")
        # The whole study went in and the answers came back.
        self.assertGreater(event["received"], 4 * 64 * 64 * 2)
        self.assertGreater(event["sent"], 0)

    async def test_pynetdicomEchoStoreAndFind(self):
        self.assertEqual(await self.echo(), 0x0000)
        series = ctSeries(3)
        statuses = await storeInstances(
            self.appliance.port, series, callingAET="CT1", sslContext=self.clientContext()
        )
        self.assertEqual(statuses, [0, 0, 0])

        def find():
            association = self.associateAsCT1(StudyRootQueryRetrieveInformationModelFind)
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = series[0].StudyInstanceUID
            query.NumberOfStudyRelatedInstances = ""
            try:
                return [
                    identifier
                    for status, identifier in association.send_c_find(
                        query, StudyRootQueryRetrieveInformationModelFind
                    )
                    if status and status.Status in (0xFF00, 0xFF01)
                ]
            finally:
                association.release()

        [match] = await deferToThread(find)
        self.assertEqual(match.StudyInstanceUID, series[0].StudyInstanceUID)
        self.assertEqual(int(match.NumberOfStudyRelatedInstances), 3)

    async def test_unknownCallingAERejected(self):
        answer = await exchange(
            self.appliance.port, associateRequest("NOBODY"), self.clientContext()
        )
        # Rejected permanent, by the service user, calling AE not recognised.
        self.assertEqual(decodeRejection(answer), (1, 1, 3))
        self.assertEqual(
            await self.lastOutcome(), "refused (calling AE 'NOBODY' is not a configured modality)"
        )
        await self.assertStillServing()

    async def test_unknownCalledAERejected(self):
        answer = await exchange(
            self.appliance.port, associateRequest("CT1", "ELSEWHERE"), self.clientContext()
        )
        self.assertEqual(decodeRejection(answer), (1, 1, 7))
        await self.assertStillServing()

    async def test_leadingSpacesInAETitlesRejected(self):
        """
        pynetdicom (and PS3.8) drop the leading spaces of an AE title;
        Orthanc does not, and refused what the forwarder had admitted.  The
        forwarder compares as Orthanc does: the proper A-ASSOCIATE-RJ.
        """
        request = associateRequest("CT1")
        calling = request[:26] + b" CT1".ljust(16) + request[42:]
        answer = await exchange(self.appliance.port, calling, self.clientContext())
        self.assertEqual(decodeRejection(answer), (1, 1, 3))
        self.assertEqual(await self.lastOutcome(), "refused (calling AE ' CT1' is not a configured modality)")
        called = request[:10] + b"  PACS".ljust(16) + request[26:]
        answer = await exchange(self.appliance.port, called, self.clientContext())
        self.assertEqual(decodeRejection(answer), (1, 1, 7))
        await self.assertStillServing()

    async def test_wrongSourceAddressRejected(self):
        answer = await exchange(
            self.appliance.port, associateRequest("FARAWAY"), self.clientContext()
        )
        self.assertEqual(decodeRejection(answer), (1, 1, 3))
        self.assertEqual(
            await self.lastOutcome(),
            "refused ([modality:faraway] connects from 10.255.0.0/16, not from 127.0.0.1)",
        )
        await self.assertStillServing()

    async def test_oldTLSVersionsRefused(self):
        for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
            context = self.clientContext(minimum_version=version, maximum_version=version)
            with self.assertRaises(ssl.SSLError):
                await exchange(self.appliance.port, associateRequest("CT1"), context)
            self.assertIn("TLS handshake failed", await self.lastOutcome())
        await self.assertStillServing()

    async def test_plainDicomOnTheTLSPort(self):
        self.assertIsNone(await self.echo(context=None))
        self.assertIn("TLS handshake failed", await self.lastOutcome())
        await self.assertStillServing()

    async def test_randomBytesClosed(self):
        # The first byte is no TLS record type (nor SSLv2's high bit): random data
        # that happens to start like a record header would make OpenSSL wait for
        # the rest of that record, and the test would time out instead.
        answer = await exchange(self.appliance.port, b"\x00" + os.urandom(4095), None)
        # At most a TLS alert comes back, never anything DICOM.
        self.assertTrue(answer == b"" or answer[:1] == b"\x15", answer[:16])
        self.assertIn("TLS handshake failed", await self.lastOutcome())
        await self.assertStillServing()

    async def test_nonDicomInsideTLSClosed(self):
        answer = await exchange(
            self.appliance.port, b"GET / HTTP/1.1\r\nHost: pacs\r\n\r\n", self.clientContext()
        )
        self.assertEqual(answer, b"")
        self.assertEqual(await self.lastOutcome(), "refused: not DICOM (first PDU type 0x47)")
        await self.assertStillServing()

    async def test_oversizedFirstPDURejected(self):
        header = struct.pack(">BBL", 0x01, 0, 10 * 1024 * 1024)
        answer = await exchange(
            self.appliance.port, header + b"\0" * 70000, self.clientContext()
        )
        # Rejected permanent, by the service provider (ACSE), no reason given.
        self.assertEqual(decodeRejection(answer), (1, 2, 1))
        self.assertIn("larger than [dicom] max_first_pdu", await self.lastOutcome())
        await self.assertStillServing()

    async def test_reloadedCertificateForNewAssociations(self):
        successor = TestAuthority(self.folder / "successor", "Successor CA")
        certificate, key = successor.issue("server", "localhost", server=True)
        self.appliance.forwarder.useCertificate(
            PrivateCertificate.loadPEM(certificate.read_text() + key.read_text())
        )
        trustsSuccessor = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        trustsSuccessor.check_hostname = False
        trustsSuccessor.load_verify_locations(str(successor.path))
        self.assertEqual(await self.echo(context=trustsSuccessor), 0x0000)
        self.assertIsNone(await self.echo())

    async def test_oneLogLinePerAssociation(self):
        await self.echo()
        await exchange(self.appliance.port, associateRequest("NOBODY"), self.clientContext())
        accepted, refused = await self.logged(2)
        self.assertEqual(
            (accepted["peer"], accepted["subject"], accepted["calling"], accepted["called"]),
            ("127.0.0.1", "-", "CT1", "PACS"),
        )
        self.assertEqual(accepted["outcome"], "accepted as [modality:ct1]")
        self.assertGreater(accepted["received"], 0)
        self.assertGreater(accepted["sent"], 0)
        self.assertGreaterEqual(accepted["duration"], 0)
        self.assertEqual(refused["calling"], "NOBODY")
        self.assertEqual(refused["sent"], 0)


class ReadinessTests(ForwarderTestCase):
    def test_readyMeansTheDicomSideAnswersToo(self):
        """
        The supervisor's real C-ECHO reached Orthanc (as the probe's AE title,
        which Orthanc's configuration lets only C-ECHO).
        """
        port = self.appliance.config.orthanc.dicom_port
        self.assertEqual(self.appliance.orthanc.dicomStatus, f"answers C-ECHO on 127.0.0.1:{port}")


class MoveTests(ForwarderTestCase):
    """
    C-MOVE to a modality: Orthanc reaches the destination's real port through
    its loopback relay.
    """

    def setUp(self):
        self.destinationPort = freePort()
        self.received: List[str] = []
        self.modalities = {
            **ForwarderTestCase.modalities,
            "modality:workstation": {
                "aet": "MOVESCP", "host": "127.0.0.1", "port": self.destinationPort
            },
        }
        self.startDestination()
        return super().setUp()

    def startDestination(self):
        def stored(event):
            self.received.append(event.dataset.SOPInstanceUID)
            return 0x0000

        ae = AE(ae_title="MOVESCP")
        ae.add_supported_context(CTImageStorage)
        server = ae.start_server(
            ("127.0.0.1", self.destinationPort), block=False,
            evt_handlers=[(evt.EVT_C_STORE, stored)],
        )
        self.addCleanup(server.shutdown)

    async def test_moveToARegisteredModality(self):
        series = ctSeries(3)
        statuses = await storeInstances(
            self.appliance.port, series, callingAET="CT1", sslContext=self.clientContext()
        )
        self.assertEqual(statuses, [0, 0, 0])

        def move():
            association = self.associateAsCT1(StudyRootQueryRetrieveInformationModelMove)
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = series[0].StudyInstanceUID
            try:
                return [
                    status.Status
                    for status, _ in association.send_c_move(
                        query, "MOVESCP", StudyRootQueryRetrieveInformationModelMove
                    )
                    if status
                ]
            finally:
                association.release()

        statuses = await deferToThread(move)
        self.assertEqual(statuses[-1], 0x0000)
        self.assertEqual(sorted(self.received), sorted(ds.SOPInstanceUID for ds in series))


def idleConnection(port: int, source: str) -> socket.socket:
    """
    A bare TCP connection to C{port} from the loopback address C{source}.
    """
    return socket.create_connection(("127.0.0.1", port), timeout=PEER_TIMEOUT, source_address=(source, 0))


class DeadlineTests(ForwarderTestCase):
    dicom = {"handshake_timeout": "300ms", "max_connections": "3"}

    async def test_peerThatNeverCompletesTheHandshake(self):
        answer = await exchange(self.appliance.port, b"", None)
        self.assertEqual(answer, b"")
        self.assertEqual(
            await self.lastOutcome(),
            "refused: no TLS handshake and association request within 0.3s",
        )
        await self.assertStillServing()

    async def test_peerThatNeverSendsItsAssociationRequest(self):
        answer = await exchange(self.appliance.port, b"", self.clientContext())
        self.assertEqual(answer, b"")
        self.assertIn("within 0.3s", await self.lastOutcome())
        await self.assertStillServing()

    async def test_connectionCap(self):
        idle = [idleConnection(self.appliance.port, f"127.0.0.{host}") for host in (3, 4, 5)]
        self.addCleanup(lambda: [each.close() for each in idle])
        # The fourth is closed at once, before any TLS.
        answer = await exchange(self.appliance.port, b"", None)
        self.assertEqual(answer, b"")
        [refusal] = [e for e in self.events if "max_connections)" in e.get("log_format", "")]
        self.assertEqual(refusal["limit"], 3)

class PerAddressCapTests(ForwarderTestCase):
    """
    Idle connections held for the whole handshake deadline (10 s), from one
    address.
    """

    dicom = {"max_connections": "3", "max_connections_per_address": "2"}

    async def test_oneAddressCannotTakeTheWholeCap(self):
        """
        The outside review filled the cap from one address with bare TCP
        sockets; past its own share, that address is refused at once while
        another is served.
        """
        idle = [idleConnection(self.appliance.port, "127.0.0.2") for _ in range(2)]
        self.addCleanup(lambda: [each.close() for each in idle])
        beyond = idleConnection(self.appliance.port, "127.0.0.2")
        self.addCleanup(beyond.close)
        beyond.settimeout(5)
        self.assertEqual(await deferToThread(beyond.recv, 1), b"", "closed at once")
        await self.assertStillServing()
        [refusal] = [e for e in self.events if "max_connections_per_address" in e.get("log_format", "")]
        self.assertEqual((refusal["client"], refusal["limit"]), ("127.0.0.2", 2))

    async def test_closedConnectionsNoLongerCount(self):
        """
        More TLS connections, one after the other, than an address may hold
        at once: each closed one stops counting (Twisted's TLS layer
        registers each connection twice; it counts once).
        """
        for _ in range(5):
            self.assertEqual(await self.echo(), 0x0000)


class MutualTLSTests(ForwarderTestCase):
    modalities = {
        "modality:ct1": {
            "aet": "CT1", "host": "127.0.0.1", "certificate_subject": "CN=ct1.test,O=Test Hospital"
        },
        "modality:ct2": {"aet": "CT2", "host": "127.0.0.1"},
    }

    def makeConfig(self, **overrides):
        self.dicom = {"require_client_certificate": "yes", "client_ca": self.authority.path}
        return super().makeConfig(**overrides)

    async def test_modalityWithItsCertificate(self):
        certificate, key = self.authority.issue("ct1", "ct1.test")
        out, err, code = await self.dcmtk(
            "echoscu", "+tls", str(key), str(certificate), "+py", "+cf", str(self.authority.path),
            "-aet", "CT1", "-aec", "PACS", "127.0.0.1", str(self.appliance.port),
        )
        self.assertEqual(code, 0, err.decode())
        [event] = await self.logged(1)
        self.assertEqual(event["subject"], "O=Test Hospital,CN=ct1.test")
        self.assertEqual(event["outcome"], "accepted as [modality:ct1]")
        self.assertEqual(await self.echo(context=self.clientContext(certificate, key)), 0)

    async def test_clientWithoutCertificate(self):
        self.assertIsNone(await self.echo())
        self.assertIn("TLS handshake failed", await self.lastOutcome())

    async def test_certificateFromAnotherAuthority(self):
        stranger = TestAuthority(self.folder / "stranger", "Stranger CA")
        certificate, key = stranger.issue("ct1", "ct1.test")
        self.assertIsNone(await self.echo(context=self.clientContext(certificate, key)))
        self.assertIn("TLS handshake failed", await self.lastOutcome())

    async def test_certificateOfAnotherModality(self):
        certificate, key = self.authority.issue("ct2", "ct2.test")
        answer = await exchange(
            self.appliance.port, associateRequest("CT1"), self.clientContext(certificate, key)
        )
        self.assertEqual(decodeRejection(answer), (1, 1, 3))
        self.assertIn(
            "must present a certificate for CN=ct1.test,O=Test Hospital", await self.lastOutcome()
        )
        # CT2 names no subject: any certificate of the authority will do.
        self.assertEqual(
            await self.echo("CT2", context=self.clientContext(certificate, key)), 0
        )


class LegacyProfileTests(ForwarderTestCase):
    dicom = {"tls_profile": "legacy"}

    async def test_retiredAESProfileAcceptedWithAWarning(self):
        out, err, code = await self.dcmtk(
            "echoscu", "+tla", "+pa", "+cf", str(self.authority.path),
            "-aet", "CT1", "-aec", "PACS", "127.0.0.1", str(self.appliance.port),
        )
        self.assertEqual(code, 0, err.decode())
        [warning] = [e for e in self.events if "tls_profile = bcp195-nd" in e.get("log_format", "")]
        self.assertEqual(warning["log_level"].name, "warn")

    async def test_tls11Accepted(self):
        old = ssl.TLSVersion.TLSv1_1
        context = self.clientContext(minimum_version=old, maximum_version=old)
        self.assertEqual(await self.echo(context=context), 0x0000)
