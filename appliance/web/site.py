"""
The HTTPS site, the HTTP listener that only redirects to it, and their services.

    https  WebRoot ─┬─ /healthz   HealthResource
                    └─ /...       ViewerResource (the OHIF build, app-config.js)
    http   RedirectToHTTPS        301 to the same path on https, nothing else

Later routes (the proxies to Orthanc) are children of L{WebRoot}.
"""

import ipaddress
import re
from typing import List, Optional, Sequence, Tuple

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from appliance.config import Config, ListenAddress
from appliance.tls import ServerTLS, loadServerCertificate
from appliance.web.appconfig import renderAppConfig
from appliance.web.health import HealthResource
from appliance.web.static import ViewerResource

Headers = Sequence[Tuple[bytes, bytes]]

#: A host name or IPv4 address as a browser writes it in the Host header.
_HOST_NAME = re.compile(rb"[A-Za-z0-9.-]{1,253}")


#: One line a request in combined log format, under its own namespace so that
#: operators can filter it in or out.
accessLog = Logger(namespace="appliance.web.access")

log = Logger()


class ApplianceRequest(Request):
    """
    A request whose response carries the site's standard headers, whatever
    resource (or error page) answers it.
    """

    def render(self, resource: Resource) -> None:
        # Replaces the Server header Request.process set: no version for scanners.
        self.setHeader(b"Server", b"pacs-appliance")
        for name, value in self.site.standardHeaders:
            self.setHeader(name, value)
        super().render(resource)


class DeadlineHTTPChannel(http.HTTPChannel):
    """
    An HTTP/1.1 channel that aborts a connection whose client has not sent a
    whole request head within C{headerTimeout}: from the connection (so the
    TLS handshake counts) and from the end of each response.  twisted.web's
    own timeout is an idle timer that every byte resets, which a client
    sending its headers a byte at a time never trips.
    """

    headerTimeout: float
    _headerDeadline = None
    log = Logger()

    def connectionMade(self) -> None:
        super().connectionMade()
        self._startHeaderDeadline()

    def allHeadersReceived(self) -> None:
        self._cancelHeaderDeadline()
        super().allHeadersReceived()

    def requestDone(self, request: Request) -> None:
        # Started first: the next request's head may already be buffered, and
        # is parsed inside requestDone.
        if self.persistent:
            self._startHeaderDeadline()
        super().requestDone(request)

    def connectionLost(self, reason) -> None:
        self._cancelHeaderDeadline()
        super().connectionLost(reason)

    def _startHeaderDeadline(self) -> None:
        self._cancelHeaderDeadline()
        self._headerDeadline = self.callLater(self.headerTimeout, self._headersTooSlow)

    def _cancelHeaderDeadline(self) -> None:
        deadline, self._headerDeadline = self._headerDeadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _headersTooSlow(self) -> None:
        self._headerDeadline = None
        self.log.info(
            "Closed the connection of {client}: no complete request within {timeout}s",
            client=str(self.transport.getPeer()),
            timeout=self.headerTimeout,
        )
        self.transport.abortConnection()


class ApplianceSite(Site):
    """
    A site that logs each request as one line in combined log format through
    twisted.logger, adds C{standardHeaders} to every response, and gives
    clients C{headerTimeout} to send each request head.
    """

    requestFactory = ApplianceRequest
    protocol = DeadlineHTTPChannel

    def __init__(
        self,
        resource: Resource,
        standardHeaders: Headers,
        reactor,
        idleTimeout: float,
        headerTimeout: float,
    ) -> None:
        super().__init__(resource, reactor=reactor, timeout=idleTimeout)
        self.standardHeaders = tuple(standardHeaders)
        self.headerTimeout = headerTimeout

    def buildProtocol(self, addr) -> DeadlineHTTPChannel:
        channel = super().buildProtocol(addr)
        channel.headerTimeout = self.headerTimeout
        return channel

    def log(self, request: Request) -> None:
        accessLog.info(
            "{line}",
            line=http.combinedLogFormatter(http.datetimeToLogString(self.reactor.seconds()), request),
            method=request.method.decode("latin-1"),
            uri=request.uri.decode("latin-1"),
            code=request.code,
            length=request.sentLength,
        )


class WebRoot(Resource):
    """
    The root of the HTTPS site: its named children, and the viewer for every
    other path (the viewer reads the whole path, so the first segment goes back).
    """

    def __init__(self, viewer: Resource) -> None:
        super().__init__()
        self._viewer = viewer

    def getChild(self, name: bytes, request: Request) -> Resource:
        request.postpath.insert(0, request.prepath.pop())
        return self._viewer


class RedirectToHTTPS(Resource):
    """
    Answers every request with a permanent redirect to the same path and query
    on the HTTPS port; nothing is served in clear.
    """

    isLeaf = True

    def __init__(self, httpsPort: int) -> None:
        super().__init__()
        self._port = b"" if httpsPort == 443 else b":%d" % (httpsPort,)

    def render(self, request: Request) -> bytes:
        host = self._redirectHost(request.getRequestHostname())
        if host is None:
            request.setResponseCode(http.BAD_REQUEST)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"Bad Host header.\n"
        target = request.uri if request.uri.startswith(b"/") else b"/"
        request.setResponseCode(http.MOVED_PERMANENTLY)
        request.setHeader(b"Location", b"https://" + host + self._port + target)
        request.setHeader(b"Content-Length", b"0")
        return b""

    @staticmethod
    def _redirectHost(host: bytes) -> Optional[bytes]:
        """
        C{host} as it goes into the Location header (IPv6 in brackets), or
        L{None} if it is neither a name nor an address.
        """
        if _HOST_NAME.fullmatch(host):
            return host
        try:
            return b"[%s]" % (ipaddress.IPv6Address(host.decode("ascii")).compressed.encode("ascii"),)
        except (UnicodeDecodeError, ValueError):
            return None


class ConnectionCap(WrappingFactory):
    """
    Closes new connections at once while C{limit} are open, so that a flood
    of idle connections cannot exhaust the process's file descriptors.
    """

    log = Logger()

    def __init__(self, wrappedFactory, limit: int) -> None:
        super().__init__(wrappedFactory)
        self._limit = limit

    def buildProtocol(self, addr):
        if len(self.protocols) >= self._limit:
            self.log.warn(
                "Refused a connection from {client}: {limit} connections are open",
                client=getattr(addr, "host", "-"),
                limit=self._limit,
            )
            return None
        return super().buildProtocol(addr)


def standardHeaders(config: Config, secure: bool) -> List[Tuple[bytes, bytes]]:
    headers = [
        (b"X-Content-Type-Options", b"nosniff"),
        # Deep links carry study UIDs: they must not leak to other sites.
        (b"Referrer-Policy", b"no-referrer"),
    ]
    if secure and config.web.hsts_max_age > 0:
        headers.append((b"Strict-Transport-Security", b"max-age=%d" % (config.web.hsts_max_age,)))
    return headers


def buildWebRoot(config: Config, orthanc) -> WebRoot:
    web = config.web
    if not (web.ohif_root / "index.html").is_file():
        log.error(
            "There is no OHIF viewer in {root} ([web] ohif_root): the site answers 404"
            " until one is unpacked there (packaging/ohif {root})",
            root=str(web.ohif_root),
        )
    viewer = ViewerResource(
        web.ohif_root,
        renderAppConfig(web),
        web.content_security_policy,
        web.cross_origin_isolation,
    )
    root = WebRoot(viewer)
    root.putChild(b"healthz", HealthResource(orthanc))
    return root


def _listener(reactor, address: ListenAddress, factory, name: str) -> StreamServerEndpointService:
    service = StreamServerEndpointService(serverFromString(reactor, address.endpointDescription()), factory)
    service.setName(name)
    # A port that cannot be bound ends the start with its error instead of a
    # log line and a daemon without its listener (twisted.application.strports
    # sets the same attribute).
    service._raiseSynchronously = True
    return service


def buildWebService(config: Config, orthanc, reactor=None, tls: Optional[ServerTLS] = None) -> MultiService:
    """
    The HTTPS listener and, unless disabled, the HTTP one.

    @param orthanc: the supervisor, for /healthz.
    @param tls: the connection creator (default: one for the configured
        certificate); the same object can later be given a new certificate.
    """
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    web = config.web
    tls = tls or ServerTLS(loadServerCertificate(config), [b"http/1.1"])
    service = MultiService()
    site = ApplianceSite(
        buildWebRoot(config, orthanc), standardHeaders(config, True), reactor, web.idle_timeout, web.header_timeout
    )
    https = ConnectionCap(TLSMemoryBIOFactory(tls, False, site), web.max_connections)
    _listener(reactor, web.listen_https, https, "https").setServiceParent(service)
    if web.listen_http is not None:
        redirect = ApplianceSite(
            RedirectToHTTPS(web.listen_https.port),
            standardHeaders(config, False),
            reactor,
            web.idle_timeout,
            web.header_timeout,
        )
        plain = ConnectionCap(redirect, web.max_connections)
        _listener(reactor, web.listen_http, plain, "http").setServiceParent(service)
    return service
