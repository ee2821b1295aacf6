"""
The listeners (L{Listener}), and how many connections each takes: in all,
and from one client (an address, and an IPv6 /64 with more room).

One host cannot take a listener's whole cap: past its own share, its new
connections are closed at once, before any TLS is spoken (the handshake is
what costs), while other hosts are still served.
"""

import ipaddress
from typing import Callable, Dict, List, Optional, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure

from appliance.configvalues import ListenAddress


#: How much more than one address an IPv6 /64 may take: a /64 is usually a
#: whole network (a reading room), and any host in it may take many addresses.
NETWORK_SHARE = 8

#: How often a refused client is named in the log at most, in seconds.
REFUSAL_LOG_INTERVAL = 60.0


def _address(client):
    host = getattr(client, "host", None)
    if host is None:
        return str(client), None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host, None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address), address


def clientKey(client) -> str:
    """
    Who a client is, for counting and for the log: its address (an
    IPv4-mapped IPv6 address as the IPv4 one).
    """
    return _address(client)[0]


def networkKey(client) -> Optional[str]:
    """
    The IPv6 network (/64) of a client, counted too, with
    L{NETWORK_SHARE} times the room of one address; L{None} for IPv4.
    """
    address = _address(client)[1]
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return None


class ConnectionLimits:
    """
    The connections open on one listener, in all and by client: against
    C{total}, C{perClient} for one address, and C{perClient} times
    L{NETWORK_SHARE} for an IPv6 /64.

    Refusals are logged at most once every L{REFUSAL_LOG_INTERVAL} for a
    client (and for the whole listener), with how many there were: a flood
    of refused connections must not flood the journal.

    @param listener: names the listener in the log ("HTTPS", "DICOM TLS").
    @param section: the configuration section of its two limits.
    """

    log = Logger()

    def __init__(self, total: int, perClient: int, listener: str, section: str, clock) -> None:
        self.total = total
        self.perClient = perClient
        self._listener = listener
        self._section = section
        self._clock = clock
        self._open = 0
        self._byClient: Dict[str, int] = {}
        #: For each client refused lately: when it was last named in the
        #: log, and how many refusals since.
        self._refused: Dict[str, Tuple[float, int]] = {}

    def admits(self, address) -> bool:
        """
        Whether a new connection from C{address} may be taken now.
        """
        host, network = clientKey(address), networkKey(address)
        if self._open >= self.total:
            self._refuse("", "Refusing new {listener} connections: {limit} are open ([{section}] max_connections)",
                         limit=self.total)
            return False
        for key, limit in ((host, self.perClient), (network, self.perClient * NETWORK_SHARE)):
            if key is not None and self._byClient.get(key, 0) >= limit:
                self._refuse(
                    key,
                    "Refusing new {listener} connections from {client}: it has {limit} open"
                    " ([{section}] max_connections_per_address)",
                    client=key,
                    limit=limit,
                )
                return False
        return True

    def _refuse(self, key: str, format: str, **fields: object) -> None:
        now = self._clock.seconds()
        lastLogged, count = self._refused.get(key, (None, 0))
        if lastLogged is not None and now - lastLogged < REFUSAL_LOG_INTERVAL:
            self._refused[key] = (lastLogged, count + 1)
            return
        if count:
            format += " ({count} more refused since the last such line)"
        self.log.warn(format, listener=self._listener, section=self._section, count=count, **fields)
        self._refused[key] = (now, 0)
        if len(self._refused) > 1000:
            # Forget the clients not refused for a while.
            self._refused = {
                other: entry for other, entry in self._refused.items() if now - entry[0] < REFUSAL_LOG_INTERVAL
            }

    def opened(self, address) -> None:
        self._open += 1
        for key in (clientKey(address), networkKey(address)):
            if key is not None:
                self._byClient[key] = self._byClient.get(key, 0) + 1

    def closed(self, address) -> None:
        self._open -= 1
        for key in (clientKey(address), networkKey(address)):
            if key is not None:
                left = self._byClient.pop(key, 0) - 1
                if left > 0:
                    self._byClient[key] = left


class ConnectionCap(WrappingFactory):
    """
    The factory of a listener, wrapped: new connections beyond C{limits} are
    closed at once, before a protocol is built (before any TLS is spoken:
    the handshake is what costs), so that a flood of idle connections can
    neither exhaust the process's file descriptors nor, from one host, lock
    the others out.
    """

    def __init__(self, wrappedFactory, limits: ConnectionLimits, onClosed: Optional[Callable[[], None]] = None) -> None:
        super().__init__(wrappedFactory)
        self.limits = limits
        #: Told of each connection that closes (L{appliance.garbage}).
        self._onClosed = onClosed

    def buildProtocol(self, addr):
        if not self.limits.admits(addr):
            return None
        return super().buildProtocol(addr)

    def registerProtocol(self, protocol) -> None:
        super().registerProtocol(protocol)
        self.limits.opened(protocol.getPeer())

    def unregisterProtocol(self, protocol) -> None:
        super().unregisterProtocol(protocol)
        self.limits.closed(protocol.getPeer())
        if self._onClosed is not None:
            self._onClosed()


class Listener(Service):
    """
    Listens on C{address} with C{factory} for as long as it runs.

    The port is bound as the service starts (in C{privilegedStartService},
    while the daemon may still be root), and a port that cannot be bound
    ends the start with its error: twisted.application's
    StreamServerEndpointService would only log it, and the daemon would run,
    and report ready, without the listener.
    """

    def __init__(self, reactor, address: ListenAddress, factory, name: str) -> None:
        self._endpoint = serverFromString(reactor, address.endpointDescription())
        self.factory = factory
        self._port: Optional[IListeningPort] = None
        self.setName(name)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        failed: List[Failure] = []
        # The TCP and TLS endpoints listen at once: the outcome is known here.
        self._endpoint.listen(self.factory).addCallbacks(self._listening, failed.append)
        if failed:
            failed[0].raiseException()

    def _listening(self, port: IListeningPort) -> None:
        self._port = port

    def startService(self) -> None:
        if self._port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> Optional[Deferred]:
        super().stopService()
        port, self._port = self._port, None
        if port is None:
            return None
        return maybeDeferred(port.stopListening)
