"""
The request layer (appliance.web.request) under a site whose only resource
echoes what it was given: request heads up to the configured size, refusals
of malformed and smuggling requests, body caps, compressed bodies, the
identity known before any resource runs, anonymous bodies, the spool folder
and a full disk; in memory, and over real TLS connections.
"""

import base64
import hashlib
import json
import os
import socket
import ssl
from io import BytesIO
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs, formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource

from appliance.web.accounts import Account
from appliance.web.checkers import BUSY_MESSAGE, PasswordChecksBusy
from appliance.web.request import ANONYMOUS_BODY_LIMIT, MEMORY_BODY_LIMIT, ApplianceRequest
from appliance.web.site import ApplianceSite
from appliance.web.spool import SpoolQuota
from tests.support import ConnectionTracker, freePort, temporaryFolder, testConfig, tinyTmpfs, webTLS
from tests.tlsclients import clientContext
from tests.webclients import Connection, Response, parseResponses

ALICE = Account("alice", frozenset({"uploader"}))
ALICE_AUTHORIZATION = b"Basic " + base64.b64encode(b"alice:secret")
ALICE_HEADER = ("Authorization", ALICE_AUTHORIZATION.decode("ascii"))

MAX_UPLOAD = 8 * 1024 * 1024
MAX_HEAD = 64 * 1024


class FakeAuthenticator:
    """
    Knows Alice by her Basic credentials, nobody else.  With C{later}, each
    answer waits in C{pending} until the test fires it (L{answer}), and a
    cancelled one is counted in C{cancelled}.  With C{busy}, credentials
    cannot be checked (L{PasswordChecksBusy}).
    """

    def __init__(self, later: bool = False) -> None:
        self.later = later
        self.busy = False
        self.pending: List[Tuple[Deferred, Optional[Account]]] = []
        self.calls: List[object] = []
        self.cancelled = 0

    def identify(self, headers, client) -> Deferred:
        self.calls.append(client)
        if self.busy and headers.hasHeader(b"Authorization"):
            return fail(PasswordChecksBusy())
        account = ALICE if headers.getRawHeaders(b"Authorization") == [ALICE_AUTHORIZATION] else None
        if not self.later:
            return succeed(account)
        waiting: Deferred = Deferred(self._cancel)
        self.pending.append((waiting, account))
        return waiting

    def _cancel(self, waiting: Deferred) -> None:
        self.cancelled += 1

    def answer(self) -> None:
        waiting, account = self.pending.pop(0)
        # A cancelled identification is never answered.
        if not waiting.called:
            waiting.callback(account)


class EchoResource(Resource):
    """
    Answers every request with what the request layer gave it, as JSON.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: List[ApplianceRequest] = []
        self.answers: List[dict] = []

    def render(self, request: ApplianceRequest) -> bytes:
        self.seen.append(request)
        content = request.content
        position = content.tell()
        spooled = None if isinstance(content, BytesIO) else os.readlink(f"/proc/self/fd/{content.fileno()}")
        body = content.read()
        request.setHeader(b"Content-Type", b"application/json")
        self.answers.append(
            {
                "method": request.method.decode("ascii"),
                "uriLength": len(request.uri),
                "contentLength": position + len(body),
                "position": position,
                "read": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
                "account": request.account.name if request.account else None,
                "credentialsUnchecked": (
                    request.credentialsUnchecked.message if request.credentialsUnchecked is not None else None
                ),
                "spooled": spooled,
            }
        )
        return json.dumps(self.answers[-1]).encode("utf-8")


def rawRequest(method: str, target: str, headers: Sequence[Tuple[str, str]] = (), body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: pacs.example"] + [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(body: bytes, size: int = 64 * 1024) -> bytes:
    pieces = [b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size]) for i in range(0, len(body), size)]
    return b"".join(pieces) + b"0\r\n\r\n"


def spoolFds(folder: Path) -> List[str]:
    """
    This process's open files in C{folder}.
    """
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder) + "/"):
            found.append(target)
    return found


def makeSite(
    folder: Path, authenticator, clock=None, spoolFolder: Optional[Path] = None
) -> Tuple[ApplianceSite, EchoResource]:
    echo = EchoResource()
    site = ApplianceSite(
        echo,
        [(b"X-Content-Type-Options", b"nosniff")],
        clock or MemoryReactorClock(),
        60,
        30,
        authenticator=authenticator,
        spoolFolder=spoolFolder or folder / "state" / "spool",
        maxUploadSize=MAX_UPLOAD,
        maxRequestHead=MAX_HEAD,
        siteName="St Elsewhere",
        minBodyRate=1024,
        spoolQuota=SpoolQuota(MAX_UPLOAD, 3 * MAX_UPLOAD),
    )
    return site, echo


class InMemoryCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = temporaryFolder(self)
        self.authenticator = FakeAuthenticator()
        self.useSite()

    def useSite(self, spoolFolder: Optional[Path] = None) -> None:
        self.site, self.echo = makeSite(self.folder, self.authenticator, spoolFolder=spoolFolder)
        self.site.doStart()
        self.addCleanup(self.site.doStop)

    def connect(self, secure: bool = True) -> Connection:
        connection = Connection(self.site, secure)
        self.addCleanup(connection.lose)
        return connection

    def exchange(self, raw: bytes) -> Response:
        connection = self.connect()
        connection.send(raw)
        responses = connection.responses()
        self.assertEqual(len(responses), 1, responses)
        return responses[0]

    def assertRefused(self, connection: Connection, status: int) -> Response:
        """
        The connection got one answer, C{status} with a one-sentence body, and
        is closing.
        """
        responses = connection.responses()
        self.assertEqual([response[0] for response in responses], [status], connection.transport.value()[:300])
        _, headers, body = responses[0]
        self.assertEqual(headers["connection"], ["close"])
        self.assertEqual(headers["content-type"], ["text/plain; charset=utf-8"])
        self.assertEqual(headers["server"], ["pacs-appliance"])
        self.assertEqual(headers["x-content-type-options"], ["nosniff"])
        self.assertRegex(body.decode("utf-8"), r"^[A-Z][^\n]+\.\n$")
        self.assertTrue(connection.transport.disconnecting)
        return responses[0]

    def assertStillServing(self) -> None:
        status, _, body = self.exchange(rawRequest("GET", "/after"))
        self.assertEqual((status, json.loads(body)["method"]), (200, "GET"))


#: The head of a chunked upload by Alice: bodies of unknown length are only
#: read from a known user.
CHUNKED_BY_ALICE = b"POST / HTTP/1.1\r\nHost: a\r\nAuthorization: %s\r\nTransfer-Encoding: chunked\r\n\r\n" % (
    ALICE_AUTHORIZATION,
)

#: Requests that are malformed or try to smuggle a second one past a front
#: end, each with the status it gets (400 everywhere: the head is refused,
#: with a sentence, and the connection closed).  "ours" marks what
#: twisted.web 26.10 lets through and the request layer refuses.
MALFORMED = [
    ("Content-Length and Transfer-Encoding",
     b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("Transfer-Encoding and Content-Length",
     b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", 400),
    ("two equal Content-Length headers",
     b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", 400),
    ("two different Content-Length headers",
     b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 0\r\n\r\nhello", 400),
    ("a list in Content-Length", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello", 400),
    ("a signed Content-Length", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello", 400),
    ("a negative Content-Length", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    ("a hexadecimal Content-Length", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\nhello", 400),
    ("an unknown Transfer-Encoding",
     b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 400),
    ("a list of transfer codings",
     b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 400),
    ("Transfer-Encoding: identity (ours)",
     b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n", 400),
    ("Transfer-Encoding: identity with Content-Length (ours)",
     b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\nContent-Length: 5\r\n\r\nhello", 400),
    ("two Transfer-Encoding headers",
     b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("a folded Transfer-Encoding (ours)",
     b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", 400),
    ("a space before the colon",
     b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    ("a vertical tab after chunked",
     b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\x0b\r\n\r\n0\r\n\r\n", 400),
    ("a chunk size with 0x", CHUNKED_BY_ALICE + b"0x5\r\nhello\r\n0\r\n\r\n", 400),
    ("a signed chunk size", CHUNKED_BY_ALICE + b"+5\r\nhello\r\n0\r\n\r\n", 400),
    ("a chunk size that is no number", CHUNKED_BY_ALICE + b"zz\r\nhello\r\n0\r\n\r\n", 400),
    ("a chunk longer than its size",
     CHUNKED_BY_ALICE + b"3\r\nhello\r\n0\r\n\r\n", 400),
    ("a chunk size line of 2 KiB",
     CHUNKED_BY_ALICE + b"0" * 2048 + b"5\r\nhello\r\n0\r\n\r\n", 400),
    ("a NUL in the request line", b"GET /\x00 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("a CR in the request line", b"GET /a\rb HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("an LF in the request line", b"GET / HTTP/1.1\nHost: a\r\n\r\n", 400),
    ("a DEL in the URL (ours)", b"GET /a\x7fb HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("a Latin-1 byte in the URL (ours)", b"GET /caf\xa9 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("a NUL in a header value", b"GET / HTTP/1.1\r\nHost: a\r\nX-Test: a\x00b\r\n\r\n", 400),
    ("a CR in a header value", b"GET / HTTP/1.1\r\nHost: a\r\nX-Test: a\rb\r\n\r\n", 400),
    ("a header line without a colon", b"GET / HTTP/1.1\r\nHost: a\r\nNo colon here\r\n\r\n", 400),
    ("a space in a header name", b"GET / HTTP/1.1\r\nHost: a\r\nX Test: a\r\n\r\n", 400),
    ("HTTP/1.1 without Host (ours)", b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", 400),
    ("two Host headers (ours)", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("an absolute URL (ours)", b"GET http://evil.example/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("an authority as target (ours)", b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", 400),
    ("HTTP/1.2", b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 400),
    ("HTTP/2.0 in a request line", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 400),
    ("a method that is no token", b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("four words in the request line", b"GET / x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("more than 500 headers", b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-A: b\r\n" * 501 + b"\r\n", 400),
]


class MalformedTests(InMemoryCase):
    def test_eachRefusedWithASentenceThenStillServing(self) -> None:
        for name, raw, status in MALFORMED:
            connection = self.connect()
            connection.send(raw)
            with self.subTest(name):
                self.assertRefused(connection, status)
            connection.lose()
        self.assertEqual(self.echo.seen, [])
        self.assertStillServing()

    def test_smuggledRequestAfterRefusalIgnored(self) -> None:
        connection = self.connect()
        connection.send(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        self.assertRefused(connection, 400)
        connection.send(b"GET /more HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(len(connection.responses()), 1)
        self.assertEqual(self.echo.seen, [])

    def test_validRequestsOfTheSameShapeAccepted(self) -> None:
        """
        The controls of the table: what it refuses, done right, passes.
        """
        for raw in (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
            CHUNKED_BY_ALICE + b"5\r\nhello\r\n0\r\n\r\n",
            CHUNKED_BY_ALICE.replace(b"chunked", b"Chunked") + b"5;ext=1\r\nhello\r\n0\r\n\r\n",
            b"GET /?q=%C3%A9 HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
        ):
            connection = self.connect()
            connection.send(raw)
            responses = connection.responses()
            self.assertEqual(len(responses), 1, raw)
            self.assertIn(responses[0][0], (200, 204), raw)
        self.assertEqual([echoed["contentLength"] for echoed in self.echo.answers], [5, 5, 5, 0, 0])

    def test_optionsStarHasTheSiteHeaders(self) -> None:
        """
        twisted.web answers C{OPTIONS *} itself, without a resource: the
        answer still names no Twisted version and carries the standard headers.
        """
        status, headers, _ = self.exchange(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(
            (status, headers["server"], headers["x-content-type-options"]), (200, ["pacs-appliance"], ["nosniff"])
        )


class HeadSizeTests(InMemoryCase):
    def qidoTarget(self, length: int) -> str:
        """
        A QIDO-RS search of C{length} characters, as OHIF sends when it
        opens many studies at once.
        """
        target = "/pacs/studies?includefield=all&StudyInstanceUID="
        uid = "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345678,"
        while len(target) + len(uid) <= length:
            target += uid
        return target + "9" * (length - len(target))

    def test_longQueryAccepted(self) -> None:
        target = self.qidoTarget(60 * 1024)
        status, _, body = self.exchange(rawRequest("GET", target, [("Accept", "application/dicom+json")]))
        self.assertEqual((status, json.loads(body)["uriLength"]), (200, len(target)))

    def test_headUpToTheLimitAccepted(self) -> None:
        # The limit counts the request line and the header lines, not their line ends.
        request = rawRequest("GET", "/", [("X-Pad", "")])
        pad = MAX_HEAD - (len(request) - 2 * request.count(b"\r\n"))
        status, _, _ = self.exchange(rawRequest("GET", "/", [("X-Pad", "p" * pad)]))
        self.assertEqual(status, 200)
        connection = self.connect()
        connection.send(rawRequest("GET", "/", [("X-Pad", "p" * (pad + 1))]))
        self.assertRefused(connection, 431)

    def test_longerURLIs414(self) -> None:
        connection = self.connect()
        connection.send(rawRequest("GET", self.qidoTarget(MAX_HEAD + 100)))
        _, _, body = self.assertRefused(connection, 414)
        self.assertIn(b"64 KiB", body)
        self.assertStillServing()

    def test_unfinishedLongURLIs414(self) -> None:
        connection = self.connect()
        connection.send(b"GET /" + b"a" * (MAX_HEAD + 10))
        self.assertRefused(connection, 414)

    def test_largeHeadersAre431(self) -> None:
        headers = [(f"X-Header-{number}", "v" * 1000) for number in range(70)]
        connection = self.connect()
        connection.send(rawRequest("GET", "/", headers))
        _, _, body = self.assertRefused(connection, 431)
        self.assertIn(b"64 KiB", body)
        self.assertStillServing()

    def test_longURLAndHeadersTogetherAre431(self) -> None:
        connection = self.connect()
        connection.send(rawRequest("GET", self.qidoTarget(60 * 1024), [("Cookie", "c" * 5000)]))
        self.assertRefused(connection, 431)

    def test_oneHeaderLineTooLongIs431(self) -> None:
        connection = self.connect()
        connection.send(b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: " + b"x" * (MAX_HEAD + 10))
        self.assertRefused(connection, 431)

    def test_headerDeadlineStillApplies(self) -> None:
        clock = MemoryReactorClock()
        site, _ = makeSite(self.folder, self.authenticator, clock)
        connection = Connection(site)
        self.addCleanup(connection.lose)
        connection.send(b"GET / HTTP/1.1\r\nHost: a\r\n")
        clock.advance(29)
        self.assertFalse(connection.transport.disconnecting)
        clock.advance(2)
        self.assertTrue(connection.transport.disconnecting)


class ClockedCase(InMemoryCase):
    """
    One connection to a site whose time is a clock the test moves.
    """

    def setUp(self) -> None:
        super().setUp()
        self.clock = MemoryReactorClock()
        self.site, _ = makeSite(self.folder, self.authenticator, self.clock)
        self.connection = Connection(self.site)
        self.addCleanup(self.connection.lose)


class BodyRateTests(ClockedCase):
    """
    A body must come at 1 KiB/s on average after the 30 s of grace of the
    head deadline; the time it is held unread does not count.
    """

    def sendHead(self) -> None:
        self.connection.send(rawRequest("POST", "/", [ALICE_HEADER, ("Content-Length", "1000000")]))

    def test_tricklingBodyAborted(self) -> None:
        self.sendHead()
        for _ in range(30):
            self.connection.send(b"x")
            self.clock.advance(1)
        self.assertFalse(self.connection.transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.connection.transport.disconnecting)

    def test_steadyBodyKept(self) -> None:
        self.sendHead()
        for _ in range(120):
            self.connection.send(b"x" * 1100)
            self.clock.advance(1)
        self.assertFalse(self.connection.transport.disconnecting)

    def test_stoppedBodyAbortedWhateverItsAverage(self) -> None:
        """
        After a fast start that puts it hours ahead of the average pace, a
        body that stops arriving is cut off header_timeout (30 s) after its
        last byte: a byte an idle period would otherwise hold it for weeks.
        """
        self.sendHead()
        self.connection.send(b"x" * 900_000)
        self.clock.advance(29)
        self.connection.send(b"x")
        self.clock.advance(29.5)
        self.assertFalse(self.connection.transport.disconnecting)
        with capturedLogs() as events:
            self.clock.advance(1)
        self.assertTrue(self.connection.transport.disconnecting)
        [line] = [formatEvent(event) for event in events]
        self.assertIn("its request body stopped arriving for 30s", line)

    def test_heldTimeNotCounted(self) -> None:
        self.authenticator.later = True
        self.sendHead()
        # Less than the idle timeout, which does apply while the body is held.
        self.clock.advance(50)
        self.authenticator.answer()
        self.clock.advance(29)
        self.assertFalse(self.connection.transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(self.connection.transport.disconnecting)


class StallTests(ClockedCase):
    """
    A transport that stays full (its channel paused) for the idle timeout
    (60 s here) means a client that is not reading: its connection is
    aborted.  The deadline counts from the last time the transport filled.
    """

    def setUp(self) -> None:
        super().setUp()
        self.channel = self.connection.protocol
        # A request being answered: no other deadline runs meanwhile.
        self.authenticator.later = True
        self.connection.send(rawRequest("GET", "/", [ALICE_HEADER]))

    def stallCalls(self) -> list:
        return [call for call in self.clock.getDelayedCalls() if call.func == self.channel._clientStalled]

    def test_fullTooLongAborted(self) -> None:
        events: List[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.channel.pauseProducing()
        self.clock.advance(59.9)
        self.assertFalse(self.connection.transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(self.connection.transport.disconnecting)
        self.assertIn(
            "did not take what was sent to it within 60s",
            [formatEvent(event) for event in events if "Closed the connection" in event.get("log_format", "")][0],
        )

    def test_drainedInTimeKept(self) -> None:
        for _ in range(3):
            self.channel.pauseProducing()
            self.clock.advance(59)
            self.channel.resumeProducing()
            self.clock.advance(59)
        self.assertFalse(self.connection.transport.disconnecting)
        self.channel.pauseProducing()
        self.clock.advance(60)
        self.assertTrue(self.connection.transport.disconnecting)

    def test_pausedAgainWithoutDrainingDoesNotMoveIt(self) -> None:
        self.channel.pauseProducing()
        self.clock.advance(30)
        self.channel.pauseProducing()
        self.clock.advance(30)
        self.assertTrue(self.connection.transport.disconnecting)

    def test_oneTimerForAWholeTransfer(self) -> None:
        """
        A transfer fills the transport at nearly every block: the deadline
        is moved, not made again each time.
        """
        self.channel.pauseProducing()
        [deadline] = self.stallCalls()
        for _ in range(100):
            self.channel.resumeProducing()
            self.clock.advance(1)
            self.channel.pauseProducing()
        self.assertEqual(self.stallCalls(), [deadline])
        self.assertEqual(deadline.getTime(), self.clock.seconds() + 60)

    def test_goneWithTheConnection(self) -> None:
        self.channel.pauseProducing()
        self.connection.lose()
        self.assertEqual(self.stallCalls(), [])


class BodyLimitTests(InMemoryCase):
    def test_contentLengthOverLimitIs413BeforeTheBody(self) -> None:
        connection = self.connect()
        connection.send(rawRequest("POST", "/", [ALICE_HEADER, ("Content-Length", str(MAX_UPLOAD + 1))]))
        _, _, body = self.assertRefused(connection, 413)
        self.assertIn(b"8 MiB", body)
        self.assertEqual(self.echo.seen, [])
        self.assertStillServing()

    def test_contentLengthAtLimitAccepted(self) -> None:
        body = os.urandom(MAX_UPLOAD)
        status, _, answer = self.exchange(
            rawRequest("PUT", "/", [ALICE_HEADER, ("Content-Length", str(len(body)))], body)
        )
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(answer)["sha256"], hashlib.sha256(body).hexdigest())

    def test_hugeContentLengthIs413(self) -> None:
        connection = self.connect()
        connection.send(rawRequest("POST", "/", [("Content-Length", "9" * 40)]))
        self.assertRefused(connection, 413)

    def test_chunkedOverLimitIs413WhileReading(self) -> None:
        connection = self.connect()
        connection.send(rawRequest("POST", "/", [ALICE_HEADER, ("Transfer-Encoding", "chunked")]))
        piece = os.urandom(1024 * 1024)
        for _ in range(8):
            connection.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.assertEqual(connection.responses(), [])
        connection.send(b"1\r\nx\r\n")
        _, _, body = self.assertRefused(connection, 413)
        self.assertIn(b"8 MiB", body)
        self.assertEqual(spoolFds(self.site.spoolFolder), [])
        connection.send(b"0\r\n\r\n")
        self.assertEqual(len(connection.responses()), 1)
        self.assertEqual(self.echo.seen, [])

    def test_oneHugeChunkIs413WhileReading(self) -> None:
        connection = self.connect()
        connection.send(rawRequest("POST", "/", [ALICE_HEADER, ("Transfer-Encoding", "chunked")]))
        connection.send(b"ffffffffffffffffffff\r\n")
        self.assertEqual(connection.responses(), [])
        connection.send(b"x" * (MAX_UPLOAD + 1))
        self.assertRefused(connection, 413)

    def test_compressedBodyIs415(self) -> None:
        for coding in ("gzip", "deflate", "br", "identity"):
            connection = self.connect()
            connection.send(
                rawRequest("POST", "/", [("Content-Encoding", coding), ("Content-Length", "4")], b"\x1f\x8b\x08\x00")
            )
            _, headers, _ = self.assertRefused(connection, 415)
            self.assertEqual(headers["accept-encoding"], ["identity"], coding)
        connection = self.connect()
        connection.send(rawRequest("POST", "/", [("Content-Encoding", "gzip"), ("Transfer-Encoding", "chunked")]))
        self.assertRefused(connection, 415)
        self.assertEqual(self.echo.seen, [])

    def test_contentEncodingWithoutBodyIgnored(self) -> None:
        status, _, _ = self.exchange(rawRequest("GET", "/", [("Content-Encoding", "gzip")]))
        self.assertEqual(status, 200)


class AnonymousBodyTests(InMemoryCase):
    def test_largeAnonymousBodyIs401BeforeTheBody(self) -> None:
        connection = self.connect()
        connection.send(rawRequest("POST", "/", [("Content-Length", str(ANONYMOUS_BODY_LIMIT + 1))]))
        _, headers, _ = self.assertRefused(connection, 401)
        self.assertEqual(headers["www-authenticate"], ['Basic realm="St Elsewhere", charset="UTF-8"'])
        self.assertEqual(self.echo.seen, [])
        self.assertStillServing()

    def test_browserNotChallengedWithBasic(self) -> None:
        """
        A browser whose session expired during an upload is not shown a
        password prompt (the access gate's rule).
        """
        connection = self.connect()
        headers = [("Sec-Fetch-Mode", "cors"), ("Content-Length", "100000")]
        connection.send(rawRequest("POST", "/pacs-admin/instances", headers))
        _, headers, _ = self.assertRefused(connection, 401)
        self.assertRegex(headers["www-authenticate"][0], '^Cookie realm="St Elsewhere", form-action="/login"')

    def test_plainHTTPNotChallengedWithBasic(self) -> None:
        connection = self.connect(secure=False)
        connection.send(rawRequest("POST", "/", [("Transfer-Encoding", "chunked")]))
        _, headers, _ = self.assertRefused(connection, 401)
        self.assertTrue(headers["www-authenticate"][0].startswith("Cookie realm="))

    def test_anonymousChunkedBodyIs401(self) -> None:
        connection = self.connect()
        connection.send(rawRequest("POST", "/", [("Transfer-Encoding", "chunked")]) + b"5\r\nhello\r\n0\r\n\r\n")
        self.assertRefused(connection, 401)

    def test_wrongCredentialsAre401(self) -> None:
        connection = self.connect()
        wrong = "Basic " + base64.b64encode(b"alice:wrong").decode()
        connection.send(rawRequest("POST", "/", [("Authorization", wrong), ("Content-Length", "100000")]))
        self.assertRefused(connection, 401)

    def test_smallAnonymousBodyAccepted(self) -> None:
        form = b"username=alice&password=secret"
        for body in (form, b"f" * ANONYMOUS_BODY_LIMIT):
            status, _, answer = self.exchange(
                rawRequest(
                    "POST",
                    "/login?next=%2Fviewer",
                    [("Content-Type", "application/x-www-form-urlencoded"), ("Content-Length", str(len(body)))],
                    body,
                )
            )
            echoed = json.loads(answer)
            self.assertEqual((status, echoed["account"], echoed["read"]), (200, None, len(body)))
        # Resources read bodies from request.content; twisted.web parses none into args.
        self.assertEqual(self.echo.seen[0].args, {b"next": [b"/viewer"]})

    def test_identifiedLargeBodyAccepted(self) -> None:
        body = os.urandom(3 * 1024 * 1024)
        status, _, answer = self.exchange(
            rawRequest("POST", "/pacs/studies", [ALICE_HEADER, ("Transfer-Encoding", "chunked")], chunked(body))
        )
        echoed = json.loads(answer)
        self.assertEqual((status, echoed["account"], echoed["contentLength"]), (200, "alice", len(body)))
        self.assertEqual(echoed["sha256"], hashlib.sha256(body).hexdigest())


class ContinueTests(InMemoryCase):
    def test_continueOnlyForAcceptedBodies(self) -> None:
        expect = ("Expect", "100-continue")
        refused = [
            (rawRequest("POST", "/", [expect, ("Content-Length", "100000")]), 401),
            (rawRequest("POST", "/", [expect, ("Content-Length", str(MAX_UPLOAD + 1))]), 413),
            (rawRequest("POST", "/", [expect, ("Content-Length", "5"), ("Content-Encoding", "gzip")]), 415),
        ]
        for raw, status in refused:
            connection = self.connect()
            connection.send(raw)
            self.assertNotIn(b"100 Continue", connection.transport.value())
            self.assertRefused(connection, status)
        connection = self.connect()
        connection.send(rawRequest("POST", "/", [expect, ALICE_HEADER, ("Content-Length", "100000")]))
        self.assertEqual(connection.transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        connection.send(b"b" * 100000)
        self.assertEqual([response[0] for response in connection.responses()], [100, 200])

    def test_continueWaitsForTheIdentity(self) -> None:
        self.authenticator.later = True
        connection = self.connect()
        connection.send(
            rawRequest("POST", "/", [("Expect", "100-continue"), ALICE_HEADER, ("Content-Length", "100000")])
        )
        self.assertEqual(connection.transport.value(), b"")
        self.authenticator.answer()
        self.assertEqual(connection.transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")


class IdentityTests(InMemoryCase):
    def setUp(self) -> None:
        super().setUp()
        self.authenticator.later = True

    def test_resourceWaitsForTheIdentity(self) -> None:
        connection = self.connect()
        connection.send(rawRequest("GET", "/", [ALICE_HEADER]))
        self.assertEqual(len(self.authenticator.pending), 1)
        self.assertEqual((self.echo.seen, connection.transport.value()), ([], b""))
        self.authenticator.answer()
        status, _, body = connection.responses()[0]
        self.assertEqual((status, json.loads(body)["account"]), (200, "alice"))
        self.assertIs(self.echo.seen[0].account, ALICE)

    def test_identifyGetsTheHeadersAndTheClient(self) -> None:
        connection = self.connect()
        connection.send(rawRequest("GET", "/"))
        self.assertEqual(self.authenticator.calls, [IPv4Address("TCP", "127.0.0.1", 50000)])

    def test_smallBodyHeldUntilIdentified(self) -> None:
        """
        Even a small body is read only once the request is known to be
        allowed: whoever sends it.
        """
        connection = self.connect()
        connection.send(rawRequest("POST", "/", [("Content-Length", "5")], b"hello"))
        self.assertEqual(connection.transport.producerState, "paused")
        self.assertEqual(connection.protocol.requests[0].content.tell(), 0)
        self.authenticator.answer()
        self.assertEqual(connection.transport.producerState, "producing")
        status, _, body = connection.responses()[0]
        self.assertEqual((status, json.loads(body)["read"]), (200, 5))

    def test_largeBodyHeldUntilIdentified(self) -> None:
        body = os.urandom(2 * 1024 * 1024)
        connection = self.connect()
        head = rawRequest("POST", "/", [ALICE_HEADER, ("Content-Length", str(len(body)))])
        connection.send(head + body[:1000])
        self.assertEqual(connection.transport.producerState, "paused")
        request = connection.protocol.requests[0]
        self.assertEqual(request.content.tell(), 0)
        connection.send(body[1000:5000])
        self.assertEqual(request.content.tell(), 0)
        self.authenticator.answer()
        self.assertEqual(connection.transport.producerState, "producing")
        self.assertEqual(request.content.tell(), 5000)
        connection.send(body[5000:])
        echoed = json.loads(connection.responses()[0][2])
        self.assertEqual(echoed["sha256"], hashlib.sha256(body).hexdigest())

    def test_drainedResponseDoesNotReleaseAHeldBody(self) -> None:
        connection = self.connect()
        connection.send(rawRequest("POST", "/", [("Content-Length", "100000")]))
        connection.protocol.pauseProducing()
        connection.protocol.resumeProducing()
        self.assertEqual(connection.transport.producerState, "paused")

    def test_largeAnonymousBodyRefusedUnread(self) -> None:
        connection = self.connect()
        connection.send(rawRequest("POST", "/", [("Content-Length", "100000")], b"x" * 1000))
        request = connection.protocol.requests[0]
        self.authenticator.answer()
        self.assertRefused(connection, 401)
        self.assertTrue(request.content.closed)
        self.assertEqual(self.echo.seen, [])

    def test_connectionLostCancelsTheIdentification(self) -> None:
        """
        A client that leaves while its password waits to be checked cancels
        that check (the authenticator then skips it); one that leaves after
        cancels nothing.
        """
        connection = self.connect()
        connection.send(rawRequest("GET", "/", [ALICE_HEADER]))
        self.authenticator.answer()
        connection.lose(ConnectionLost)
        self.assertEqual(self.authenticator.cancelled, 0)
        connection = self.connect()
        connection.send(rawRequest("GET", "/", [ALICE_HEADER]))
        connection.lose(ConnectionLost)
        self.assertEqual(self.authenticator.cancelled, 1)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_connectionLostWhileIdentifying(self) -> None:
        for raw in (
            rawRequest("GET", "/"),
            rawRequest("POST", "/", [("Content-Length", "100000")]),
            rawRequest("POST", "/", [("Content-Length", "100000"), ALICE_HEADER]),
        ):
            connection = self.connect()
            connection.send(raw)
            request = connection.protocol.requests[0]
            connection.lose(ConnectionLost)
            self.authenticator.answer()
            self.assertEqual(connection.transport.value(), b"", raw)
            self.assertTrue(request.content.closed)
        self.assertEqual(self.echo.seen, [])

    def test_pipelinedRequestsAnsweredInOrder(self) -> None:
        connection = self.connect()
        connection.send(
            rawRequest("GET", "/first", [ALICE_HEADER])
            + rawRequest("POST", "/second", [("Content-Length", "6")], b"second")
            + rawRequest("GET", "/third")
        )
        self.assertEqual(len(self.authenticator.pending), 1)
        self.authenticator.answer()
        self.assertEqual(len(connection.responses()), 1)
        self.authenticator.answer()
        self.authenticator.answer()
        responses = connection.responses()
        self.assertEqual([status for status, _, _ in responses], [200, 200, 200])
        self.assertEqual([request.uri for request in self.echo.seen], [b"/first", b"/second", b"/third"])
        self.assertEqual([json.loads(body)["account"] for _, _, body in responses], ["alice", None, None])

    def test_failedIdentificationIsAnonymousAndLogged(self) -> None:
        self.authenticator.identify = lambda headers, client: fail(RuntimeError("users file unreadable"))
        connection = self.connect()
        connection.send(rawRequest("GET", "/"))
        status, _, body = connection.responses()[0]
        self.assertEqual((status, json.loads(body)["account"]), (200, None))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class BusyTests(InMemoryCase):
    """
    Credentials the authenticator's busy password checks cannot look at
    (L{PasswordChecksBusy}).
    """

    def setUp(self) -> None:
        super().setUp()
        self.authenticator.busy = True

    def test_heldBodyIs503(self) -> None:
        connection = self.connect()
        connection.send(rawRequest("POST", "/", [ALICE_HEADER, ("Content-Length", "100000")], b"x" * 1000))
        request = connection.protocol.requests[0]
        _, headers, body = self.assertRefused(connection, 503)
        self.assertEqual(headers["retry-after"], ["5"])
        self.assertEqual(body.decode("utf-8"), BUSY_MESSAGE + "\n")
        self.assertTrue(request.content.closed)
        self.assertEqual(self.echo.seen, [])

    def test_smallBodyIs503Too(self) -> None:
        connection = self.connect()
        connection.send(rawRequest("POST", "/", [ALICE_HEADER, ("Content-Length", "5")], b"hello"))
        self.assertRefused(connection, 503)
        self.assertEqual(self.echo.seen, [])

    def test_otherRequestsGoOnMarked(self) -> None:
        """
        Without a body to hold, the request goes on without an account and
        marked, so that the access gate answers it (503 where a login is
        needed).
        """
        status, _, body = self.exchange(rawRequest("GET", "/", [ALICE_HEADER]))
        echoed = json.loads(body)
        self.assertEqual((status, echoed["account"], echoed["credentialsUnchecked"]), (200, None, BUSY_MESSAGE))
        status, _, body = self.exchange(rawRequest("GET", "/"))
        self.assertIsNone(json.loads(body)["credentialsUnchecked"])
        self.assertEqual(self.flushLoggedErrors(), [])


class SpoolTests(InMemoryCase):
    def test_spoolFolderCreatedPrivate(self) -> None:
        folder = self.site.spoolFolder
        self.assertEqual(folder.stat().st_mode & 0o777, 0o700)
        folder.chmod(0o755)
        self.useSite()
        self.assertEqual(folder.stat().st_mode & 0o777, 0o700)

    def test_smallBodyInMemory(self) -> None:
        body = b"m" * MEMORY_BODY_LIMIT
        _, _, answer = self.exchange(
            rawRequest("PUT", "/", [ALICE_HEADER, ("Content-Length", str(len(body)))], body)
        )
        echoed = json.loads(answer)
        self.assertEqual((echoed["spooled"], echoed["position"], echoed["read"]), (None, 0, len(body)))

    def test_largeBodySpooledThenGone(self) -> None:
        body = os.urandom(MEMORY_BODY_LIMIT + 1)
        connection = self.connect()
        connection.send(rawRequest("PUT", "/", [ALICE_HEADER, ("Content-Length", str(len(body)))], body))
        echoed = json.loads(connection.responses()[0][2])
        self.assertTrue(echoed["spooled"].startswith(str(self.site.spoolFolder) + "/"), echoed["spooled"])
        self.assertTrue(echoed["spooled"].endswith(" (deleted)"), echoed["spooled"])
        self.assertEqual((echoed["position"], echoed["read"]), (0, len(body)))
        self.assertEqual(echoed["sha256"], hashlib.sha256(body).hexdigest())
        self.assertTrue(self.echo.seen[0].content is None or self.echo.seen[0].content.closed)
        self.assertEqual(spoolFds(self.site.spoolFolder), [])
        self.assertEqual(os.listdir(self.site.spoolFolder), [])

    def test_clientLeavingMidBodyLeavesNothing(self) -> None:
        connection = self.connect()
        connection.send(rawRequest("PUT", "/", [ALICE_HEADER, ("Content-Length", str(4 * MEMORY_BODY_LIMIT))]))
        connection.send(b"x" * (2 * MEMORY_BODY_LIMIT))
        request = connection.protocol.requests[0]
        self.assertEqual(len(spoolFds(self.site.spoolFolder)), 1)
        connection.lose(ConnectionLost)
        self.assertTrue(request.content.closed)
        self.assertEqual(spoolFds(self.site.spoolFolder), [])
        self.assertEqual(self.echo.seen, [])


class FullDisk:
    """
    A spool file on a disk that is full.
    """

    closed = False

    def write(self, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    def close(self) -> None:
        self.closed = True


class FullDiskTests(InMemoryCase):
    def test_fullDiskIs507AndLeavesNothing(self) -> None:
        tmpfs = tinyTmpfs(self, "1m")
        if tmpfs is None:
            # No right to mount: a spool file that fails the same way.
            self.site.openSpoolFile = FullDisk
        else:
            self.useSite(spoolFolder=tmpfs / "spool")
        body = os.urandom(3 * MEMORY_BODY_LIMIT)
        connection = self.connect()
        connection.send(rawRequest("PUT", "/", [ALICE_HEADER, ("Content-Length", str(len(body)))]))
        for offset in range(0, len(body), 64 * 1024):
            connection.send(body[offset : offset + 64 * 1024])
        _, _, sentence = self.assertRefused(connection, 507)
        self.assertIn(b"disk space", sentence)
        self.assertEqual(self.echo.seen, [])
        if tmpfs is not None:
            usage = os.statvfs(tmpfs)
            self.assertEqual(usage.f_bfree, usage.f_blocks)
            self.assertEqual(os.listdir(tmpfs / "spool"), [])
        self.assertStillServing()
        small = b"s" * 1000
        status, _, _ = self.exchange(
            rawRequest("PUT", "/", [ALICE_HEADER, ("Content-Length", str(len(small)))], small)
        )
        self.assertEqual(status, 200)


def tlsExchange(port: int, chunks: Sequence[bytes]) -> bytes:
    """
    Send C{chunks} over a new TLS connection and read until the server
    closes it (blocking).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        with clientContext().wrap_socket(raw, server_hostname="localhost") as connection:
            for chunk in chunks:
                connection.sendall(chunk)
            received = b""
            while True:
                try:
                    data = connection.recv(65536)
                except ssl.SSLEOFError:
                    break
                if not data:
                    break
                received += data
            return received


class OverTLSTests(TestCase):
    """
    The same over real TLS connections to a site on a free port.
    """

    timeout = 120

    def setUp(self) -> None:
        folder = temporaryFolder(self)
        config = testConfig(folder)
        self.authenticator = FakeAuthenticator()
        self.site, self.echo = makeSite(folder, self.authenticator, reactor)
        tls = TLSMemoryBIOFactory(webTLS(config), False, self.site)
        connections = ConnectionTracker(tls)
        self.port = reactor.listenTCP(freePort(), connections, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        # Clients close their end before the reactor sees it: wait for it.
        self.addCleanup(connections.whenClosed)
        self.portNumber = self.port.getHost().port

    def exchange(self, *chunks: bytes) -> Deferred:
        return deferToThread(tlsExchange, self.portNumber, chunks).addCallback(parseResponses)

    def statusOf(self, responses: List[Response]) -> List[int]:
        return [status for status, _, _ in responses]

    def test_malformedRefusedThenStillServing(self):
        def run():
            outcome = {
                name: self.statusOf(parseResponses(tlsExchange(self.portNumber, [raw]))) for name, raw, _ in MALFORMED
            }
            normal = parseResponses(tlsExchange(self.portNumber, [rawRequest("GET", "/", [("Connection", "close")])]))
            return outcome, normal

        def check(result):
            outcome, normal = result
            self.assertEqual(outcome, {name: [status] for name, _, status in MALFORMED})
            self.assertEqual(self.statusOf(normal), [200])

        return deferToThread(run).addCallback(check)

    def test_longQueryAcceptedLongerRefused(self):
        accepted = "/pacs/studies?StudyInstanceUID=" + "1.2.3," * (60 * 1024 // 6)
        refused = accepted + "4.5.6," * 1000
        d = self.exchange(rawRequest("GET", accepted, [("Connection", "close")]))
        d.addCallback(lambda responses: self.assertEqual(self.statusOf(responses), [200]))
        d.addCallback(lambda _: self.exchange(rawRequest("GET", refused)))
        d.addCallback(lambda responses: self.assertEqual(self.statusOf(responses), [414]))
        d.addCallback(lambda _: self.exchange(rawRequest("GET", "/", [(f"X-{n}", "v" * 1000) for n in range(70)])))
        d.addCallback(lambda responses: self.assertEqual(self.statusOf(responses), [431]))
        return d

    def test_refusedBeforeTheBodyIsSent(self):
        """
        The client sends only the head, and waits: the answer comes without
        the body (the read would otherwise time out).
        """
        d = self.exchange(rawRequest("POST", "/", [ALICE_HEADER, ("Content-Length", str(MAX_UPLOAD + 1))]))
        d.addCallback(lambda responses: self.assertEqual(self.statusOf(responses), [413]))
        d.addCallback(lambda _: self.exchange(rawRequest("POST", "/", [("Content-Length", "1000000")])))
        d.addCallback(lambda responses: self.assertEqual(self.statusOf(responses), [401]))
        return d

    def test_refusedHeldBodyStillGetsItsAnswer(self):
        """
        A client that sends its whole body without waiting (as urllib3
        does), held while the identity is looked up, then refused: it gets
        to send it all and read the 401.
        """
        self.authenticator.identify = lambda headers, client: deferLater(reactor, 0, lambda: None)
        body = b"b" * (MAX_UPLOAD - 1)
        d = self.exchange(rawRequest("POST", "/", [("Content-Length", str(len(body)))]), body)
        d.addCallback(lambda responses: self.assertEqual(self.statusOf(responses), [401]))
        return d

    def test_identifiedUploadSpooled(self):
        body = os.urandom(3 * 1024 * 1024)
        d = self.exchange(
            rawRequest("POST", "/", [ALICE_HEADER, ("Content-Length", str(len(body))), ("Connection", "close")]),
            body,
        )

        def check(responses):
            self.assertEqual(self.statusOf(responses), [200])
            echoed = json.loads(responses[0][2])
            self.assertEqual((echoed["account"], echoed["sha256"]), ("alice", hashlib.sha256(body).hexdigest()))
            self.assertTrue(echoed["spooled"].startswith(str(self.site.spoolFolder) + "/"))
            self.assertEqual(spoolFds(self.site.spoolFolder), [])

        return d.addCallback(check)
