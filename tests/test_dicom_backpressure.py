"""
Backpressure through the forwarder: an upstream SCP that stops reading makes the
forwarder stop reading from the modality, instead of buffering the stream.

The bound: in user space the forwarder holds at most Twisted's write-buffer
threshold (64 KiB) plus one read (64 KiB) per direction, so while a modality
tries to push 256 MiB at an SCP that reads nothing, the process grows by less
than 32 MiB, and the modality gets stuck after what the kernel's socket buffers
hold (a few MiB each on loopback), far below the stream's size.
"""

import ssl
import struct
from typing import List

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from appliance.dicom.forwarder import DicomForwarderService
from appliance.orthanc.space import StorageSpace
from tests.dicompeers import PEER_TIMEOUT, associateRequest
from tests.support import TestAuthority, freePort, serverCertificate, temporaryFolder, testConfig

STREAM = 256 * 1024 * 1024
CHUNK = 64 * 1024
RSS_BOUND = 32 * 1024 * 1024
#: A modality that has sent nothing for this many polls of 50 ms is stuck.
STUCK_POLLS = 10


def residentSetSize() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class SlowSCP(Protocol):
    """
    An upstream that reads nothing until told to, then counts what it gets.
    """

    def __init__(self) -> None:
        self.received = 0
        self.whenConnected: Deferred = Deferred()
        self.whenFinished: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        self.whenConnected.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)

    def connectionLost(self, reason) -> None:
        self.whenFinished.callback(self.received)


class BackpressureTests(TestCase):
    timeout = 300

    async def test_slowUpstreamHoldsTheModalityBack(self):
        folder = temporaryFolder(self)
        authority = TestAuthority(folder / "ca")
        certificate, key = authority.issue("server", "localhost", server=True)
        scp = SlowSCP()
        listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(lambda: scp)
        )
        self.addCleanup(listening.stopListening)
        config = testConfig(
            folder,
            orthanc={"dicom_port": listening.getHost().port},
            tls={"certificate": certificate, "private_key": key},
            dicom={"listen": f"127.0.0.1:{freePort()}"},
            **{"modality:ct1": {"aet": "CT1", "host": "127.0.0.1"}},
        )
        forwarder = DicomForwarderService(config, serverCertificate(config), reactor, StorageSpace.forOrthanc(config))
        forwarder.startService()
        self.addCleanup(forwarder.stopService)

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_verify_locations(str(authority.path))
        request = associateRequest("CT1")
        sent: List[int] = [0]
        pdu = struct.pack(">BBL", 0x04, 0, CHUNK - 6) + b"\x5a" * (CHUNK - 6)

        def modality() -> None:
            import socket

            with socket.create_connection(("127.0.0.1", config.dicom.listen.port)) as raw:
                with context.wrap_socket(raw) as stream:
                    stream.sendall(request)
                    while sent[0] < STREAM:
                        stream.sendall(pdu)
                        sent[0] += len(pdu)
                    # Close as TLS should: close_notify both ways, reading what
                    # the server sent (session tickets), so no reset loses data.
                    stream.unwrap()

        before = residentSetSize()
        sending = deferToThread(modality)
        await scp.whenConnected.addTimeout(PEER_TIMEOUT, reactor)
        await self.stuck(sent, sending)
        grown = residentSetSize() - before
        self.assertLess(sent[0], STREAM // 4, "the forwarder read on while upstream did not")
        self.assertLess(grown, RSS_BOUND, f"the process grew by {grown} bytes")

        # Once the SCP reads, the whole stream arrives, in order and complete.
        scp.transport.resumeProducing()
        await sending
        total = await scp.whenFinished.addTimeout(PEER_TIMEOUT * 6, reactor)
        self.assertEqual(total, len(request) + STREAM)

    def stuck(self, sent: List[int], sending: Deferred) -> Deferred:
        """
        Fires once the modality has sent nothing for STUCK_POLLS polls; fails
        if it sent the whole stream.
        """
        stuck: Deferred = Deferred()
        history = [-1]

        def poll() -> None:
            if sending.called:
                poller.stop()
                stuck.errback(AssertionError("the modality sent the whole stream unhindered"))
                return
            history.append(sent[0])
            if len(history) > STUCK_POLLS and len(set(history[-STUCK_POLLS:])) == 1:
                poller.stop()
                stuck.callback(None)

        poller = LoopingCall(poll)
        poller.start(0.05)
        return stuck.addTimeout(PEER_TIMEOUT * 3, reactor)
