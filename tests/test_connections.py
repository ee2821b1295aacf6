"""
The connection caps of the listeners (appliance.connections), on a clock:
per address, per IPv6 /64, in all, and a log that a flood cannot flood.  The
listeners themselves are tested with real sockets in tests/test_slow_clients.py
and tests/test_dicom_forwarder.py.
"""

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from appliance.connections import NETWORK_SHARE, REFUSAL_LOG_INTERVAL, ConnectionLimits


def v4(host: str) -> IPv4Address:
    return IPv4Address("TCP", host, 40000)


def v6(host: str) -> IPv6Address:
    return IPv6Address("TCP", host, 40000)


class ConnectionLimitsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.limits = ConnectionLimits(100, 3, "HTTPS", "web", self.clock)

    def fill(self, address, count: int) -> int:
        """
        Open up to C{count} connections from C{address}; how many were taken.
        """
        taken = 0
        for _ in range(count):
            if self.limits.admits(address):
                self.limits.opened(address)
                taken += 1
        return taken

    def test_perAddress(self) -> None:
        self.assertEqual(self.fill(v4("192.0.2.1"), 5), 3)
        self.assertEqual(self.fill(v4("192.0.2.2"), 5), 3)
        self.limits.closed(v4("192.0.2.1"))
        self.assertEqual(self.fill(v4("192.0.2.1"), 5), 1)
        # An IPv4-mapped address is the IPv4 one.
        self.assertFalse(self.limits.admits(v6("::ffff:192.0.2.1")))

    def test_ipv6AddressAndItsNetwork(self) -> None:
        """
        Each IPv6 address has its own share; its /64 has NETWORK_SHARE
        times as much, so a host cannot take more by changing addresses
        within it, and one host does not fill its network.
        """
        taken = [self.fill(v6(f"2001:db8:0:1::{host:x}"), 5) for host in range(1, 20)]
        self.assertEqual(taken[:NETWORK_SHARE], [3] * NETWORK_SHARE)
        self.assertEqual(sum(taken), 3 * NETWORK_SHARE)
        self.assertEqual(self.fill(v6("2001:db8:0:2::1"), 5), 3, "another /64")

    def test_inAll(self) -> None:
        limits = self.limits = ConnectionLimits(4, 3, "DICOM TLS", "dicom", self.clock)
        self.assertEqual(self.fill(v4("192.0.2.1"), 3) + self.fill(v4("192.0.2.2"), 3), 4)
        limits.closed(v4("192.0.2.2"))
        self.assertEqual(self.fill(v4("192.0.2.3"), 3), 1)

    def test_aFloodIsLoggedOnceAnInterval(self) -> None:
        """
        A client refused again and again, closing and opening between
        refusals, is named once an interval, with the count since.
        """
        flooder = v4("192.0.2.9")
        self.fill(flooder, 3)
        with capturedLogs() as events:
            for _ in range(1000):
                self.limits.closed(flooder)
                self.fill(flooder, 2)
                self.clock.advance(0.01)
            self.clock.advance(REFUSAL_LOG_INTERVAL)
            self.assertFalse(self.limits.admits(flooder))
        lines = [formatEvent(event) for event in events]
        self.assertEqual(len(lines), 2, lines)
        self.assertEqual(
            lines[0],
            "Refusing new HTTPS connections from 192.0.2.9: it has 3 open ([web] max_connections_per_address)",
        )
        self.assertTrue(lines[1].endswith("(999 more refused since the last such line)"), lines[1])
