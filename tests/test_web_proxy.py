"""
The proxy to Orthanc in memory: the client side is an HTTP channel on a
StringTransport, Orthanc's side the Agent's connection on another one, and
time a MemoryReactorClock.  Header policy both ways, timeouts, the
supervisor's state, cancellation, backpressure, gzip, the /pacs-admin
rewrites and refusals, and CORS.
"""

import gzip
import json
from typing import Dict, List, Optional, Tuple

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from appliance.compat import HTTPChannelHooks
from appliance.orthanc.settings import ORTHANC_HTTP_THREADS, RESERVED_HTTP_THREADS, OrthancCredentials
from appliance.orthanc.space import StorageSpace
from appliance.orthanc.state import OrthancState
from appliance.web.adminroutes import RouteTable
from appliance.web.proxy import STORAGE_FULL
from appliance.web.routes import (
    DICOMWEB_CLIENT_POLICY,
    ORTHANC_EXPLORER_POLICY,
    PacsAdminResource,
    buildProxyResources,
)
from appliance.web.turns import MAX_ORTHANC_REQUESTS, OrthancTurns
from tests.support import FakeFileSystem, FakeOrthanc, temporaryFolder, testConfig
from tests.test_stow_check import stowAnswer
from tests.webclients import BOUNDARY, Answer, archive, head, multipart, parseHead

ORTHANC = OrthancCredentials("pacs-appliance", "orthanc-secret-password")
CONNECT, RESPONSE, IDLE = 3, 20, 7
PUBLIC_HOST = "pacs.example:8443"


@implementer(ISSLTransport)
class TLSClientSide(StringTransport):
    """
    A client connection over TLS, as far as twisted.web asks.
    """

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


class OrthancSide(StringTransport):
    """
    The proxy's connection to Orthanc; like a TCP transport, stopping it
    closes it, and resuming a closed one does nothing.
    """

    def __init__(self) -> None:
        super().__init__(lenient=True)

    def stopProducing(self) -> None:
        self.producerState = "stopped"
        self.loseConnection()

    def pauseProducing(self) -> None:
        if self.producerState != "stopped":
            self.producerState = "paused"

    def resumeProducing(self) -> None:
        if self.producerState != "stopped":
            self.producerState = "producing"


class Client:
    """
    One client connection to the site.
    """

    def __init__(self, site: Site, peer=None, secure: bool = True) -> None:
        self.transport = (TLSClientSide if secure else StringTransport)(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8443),
            peerAddress=peer or IPv4Address("TCP", "192.0.2.7", 50000),
        )
        self.channel = site.buildProtocol(self.transport.getPeer())
        self.channel.makeConnection(self.transport)

    def send(self, method: str, path: str, headers=(), body: bytes = b"", host: Optional[str] = PUBLIC_HOST) -> None:
        lines = [f"{method} {path} HTTP/1.1"]
        if host is not None:
            lines.append(f"Host: {host}")
        lines += [f"{name}: {value}" for name, value in headers]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        self.channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    def answer(self) -> Answer:
        return Answer(self.transport.value())

    def leave(self) -> None:
        self.channel.connectionLost(Failure(ConnectionLost()))


class Upstream:
    """
    The Agent's connection to Orthanc.
    """

    def __init__(self, protocol) -> None:
        self.protocol = protocol
        self.transport = OrthancSide()
        protocol.makeConnection(self.transport)

    def request(self) -> Tuple[bytes, Dict[str, List[str]], bytes]:
        head, _, body = self.transport.value().partition(b"\r\n\r\n")
        requestLine, headers = parseHead(head)
        return requestLine, headers, body

    def respond(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def lose(self, reason=ConnectionDone) -> None:
        self.protocol.connectionLost(Failure(reason()))


class ProxyCase(SynchronousTestCase):
    web: Dict[str, object] = {}
    maxRequests = MAX_ORTHANC_REQUESTS

    def setUp(self) -> None:
        self.folder = folder = temporaryFolder(self)
        web = {
            "proxy_connect_timeout": f"{CONNECT}s",
            "proxy_response_timeout": f"{RESPONSE}s",
            "proxy_idle_timeout": f"{IDLE}s",
            **self.web,
        }
        self.config = testConfig(folder, web=web)
        self.reactor = MemoryReactorClock()
        self.orthanc = FakeOrthanc(credentials=ORTHANC)
        self.proxy, children = buildProxyResources(
            self.config, self.orthanc, StorageSpace.forOrthanc(self.config), self.reactor, maxRequests=self.maxRequests
        )
        root = Resource()
        for name, child in children.items():
            root.putChild(name, child)
        self.site = Site(root, reactor=self.reactor)
        # The proxy streams through the appliance's channel, which says when
        # the client holds it paused (twisted.web's does not).
        self.site.protocol = HTTPChannelHooks
        self.pooled: Optional[Upstream] = None
        self.events: List[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def client(
        self, method: str, path: str, headers=(), body: bytes = b"", peer=None, secure: bool = True, host=PUBLIC_HOST
    ) -> Client:
        """
        A client connection that has sent one request.
        """
        client = Client(self.site, peer, secure)
        client.send(method, path, headers, body, host)
        return client

    def upstream(self) -> Upstream:
        """
        Accept the connection the proxy is making to Orthanc, or take the
        one it reused from its pool.
        """
        if not self.reactor.tcpClients and self.pooled is not None:
            pooled, self.pooled = self.pooled, None
            return pooled
        self.assertTrue(self.reactor.tcpClients, "the proxy did not connect to Orthanc")
        host, port, factory, _, _ = self.reactor.tcpClients.pop(0)
        self.assertEqual((host, port), ("127.0.0.1", self.config.orthanc.http_port))
        return Upstream(factory.buildProtocol(None))

    def pump(self) -> None:
        """
        Let the cooperator read the request body a block at a time.
        """
        for _ in range(64):
            self.reactor.advance(0)

    def exchange(self, method: str, path: str, answer: bytes, headers=(), body: bytes = b""):
        """
        One request answered by Orthanc with the bytes C{answer}; what the
        client got, and the connection to Orthanc.
        """
        client = self.client(method, path, headers, body)
        upstream = self.upstream()
        self.pump()
        upstream.respond(answer)
        if not upstream.transport.disconnecting:
            upstream.transport.clear()
            self.pooled = upstream
        return client.answer(), upstream


class RequestHeaderTests(ProxyCase):
    def test_headerPolicyTowardsOrthanc(self) -> None:
        self.client(
            "GET",
            "/pacs/studies?PatientName=DOE*&limit=5",
            [
                ("Accept", "application/dicom+json"),
                ("Connection", "keep-alive, X-Hop"),
                ("X-Hop", "private to this connection"),
                ("Keep-Alive", "timeout=5"),
                ("TE", "trailers"),
                ("Upgrade", "h2c"),
                ("Proxy-Authorization", "Basic cHJveHk6cHJveHk="),
                ("Authorization", "Basic dXNlcjp1c2VyLXBhc3N3b3Jk"),
                ("Cookie", "theme=dark; __Host-pacs-session=SESSIONTOKEN; lang=en"),
                ("Forwarded", "for=6.6.6.6;host=evil.example"),
                ("X-Forwarded-For", "6.6.6.6"),
                ("X-Forwarded-Host", "evil.example"),
                ("X-Real-IP", "6.6.6.6"),
                ("X-Repeated", "one"),
                ("X-Repeated", "two"),
            ],
        )
        upstream = self.upstream()
        requestLine, headers, _ = upstream.request()
        self.assertEqual(requestLine, b"GET /pacs/studies?PatientName=DOE*&limit=5 HTTP/1.1")
        self.assertEqual(headers["authorization"], [ORTHANC.authorization().decode("ascii")])
        self.assertEqual(headers["cookie"], ["theme=dark; lang=en"])
        self.assertEqual(headers["x-repeated"], ["one", "two"])
        self.assertEqual(headers["accept"], ["application/dicom+json"])
        self.assertEqual(headers["host"], [f"127.0.0.1:{self.config.orthanc.http_port}"])
        self.assertEqual(headers["forwarded"], ["for=192.0.2.7;host=pacs.example:8443;proto=https"])
        self.assertEqual(headers["x-forwarded-for"], ["192.0.2.7"])
        self.assertEqual(headers["x-forwarded-proto"], ["https"])
        self.assertEqual(headers["x-forwarded-host"], ["pacs.example:8443"])
        for name in ("x-hop", "keep-alive", "te", "upgrade", "proxy-authorization", "x-real-ip", "content-length"):
            self.assertNotIn(name, headers)
        for secret in (b"SESSIONTOKEN", b"dXNlcjp1c2VyLXBhc3N3b3Jk", b"6.6.6.6", b"evil.example"):
            self.assertNotIn(secret, upstream.transport.value())

    def test_sessionCookieAloneSendsNoCookie(self) -> None:
        self.client("GET", "/pacs/studies", [("Cookie", "__Host-pacs-session=SESSIONTOKEN")])
        _, headers, _ = self.upstream().request()
        self.assertNotIn("cookie", headers)

    def test_plainHttpAndIPv6Client(self) -> None:
        self.client("GET", "/pacs/studies", peer=IPv6Address("TCP", "2001:db8::7", 50000), secure=False, host="[2001:db8::1]:8080")
        _, headers, _ = self.upstream().request()
        self.assertEqual(headers["forwarded"], ['for="[2001:db8::7]";host=[2001:db8::1]:8080;proto=http'])
        self.assertEqual(headers["x-forwarded-for"], ["2001:db8::7"])

    def test_badHostIsRefused(self) -> None:
        for host in ("pacs.example;proto=http", 'pacs.example"', "a,for=evil", "pacs example", None):
            client = self.client("GET", "/pacs/studies", host=host)
            answer = client.answer()
            self.assertEqual(answer.status, 400, host)
            self.assertIn("Host", answer.json()["error"])
        # A second Host header is the request layer's to refuse (test_web_requests).
        self.assertEqual(self.reactor.tcpClients, [])

    def test_bodyIsStreamedWithItsLength(self) -> None:
        body = bytes(range(256)) * 1200
        contentType = 'multipart/related; type="application/dicom"; boundary=XYZ'
        client = self.client("POST", "/pacs/studies", [("Content-Type", contentType)], body)
        upstream = self.upstream()
        self.pump()
        requestLine, headers, sent = upstream.request()
        self.assertEqual(requestLine, b"POST /pacs/studies HTTP/1.1")
        self.assertEqual(headers["content-length"], [str(len(body))])
        self.assertEqual(headers["content-type"], [contentType])
        self.assertNotIn("transfer-encoding", headers)
        self.assertEqual(sent, body)
        upstream.respond(head(headers=[("Content-Type", "application/dicom+json")], length=2) + b"{}")
        self.assertEqual((client.answer().status, client.answer().body), (200, b"{}"))

    def test_bodilessRequestHasNoBody(self) -> None:
        self.client("GET", "/pacs/studies")
        _, headers, body = self.upstream().request()
        self.assertNotIn("content-length", headers)
        self.assertNotIn("transfer-encoding", headers)
        self.assertEqual(body, b"")


class AnswerHeaderTests(ProxyCase):
    def test_headerPolicyTowardsClient(self) -> None:
        answer, _ = self.exchange(
            "GET",
            "/pacs/studies/1.2.3/series/4.5.6/instances/7.8.9/frames/1",
            head(
                headers=[
                    ("Content-Type", "application/octet-stream"),
                    ("Connection", "keep-alive"),
                    ("Keep-Alive", "timeout=1"),
                    ("Server", "Orthanc"),
                    ("WWW-Authenticate", 'Basic realm="Orthanc Secure Area"'),
                    ("Access-Control-Allow-Origin", "*"),
                    ("X-Repeated", "one"),
                    ("X-Repeated", "two"),
                    ("Set-Cookie", "a=1; Path=/"),
                    ("Set-Cookie", "__Host-pacs-session=forged; Path=/; Secure"),
                    ("Set-Cookie", "b=2; Path=/"),
                ],
                length=4,
            )
            + b"\x00\x01\x02\x03",
        )
        self.assertEqual((answer.status, answer.body), (200, b"\x00\x01\x02\x03"))
        self.assertEqual(answer.header("Content-Length"), "4")
        self.assertEqual(answer.headers["x-repeated"], ["one", "two"])
        self.assertEqual(answer.headers["set-cookie"], ["a=1; Path=/", "b=2; Path=/"])
        self.assertNotEqual(answer.header("Server"), "Orthanc")
        for name in ("keep-alive", "www-authenticate", "access-control-allow-origin"):
            self.assertNotIn(name, answer.headers)
        self.assertIn("Origin", answer.header("Vary"))

    def test_headIsAskedWithGet(self) -> None:
        client = self.client("HEAD", "/pacs/studies/1/series/2/instances/3/frames/1")
        upstream = self.upstream()
        self.assertEqual(upstream.request()[0], b"GET /pacs/studies/1/series/2/instances/3/frames/1 HTTP/1.1")
        upstream.respond(head(headers=[("Content-Type", "application/octet-stream")], length=1234) + b"x" * 100)
        answer = client.answer()
        self.assertEqual((answer.status, answer.header("Content-Length"), answer.body), (200, "1234", b""))
        self.assertEqual(answer.header("Content-Type"), "application/octet-stream")
        # Orthanc's body is not read.
        self.assertTrue(upstream.transport.disconnecting)

    def test_orthancLoginPromptNeverReachesTheClient(self) -> None:
        client = self.client("GET", "/pacs/studies")
        upstream = self.upstream()
        upstream.respond(
            head("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="Orthanc Secure Area"')], length=0)
        )
        answer = client.answer()
        self.assertEqual(answer.status, 503)
        self.assertEqual(answer.header("Retry-After"), "5")
        self.assertNotIn("www-authenticate", answer.headers)
        self.assertEqual(answer.header("Content-Type"), "application/json")
        self.assertIn("restarting", answer.json()["error"])
        self.assertNotIn(ORTHANC.password.encode(), client.transport.value())
        logged = "".join(repr(event) for event in self.events)
        self.assertNotIn(ORTHANC.password, logged)
        self.assertNotIn(ORTHANC.authorization().decode(), logged)


#: Orthanc's answer to the outside review's search: its error page, with the
#: request's text in it.
ECHOED = b"<html><body><img/src=x/onerror=alert(1)></body></html>"


class PageTests(ProxyCase):
    """
    No page Orthanc answers is rendered on the site's origin but Orthanc
    Explorer's own: every answer carries a Content-Security-Policy, and
    Orthanc's HTML error pages become the appliance's sentence.
    """

    def page(self, path: str, status: str = "400 Bad Request", contentType: str = "text/html; charset=utf-8"):
        """
        The client's answer when Orthanc answers C{path} with L{ECHOED}.
        """
        client = self.client("GET", path)
        upstream = self.upstream()
        upstream.respond(head(status, [("Content-Type", contentType)], len(ECHOED)) + ECHOED)
        # A page not passed on is not read: the connection to Orthanc ends.
        upstream.lose()
        return client.answer()

    def test_orthancErrorPageBecomesASentence(self) -> None:
        for path in ("/pacs/studies?fuzzymatching=%3Cimg/src=x/onerror=alert(1)%3E", "/pacs-admin/patients"):
            answer = self.page(path)
            self.assertEqual((answer.status, answer.header("Content-Type")), (400, "application/json"), path)
            self.assertEqual(answer.json(), {"error": "The archive refused this request (400 Bad Request)."})
            self.assertEqual(answer.header("Content-Security-Policy"), None)

    def test_pageOutsideExplorerIsNotPassed(self) -> None:
        for contentType in ("text/html", "application/xhtml+xml", "TEXT/HTML; charset=utf-8"):
            answer = self.page("/pacs-admin/instances/1/content/0010-0010", "200 OK", contentType)
            self.assertEqual(answer.status, 502)
            self.assertNotIn(b"onerror", answer.body)

    def test_everyOtherAnswerIsSandboxed(self) -> None:
        for path in ("/pacs/studies", "/pacs-admin/system", "/pacs-admin/app/explorer.js"):
            answer, _ = self.exchange("GET", path, head(headers=[("Content-Type", "application/json")], length=2) + b"{}")
            self.assertEqual(answer.header("Content-Security-Policy"), "default-src 'none'; sandbox", path)

    def test_redirectWithAPageIsSandboxed(self) -> None:
        client = self.client("GET", "/pacs-admin/patients")
        upstream = self.upstream()
        upstream.respond(head("302 Found", [("Content-Type", "text/html"), ("Location", "/app/explorer.html")], len(ECHOED)) + ECHOED)
        answer = client.answer()
        self.assertEqual((answer.status, answer.header("Location")), (302, "/pacs-admin/app/explorer.html"))
        self.assertEqual(answer.header("Content-Security-Policy"), "default-src 'none'; sandbox")

    def test_untypedAnswerIsText(self) -> None:
        """
        Orthanc answers some requests with no type: twisted.web would call
        them text/html.
        """
        answer, _ = self.exchange("DELETE", "/pacs-admin/studies/1", head(length=0))
        self.assertEqual((answer.status, answer.header("Content-Type")), (200, "text/plain"))
        answer, _ = self.exchange("GET", "/pacs-admin/patients", head("404 Not Found", length=0))
        self.assertEqual((answer.status, answer.header("Content-Type")), (404, "application/json"))

    def test_explorerPagesHaveTheirOwnPolicy(self) -> None:
        for path, policy in (
            ("/pacs-admin/app/explorer.html", ORTHANC_EXPLORER_POLICY),
            ("/pacs-admin/pacs/app/client/index.html", DICOMWEB_CLIENT_POLICY),
        ):
            answer = self.page(path, "200 OK")
            self.assertEqual(answer.status, 200)
            self.assertEqual(answer.header("Content-Security-Policy"), policy.decode())
        # Its error pages are Orthanc's error pages.
        self.assertEqual(self.page("/pacs-admin/app/missing.html", "404 Not Found").status, 404)
        self.assertEqual(self.page("/pacs-admin/app/missing.html", "404 Not Found").header("Content-Type"), "application/json")


class SupervisorStateTests(ProxyCase):
    def test_notReadyAnswers503WithoutAskingOrthanc(self) -> None:
        for state, retry in (
            (OrthancState.STARTING, "5"),
            (OrthancState.RESTARTING, "5"),
            (OrthancState.STOPPED, "5"),
            (OrthancState.FAILED, "60"),
        ):
            self.orthanc.state = state
            answer = self.client("GET", "/pacs/studies").answer()
            self.assertEqual((answer.status, answer.header("Retry-After")), (503, retry), state)
            self.assertTrue(answer.json()["error"].endswith("."))
            self.assertIn("Origin", answer.header("Vary"))
        self.assertEqual(self.reactor.tcpClients, [])

    def test_refusedConnectionAnswers502(self) -> None:
        client = self.client("GET", "/pacs/studies")
        _, _, factory, _, _ = self.reactor.tcpClients.pop(0)
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        answer = client.answer()
        self.assertEqual(answer.status, 502)
        self.assertIn("Orthanc", answer.json()["error"])
        [event] = [event for event in self.events if event.get("log_level").name == "error"]
        self.assertEqual((event["method"], event["path"]), ("GET", "/pacs/studies"))

    def test_orthancDyingUnderTheRequestAnswers503(self) -> None:
        client = self.client("GET", "/pacs/studies")
        upstream = self.upstream()
        self.orthanc.state = OrthancState.RESTARTING
        upstream.lose(ConnectionLost)
        answer = client.answer()
        self.assertEqual((answer.status, answer.header("Retry-After")), (503, "5"))

    def test_connectionClosedBeforeHeadersAnswers502(self) -> None:
        client = self.client("GET", "/pacs/studies")
        upstream = self.upstream()
        upstream.respond(b"HTTP/1.1 200 OK\r\nContent-")
        upstream.lose(ConnectionLost)
        self.assertEqual(client.answer().status, 502)

    def test_answerBrokenAfterHeadersClosesTheClient(self) -> None:
        client = self.client("GET", "/pacs/studies/1/series/2/instances/3/frames/1")
        upstream = self.upstream()
        upstream.respond(head(headers=[("Content-Type", "application/octet-stream")], length=100) + b"x" * 10)
        upstream.lose(ConnectionLost)
        answer = client.answer()
        self.assertEqual((answer.status, answer.body), (200, b"x" * 10))
        self.assertTrue(client.transport.disconnecting)


class CloseDelimitedAnswerTests(ProxyCase):
    """
    Orthanc ends whole-study retrievals and archives by closing its
    connection: a close before the answer's own end mark is a cut, which
    the client must see as one.
    """

    path = "/pacs/studies/1.2.3"
    multipartType = f'multipart/related; type="application/dicom"; boundary={BOUNDARY.decode()}'

    def closeDelimited(self, contentType: str, body: bytes, path: Optional[str] = None) -> Client:
        client = self.client("GET", path or self.path)
        upstream = self.upstream()
        upstream.respond(head(headers=[("Content-Type", contentType), ("Connection", "close")]) + body)
        upstream.lose(ConnectionDone)
        return client

    def errors(self) -> List[str]:
        return [formatEvent(event) for event in self.events if event.get("log_level").name == "error"]

    def test_wholeMultipart(self) -> None:
        body = multipart([b"a" * 1000, b"b" * 10])
        client = self.closeDelimited(self.multipartType, body)
        answer = client.answer()
        self.assertEqual((answer.status, answer.body, answer.complete), (200, body, True))
        self.assertEqual(self.errors(), [])

    def test_cutMultipart(self) -> None:
        body = multipart([b"a" * 1000, b"b" * 10])
        client = self.closeDelimited(self.multipartType, body[:-20])
        answer = client.answer()
        self.assertEqual((answer.status, answer.body, answer.complete), (200, body[:-20], False))
        self.assertTrue(client.transport.disconnecting)
        [error] = self.errors()
        self.assertIn("Orthanc broke off its answer to GET /pacs/studies/1.2.3", error)
        self.assertIn("the connection closed before the end of its multipart body", error)

    def test_wholeAndCutArchive(self) -> None:
        data = archive()
        path = "/pacs-admin/studies/0a1b/archive"
        for body, complete in ((data, True), (data[:-1], False)):
            client = self.closeDelimited("application/zip", body, path)
            answer = client.answer()
            self.assertEqual((answer.status, answer.body, answer.complete), (200, body, complete))
        [error] = self.errors()
        self.assertIn("before the end of its ZIP archive", error)

    def test_typeThatCannotTellEndsAsWhole(self) -> None:
        client = self.closeDelimited("application/octet-stream", b"x" * 10)
        self.assertEqual(client.answer().complete, True)


class TimeoutTests(ProxyCase):
    def test_connectTimeout(self) -> None:
        client = self.client("GET", "/pacs/studies")
        self.reactor.advance(CONNECT)
        answer = client.answer()
        self.assertEqual(answer.status, 504)
        self.assertIn(f"connection within {CONNECT}s", answer.json()["error"])

    def test_responseTimeout(self) -> None:
        client = self.client("GET", "/pacs/studies")
        upstream = self.upstream()
        self.reactor.advance(RESPONSE - 0.1)
        self.assertEqual(client.transport.value(), b"")
        self.reactor.advance(0.1)
        answer = client.answer()
        self.assertEqual(answer.status, 504)
        self.assertIn(f"answer within {RESPONSE}s", answer.json()["error"])
        self.assertTrue(upstream.transport.disconnecting)

    def test_responseTimeStartsOnceTheBodyIsSent(self) -> None:
        body = b"d" * (300 * 1024)
        client = self.client("POST", "/pacs/studies", [("Content-Type", "application/dicom")], body)
        upstream = self.upstream()
        # Orthanc takes its time to start reading, less than the idle timeout.
        upstream.transport.producer.pauseProducing()
        self.reactor.advance(IDLE - 1)
        upstream.transport.producer.resumeProducing()
        self.pump()
        self.assertEqual(upstream.request()[2], body)
        self.reactor.advance(RESPONSE - 0.1)
        self.assertEqual(client.transport.value(), b"")
        self.reactor.advance(0.1)
        self.assertEqual(client.answer().status, 504)

    def test_orthancNotReadingTheBody(self) -> None:
        body = b"d" * (300 * 1024)
        client = self.client("POST", "/pacs/studies", [("Content-Type", "application/dicom")], body)
        upstream = self.upstream()
        upstream.transport.producer.pauseProducing()
        self.pump()
        self.reactor.advance(IDLE)
        answer = client.answer()
        self.assertEqual(answer.status, 504)
        self.assertIn("stopped reading", answer.json()["error"])
        self.assertLess(len(upstream.request()[2]), len(body))

    def test_orthancNotReadingTheBodyOnAPooledConnection(self) -> None:
        _, upstream = self.exchange("GET", "/pacs/studies", head(length=0))
        client = self.client("POST", "/pacs/studies", [("Content-Type", "application/dicom")], b"d" * 1024)
        self.assertIs(self.upstream(), upstream)
        # Orthanc's socket is full: the body waits from its first block on.
        upstream.transport.producer.pauseProducing()
        self.pump()
        self.reactor.advance(IDLE)
        self.assertEqual(client.answer().status, 504)

    def test_idleTimeoutInTheMiddleOfTheBody(self) -> None:
        client = self.client("GET", "/pacs/studies/1/series/2/instances/3/frames/1")
        upstream = self.upstream()
        upstream.respond(head(headers=[("Content-Type", "application/octet-stream")], length=100) + b"x" * 10)
        self.reactor.advance(IDLE - 1)
        upstream.respond(b"y" * 10)
        self.reactor.advance(IDLE - 1)
        self.assertFalse(client.transport.disconnecting)
        self.reactor.advance(1)
        self.assertTrue(client.transport.disconnecting)
        self.assertEqual(upstream.transport.producerState, "stopped")
        self.assertEqual(client.answer().body, b"x" * 10 + b"y" * 10)

    def test_noIdleTimeoutWhileTheClientHoldsOrthancBack(self) -> None:
        client = self.client("GET", "/pacs/studies/1/series/2/instances/3/frames/1")
        upstream = self.upstream()
        upstream.respond(head(headers=[("Content-Type", "application/octet-stream")], length=100) + b"x" * 10)
        client.transport.producer.pauseProducing()
        self.reactor.advance(IDLE * 10)
        self.assertFalse(client.transport.disconnecting)
        client.transport.producer.resumeProducing()
        upstream.respond(b"y" * 90)
        self.assertTrue(client.answer().complete)
        self.assertEqual(client.answer().body, b"x" * 10 + b"y" * 90)


class CancellationTests(ProxyCase):
    def test_clientLeavingBeforeTheAnswerCancelsIt(self) -> None:
        client = self.client("GET", "/pacs/studies")
        upstream = self.upstream()
        client.leave()
        self.assertTrue(upstream.transport.disconnecting)
        self.reactor.advance(RESPONSE * 2)
        self.assertEqual(client.transport.value(), b"")

    def test_clientLeavingWhileConnectingCancelsTheConnection(self) -> None:
        client = self.client("GET", "/pacs/studies")
        client.leave()
        self.reactor.advance(CONNECT * 2)
        self.assertEqual(client.transport.value(), b"")
        self.assertEqual([event for event in self.events if event.get("log_level").name == "error"], [])

    def test_clientLeavingDuringTheBodyStopsOrthanc(self) -> None:
        client = self.client("GET", "/pacs/studies/1/series/2/instances/3/frames/1")
        upstream = self.upstream()
        upstream.respond(head(headers=[("Content-Type", "application/octet-stream")], length=100) + b"x" * 10)
        client.leave()
        self.assertEqual(upstream.transport.producerState, "stopped")
        self.assertTrue(upstream.transport.disconnecting)
        upstream.lose(ConnectionDone)
        self.reactor.advance(IDLE * 2)

    def test_clientLeavingDuringTheUploadStopsIt(self) -> None:
        body = b"d" * (300 * 1024)
        client = self.client("POST", "/pacs/studies", [("Content-Type", "application/dicom")], body)
        upstream = self.upstream()
        upstream.transport.producer.pauseProducing()
        client.leave()
        self.assertTrue(upstream.transport.disconnecting)
        self.pump()
        self.assertLess(len(upstream.request()[2]), len(body))


class BackpressureTests(ProxyCase):
    def test_slowClientPausesOrthanc(self) -> None:
        client = self.client("GET", "/pacs/studies/1/series/2/instances/3/frames/1")
        upstream = self.upstream()
        upstream.respond(head(headers=[("Content-Type", "application/octet-stream")], length=30) + b"a" * 10)
        self.assertEqual(upstream.transport.producerState, "producing")
        client.transport.producer.pauseProducing()
        self.assertEqual(upstream.transport.producerState, "paused")
        client.transport.producer.resumeProducing()
        self.assertEqual(upstream.transport.producerState, "producing")
        upstream.respond(b"b" * 20)
        self.assertEqual(client.answer().body, b"a" * 10 + b"b" * 20)

    def test_alreadyPausedClientPausesOrthancAtOnce(self) -> None:
        client = self.client("GET", "/pacs/studies/1/series/2/instances/3/frames/1")
        upstream = self.upstream()
        client.transport.producer.pauseProducing()
        upstream.respond(head(headers=[("Content-Type", "application/octet-stream")], length=30) + b"a" * 10)
        self.assertEqual(upstream.transport.producerState, "paused")
        # Orthanc is not idle while the client holds it back.
        self.reactor.advance(IDLE * 10)
        self.assertFalse(client.transport.disconnecting)
        client.transport.producer.resumeProducing()
        upstream.respond(b"b" * 20)
        self.assertEqual(client.answer().body, b"a" * 10 + b"b" * 20)

    def test_connectionGoesBackToThePoolAndIsReused(self) -> None:
        answer, upstream = self.exchange(
            "GET", "/pacs/studies", head(headers=[("Content-Type", "application/octet-stream")], length=2) + b"ok"
        )
        self.assertEqual(answer.body, b"ok")
        upstream.transport.clear()
        client = self.client("GET", "/pacs/series")
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertTrue(upstream.request()[0].startswith(b"GET /pacs/series "))
        upstream.respond(head(length=0))
        self.assertEqual(client.answer().status, 200)

    def test_orthancKeepsThreadsForItsHealthCheck(self) -> None:
        self.assertEqual(self.proxy.turns.limit, ORTHANC_HTTP_THREADS - RESERVED_HTTP_THREADS)
        self.assertGreater(RESERVED_HTTP_THREADS, 0)

    def test_stopServiceClosesIdleConnections(self) -> None:
        _, upstream = self.exchange("GET", "/pacs/studies", head(length=0))
        stopped = self.proxy.stopService()
        self.assertTrue(upstream.transport.disconnecting)
        upstream.lose(ConnectionDone)
        self.successResultOf(stopped)


class FairTurnTests(SynchronousTestCase):
    """
    One account gets at most its share of the turns; a turn that comes free
    goes to the next account in turn with a request waiting and room in its
    share.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.turns = OrthancTurns(4, 2, self.clock)

    def test_oneAccountWaitsBehindItsShareWhileOthersGoOn(self) -> None:
        alice = [self.turns.acquire("alice") for _ in range(3)]
        self.assertEqual([turn.called for turn in alice], [True, True, False])
        self.assertEqual((self.turns.inUse, self.turns.waiting), (2, 1))
        # Turns are free: another account starts at once.
        bob = [self.turns.acquire("bob") for _ in range(2)]
        self.assertTrue(all(turn.called for turn in bob))
        carol = self.turns.acquire("carol")
        self.assertFalse(carol.called)
        # Bob's turn comes free: Alice waited first, but holds her share.
        self.turns.release("bob")
        self.assertTrue(carol.called)
        self.assertFalse(alice[2].called)
        self.turns.release("alice")
        self.assertTrue(alice[2].called)
        self.assertEqual((self.turns.inUse, self.turns.waiting), (4, 0))

    def test_accountsTakeTurns(self) -> None:
        """
        With one turn, the accounts waiting get it in turn, each its own
        requests in arrival order.
        """
        turns = OrthancTurns(1, 1, self.clock)
        turns.acquire("alice")
        pending = [(name, turns.acquire(name)) for name in ("alice", "alice", "bob", "carol", "bob")]
        holder, order = "alice", []
        while pending:
            turns.release(holder)
            [(holder, _)] = [entry for entry in pending if entry[1].called]
            pending = [entry for entry in pending if not entry[1].called]
            order.append(holder)
        self.assertEqual(order, ["alice", "bob", "carol", "alice", "bob"])

    def test_aTurnThatEndsAtOnceGivesItOnAtOnce(self) -> None:
        """
        The request whose turn comes may end before its callback returns
        (and release its turn within the release that gave it).
        """
        turns = OrthancTurns(2, 1, self.clock)
        turns.acquire("alice")
        turns.acquire("dave")
        quick = [turns.acquire(name) for name in ("bob", "carol")]
        quick[0].addCallback(lambda _: turns.release("bob"))
        quick[1].addCallback(lambda _: turns.release("carol"))
        turns.release("alice")
        self.assertTrue(all(turn.called for turn in quick))
        self.assertEqual((turns.inUse, turns.waiting), (1, 0))

    def test_leavingGivesUpThePlace(self) -> None:
        turns = OrthancTurns(1, 1, self.clock)
        turns.acquire("alice")
        leaving, staying = turns.acquire("bob"), turns.acquire("carol")
        leaving.cancel()
        self.failureResultOf(leaving, CancelledError)
        self.assertEqual(turns.waiting, 1)
        turns.release("alice")
        self.assertTrue(staying.called)


class TurnTests(ProxyCase):
    """
    At most maxRequests exchanges with Orthanc at a time (here two); the
    others wait their turn in the appliance, in arrival order.
    """

    maxRequests = 2
    FRAME = "/pacs/studies/1/series/2/instances/3/frames/1"

    def slowReader(self) -> Tuple[Client, Upstream]:
        """
        A client in the middle of a transfer it has stopped reading.
        """
        client = self.client("GET", self.FRAME)
        upstream = self.upstream()
        upstream.respond(head(headers=[("Content-Type", "application/octet-stream")], length=100) + b"x" * 10)
        client.transport.producer.pauseProducing()
        return client, upstream

    def assertWaiting(self, count: int) -> None:
        self.assertEqual((self.proxy.turns.inUse, self.proxy.turns.waiting), (self.maxRequests, count))
        self.assertEqual(self.reactor.tcpClients, [], "a waiting request reached Orthanc")

    def turnEvents(self) -> List[str]:
        return [formatEvent(event) for event in self.events if "their turn" in event.get("log_format", "")]

    def test_requestsBeyondTheLimitWaitAndGoInArrivalOrder(self) -> None:
        first, second = self.client("GET", "/pacs/studies?n=1"), self.client("GET", "/pacs/studies?n=2")
        toFirst, toSecond = self.upstream(), self.upstream()
        third, fourth = self.client("GET", "/pacs/studies?n=3"), self.client("GET", "/pacs/studies?n=4")
        self.assertWaiting(2)
        self.assertEqual((third.transport.value(), fourth.transport.value()), (b"", b""))
        # The second answer ends first: its connection, back in the pool,
        # takes the third request, the first that waited.
        toSecond.transport.clear()
        toSecond.respond(head(length=2) + b"[]")
        self.assertEqual(second.answer().status, 200)
        self.assertEqual(toSecond.request()[0], b"GET /pacs/studies?n=3 HTTP/1.1")
        self.assertWaiting(1)
        toFirst.transport.clear()
        toFirst.respond(head(length=2) + b"[]")
        self.assertEqual(first.answer().status, 200)
        self.assertEqual(toFirst.request()[0], b"GET /pacs/studies?n=4 HTTP/1.1")
        self.assertEqual((self.proxy.turns.inUse, self.proxy.turns.waiting), (2, 0))
        for upstream, client in ((toSecond, third), (toFirst, fourth)):
            upstream.respond(head(length=2) + b"[]")
            self.assertEqual((client.answer().status, client.answer().body), (200, b"[]"))
        self.assertEqual(self.proxy.turns.inUse, 0)
        # Saturation is logged when it starts and when it ends, not per request.
        started, drained = self.turnEvents()
        self.assertIn("All 2 connections to Orthanc are in use", started)
        self.assertIn("no longer wait for their turn: 2 waited", drained)
        self.assertIn("0 of them left or timed out", drained)

    def test_clientLeavingMidAnswerPassesItsTurnOn(self) -> None:
        reader, toReader = self.slowReader()
        self.slowReader()
        waiting = self.client("GET", "/pacs/studies")
        self.assertWaiting(1)
        reader.leave()
        self.assertEqual(toReader.transport.producerState, "stopped")
        self.upstream().respond(head(length=2) + b"[]")
        self.assertEqual(waiting.answer().status, 200)

    def test_clientLeavingBeforeTheAnswerPassesItsTurnOn(self) -> None:
        leaving = self.client("GET", "/pacs/studies")
        toLeaving = self.upstream()
        self.slowReader()
        waiting = self.client("GET", "/pacs/series")
        self.assertWaiting(1)
        leaving.leave()
        self.assertTrue(toLeaving.transport.disconnecting)
        self.assertEqual(self.upstream().request()[0], b"GET /pacs/series HTTP/1.1")
        self.assertEqual(waiting.transport.value(), b"")

    def test_failuresPassTheTurnOn(self) -> None:
        refused = self.client("GET", "/pacs/studies")
        _, _, factory, _, _ = self.reactor.tcpClients.pop(0)
        broken = self.client("GET", self.FRAME)
        toBroken = self.upstream()
        firstWaiting, secondWaiting = self.client("GET", "/pacs/studies?n=1"), self.client("GET", "/pacs/studies?n=2")
        self.assertWaiting(2)
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual(refused.answer().status, 502)
        self.assertEqual(self.upstream().request()[0], b"GET /pacs/studies?n=1 HTTP/1.1")
        toBroken.respond(head(headers=[("Content-Type", "application/octet-stream")], length=100) + b"x" * 10)
        toBroken.lose(ConnectionLost)
        self.assertTrue(broken.transport.disconnecting)
        self.assertEqual(self.upstream().request()[0], b"GET /pacs/studies?n=2 HTTP/1.1")
        self.assertEqual((firstWaiting.transport.value(), secondWaiting.transport.value()), (b"", b""))

    def test_timeoutsPassTheTurnOn(self) -> None:
        silent = self.client("GET", "/pacs/studies")
        self.upstream()
        stalled = self.client("GET", self.FRAME)
        self.upstream().respond(head(headers=[("Content-Type", "application/octet-stream")], length=100) + b"x" * 10)
        self.reactor.advance(1)
        afterResponse, afterIdle = self.client("GET", "/pacs/studies?n=1"), self.client("GET", "/pacs/studies?n=2")
        self.assertWaiting(2)
        # Orthanc stops sending the frame: the idle timeout closes the client.
        self.reactor.advance(IDLE - 1)
        self.assertTrue(stalled.transport.disconnecting)
        self.assertEqual(self.upstream().request()[0], b"GET /pacs/studies?n=1 HTTP/1.1")
        # Orthanc never answers the first request.
        self.reactor.advance(RESPONSE - IDLE)
        self.assertEqual(silent.answer().status, 504)
        self.assertIn(f"answer within {RESPONSE}s", silent.answer().json()["error"])
        self.assertEqual(self.upstream().request()[0], b"GET /pacs/studies?n=2 HTTP/1.1")
        self.assertEqual((afterResponse.transport.value(), afterIdle.transport.value()), (b"", b""))

    def test_waitingClientLeavingNeverReachesOrthanc(self) -> None:
        self.slowReader()
        self.slowReader()
        leaving = self.client("GET", "/pacs/studies?n=1")
        staying = self.client("GET", "/pacs/studies?n=2")
        leaving.leave()
        # It gave up its place, and no turn it did not hold.
        self.assertWaiting(1)
        latecomer = self.client("GET", "/pacs/studies?n=3")
        self.assertWaiting(2)
        self.reactor.advance(RESPONSE * 2)
        self.assertEqual(leaving.transport.value(), b"")
        self.assertEqual([event for event in self.events if event.get("log_level").name == "error"], [])
        self.assertEqual(staying.answer().status, 504)
        self.assertEqual(latecomer.answer().status, 504)
        [_, drained] = self.turnEvents()
        self.assertIn("3 waited", drained)
        self.assertIn("3 of them left or timed out", drained)

    def test_waitingTooLongAnswers504(self) -> None:
        readers = [self.slowReader(), self.slowReader()]
        waiting = self.client("GET", "/pacs/studies")
        self.reactor.advance(RESPONSE - 0.1)
        self.assertEqual(waiting.transport.value(), b"")
        self.reactor.advance(0.1)
        answer = waiting.answer()
        self.assertEqual((answer.status, answer.header("Content-Type")), (504, "application/json"))
        self.assertEqual(
            answer.json()["error"],
            f"The archive is busy: this request waited {RESPONSE}s for its turn without reaching Orthanc;"
            " try again in a moment.",
        )
        self.assertWaiting(0)
        # The slow readers go on.
        for client, upstream in readers:
            self.assertFalse(client.transport.disconnecting)
            self.assertEqual(upstream.transport.producerState, "paused")

    def test_theWaitCountsAsWaitingForTheAnswer(self) -> None:
        reader, _ = self.slowReader()
        self.slowReader()
        waiting = self.client("GET", "/pacs/studies")
        self.reactor.advance(RESPONSE - 5)
        reader.leave()
        self.upstream()
        self.reactor.advance(5 - 0.1)
        self.assertEqual(waiting.transport.value(), b"")
        self.reactor.advance(0.1)
        self.assertIn(f"answer within {RESPONSE}s", waiting.answer().json()["error"])
        self.assertEqual(self.proxy.turns.inUse, 1)


class GzipTests(ProxyCase):
    metadata = json.dumps([{"00080018": {"vr": "UI", "Value": ["1.2.3.%d" % i]}} for i in range(500)]).encode()

    def answerMetadata(self, headers=(), extra=()) -> Answer:
        client = self.client("GET", "/pacs/studies/1/metadata", headers)
        upstream = self.upstream()
        half = len(self.metadata) // 2
        upstream.respond(
            head(headers=[("Content-Type", "application/dicom+json"), *extra], length=len(self.metadata))
            + self.metadata[:half]
        )
        upstream.respond(self.metadata[half:])
        return client.answer()

    def test_dicomJsonIsCompressedForClientsThatAcceptGzip(self) -> None:
        answer = self.answerMetadata([("Accept-Encoding", "gzip, deflate, br")], [("ETag", '"abc"')])
        self.assertEqual(answer.header("Content-Encoding"), "gzip")
        self.assertNotIn("content-length", answer.headers)
        self.assertIn("Accept-Encoding", answer.header("Vary"))
        self.assertIn("Origin", answer.header("Vary"))
        self.assertEqual(answer.header("ETag"), 'W/"abc"')
        self.assertTrue(answer.complete)
        self.assertEqual(gzip.decompress(answer.body), self.metadata)
        self.assertLess(len(answer.body), len(self.metadata) / 5)

    def test_identityForOtherClients(self) -> None:
        answer = self.answerMetadata()
        self.assertNotIn("content-encoding", answer.headers)
        self.assertEqual(answer.header("Content-Length"), str(len(self.metadata)))
        self.assertIn("Accept-Encoding", answer.header("Vary"))
        self.assertEqual(answer.body, self.metadata)

    def test_pixelDataIsNotCompressed(self) -> None:
        answer, _ = self.exchange(
            "GET",
            "/pacs/studies/1/series/2/instances/3/frames/1",
            head(headers=[("Content-Type", "application/octet-stream")], length=4) + b"abcd",
            [("Accept-Encoding", "gzip")],
        )
        self.assertNotIn("content-encoding", answer.headers)
        self.assertEqual(answer.body, b"abcd")

    def test_encodedAnswerPassesAsItIs(self) -> None:
        compressed = gzip.compress(self.metadata)
        answer, _ = self.exchange(
            "GET",
            "/pacs/studies/1/metadata",
            head(headers=[("Content-Type", "application/dicom+json"), ("Content-Encoding", "gzip")], length=len(compressed))
            + compressed,
            [("Accept-Encoding", "gzip")],
        )
        self.assertEqual((answer.header("Content-Encoding"), answer.body), ("gzip", compressed))


class StowCheckTests(ProxyCase):
    """
    A STOW-RS answer is passed on only if it accounts for every instance
    sent: Orthanc's DICOMweb plugin leaves out, from a 200, an instance
    whose store failed (see appliance.web.stowcheck; the real case is in
    test_cluster).
    """

    def stow(self, parts: int, status: str, body: bytes, answerType: str = "application/dicom+json", headers=()):
        # Parts of 100 kB: the body reaches Orthanc in several blocks.
        request = multipart([bytes([i]) * 100_000 for i in range(parts)])
        contentType = f'multipart/related; type="application/dicom"; boundary={BOUNDARY.decode()}'
        client = self.client("POST", "/pacs/studies", [("Content-Type", contentType), *headers], request)
        upstream = self.upstream()
        self.pump()
        self.assertEqual(upstream.request()[2], request)
        upstream.respond(head(status, [("Content-Type", answerType)], length=len(body)) + body)
        upstream.transport.clear()
        self.pooled = upstream
        return client.answer()

    def warnings(self) -> List[str]:
        return [
            formatEvent(event)
            for event in self.events
            if event.get("log_level").name in ("warn", "error")
            and event.get("log_namespace", "").startswith("appliance.web.proxy")
        ]

    def test_anInstanceLeftOutIsNotAcknowledged(self) -> None:
        answer = self.stow(3, "200 OK", stowAnswer(2, 0))
        self.assertEqual((answer.status, answer.header("Retry-After")), (503, "5"))
        self.assertIn("could not store 1 of the 3 instances", answer.json()["error"])
        [warning] = self.warnings()
        self.assertIn("accounted for 2 of the 3 instances", warning)
        self.assertEqual(self.stow(1, "200 OK", stowAnswer(0, 0)).status, 503)

    def test_anAnswerAccountingForEveryInstancePasses(self) -> None:
        for status, body in (("200 OK", stowAnswer(3, 0)), ("202 Accepted", stowAnswer(2, 1))):
            answer = self.stow(3, status, body)
            self.assertEqual((answer.status, answer.body), (int(status[:3]), body))
            self.assertEqual(answer.header("Content-Length"), str(len(body)))
        compressed = self.stow(3, "200 OK", stowAnswer(3, 0), headers=[("Accept-Encoding", "gzip")])
        self.assertEqual(gzip.decompress(compressed.body), stowAnswer(3, 0))
        self.assertEqual(self.warnings(), [])

    def test_refusalsPassAsTheyAre(self) -> None:
        answer = self.stow(2, "400 Bad Request", stowAnswer(1, 0))
        self.assertEqual((answer.status, answer.body), (400, stowAnswer(1, 0)))

    def test_anAnswerThatCannotBeReadIsNotAnAcknowledgement(self) -> None:
        answer = self.stow(1, "200 OK", b"<NativeDicomModel><DicomAttribute", "application/dicom+xml")
        self.assertEqual(answer.status, 502)
        self.assertIn("could not be checked", answer.json()["error"])
        [error] = self.warnings()
        self.assertIn("could not be read", error)

    def test_orthancsOwn503SaysWhenToTryAgain(self) -> None:
        answer, _ = self.exchange(
            "POST",
            "/pacs-admin/instances",
            head("503 Service Unavailable", [("Content-Type", "application/json")], length=2) + b"{}",
            [("Content-Type", "application/dicom")],
            b"DICM",
        )
        self.assertEqual((answer.status, answer.header("Retry-After")), (503, "5"))


class PacsRouteTests(ProxyCase):
    def test_pathsAreResolvedAndReencoded(self) -> None:
        for sent, forwarded in (
            ("/pacs/studies/1.2.3/series?includefield=all", b"/pacs/studies/1.2.3/series?includefield=all"),
            ("/pacs//studies/./1.2.3/", b"/pacs/studies/1.2.3/"),
            ("/pacs/studies/1.2.3/x/../series", b"/pacs/studies/1.2.3/series"),
            ("/pacs/%73tudies/1.2.3/frames/1,2", b"/pacs/studies/1.2.3/frames/1,2"),
            ("/pacs/wado?requestType=WADO&studyUID=1&seriesUID=2&objectUID=3", None),
        ):
            self.client("GET", sent)
            requestLine = self.upstream().request()[0]
            self.assertEqual(requestLine, b"GET " + (forwarded or sent.encode()) + b" HTTP/1.1")

    def test_badPaths(self) -> None:
        for path in (
            "/pacs/..%2ftools/shutdown",
            "/pacs/studies/%2e%2e/%2e%2e/tools/shutdown",
            "/pacs/../pacs-admin/tools/shutdown",
            "/pacs/studies%00",
            "/pacs/studies/%zz",
            "/pacs/studies?_method=DELETE",
            "/pacs/studies?%5Fmethod=DELETE",
        ):
            answer = self.client("GET", path).answer()
            self.assertEqual(answer.status, 400, path)
            self.assertTrue(answer.json()["error"].endswith("."), path)
        answer = self.client("POST", "/pacs/studies", [("X-HTTP-Method-Override", "DELETE")]).answer()
        self.assertEqual(answer.status, 400)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_onlyDicomWebResources(self) -> None:
        for path in ("/pacs", "/pacs/", "/pacs/servers", "/pacs/servers/x/stow", "/pacs/app/client/index.html", "/pacs/system"):
            self.assertEqual(self.client("GET", path).answer().status, 404, path)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_methods(self) -> None:
        for method, path, allowed in (
            ("PUT", "/pacs/studies", "GET, HEAD, POST, OPTIONS"),
            ("DELETE", "/pacs/studies/1.2.3", "GET, HEAD, POST, OPTIONS"),
            ("POST", "/pacs/studies/1.2.3/series", "GET, HEAD, OPTIONS"),
            ("POST", "/pacs/wado", "GET, HEAD, OPTIONS"),
            ("PATCH", "/pacs/studies", "GET, HEAD, POST, OPTIONS"),
        ):
            answer = self.client(method, path).answer()
            self.assertEqual((answer.status, answer.header("Allow")), (405, allowed), (method, path))
            self.assertIn(method, answer.json()["error"])
        self.assertEqual(self.reactor.tcpClients, [])
        self.client("POST", "/pacs/studies/1.2.3", [("Content-Type", "application/dicom")], b"DICM")
        self.assertEqual(self.upstream().request()[0], b"POST /pacs/studies/1.2.3 HTTP/1.1")

    def test_optionsIsNeverForwarded(self) -> None:
        answer = self.client("OPTIONS", "/pacs/studies").answer()
        self.assertEqual((answer.status, answer.header("Allow")), (204, "GET, HEAD, POST, OPTIONS"))
        self.assertNotIn("access-control-allow-origin", answer.headers)
        self.assertEqual(self.reactor.tcpClients, [])


class CorsTests(ProxyCase):
    web = {"cors_allowed_origins": "https://viewer.example https://10.1.2.3:8443"}

    def test_originsAreComparedAsBrowsersWriteThem(self) -> None:
        """
        The configured origins and the request's are compared in the form
        browsers write them (lower case, no default port), whatever the
        configuration or a client wrote.
        """
        config = testConfig(temporaryFolder(self), web={"cors_allowed_origins": "HTTPS://Viewer.Example:443 http://[::1]:80"})
        self.assertEqual(config.web.cors_allowed_origins, ("https://viewer.example", "http://[::1]"))
        self.proxy, children = buildProxyResources(config, self.orthanc, StorageSpace.forOrthanc(config), self.reactor)
        for name, child in children.items():
            self.site.resource.putChild(name, child)
        for origin, allowed in (
            ("https://viewer.example", "https://viewer.example"),
            ("https://VIEWER.example:443", "https://viewer.example"),
            ("http://[::1]", "http://[::1]"),
            ("https://viewer.example:8443", None),
        ):
            answer = self.client("OPTIONS", "/pacs/studies", [("Origin", origin), *self.preflight[1:]]).answer()
            self.assertEqual(answer.header("Access-Control-Allow-Origin"), allowed, origin)
    preflight = [("Origin", "https://viewer.example"), ("Access-Control-Request-Method", "GET"),
                 ("Access-Control-Request-Headers", "authorization")]

    def test_preflightFromAnAllowedOrigin(self) -> None:
        answer = self.client("OPTIONS", "/pacs/studies", self.preflight).answer()
        self.assertEqual(answer.status, 204)
        self.assertEqual(answer.header("Access-Control-Allow-Origin"), "https://viewer.example")
        self.assertEqual(answer.header("Access-Control-Allow-Credentials"), "true")
        self.assertEqual(answer.header("Access-Control-Allow-Methods"), "GET, HEAD, POST, OPTIONS")
        self.assertIn("Authorization", answer.header("Access-Control-Allow-Headers"))
        self.assertEqual(answer.header("Access-Control-Max-Age"), "600")
        self.assertIn("Origin", answer.header("Vary"))
        self.assertEqual(self.reactor.tcpClients, [])

    def test_preflightFromAnotherOrigin(self) -> None:
        for origin in ("https://evil.example", "https://viewer.example.evil", "null", "http://viewer.example"):
            answer = self.client("OPTIONS", "/pacs/studies", [("Origin", origin), *self.preflight[1:]]).answer()
            self.assertEqual(answer.status, 204, origin)
            self.assertEqual([name for name in answer.headers if name.startswith("access-control-")], [], origin)
            self.assertIn("Origin", answer.header("Vary"))
        self.assertEqual(self.reactor.tcpClients, [])

    def test_preflightForAnotherMethod(self) -> None:
        answer = self.client("OPTIONS", "/pacs/studies", [self.preflight[0], ("Access-Control-Request-Method", "DELETE")]).answer()
        self.assertNotIn("access-control-allow-methods", answer.headers)

    def test_answersCarryCorsHeaders(self) -> None:
        answer, _ = self.exchange(
            "GET", "/pacs/studies", head(headers=[("Content-Type", "application/dicom+json"), ("Vary", "Accept")], length=2) + b"[]",
            [("Origin", "https://10.1.2.3:8443"), ("Accept-Encoding", "gzip")],
        )
        self.assertEqual(answer.header("Access-Control-Allow-Origin"), "https://10.1.2.3:8443")
        self.assertEqual(answer.header("Access-Control-Allow-Credentials"), "true")
        self.assertEqual(answer.header("Vary"), "Origin, Accept, Accept-Encoding")
        answer = self.client("PUT", "/pacs/studies", [("Origin", "https://viewer.example")]).answer()
        self.assertEqual((answer.status, answer.header("Access-Control-Allow-Origin")), (405, "https://viewer.example"))
        answer, _ = self.exchange("GET", "/pacs/studies", head(length=0), [("Origin", "https://evil.example")])
        self.assertEqual(answer.header("Vary"), "Origin")
        self.assertNotIn("access-control-allow-origin", answer.headers)


class AdminRouteTests(ProxyCase):
    def test_rootRedirectsToTheSlash(self) -> None:
        answer = self.client("GET", "/pacs-admin?x=1").answer()
        self.assertEqual((answer.status, answer.header("Location")), (301, "/pacs-admin/?x=1"))
        self.client("GET", "/pacs-admin/")
        self.assertEqual(self.upstream().request()[0], b"GET / HTTP/1.1")

    def test_locationAndCookiesStayUnderThePrefix(self) -> None:
        port = self.config.orthanc.http_port
        for location, rewritten in (
            ("app/explorer.html", "app/explorer.html"),
            ("/app/explorer.html", "/pacs-admin/app/explorer.html"),
            (f"http://127.0.0.1:{port}/instances/abc", "/pacs-admin/instances/abc"),
            (f"http://localhost:{port}", "/pacs-admin/"),
        ):
            answer, _ = self.exchange(
                "GET", "/pacs-admin/", head("301 Moved Permanently", [("Location", location)], length=0)
            )
            self.assertEqual(answer.header("Location"), rewritten)
        answer, _ = self.exchange(
            "POST",
            "/pacs-admin/instances",
            head(
                "200 OK",
                [
                    ("Set-Cookie", "a=1; Path=/; HttpOnly"),
                    ("Set-Cookie", "b=2; Domain=example.org; path=/app"),
                    ("Set-Cookie", "c=3"),
                ],
                length=0,
            ),
            body=b"DICM",
        )
        self.assertEqual(
            answer.headers["set-cookie"],
            ["a=1; Path=/pacs-admin/; HttpOnly", "b=2; Path=/pacs-admin/app", "c=3; Path=/pacs-admin/"],
        )

    def test_unsafeEndpointsAreRefusedWhateverTheSpelling(self) -> None:
        for method, path in (
            ("POST", "/pacs-admin/tools/shutdown"),
            ("POST", "/pacs-admin/tools/shutdown/"),
            ("POST", "/pacs-admin//tools//shutdown"),
            ("POST", "/pacs-admin/tools/./shutdown"),
            ("POST", "/pacs-admin/tools/x/../shutdown"),
            ("POST", "/pacs-admin/tools/%2e%2e/tools/shutdown"),
            ("POST", "/pacs-admin/tools%2fshutdown"),
            ("POST", "/pacs-admin/%74ools/%73hutdown"),
            ("POST", "/pacs-admin/TOOLS/Shutdown"),
            ("GET", "/pacs-admin/tools/shutdown"),
            ("POST", "/pacs-admin/tools/reset"),
            ("POST", "/pacs-admin/tools/execute-script"),
            ("PUT", "/pacs-admin/modalities/elsewhere"),
            ("DELETE", "/pacs-admin/peers/other"),
            ("PUT", "/pacs-admin/pacs/servers/elsewhere"),
        ):
            answer = self.client(method, path, body=b"print(1)" if method == "POST" else b"").answer()
            self.assertEqual(answer.status, 403, (method, path))
            self.assertIn("[web] admin_unsafe_endpoints", answer.json()["error"])
        self.assertEqual(self.reactor.tcpClients, [])

    def test_safeNeighboursAreForwarded(self) -> None:
        for method, path, forwarded in (
            ("GET", "/pacs-admin/modalities/elsewhere", b"GET /modalities/elsewhere HTTP/1.1"),
            ("POST", "/pacs-admin/modalities/elsewhere/store", b"POST /modalities/elsewhere/store HTTP/1.1"),
            ("GET", "/pacs-admin/tools/generate-uid?level=study", b"GET /tools/generate-uid?level=study HTTP/1.1"),
            ("DELETE", "/pacs-admin/studies/abc", b"DELETE /studies/abc HTTP/1.1"),
        ):
            self.client(method, path, body=b"[]" if method == "POST" else b"")
            self.assertEqual(self.upstream().request()[0], forwarded)

    def test_badPathsAndMethods(self) -> None:
        for path in ("/pacs-admin/../tools/shutdown", "/pacs-admin/%2e%2e/tools", "/pacs-admin/x%00", "/pacs-admin/%g0"):
            self.assertEqual(self.client("GET", path).answer().status, 400, path)
        answer = self.client("GET", "/pacs-admin/tools/log-level?_method=PUT").answer()
        self.assertEqual(answer.status, 400)
        answer = self.client("PATCH", "/pacs-admin/studies/abc").answer()
        self.assertEqual((answer.status, answer.header("Allow")), (405, "GET, HEAD, POST, PUT, DELETE, OPTIONS"))
        answer = self.client("OPTIONS", "/pacs-admin/").answer()
        self.assertEqual(answer.status, 204)
        self.assertEqual(self.reactor.tcpClients, [])


class UnsafeAllowedTests(ProxyCase):
    web = {"admin_unsafe_endpoints": "yes"}

    def test_unsafeEndpointsAreForwardedWhenAllowed(self) -> None:
        self.client("POST", "/pacs-admin/tools/execute-script", body=b"print(1)")
        self.assertEqual(self.upstream().request()[0], b"POST /tools/execute-script HTTP/1.1")


class FullStorageTests(ProxyCase):
    MINIMUM = 64 * 2**20

    def setUp(self) -> None:
        super().setUp()
        self.disk = FakeFileSystem(free=10 * 2**20)
        self.proxy.space = StorageSpace(self.folder, self.MINIMUM, self.disk)

    def storageEvents(self) -> List[str]:
        return [formatEvent(event) for event in self.events if "storage" in event.get("log_format", "")]

    def test_uploadsAreRefusedWith507WithoutReachingOrthanc(self) -> None:
        for method, path in (
            ("POST", "/pacs/studies"),
            ("POST", "/pacs/studies/1.2.3"),
            ("POST", "/pacs-admin/instances"),
        ):
            answer = self.client(method, path, [("Content-Type", "application/dicom")], b"DICM").answer()
            self.assertEqual(answer.status, 507, path)
            self.assertEqual(answer.json(), {"error": STORAGE_FULL}, path)
            self.assertEqual(answer.header("Content-Type"), "application/json")
        self.assertEqual(self.reactor.tcpClients, [])
        [full] = self.storageEvents()
        self.assertIn("10.0 MiB free in", full)
        self.assertIn("[orthanc] min_free_space (64.0 MiB)", full)

    def test_readingAndOtherPostsGoOn(self) -> None:
        for method, path, forwarded in (
            ("GET", "/pacs/studies", b"GET /pacs/studies HTTP/1.1"),
            ("POST", "/pacs-admin/tools/find", b"POST /tools/find HTTP/1.1"),
            ("DELETE", "/pacs-admin/patients/abc", b"DELETE /patients/abc HTTP/1.1"),
        ):
            self.client(method, path, body=b"{}" if method == "POST" else b"")
            self.assertEqual(self.upstream().request()[0], forwarded)
        self.assertEqual(self.storageEvents(), [])

    def test_uploadsGoOnOnceSpaceIsFreed(self) -> None:
        self.assertEqual(self.client("POST", "/pacs/studies", body=b"DICM").answer().status, 507)
        self.disk.free = self.MINIMUM
        self.client("POST", "/pacs/studies", body=b"DICM")
        self.assertEqual(self.upstream().request()[0], b"POST /pacs/studies HTTP/1.1")
        full, room = self.storageEvents()
        self.assertIn("full", full)
        self.assertIn("room again: 64.0 MiB free", room)


class RewriteTests(SynchronousTestCase):
    def test_cookieWithoutAttributes(self) -> None:
        resource = PacsAdminResource(None, False, RouteTable(()))
        self.assertEqual(resource.rewriteHeader(b"set-cookie", b"x=y"), b"x=y; Path=/pacs-admin/")
        self.assertEqual(resource.rewriteHeader(b"content-type", b"text/html"), b"text/html")
        self.assertEqual(resource.rewriteHeader(b"location", b"//elsewhere.example/x"), b"//elsewhere.example/x")
