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
from typing import List

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.threads import deferToThread

from tests.dicompeers import PEER_TIMEOUT, ForwarderTestCase, associateRequest, decodeRejection, exchange
from tests.support import (
    TestAuthority,
    ctSeries,
    freePort,
    storeInstances,
)


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
