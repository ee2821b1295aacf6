"""
When Orthanc's connection ends under a relayed association, the forwarder tells
the modality at once: an A-ABORT (source 2, the service provider; reason 0) if
what the modality received so far ends between two PDUs, a transient
A-ASSOCIATE-RJ if Orthanc had not answered the association yet, nothing but the
close when the connection ended in the middle of a PDU, and nothing more after
a PDU that ended the association (A-ASSOCIATE-RJ, A-RELEASE-RP, A-ABORT).

In memory first (L{PDUBoundaries} and the forwarder's connection, with
hypothesis cutting a stream of PDUs anywhere), then with pynetdicom over TLS
through the real forwarder, in front of a stand-in for Orthanc that dies.
"""

from typing import List, Optional

from hypothesis import event, given
from hypothesis import strategies as st
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from appliance.dicom.forwarder import ForwarderFactory
from appliance.dicom.pdu import ENDING_TYPES, PDU_HEADER, PROVIDER_ABORT, PDUBoundaries
from appliance.orthanc.space import StorageSpace
from tests.dicompeers import PEER_TIMEOUT, NegotiatedTransport, StandInTestCase, associateRequest, decodeRejection
from tests.fuzzing import FUZZ
from tests.support import temporaryFolder, testConfig

#: The A-ABORT of PS3.8 9.3.8: type 7, length 4, source 2 (service provider), reason 0.
ABORT_BYTES = bytes.fromhex("07 00 00000004 00 00 02 00")
#: What the forwarder answers when Orthanc closes before answering the request:
#: rejected transient, by the service provider (presentation), congestion.
ORTHANC_AWAY = (2, 3, 1)


def pdu(pduType: int, payload: bytes = b"") -> bytes:
    return PDU_HEADER.pack(pduType, 0, len(payload)) + payload


#: Orthanc's side of an association: accepted, an answer in two fragments.
ACCEPT = pdu(0x02, b"\x00\x01" + b"a" * 60)
ANSWER = pdu(0x04, b"\x00\x00\x00\x0c\x01\x03" + b"r" * 10)
RELEASE_RP = pdu(0x06, b"\x00" * 4)
REJECT = pdu(0x03, b"\x00\x01\x01\x03")


class RelayedAssociation:
    """
    A modality's connection through the forwarder, in memory: the TLS
    handshake taken as done, its A-ASSOCIATE-RQ admitted and replayed to a
    stand-in for Orthanc's DICOM port.
    """

    def __init__(self, config) -> None:
        self.reactor = MemoryReactorClock()
        factory = ForwarderFactory(config, self.reactor, StorageSpace.forOrthanc(config))
        self.modality = NegotiatedTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", config.dicom.listen.port),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 50000),
        )
        self.connection = factory.buildProtocol(self.modality.getPeer())
        self.connection.makeConnection(self.modality)
        request = associateRequest("CT1")
        self.connection.dataReceived(request)
        [(host, port, connector, _, _)] = self.reactor.tcpClients
        self.orthanc = StringTransport()
        self.upstream = connector.buildProtocol(IPv4Address("TCP", host, port))
        self.upstream.makeConnection(self.orthanc)
        assert self.orthanc.value() == request

    def fromOrthanc(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.upstream.dataReceived(chunk)

    def orthancLost(self) -> None:
        """
        Orthanc's connection is gone at once (a reset).
        """
        self.upstream.connectionLost(Failure(ConnectionLost()))

    def orthancFinished(self) -> None:
        """
        Orthanc's connection ends as a dead process's does: its end first,
        then, once the modality's connection is closed, the rest.
        """
        self.upstream.readConnectionLost()
        self.assertClosed()
        self.connection.connectionLost(Failure(ConnectionDone()))
        self.upstream.connectionLost(Failure(ConnectionDone()))

    def assertClosed(self) -> None:
        assert self.modality.disconnecting, "the modality's connection is open"
        # A TLS close, after what was written: not an abort, which loses it.
        assert not self.modality.disconnected, "the modality's connection was aborted"


class TCPTransport(NegotiatedTransport):
    """
    An in-memory transport that says whether Nagle's algorithm was turned
    off, as a TCP connection can.
    """

    noDelay = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.noDelay = enabled


class NoDelayTests(SynchronousTestCase):
    def test_bothSidesSendAtOnce(self):
        """
        The modality's and Orthanc's connections send each message as soon
        as it is written: a C-STORE's last segment must not wait for the
        ACK of the one before.
        """
        config = testConfig(temporaryFolder(self), **{"modality:ct1": {"aet": "CT1", "host": "127.0.0.1"}})
        reactor = MemoryReactorClock()
        modality = TCPTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", config.dicom.listen.port),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 50000),
        )
        connection = ForwarderFactory(config, reactor, StorageSpace.forOrthanc(config)).buildProtocol(modality.getPeer())
        connection.makeConnection(modality)
        connection.dataReceived(associateRequest("CT1"))
        [(host, port, connector, _, _)] = reactor.tcpClients
        orthanc = TCPTransport()
        connector.buildProtocol(IPv4Address("TCP", host, port)).makeConnection(orthanc)
        self.assertEqual((modality.noDelay, orthanc.noDelay), (True, True))


class BoundaryTests(SynchronousTestCase):
    """
    L{PDUBoundaries} on streams cut into chunks anywhere.
    """

    def feed(self, *chunks: bytes) -> PDUBoundaries:
        boundaries = PDUBoundaries()
        for chunk in chunks:
            boundaries.feed(chunk)
        return boundaries

    def test_nothingYet(self):
        boundaries = self.feed()
        self.assertTrue(boundaries.atBoundary)
        self.assertIsNone(boundaries.lastType)

    def test_wholePDUsInOneChunk(self):
        boundaries = self.feed(ACCEPT + ANSWER)
        self.assertEqual((boundaries.atBoundary, boundaries.lastType), (True, 0x04))

    def test_headerSplitAcrossChunks(self):
        stream = ACCEPT + ANSWER
        for cut in range(len(ACCEPT) + 1, len(ACCEPT) + PDU_HEADER.size):
            boundaries = self.feed(stream[:cut])
            self.assertEqual((boundaries.atBoundary, boundaries.lastType), (False, 0x02), cut)
            boundaries.feed(stream[cut:])
            self.assertEqual((boundaries.atBoundary, boundaries.lastType), (True, 0x04), cut)

    def test_headerInSingleBytes(self):
        boundaries = self.feed(*[ANSWER[i : i + 1] for i in range(len(ANSWER))])
        self.assertEqual((boundaries.atBoundary, boundaries.lastType), (True, 0x04))

    def test_cutInThePayload(self):
        boundaries = self.feed(ACCEPT, ANSWER[:-1])
        self.assertEqual((boundaries.atBoundary, boundaries.lastType), (False, 0x04))
        boundaries.feed(ANSWER[-1:] + RELEASE_RP)
        self.assertEqual((boundaries.atBoundary, boundaries.lastType), (True, 0x06))

    def test_emptyPDU(self):
        self.assertTrue(self.feed(pdu(0x05), pdu(0x04)).atBoundary)

    def test_largeLength(self):
        # A length field of 4 GiB - 1 is owed, not read.
        boundaries = self.feed(PDU_HEADER.pack(0x04, 0, 0xFFFFFFFF), b"x" * 100)
        self.assertFalse(boundaries.atBoundary)

    @FUZZ
    @given(st.data())
    def test_anyChunkingAnyCut(self, data):
        """
        A stream of PDUs cut at any point, fed in any chunks: at a boundary
        exactly when the cut is at one, and the last type is that of the last
        PDU whose header is whole.
        """
        stream, starts = data.draw(pduStreams())
        cut = data.draw(st.integers(0, len(stream)), label="cut")
        boundaries = self.feed(*data.draw(chunkings(stream[:cut])))
        self.assertEqual(boundaries.atBoundary, cut in starts or cut == len(stream))
        headers = [stream[start] for start in starts if start + PDU_HEADER.size <= cut]
        self.assertEqual(boundaries.lastType, headers[-1] if headers else None)


@st.composite
def pduStreams(draw):
    """
    A stream of PDUs from Orthanc (any type it may send, short payloads so
    that headers often straddle chunks, now and then a long one) and where
    each PDU starts.
    """
    types = st.sampled_from([0x02, 0x03, 0x04, 0x05, 0x06, 0x07])
    sizes = st.one_of(st.integers(0, 12), st.integers(13, 3000))
    pdus = draw(st.lists(st.tuples(types, sizes), min_size=1, max_size=8))
    stream, starts = b"", []
    for pduType, size in pdus:
        starts.append(len(stream))
        stream += pdu(pduType, bytes([pduType]) * size)
    return stream, starts


@st.composite
def chunkings(draw, stream: bytes) -> List[bytes]:
    """
    C{stream} cut into chunks (none empty: a transport delivers none).
    """
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=12)))
    edges = [0] + [cut for cut in cuts if cut < len(stream)] + [len(stream)]
    return [stream[a:b] for a, b in zip(edges, edges[1:]) if b > a]


class ForwarderAbortTests(SynchronousTestCase):
    """
    The forwarder's connection, in memory, when Orthanc's connection ends.
    """

    def setUp(self) -> None:
        self.config = testConfig(
            temporaryFolder(self), **{"modality:ct1": {"aet": "CT1", "host": "127.0.0.0/8"}}
        )

    def relayed(self) -> RelayedAssociation:
        return RelayedAssociation(self.config)

    def test_lostAtABoundary(self):
        """
        The modality gets exactly what Orthanc sent and then one A-ABORT, and
        its connection is closed after it.
        """
        relayed = self.relayed()
        relayed.fromOrthanc(ACCEPT, ANSWER)
        relayed.orthancLost()
        self.assertEqual(relayed.modality.value(), ACCEPT + ANSWER + ABORT_BYTES)
        self.assertEqual(PROVIDER_ABORT, ABORT_BYTES)
        relayed.assertClosed()
        self.assertTrue(
            relayed.connection.outcome.endswith("; aborted (A-ABORT) when Orthanc's connection ended"),
            relayed.connection.outcome,
        )

    def test_finishedAtABoundary(self):
        """
        Orthanc's end of the stream (a dead process's FIN) is answered with
        the A-ABORT too, once, though its connection is lost just after.
        """
        relayed = self.relayed()
        relayed.fromOrthanc(ACCEPT, ANSWER)
        relayed.orthancFinished()
        self.assertEqual(relayed.modality.value(), ACCEPT + ANSWER + ABORT_BYTES)

    def test_lostInThePayload(self):
        relayed = self.relayed()
        relayed.fromOrthanc(ACCEPT, ANSWER[:9])
        relayed.orthancLost()
        self.assertEqual(relayed.modality.value(), ACCEPT + ANSWER[:9])
        relayed.assertClosed()
        self.assertTrue(
            relayed.connection.outcome.endswith(
                "; closed in the middle of a PDU when Orthanc's connection ended"
            ),
            relayed.connection.outcome,
        )

    def test_lostInAHeader(self):
        relayed = self.relayed()
        relayed.fromOrthanc(ACCEPT + ANSWER[:2], ANSWER[2:4])
        relayed.orthancFinished()
        self.assertEqual(relayed.modality.value(), ACCEPT + ANSWER[:4])

    def test_headerSplitAcrossChunks(self):
        relayed = self.relayed()
        relayed.fromOrthanc(ACCEPT[:3], ACCEPT[3:5], ACCEPT[5:] + ANSWER[:1], ANSWER[1:])
        relayed.orthancLost()
        self.assertEqual(relayed.modality.value(), ACCEPT + ANSWER + ABORT_BYTES)

    def test_lostBeforeOrthancAnswered(self):
        """
        Nothing answered the A-ASSOCIATE-RQ yet: the modality is refused as
        when Orthanc's port cannot be reached, and may try again.
        """
        relayed = self.relayed()
        relayed.orthancFinished()
        self.assertEqual(decodeRejection(relayed.modality.value()), ORTHANC_AWAY)
        self.assertIn(
            "; refused (Orthanc closed the connection before answering)",
            relayed.connection.outcome,
        )

    def test_nothingAfterTheAssociationEnded(self):
        """
        After a PDU that ends the association the modality is told nothing
        more: it closes its side itself.
        """
        for ending in (REJECT, ACCEPT + ANSWER + RELEASE_RP, ACCEPT + ANSWER + ABORT_BYTES):
            relayed = self.relayed()
            relayed.fromOrthanc(ending)
            relayed.orthancFinished()
            self.assertEqual(relayed.modality.value(), ending)
            self.assertEqual(relayed.connection.outcome, "accepted as [modality:ct1]")

    def test_modalityAbortedFirst(self):
        """
        When the modality aborts and Orthanc then closes, as PS3.8 has it,
        the modality is sent nothing more and the log says who aborted.
        """
        relayed = self.relayed()
        relayed.fromOrthanc(ACCEPT, ANSWER)
        relayed.connection.dataReceived(pdu(0x07, b"\x00\x00\x00\x00"))
        relayed.orthancFinished()
        self.assertEqual(relayed.modality.value(), ACCEPT + ANSWER)
        self.assertEqual(relayed.connection.outcome, "accepted as [modality:ct1]; aborted by the modality (A-ABORT)")

    def test_modalityGoneFirst(self):
        """
        When the modality's connection is gone, Orthanc's end writes nothing.
        """
        relayed = self.relayed()
        relayed.fromOrthanc(ACCEPT, ANSWER)
        relayed.connection.connectionLost(Failure(ConnectionDone()))
        relayed.upstream.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(relayed.modality.value(), ACCEPT + ANSWER)

    @FUZZ
    @given(st.data())
    def test_anyChunkingAnyCut(self, data):
        """
        Orthanc's stream in any chunks, its connection lost anywhere: the
        modality gets what was sent, then an A-ABORT exactly when the cut is
        at a boundary under a live association (an A-ASSOCIATE-RJ before
        anything), and its connection is closed, never aborted.
        """
        stream, starts = data.draw(pduStreams())
        cut = data.draw(st.sampled_from(starts + [len(stream)]) | st.integers(0, len(stream)), label="cut")
        relayed = self.relayed()
        relayed.fromOrthanc(*data.draw(chunkings(stream[:cut])))
        if data.draw(st.booleans(), label="finished first"):
            relayed.orthancFinished()
        else:
            relayed.orthancLost()
        relayed.assertClosed()
        answered = relayed.modality.value()
        self.assertEqual(answered[:cut], stream[:cut])
        last: Optional[int] = max((start for start in starts if start < cut), default=None)
        if cut == 0:
            event("before any answer")
            self.assertEqual(decodeRejection(answered), ORTHANC_AWAY)
        elif cut not in starts and cut != len(stream):
            event("in the middle of a PDU")
            self.assertEqual(answered, stream[:cut])
        elif stream[last] in ENDING_TYPES:
            event("after the association ended")
            self.assertEqual(answered, stream[:cut])
        else:
            event("at a boundary")
            self.assertEqual(answered, stream[:cut] + ABORT_BYTES)


def associationAccept(request: bytes) -> bytes:
    """
    An A-ASSOCIATE-AC accepting every presentation context of the
    A-ASSOCIATE-RQ C{request} with its first transfer syntax.
    """
    decoded = A_ASSOCIATE_RQ()
    decoded.decode(request)
    primitive = decoded.to_primitive()
    primitive.result = 0
    results = []
    for proposed in primitive.presentation_context_definition_list:
        accepted = PresentationContext()
        accepted.context_id = proposed.context_id
        accepted.add_transfer_syntax(proposed.transfer_syntax[0])
        accepted.result = 0
        results.append(accepted)
    primitive.presentation_context_definition_results_list = results
    accept = A_ASSOCIATE_AC()
    accept.from_primitive(primitive)
    return accept.encode()


class DyingSCP(Protocol):
    """
    A stand-in for Orthanc's DICOM port that dies under the association,
    as C{death} says: C{"before answering"} its A-ASSOCIATE-RQ; or, having
    accepted it, on the first P-DATA-TF: C{"close"} (its end of the stream,
    as a killed process's), C{"reset"}, or C{"mid-PDU"} (a close after half
    a P-DATA-TF).
    """

    def __init__(self, death: str) -> None:
        self._death = death
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= PDU_HEADER.size:
            pduType, _, length = PDU_HEADER.unpack_from(self._buffer)
            end = PDU_HEADER.size + length
            if len(self._buffer) < end:
                return
            whole, self._buffer = self._buffer[:end], self._buffer[end:]
            self.received(pduType, whole)

    def received(self, pduType: int, whole: bytes) -> None:
        if pduType == 0x01:
            if self._death == "before answering":
                self.transport.loseConnection()
            else:
                self.transport.write(associationAccept(whole))
        elif pduType == 0x04:
            if self._death == "reset":
                self.transport.abortConnection()
                return
            if self._death == "mid-PDU":
                self.transport.write(PDU_HEADER.pack(0x04, 0, 100) + b"\x00" * 20)
            self.transport.loseConnection()


class PynetdicomAbortTests(StandInTestCase):
    """
    pynetdicom over TLS through the real forwarder, in front of an Orthanc
    that dies under the association: the A-ABORT (or its absence) on the
    wire, as pynetdicom decoded it.
    """

    #: Far longer than any test here may take: an association that ends
    #: by one of these timeouts fails the test.
    NETWORK_TIMEOUT = 30

    async def echoThroughDyingSCP(self, death: str):
        """
        Associate as CT1 and send a C-ECHO through the forwarder in front
        of a L{DyingSCP}; (the association, the PDUs pynetdicom received).
        """
        listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(lambda: DyingSCP(death))
        )
        self.addCleanup(listening.stopListening)
        port = self.startForwarder(listening.getHost().port)
        context = self.clientContext()

        def run():
            received = []
            ae = AE(ae_title="CT1")
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.NETWORK_TIMEOUT
            ae.connection_timeout = self.NETWORK_TIMEOUT
            ae.add_requested_context(Verification)
            association = ae.associate(
                "127.0.0.1", port, ae_title="PACS", tls_args=(context, None),
                evt_handlers=[(evt.EVT_PDU_RECV, lambda event: received.append(event.pdu))],
            )
            if association.is_established:
                association.send_c_echo()
                # The association thread ends once the abort is handled.
                association.join()
            return association, received

        return await deferToThread(run)

    def aborts(self, received) -> List[tuple]:
        return [(each.source, each.reason_diagnostic) for each in received if isinstance(each, A_ABORT_RQ)]

    async def test_orthancEndsItsStream(self):
        association, received = await self.echoThroughDyingSCP("close")
        self.assertTrue(association.is_aborted)
        # Aborted because an A-ABORT came, from the service provider.
        self.assertEqual(self.aborts(received), [(2, 0)])
        outcome = await self.outcome.addTimeout(PEER_TIMEOUT, reactor)
        self.assertEqual(
            outcome, "accepted as [modality:ct1]; aborted (A-ABORT) when Orthanc's connection ended"
        )

    async def test_orthancResetsItsConnection(self):
        association, received = await self.echoThroughDyingSCP("reset")
        self.assertTrue(association.is_aborted)
        self.assertEqual(self.aborts(received), [(2, 0)])

    async def test_orthancDiesInTheMiddleOfAPDU(self):
        """
        No A-ABORT after half a PDU: pynetdicom sees its connection close.
        """
        association, received = await self.echoThroughDyingSCP("mid-PDU")
        self.assertTrue(association.is_aborted)
        self.assertEqual(self.aborts(received), [])
        outcome = await self.outcome.addTimeout(PEER_TIMEOUT, reactor)
        self.assertIn("closed in the middle of a PDU", outcome)

    async def test_orthancDiesBeforeAnswering(self):
        association, received = await self.echoThroughDyingSCP("before answering")
        self.assertTrue(association.is_rejected)
        [rejection] = received
        self.assertEqual(
            (rejection.result, rejection.source, rejection.reason_diagnostic), ORTHANC_AWAY
        )
