"""
The forwarder alone, in front of stand-ins for Orthanc's DICOM port: when
Orthanc cannot be reached the modality gets a transient A-ASSOCIATE-RJ, and a
relayed connection that carries nothing for [dicom] idle_timeout is closed.
"""

import ssl
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from appliance.dicom.forwarder import DicomForwarderService
from appliance.orthanc.space import StorageSpace
from tests.support import TestAuthority, freePort, serverCertificate, temporaryFolder, testConfig
from tests.test_dicom_forwarder import PEER_TIMEOUT, associateRequest, decodeRejection, exchange


class SilentSCP(Protocol):
    """
    Accepts the connection and never answers.
    """

    def __init__(self, closed: Deferred) -> None:
        self._closed = closed

    def connectionLost(self, reason) -> None:
        self._closed.callback(None)


class StandInTestCase(TestCase):
    """
    Starts the forwarder alone (L{startForwarder}) in front of a stand-in for
    Orthanc's DICOM port, with certificates of a test authority.
    """

    timeout = 120

    def setUp(self):
        self.folder = temporaryFolder(self)
        self.authority = TestAuthority(self.folder / "ca")
        self.certificate, self.key = self.authority.issue("server", "localhost", server=True)
        # The forwarder logs a connection once it has seen it close, which may
        # be just after the peer has.
        self.outcome: Deferred = Deferred()

        def observe(event):
            if "outcome" in event and "calling" in event and not self.outcome.called:
                self.outcome.callback(event["outcome"])

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def startForwarder(self, orthancPort: int, **dicom) -> int:
        config = testConfig(
            self.folder,
            orthanc={"dicom_port": orthancPort},
            tls={"certificate": self.certificate, "private_key": self.key},
            dicom={"listen": f"127.0.0.1:{freePort()}", **dicom},
            **{"modality:ct1": {"aet": "CT1", "host": "127.0.0.1"}},
        )
        forwarder = DicomForwarderService(config, serverCertificate(config), reactor, StorageSpace.forOrthanc(config))
        forwarder.startService()
        self.addCleanup(forwarder.stopService)
        return config.dicom.listen.port

    def clientContext(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_verify_locations(str(self.authority.path))
        return context


class UpstreamTests(StandInTestCase):
    async def test_orthancUnreachable(self):
        port = self.startForwarder(orthancPort=freePort())
        answer = await exchange(port, associateRequest("CT1"), self.clientContext())
        # Rejected transient, by the service provider (presentation), congestion.
        self.assertEqual(decodeRejection(answer), (2, 3, 1))
        outcome = await self.outcome.addTimeout(PEER_TIMEOUT, reactor)
        self.assertIn("refused (Orthanc's DICOM port cannot be reached", outcome)

    async def test_idleRelayClosed(self):
        upstreamClosed: Deferred = Deferred()
        listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(lambda: SilentSCP(upstreamClosed))
        )
        self.addCleanup(listening.stopListening)
        port = self.startForwarder(listening.getHost().port, idle_timeout="300ms")
        # The modality associates and then waits for an answer that never comes.
        answer = await exchange(port, associateRequest("CT1"), self.clientContext())
        self.assertEqual(answer, b"")
        await upstreamClosed.addTimeout(PEER_TIMEOUT, reactor)
        outcome = await self.outcome.addTimeout(PEER_TIMEOUT, reactor)
        self.assertEqual(
            outcome, "accepted as [modality:ct1]; closed after 0.3s without traffic"
        )
