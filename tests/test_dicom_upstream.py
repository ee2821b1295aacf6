"""
The forwarder alone, in front of stand-ins for Orthanc's DICOM port: when
Orthanc cannot be reached the modality gets a transient A-ASSOCIATE-RJ, and a
relayed connection that carries nothing for [dicom] idle_timeout is closed.
"""

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol

from tests.dicompeers import PEER_TIMEOUT, StandInTestCase, associateRequest, decodeRejection, exchange
from tests.support import freePort


class SilentSCP(Protocol):
    """
    Accepts the connection and never answers.
    """

    def __init__(self, closed: Deferred) -> None:
        self._closed = closed

    def connectionLost(self, reason) -> None:
        self._closed.callback(None)


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
