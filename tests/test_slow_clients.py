"""
Slow and many clients against the HTTPS listener on a real socket: request
heads trickled (slowloris), bodies trickled, a flood of idle keep-alive
connections up to [web] max_connections, TLS handshakes never finished, and
answers never read.
Each attack runs in a thread while a normal user, in another, GETs a small
file over a fresh TLS connection again and again; the attack must be cut off
and the user served, and the user's latency during the attack is printed
(no timing assertion beyond a generous cap).
"""

import http.client
import select
import socket
import ssl
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from appliance.web.site import NoCredentials, buildWebRoot, buildWebService
from tests.support import FakeOrthanc, temporaryFolder, testConfig, webTLS
from tests.tlsclients import clientContext
from tests.viewerbuild import makeBuild

HEADER_TIMEOUT = 2.0
HANDSHAKE_TIMEOUT = 1.0
IDLE_TIMEOUT = 3.0
MAX_CONNECTIONS = 50

#: How late after its deadline a connection may be closed, and how long a
#: normal request may take, on a loaded test machine: generous on purpose.
SLACK = 4.0
LATENCY_CAP = 10.0

#: The small file the normal user fetches.
SMALL_FILE = "/app.bundle.css"

#: A file far larger than every buffer between the server and a client
#: (socket buffers grow to a few MiB on loopback).
LARGE_FILE = "/large.bundle.0123456789abcdef.js"
LARGE_FILE_SIZE = 48 * 1024 * 1024

#: Linux's TCP states (tcp_states.h) in which the peer has closed or reset.
TCP_CLOSED_STATES = (7, 8)

#: Time between two bytes of a trickle: well inside both timeouts, so that
#: only a deadline, never an idle timer, can end the connection.
TRICKLE_PACE = 0.25


@dataclass
class Attempt:
    """
    One request of the normal user: when it started (monotonic), how long it
    took, and its status or why it failed.
    """

    startedAt: float
    latency: float
    status: Optional[int] = None
    error: Optional[str] = None


def normalUser(port: int, go: threading.Event, stop: threading.Event, attempts: List[Attempt]) -> None:
    """
    Once C{go} is set and until C{stop} is, GET L{SMALL_FILE} over a fresh
    TLS connection, one request after the other, noting each in C{attempts}
    (blocking).
    """
    go.wait(60)
    context = clientContext()
    while not stop.is_set():
        startedAt = time.monotonic()
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=LATENCY_CAP)
        try:
            connection.request("GET", SMALL_FILE)
            response = connection.getresponse()
            response.read()
            attempts.append(Attempt(startedAt, time.monotonic() - startedAt, status=response.status))
        except (OSError, http.client.HTTPException) as error:
            attempts.append(Attempt(startedAt, time.monotonic() - startedAt, error=repr(error)))
        finally:
            connection.close()
        # Pacing, not waiting for an event: a user clicking, not a benchmark.
        stop.wait(0.05)


def latencyFigures(attempts: Sequence[Attempt]) -> str:
    latencies = [attempt.latency * 1000 for attempt in attempts]
    if not latencies:
        return "no request"
    return "{} requests, median {:.0f} ms, max {:.0f} ms".format(
        len(latencies), statistics.median(latencies), max(latencies)
    )


@dataclass
class HeldConnection:
    """
    A connection an attack holds open: when it was opened (or last answered,
    which restarts the server's deadline), what it still has to trickle, and
    when the server closed it.
    """

    sock: socket.socket
    openedAt: float
    trickle: Iterator[bytes]
    closedAt: Optional[float] = None
    lastSentAt: Optional[float] = None

    @property
    def held(self) -> float:
        return self.closedAt - self.openedAt


def noMore() -> Iterator[bytes]:
    return iter(())


def forever(data: bytes) -> Iterator[bytes]:
    """
    The bytes of C{data}, one at a time, over and over.
    """
    while True:
        for byte in data:
            yield bytes([byte])


def checkClosed(connection: HeldConnection) -> None:
    """
    Note whether the server has closed C{connection} (non-blocking socket):
    an end of stream, a reset or a TLS error is a close; data, or TLS
    records with no data yet (session tickets), are not.
    """
    try:
        data = connection.sock.recv(4096)
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
        return
    except OSError:
        data = b""
    if not data:
        connection.closedAt = time.monotonic()


def checkClosedUnread(connection: HeldConnection) -> None:
    """
    Note whether the server has closed or reset C{connection}, without
    reading what it was sent.
    """
    state = connection.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    if state in TCP_CLOSED_STATES:
        connection.closedAt = time.monotonic()


def attemptsWhileHeld(connections: Sequence[HeldConnection], go, attempts, limit: float) -> list:
    """
    Let the normal user start (C{go}), hold C{connections} until closed or
    C{limit} seconds, and return the user's attempts made meanwhile.
    """
    go.set()
    started = time.monotonic()
    holdUntilClosed(connections, limit)
    return [attempt for attempt in attempts if attempt.startedAt >= started]


def holdUntilClosed(connections: Sequence[HeldConnection], limit: float) -> None:
    """
    Until the server has closed every connection, or C{limit} seconds have
    passed: send each open connection the next byte of its trickle every
    L{TRICKLE_PACE}, and note when the server closes each (blocking).
    """
    for connection in connections:
        connection.sock.setblocking(False)
    end = time.monotonic() + limit
    nextSend = time.monotonic()
    while True:
        now = time.monotonic()
        open = [connection for connection in connections if connection.closedAt is None]
        if not open or now >= end:
            return
        if now >= nextSend:
            nextSend = now + TRICKLE_PACE
            for connection in open:
                byte = next(connection.trickle, None)
                if byte is None:
                    continue
                try:
                    connection.sock.send(byte)
                    connection.lastSentAt = now
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                    pass
                except OSError:
                    connection.closedAt = now
        bySocket = {connection.sock: connection for connection in open if connection.closedAt is None}
        readable, _, _ = select.select(list(bySocket), [], [], max(0.0, min(nextSend, end) - time.monotonic()))
        for sock in readable:
            checkClosed(bySocket[sock])


def openTLS(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    """
    A TLS connection to C{port}, handshake done (blocking).
    """
    raw = socket.create_connection(("127.0.0.1", port), timeout=LATENCY_CAP)
    try:
        return context.wrap_socket(raw, server_hostname="localhost")
    except BaseException:
        raw.close()
        raise


def clientHello() -> bytes:
    """
    The first flight of a TLS client (a ClientHello), as it goes on the wire.
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    handshake = clientContext().wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        handshake.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def closeAll(connections: Sequence[HeldConnection]) -> None:
    for connection in connections:
        connection.sock.close()


class SlowClientCase(TestCase):
    """
    The web service, with short deadlines and a small connection cap,
    listening on loopback; each test attacks it while a normal user fetches
    a small file.
    """

    timeout = 60
    #: More of the configuration's [web] section.
    web: dict = {}

    def setUp(self):
        folder = temporaryFolder(self)
        build = makeBuild(folder / "ohif")
        with (build / LARGE_FILE.lstrip("/")).open("wb") as large:
            large.truncate(LARGE_FILE_SIZE)
        self.config = testConfig(
            folder,
            web={
                "ohif_root": build,
                "header_timeout": f"{HEADER_TIMEOUT}s",
                "handshake_timeout": f"{HANDSHAKE_TIMEOUT}s",
                "idle_timeout": f"{IDLE_TIMEOUT}s",
                "max_connections": MAX_CONNECTIONS,
                **self.web,
            },
        )
        tls = webTLS(self.config)
        service = buildWebService(
            self.config, buildWebRoot(self.config, FakeOrthanc()), NoCredentials(), tls, reactor
        )
        service.startService()
        self.addCleanup(service.stopService)
        # The connection cap wraps every connection of the HTTPS listener:
        # the test ends once the server has seen each of them go.
        self.addCleanup(self.serverConnectionsGone, service.getServiceNamed("https").factory)
        self.port = self.config.web.listen_https.port

    @inlineCallbacks
    def serverConnectionsGone(self, factory):
        end = time.monotonic() + LATENCY_CAP
        while factory.protocols and time.monotonic() < end:
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(factory.protocols), 0, "the server still holds connections after the test")

    @inlineCallbacks
    def underAttack(self, attack: Callable[[threading.Event, List[Attempt]], object]):
        """
        Run C{attack(go, attempts)} in a thread, and the normal user in
        another from when the attack sets C{go} until it returns; fire with
        C{(what attack returned, the user's attempts)}.
        """
        go, stop = threading.Event(), threading.Event()
        attempts: List[Attempt] = []
        user = deferToThread(normalUser, self.port, go, stop, attempts)
        try:
            outcome = yield deferToThread(attack, go, attempts)
        finally:
            go.set()
            stop.set()
            yield user
        return outcome, attempts

    def assertServed(self, name: str, attempts: Sequence[Attempt], during: str = "during the attack") -> None:
        """
        The normal user was served every time, and not too slowly; print
        the latency figures.
        """
        print(f"\n{name}: normal user {during}: {latencyFigures(attempts)}")
        self.assertGreaterEqual(len(attempts), 3, f"the normal user made too few requests {during}")
        self.assertEqual([attempt for attempt in attempts if attempt.status != 200], [])
        self.assertLess(max(attempt.latency for attempt in attempts), LATENCY_CAP)

    def assertClosedAtDeadline(self, connections: Sequence[HeldConnection], deadline: float) -> None:
        stillOpen = [connection for connection in connections if connection.closedAt is None]
        self.assertEqual(len(stillOpen), 0, f"{len(stillOpen)} of {len(connections)} connections never closed")
        held = sorted(connection.held for connection in connections)
        print(f"closed after {held[0]:.2f} s to {held[-1]:.2f} s (deadline {deadline} s)")
        # Each connection's clock started before the server's.
        self.assertGreaterEqual(held[0], deadline - 0.05)
        self.assertLess(held[-1], deadline + SLACK)



class AttackTests(SlowClientCase):
    """
    Each attack, on a listener with the deadlines and the cap above.
    """

    @inlineCallbacks
    def test_slowloris(self):
        """
        Connections trickling their request heads a byte at a time, each
        byte well inside the idle timeout, are closed at header_timeout from
        the connection; the normal user is served meanwhile.
        """

        def attack(go, attempts):
            connections = []
            try:
                for _ in range(MAX_CONNECTIONS - 10):
                    # Before the connect: the server's clock starts when it accepts.
                    openedAt = time.monotonic()
                    sock = openTLS(self.port, clientContext())
                    connections.append(HeldConnection(sock, openedAt, forever(b"X-Slow: a\r\n")))
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
                return connections, attemptsWhileHeld(connections, go, attempts, HEADER_TIMEOUT + SLACK)
            finally:
                closeAll(connections)

        (connections, during), _ = yield self.underAttack(attack)
        self.assertClosedAtDeadline(connections, HEADER_TIMEOUT)
        # Each was still sending when it was cut off: a deadline, not an idle timer.
        for connection in connections:
            self.assertGreater(connection.lastSentAt, connection.closedAt - 1.0)
        self.assertServed("slowloris", during)

    @inlineCallbacks
    def test_slowBody(self):
        """
        Requests whose small (anonymous) body trickles a byte at a time,
        each byte well inside the idle timeout, are cut off: the head's
        deadline no longer applies, and the idle timer is reset by every
        byte, so something else must bound how long a body may take.
        """
        length = 4096

        def attack(go, attempts):
            connections = []
            try:
                for _ in range(10):
                    sock = openTLS(self.port, clientContext())
                    sock.sendall(
                        b"POST /login HTTP/1.1\r\nHost: localhost\r\n"
                        b"Content-Type: application/x-www-form-urlencoded\r\n"
                        b"Content-Length: %d\r\n\r\nuser=" % (length,)
                    )
                    connections.append(HeldConnection(sock, time.monotonic(), forever(b"a")))
                return connections, attemptsWhileHeld(connections, go, attempts, HEADER_TIMEOUT + IDLE_TIMEOUT + SLACK)
            finally:
                closeAll(connections)

        (connections, during), _ = yield self.underAttack(attack)
        self.assertServed("slow body", during)
        stillOpen = [connection for connection in connections if connection.closedAt is None]
        self.assertEqual(
            len(stillOpen),
            0,
            f"{len(stillOpen)} of {len(connections)} trickled bodies were still being read after"
            f" {HEADER_TIMEOUT + IDLE_TIMEOUT + SLACK} s",
        )
        held = sorted(connection.held for connection in connections)
        print(f"slow body: closed after {held[0]:.2f} s to {held[-1]:.2f} s")


    @inlineCallbacks
    def test_idleKeepAliveFlood(self):
        """
        Keep-alive connections up to max_connections, each idle after one
        request: a connection beyond the cap is refused at once, and the
        normal user with it; the idle ones are closed (by the head deadline
        of their next request, header_timeout after their response, which
        comes before idle_timeout), and the user is served again.
        """

        def attack(go, attempts):
            flood: List[http.client.HTTPSConnection] = []
            held: List[HeldConnection] = []
            try:
                for _ in range(MAX_CONNECTIONS):
                    connection = http.client.HTTPSConnection(
                        "127.0.0.1", self.port, context=clientContext(), timeout=LATENCY_CAP
                    )
                    flood.append(connection)
                    connection.connect()
                # The requests after every handshake, so that every
                # connection's deadline starts again at about the same time
                # (when the server has answered, after this).
                requestsSent = time.monotonic()
                for connection in flood:
                    connection.request("GET", SMALL_FILE)
                for connection in flood:
                    response = connection.getresponse()
                    response.read()
                    if response.status != 200:
                        raise AssertionError(f"a flood request got {response.status}")
                    held.append(HeldConnection(connection.sock, requestsSent, noMore()))
                for connection in held:
                    connection.sock.setblocking(False)
                    checkClosed(connection)
                full = all(connection.closedAt is None for connection in held)
                probeStarted = time.monotonic()
                try:
                    openTLS(self.port, clientContext()).close()
                    probe = "accepted"
                except OSError as error:
                    probe = repr(error)
                probeTook = time.monotonic() - probeStarted
                go.set()
                holdUntilClosed(held, HEADER_TIMEOUT + SLACK)
                cutOff = max(connection.closedAt or time.monotonic() for connection in held)
                # The user's requests once the flood has gone.
                end = time.monotonic() + LATENCY_CAP
                while time.monotonic() < end:
                    if len([a for a in attempts if a.startedAt > cutOff and a.status == 200]) >= 5:
                        break
                    time.sleep(0.05)
                return full, probe, probeTook, held, cutOff, list(attempts)
            finally:
                for connection in flood:
                    connection.close()

        (full, probe, probeTook, held, cutOff, attempts), _ = yield self.underAttack(attack)
        self.assertTrue(full, "a flood connection closed before the cap could be probed")
        self.assertNotEqual(probe, "accepted")
        print(f"\nidle flood: the connection beyond the cap: {probe} after {probeTook * 1000:.0f} ms")
        self.assertLess(probeTook, 1.0)
        self.assertClosedAtDeadline(held, HEADER_TIMEOUT)
        firstClose = min(connection.closedAt for connection in held)
        refused = [attempt for attempt in attempts if attempt.startedAt < firstClose and attempt.error]
        print(f"idle flood: normal user refused {len(refused)} times while the flood held every connection")
        self.assertGreater(len(refused), 0)
        # The server may see the last flood connection go a moment after
        # its client does: served from the first success on.
        after = [attempt for attempt in attempts if attempt.startedAt > cutOff]
        first = next((index for index, attempt in enumerate(after) if attempt.status == 200), len(after))
        print(f"idle flood: {first} refusals after the cut-off before the first success")
        self.assertServed("idle flood", after[first:], "after the cut-off")

    @inlineCallbacks
    def test_unfinishedHandshakes(self):
        """
        Connections that never finish their TLS handshake, silent after
        the TCP connect, or sending part of a ClientHello and then the rest
        a byte at a time, are closed at handshake_timeout, before the header
        deadline.
        """
        hello = clientHello()
        # The trickle cannot finish the ClientHello before the test gives up.
        self.assertGreater(len(hello), 20 + (HEADER_TIMEOUT + SLACK) / TRICKLE_PACE)

        def attack(go, attempts):
            connections = []
            try:
                for index in range(20):
                    openedAt = time.monotonic()
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=LATENCY_CAP)
                    if index < 10:
                        trickle = noMore()
                    else:
                        sock.sendall(hello[:20])
                        trickle = (bytes([byte]) for byte in hello[20:])
                    connections.append(HeldConnection(sock, openedAt, trickle))
                return connections, attemptsWhileHeld(connections, go, attempts, HEADER_TIMEOUT + SLACK)
            finally:
                closeAll(connections)

        (connections, during), _ = yield self.underAttack(attack)
        self.assertClosedAtDeadline(connections[:10], HANDSHAKE_TIMEOUT)
        self.assertClosedAtDeadline(connections[10:], HANDSHAKE_TIMEOUT)
        self.assertLess(max(connection.held for connection in connections), HEADER_TIMEOUT)
        self.assertServed("unfinished handshakes", during)

    @inlineCallbacks
    def test_stalledReaders(self):
        """
        Connections that ask for a large file and then read nothing are
        closed (reset) idle_timeout after the server's buffers fill:
        twisted.web stops its idle timer while it answers, so nothing else
        would end them.  The normal user is served meanwhile.
        """

        def attack(go, attempts):
            connections = []
            try:
                for _ in range(10):
                    sock = openTLS(self.port, clientContext())
                    sock.sendall(f"GET {LARGE_FILE} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode("ascii"))
                    # The answer has begun; from now on nothing is read.
                    self.assertTrue(sock.recv(4096).startswith(b"HTTP/1.1 200 "))
                    connections.append(HeldConnection(sock, time.monotonic(), noMore()))
                go.set()
                started = time.monotonic()
                end = started + IDLE_TIMEOUT + SLACK
                while time.monotonic() < end and any(c.closedAt is None for c in connections):
                    for connection in connections:
                        if connection.closedAt is None:
                            checkClosedUnread(connection)
                    # Polling: a reset without reading has no event to wait on.
                    time.sleep(0.05)
                return connections, [attempt for attempt in attempts if attempt.startedAt >= started]
            finally:
                closeAll(connections)

        (connections, during), _ = yield self.underAttack(attack)
        self.assertClosedAtDeadline(connections, IDLE_TIMEOUT)
        self.assertServed("stalled readers", during)


#: The flooding host: another loopback address, so that the normal user
#: (127.0.0.1) is another client.
FLOODER = "127.0.0.2"
PER_ADDRESS = 20


class OneAddressFloodTests(SlowClientCase):
    """
    One address opens bare TCP connections (no TLS) far beyond its share
    of the cap: the outside review's 1,005 sockets made /healthz fail for
    everyone until header_timeout.
    """

    web = {"max_connections_per_address": PER_ADDRESS}

    @inlineCallbacks
    def test_otherAddressServedWhileOneFloods(self):
        def attack(go, attempts):
            connections = []
            try:
                for _ in range(PER_ADDRESS):
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=LATENCY_CAP, source_address=(FLOODER, 0))
                    connections.append(HeldConnection(sock, time.monotonic(), noMore()))
                # The normal user comes in once the address holds its share:
                # on a loaded machine, refusing the rest may take as long as
                # the share's handshake deadline.
                go.set()
                started = time.monotonic()
                # Beyond its share, the flooder's connections are closed at once.
                beyond = []
                for _ in range(2 * MAX_CONNECTIONS):
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=LATENCY_CAP, source_address=(FLOODER, 0))
                    beyond.append(HeldConnection(sock, time.monotonic(), noMore()))
                holdUntilClosed(beyond, SLACK)
                holdUntilClosed(connections, HANDSHAKE_TIMEOUT + SLACK)
                during = [attempt for attempt in attempts if attempt.startedAt >= started]
                return connections, beyond, during
            finally:
                closeAll(connections)

        (connections, beyond, during), _ = yield self.underAttack(attack)
        stillOpen = [connection for connection in beyond if connection.closedAt is None]
        self.assertEqual(stillOpen, [], "connections beyond the address's share were kept")
        print(f"\none address: {len(beyond)} connections beyond its share closed after at most"
              f" {max(connection.held for connection in beyond) * 1000:.0f} ms")
        self.assertClosedAtDeadline(connections, HANDSHAKE_TIMEOUT)
        self.assertServed("one address flooding", during)
