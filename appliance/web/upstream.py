"""
Connections to Orthanc's loopback HTTP port: a persistent pool, a connect
timeout on the injected reactor, and large reads.
"""

from typing import Tuple

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

#: How much is read from Orthanc's connection at a time (see _TimedEndpoint).
#: Measured on a whole-study retrieve: 64 KiB (Twisted's default) costs 4.3 ms
#: of CPU a megabyte, 128 KiB 3.4 and 512 KiB 2.2; but the memory the daemon
#: keeps after clients leave in the middle of a transfer grows with the size
#: (about 0.1 MB a departed client at 128 KiB, 0.4 MB at 512 KiB: allocator
#: fragmentation, no object is kept), so the middle way.
ORTHANC_READ_SIZE = 128 * 1024

#: Idle connections kept to Orthanc, and for how long: Orthanc 1.10 closes an
#: idle keep-alive connection after one second ("Keep-Alive: timeout=1"), so
#: the pool lets go first rather than race it.
MAX_IDLE_CONNECTIONS = 8
IDLE_CONNECTION_LIFETIME = 0.5


@implementer(IStreamClientEndpoint)
class _TimedEndpoint:
    """
    A TCP connection to Orthanc that gives up after C{timeout} seconds, timed
    by the given reactor (so that tests can use a clock).
    """

    def __init__(self, reactor, port: int, timeout: float) -> None:
        self._reactor = reactor
        self._endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        self._timeout = timeout

    def connect(self, factory) -> Deferred:
        connecting = self._endpoint.connect(factory).addTimeout(self._timeout, self._reactor, self._timedOut)
        return connecting.addCallback(self._readLargeBlocks)

    @staticmethod
    def _readLargeBlocks(protocol):
        # Each block read from Orthanc costs the same Python work on its way
        # to the client, whatever its size: larger blocks than Twisted's
        # 64 KiB cost less CPU per megabyte (see ORTHANC_READ_SIZE).
        # A paused client still holds at most one block (Orthanc's connection
        # stops being read while the client's buffer is full).  The same size
        # is how much of an upload may wait in the buffer toward Orthanc.
        protocol.transport.bufferSize = ORTHANC_READ_SIZE
        return protocol

    @staticmethod
    def _timedOut(result: object, timeout: float) -> object:
        # A cancelled connection attempt fails with ConnectingCancelledError,
        # which the default of addTimeout does not turn into a TimeoutError.
        if isinstance(result, Failure):
            return Failure(TimeoutError(f"no connection to Orthanc within {timeout:g}s"))
        return result


@implementer(IAgentEndpointFactory)
class _OrthancEndpoints:
    def __init__(self, reactor, port: int, timeout: float) -> None:
        self._endpoint = _TimedEndpoint(reactor, port, timeout)

    def endpointForURI(self, uri) -> _TimedEndpoint:
        return self._endpoint


def orthancAgent(reactor, port: int, connectTimeout: float) -> Tuple[Agent, HTTPConnectionPool]:
    """
    An agent for Orthanc's HTTP C{port}, and the pool of its idle connections
    (to close when the proxy stops).
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = MAX_IDLE_CONNECTIONS
    pool.cachedConnectionTimeout = IDLE_CONNECTION_LIFETIME
    agent = Agent.usingEndpointFactory(reactor, _OrthancEndpoints(reactor, port, connectTimeout), pool=pool)
    return agent, pool
