"""
Who a client is, for counting, and how many connections a listener takes:
in all, and from one client.

One host cannot take a listener's whole cap: past its own share, its new
connections are closed at once, before any TLS is spoken (the handshake is
what costs), while other hosts are still served.
"""

import ipaddress
from typing import Dict

from twisted.logger import Logger


def clientKey(client) -> str:
    """
    Who a client is, for counting: the IPv4 address, or the /64 of an IPv6
    one (one host usually holds a whole /64).
    """
    host = getattr(client, "host", None)
    if host is None:
        return str(client)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class ConnectionLimits:
    """
    The connections open on one listener, in all and by client (see
    L{clientKey}), against C{total} and C{perClient}.

    A refusal is logged once, when a client (or the whole listener) starts
    being refused, not once a connection: a flood would flood the journal.

    @param listener: names the listener in the log ("HTTPS", "DICOM TLS").
    @param section: the configuration section of its two limits.
    """

    log = Logger()

    def __init__(self, total: int, perClient: int, listener: str, section: str) -> None:
        self.total = total
        self.perClient = perClient
        self._listener = listener
        self._section = section
        self._open = 0
        self._byClient: Dict[str, int] = {}
        self._refusing: Dict[str, int] = {}
        self._full = False

    def admits(self, address) -> bool:
        """
        Whether a new connection from C{address} may be taken now.
        """
        key = clientKey(address)
        if self._open >= self.total:
            if not self._full:
                self._full = True
                self.log.warn(
                    "Refusing new {listener} connections: {limit} are open ([{section}] max_connections)",
                    listener=self._listener,
                    limit=self.total,
                    section=self._section,
                )
            return False
        if self._byClient.get(key, 0) >= self.perClient:
            if key not in self._refusing:
                self._refusing[key] = 0
                self.log.warn(
                    "Refusing new {listener} connections from {client}: it has {limit} open"
                    " ([{section}] max_connections_per_address)",
                    listener=self._listener,
                    client=key,
                    limit=self.perClient,
                    section=self._section,
                )
            self._refusing[key] += 1
            return False
        return True

    def opened(self, address) -> None:
        key = clientKey(address)
        self._open += 1
        self._byClient[key] = self._byClient.get(key, 0) + 1

    def closed(self, address) -> None:
        key = clientKey(address)
        self._open -= 1
        left = self._byClient.pop(key, 0) - 1
        if left > 0:
            self._byClient[key] = left
        if self._open < self.total:
            self._full = False
        refused = self._refusing.pop(key, None)
        if refused:
            self.log.info(
                "Taking {listener} connections from {client} again; {count} were refused",
                listener=self._listener,
                client=key,
                count=refused,
            )


class CappedConnections:
    """
    For a L{twisted.protocols.policies.WrappingFactory}: new connections
    beyond C{limits} are closed at once (refused before a protocol is
    built), and each connection is counted from its registration to its
    unregistration.  Twisted's TLS wrapper registers itself twice (its
    C{makeConnection} and L{ProtocolWrapper}'s): a connection counts once.
    """

    limits: ConnectionLimits
    protocols: dict

    def buildProtocol(self, addr):
        if not self.limits.admits(addr):
            return None
        return super().buildProtocol(addr)  # type: ignore[misc]

    def registerProtocol(self, protocol) -> None:
        if protocol not in self.protocols:
            self.limits.opened(protocol.getPeer())
        super().registerProtocol(protocol)  # type: ignore[misc]

    def unregisterProtocol(self, protocol) -> None:
        if protocol in self.protocols:
            self.limits.closed(protocol.getPeer())
        super().unregisterProtocol(protocol)  # type: ignore[misc]
