"""
The private parts of Twisted the appliance relies on where Twisted has no
public hook (see their users in appliance/web/request.py, streaming.py and
site.py).  setup.cfg pins Twisted below the next major version; this test
fails on an upgrade that renames or drops one of them, instead of the
appliance quietly losing the check built on it (a 100 Continue sent before
authentication, a producer never paused).
"""

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import http
from twisted.web.test.requesthelper import DummyChannel


class PrivateHooksTests(SynchronousTestCase):
    def test_channelMethods(self) -> None:
        for name in ("_send100Continue", "_respondToBadRequestAndDisconnect"):
            self.assertTrue(callable(getattr(http.HTTPChannel, name, None)), name)

    def test_channelState(self) -> None:
        channel = http.HTTPChannel()
        channel.makeConnection(StringTransport())
        self.addCleanup(channel.connectionLost, None)
        for name in ("_networkProducer", "_waitingForTransport", "_receivedHeaderSize", "_abortingCall"):
            self.assertTrue(hasattr(channel, name), name)
        channel.dataReceived(b"GET /path HTTP/1.1\r\nHost: x\r\n")
        self.assertEqual((channel._command, channel._path, channel._version), (b"GET", b"/path", b"HTTP/1.1"))

    def test_requestAndService(self) -> None:
        self.assertFalse(http.Request(DummyChannel())._disconnected)
        self.assertTrue(hasattr(StreamServerEndpointService, "_raiseSynchronously"))
