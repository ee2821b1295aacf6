"""
Two TCP connections joined into one byte stream, with backpressure both ways.

The connection that was accepted (L{RelayedConnection}) opens the other one
(L{UpstreamConnection}) and, once it is there, each transport becomes the
other's producer: when one side's write buffer fills up, reading from the other
side stops until it drains, so a slow reader never makes the relay buffer the
stream.  The end of one direction is passed on to the other side as a half-close
where the transport can (TCP), and as a TLS close otherwise; a subclass may send
its peer last words first (L{RelayedConnection.upstreamEnded}).
"""

import time
from typing import Optional, Set

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol, INegotiated, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer


def sendAtOnce(transport) -> None:
    """
    Turn Nagle's algorithm off on C{transport}'s TCP connection (through TLS,
    whose transport passes for the TCP one): DICOM is request and answer, and
    the last small segment of a message would otherwise wait for the ACK of
    the one before, which the peer delays (40 ms on Linux) -- twice per
    C-STORE through the relay.
    """
    # Asked by name: TLS passes the call on to the TCP connection under it.
    setTcpNoDelay = getattr(transport, "setTcpNoDelay", None)
    if setTcpNoDelay is not None:
        setTcpNoDelay(True)


@implementer(IHalfCloseableProtocol)
class UpstreamConnection(Protocol):
    """
    The side of a relay that the relay opened; everything it hears goes to the
    accepted side.
    """

    def __init__(self, downstream: "RelayedConnection") -> None:
        self._downstream = downstream

    def connectionMade(self) -> None:
        sendAtOnce(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self._downstream.upstreamDataReceived(data)

    def readConnectionLost(self) -> None:
        self._downstream.upstreamFinishedSending()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        self._downstream.upstreamLost()


@implementer(IHalfCloseableProtocol)
class RelayedConnection(Protocol, TimeoutMixin):
    """
    An accepted connection that, once L{relayTo} is called, is relayed to a new
    upstream connection.  Subclasses decide when (and whether) to relay, and
    describe the connection in one log line when it ends (L{connectionEnded}).

    @ivar received: bytes received from this connection's peer.
    @ivar sent: bytes sent to it.
    """

    upstream: Optional[UpstreamConnection] = None

    def __init__(self, reactor, idleTimeout: float) -> None:
        self._reactor = reactor
        self.callLater = reactor.callLater  # for TimeoutMixin
        self._idleTimeout = idleTimeout
        self._pending = b""
        self._connecting = False
        self._relaying = False
        self._upstreamEnded = False
        self.received = 0
        self.sent = 0
        self.started = time.monotonic()
        self.closed: Deferred = Deferred()
        # Protocol.connected is never reset: this is whether the peer is gone.
        self._lost = False

    def connectionMade(self) -> None:
        sendAtOnce(self.transport)
        self.factory.connections.add(self)
        self.setTimeout(self._idleTimeout)

    def abort(self) -> Deferred:
        """
        Close both sides now; the Deferred fires once this side is gone.
        """
        self.transport.abortConnection()
        if self.upstream is not None:
            self.upstream.transport.abortConnection()
        return self.closed

    def timeoutConnection(self) -> None:
        self.idleTimedOut()
        self.transport.abortConnection()
        if self.upstream is not None:
            self.upstream.transport.abortConnection()

    def idleTimedOut(self) -> None:
        """
        Called when the connection is closed for want of traffic.
        """

    def relayTo(self, endpoint: IStreamClientEndpoint, first: bytes = b"") -> Deferred:
        """
        Open the upstream connection, send it C{first} and then relay both
        ways.  Reading from this connection is paused until then.  The
        Deferred fires with None once relaying, or fails if the connection
        could not be opened (this connection is then left for the caller to
        answer and close).
        """
        self._pending = first
        self._connecting = True
        self.transport.pauseProducing()
        connecting = connectProtocol(endpoint, UpstreamConnection(self))
        connecting.addCallback(self._upstreamConnected)
        connecting.addErrback(self._upstreamFailed)
        return connecting

    def _upstreamFailed(self, reason: Failure) -> Failure:
        self._connecting = False
        # Read again, so that the caller's answer and close can complete.
        self.transport.resumeProducing()
        return reason

    def _upstreamConnected(self, upstream: UpstreamConnection) -> None:
        self._connecting = False
        if self._lost:
            upstream.transport.loseConnection()
            return
        self.upstream = upstream
        self._relaying = True
        pending, self._pending = self._pending, b""
        upstream.transport.write(pending)
        self.transport.registerProducer(upstream.transport, True)
        upstream.transport.registerProducer(self.transport, True)
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.resetTimeout()
        if self._relaying:
            self.upstream.transport.write(data)
        elif self.upstream is None and not self._connecting:
            self.dataBeforeRelaying(data)
        else:
            self._pending += data

    def dataBeforeRelaying(self, data: bytes) -> None:
        """
        Called with what the peer sends before L{relayTo}; ignored unless a
        subclass needs it.
        """

    def upstreamDataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        self.sent += len(data)
        self.transport.write(data)

    def upstreamFinishedSending(self) -> None:
        if self._lost:
            return
        self.transport.unregisterProducer()
        self._endOfUpstream()
        if _isTLS(self.transport):
            # TLS has no half-close: its close alert ends both directions.
            self.transport.loseConnection()
        else:
            self.transport.loseWriteConnection()

    def upstreamLost(self) -> None:
        self.upstream = None
        self._relaying = False
        if not self._lost:
            self.transport.unregisterProducer()
            self._endOfUpstream()
            self.transport.loseConnection()

    def _endOfUpstream(self) -> None:
        if not self._upstreamEnded and not self.transport.disconnecting:
            self._upstreamEnded = True
            self.upstreamEnded()

    def upstreamEnded(self) -> None:
        """
        Called once when the upstream connection stops sending or is lost
        while this one is open, just before this one is closed: the last
        moment to write to the peer.
        """

    def readConnectionLost(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.unregisterProducer()
            self.upstream.transport.loseWriteConnection()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        self._lost = True
        self.setTimeout(None)
        self.factory.connections.discard(self)
        if self.upstream is not None:
            self.upstream.transport.unregisterProducer()
            self.upstream.transport.loseConnection()
        self.connectionEnded(reason, time.monotonic() - self.started)
        self.closed.callback(None)

    def connectionEnded(self, reason: Failure, duration: float) -> None:
        """
        Called once when this connection is gone, to log it.
        """


def _isTLS(transport) -> bool:
    return INegotiated.providedBy(transport)


class RelayFactory(Factory):
    """
    Keeps track of its open L{RelayedConnection}s, to close them when the
    service that listens stops.
    """

    def __init__(self) -> None:
        self.connections: Set[RelayedConnection] = set()

    def abortAll(self) -> Deferred:
        return gatherResults([connection.abort() for connection in list(self.connections)])
