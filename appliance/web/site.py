"""
The HTTPS site, the HTTP listener that only redirects to it, and their services.

    https  AccessGate ── SiteRoot ── the routes of appliance.web.sitemap: /healthz, /login,
                                     /logout, /pacs/, /pacs-admin/, the viewer
    http   RedirectToHTTPS        301 to the same path on https, nothing else

Every HTTPS request is identified (L{appliance.web.request}) before the gate
decides whether its account may reach the resource.
"""

import ipaddress
import tempfile
from functools import partial
from pathlib import Path
from typing import BinaryIO, List, Mapping, Optional, Tuple

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web import http
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from appliance.config import Config
from appliance.connections import ConnectionCap, ConnectionLimits, Listener
from appliance.logs import LINE_FORMAT, oncePerSecond
from appliance.tls import ServerTLS
from appliance.web.appconfig import renderAppConfig
from appliance.orthanc.state import IOrthanc
from appliance.state.database import StateDatabase
from appliance.web.authenticator import Authenticator
from appliance.web.gate import AccessGate
from appliance.web.origins import requestTarget
from appliance.web.health import HealthResource
from appliance.web.login import LoginResource, LogoutResource
from appliance.web.openid import OpenIDProvider
from appliance.web.channel import DeadlineHTTPChannel, HeaderPairs
from appliance.web.request import HOST_NAME, ApplianceRequest
from appliance.web.spool import SpoolQuota
from appliance.web.sitemap import ADMIN, DICOMWEB, SiteMap, archiveRoutes, viewerRoutes
from appliance.web.compressedcopies import COMPRESSED_COPIES, CompressedCopies
from appliance.web.static import ViewerResource


#: One line a request in combined log format, under its own namespace so that
#: operators can filter it in or out.
accessLog = Logger(namespace="appliance.web.access")

log = Logger()


class ApplianceSite(Site):
    """
    The site of a listener: the request layer of L{appliance.web.request}
    under C{resource}, each request logged as one line in combined log
    format through twisted.logger, C{standardHeaders} on every response.

    @param authenticator: identifies each request's sender before any
        resource runs (C{identify(headers, client)}, a Deferred of an account
        or L{None}).
    @param spoolFolder: where bodies too large for memory go, created
        (mode 0700) when the site starts.
    @param maxUploadSize: the largest request body, in bytes.
    @param maxRequestHead: the largest request head (request line and
        headers), in bytes.
    @param siteName: the realm of the 401 given before a body is read.
    @param minBodyRate: the slowest average pace of a request body, in bytes
        a second, after C{headerTimeout} of grace.
    @param gate: judges a request from its head and account before its body
        is read (L{appliance.web.gate.AccessGate.refusalBeforeBody}); without one,
        every body from a known user is read.
    @param spoolQuota: the request bodies held, per account and in all.
    @param handshakeTimeout: how long a TLS handshake may take (the header
        deadline, longer, counts it too); L{None} for plain HTTP.
    @param requestMetrics: told of each request at its end
        (L{appliance.metrics.RequestMetrics}), if given.
    @param auditEvents: told of each request at its end
        (L{appliance.audit.events.AuditEvents}), if given.
    """

    requestFactory = ApplianceRequest
    protocol = DeadlineHTTPChannel

    def __init__(
        self,
        resource: Resource,
        standardHeaders: HeaderPairs,
        reactor,
        idleTimeout: float,
        headerTimeout: float,
        *,
        authenticator,
        spoolFolder: Path,
        maxUploadSize: int,
        maxRequestHead: int,
        siteName: str,
        minBodyRate: int,
        spoolQuota: SpoolQuota,
        gate: Optional[AccessGate] = None,
        handshakeTimeout: Optional[float] = None,
        requestMetrics=None,
        auditEvents=None,
    ) -> None:
        # Resources read request.content themselves: twisted.web would read
        # a form body whole into request.args, even a spooled upload.
        super().__init__(resource, reactor=reactor, timeout=idleTimeout, parsePOSTFormSubmission=False)
        self.standardHeaders = tuple(standardHeaders)
        self.headerTimeout = headerTimeout
        self.authenticator = authenticator
        self.spoolFolder = spoolFolder
        self.maxUploadSize = maxUploadSize
        self.maxRequestHead = maxRequestHead
        self.siteName = siteName
        self.minBodyRate = minBodyRate
        self.spoolQuota = spoolQuota
        self.gate = gate
        self.handshakeTimeout = handshakeTimeout
        self.requestMetrics = requestMetrics
        self.auditEvents = auditEvents

    @classmethod
    def fromConfig(
        cls,
        config: Config,
        resource: Resource,
        reactor,
        authenticator,
        secure: bool,
        spoolQuota: Optional[SpoolQuota] = None,
        requestMetrics=None,
        auditEvents=None,
    ) -> "ApplianceSite":
        """
        The site of C{resource} with the limits, timeouts and spool folder of
        C{config}; C{secure} for the HTTPS listener.  When C{resource} is the
        access gate, it also judges each request before its body.

        @param spoolQuota: the shares of the spool, if another listener shares
            them (by default, this site's own).
        """
        web = config.web
        if spoolQuota is None:
            spoolQuota = SpoolQuota(web.max_spool_per_account, web.max_spool)
        return cls(
            resource,
            standardHeaders(config, secure),
            reactor,
            web.idle_timeout,
            web.header_timeout,
            authenticator=authenticator,
            spoolFolder=config.appliance.state_dir / "spool",
            maxUploadSize=web.max_upload_size,
            maxRequestHead=web.max_request_head,
            siteName=web.site_name,
            minBodyRate=web.min_body_rate,
            spoolQuota=spoolQuota,
            gate=resource if isinstance(resource, AccessGate) else None,
            handshakeTimeout=web.handshake_timeout if secure else None,
            requestMetrics=requestMetrics,
            auditEvents=auditEvents,
        )

    def startFactory(self) -> None:
        super().startFactory()
        self.spoolFolder.mkdir(mode=0o700, parents=True, exist_ok=True)
        # An existing folder keeps the modes it was made with.
        self.spoolFolder.chmod(0o700)

    def openSpoolFile(self) -> BinaryIO:
        """
        A new file for a request body in the spool folder.  It has no name
        (O_TMPFILE on Linux), so it disappears when closed, and when the
        process dies: nothing is left behind, even after a crash.
        """
        return tempfile.TemporaryFile(dir=self.spoolFolder)

    def buildProtocol(self, addr) -> DeadlineHTTPChannel:
        channel = super().buildProtocol(addr)
        channel.headerTimeout = self.headerTimeout
        channel.handshakeTimeout = self.handshakeTimeout
        channel.minBodyRate = self.minBodyRate
        channel.stallTimeout = self.timeOut
        # twisted.web allows 16 KiB for the whole head and for each line;
        # OHIF opening many studies sends longer query strings.
        channel.totalHeadersSize = channel.MAX_LENGTH = self.maxRequestHead
        return channel

    def log(self, request: Request) -> None:
        if self.requestMetrics is not None:
            self.requestMetrics.observe(
                request.path,
                request.method,
                request.code,
                self.reactor.seconds() - getattr(request, "startedAt", self.reactor.seconds()),
                getattr(request, "receivedLength", 0),
                request.sentLength,
            )
        if self.auditEvents is not None:
            self.auditEvents.requestEnded(request)
        accessLog.info(
            LINE_FORMAT,
            line=accessLogLine(_logTime(self.reactor.seconds()), request),
            method=request.method.decode("latin-1"),
            uri=withoutQuery(request.uri).decode("latin-1"),
            code=request.code,
            length=request.sentLength,
        )


_logTime = oncePerSecond(http.datetimeToLogString)


def withoutQuery(uri: bytes) -> bytes:
    """
    C{uri} with its query, if any, replaced by C{?...}: DICOMweb searches put
    patient names and birth dates there, which have no place in the journal.
    """
    path, mark, _ = uri.partition(b"?")
    return path + b"?..." if mark else path


def _logText(value: bytes) -> str:
    # Client-chosen bytes: control characters and quotes must not forge lines
    # or fields.
    return value.decode("latin-1").encode("unicode_escape").decode("ascii").replace('"', '\\"')


def accessLogLine(timestamp: str, request: Request) -> str:
    """
    C{request} in combined log format, with its account's name as the user,
    and neither its query nor its referrer's (see L{withoutQuery}).
    """
    client = request.getClientAddress()
    account = getattr(request, "account", None)
    referrer = request.getHeader(b"referer")
    return '"{}" - {} {} "{} {} {}" {} {} "{}" "{}"'.format(
        _logText(getattr(client, "host", "-").encode("latin-1")),
        # A directory's or a provider's names are not the users file's: no
        # space may split the field either.
        _logText(account.label.encode("utf-8")).replace(" ", "\\x20") if account is not None else "-",
        timestamp,
        _logText(request.method),
        _logText(withoutQuery(request.uri)),
        _logText(request.clientproto),
        request.code,
        request.sentLength or "-",
        _logText(withoutQuery(referrer)) if referrer else "-",
        _logText(request.getHeader(b"user-agent") or b"-"),
    )


class NoCredentials:
    """
    The authenticator of the plain-HTTP listener, which only redirects to
    HTTPS: everyone is anonymous there, and credentials sent in clear are
    not even looked at.
    """

    def identify(self, headers, client) -> Deferred:
        return succeed(None)


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
        target = requestTarget(request)
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
        if HOST_NAME.fullmatch(host):
            return host
        try:
            return b"[%s]" % (ipaddress.IPv6Address(host.decode("ascii")).compressed.encode("ascii"),)
        except (UnicodeDecodeError, ValueError):
            return None


def standardHeaders(config: Config, secure: bool) -> List[Tuple[bytes, bytes]]:
    headers = [
        (b"X-Content-Type-Options", b"nosniff"),
        # Deep links carry study UIDs: they must not leak to other sites.
        (b"Referrer-Policy", b"same-origin"),
    ]
    if secure and config.web.hsts_max_age > 0:
        headers.append((b"Strict-Transport-Security", b"max-age=%d" % (config.web.hsts_max_age,)))
    return headers


def compressedCopies(config: Config, reactor) -> CompressedCopies:
    """
    The gzip copies of the viewer's files, under C{state_dir}, made in the
    threads of C{reactor}.
    """
    runInThread = partial(deferToThreadPool, reactor, reactor.getThreadPool())
    return CompressedCopies(config.appliance.state_dir / COMPRESSED_COPIES, runInThread)


def viewerResource(config: Config, copies: Optional[CompressedCopies] = None) -> ViewerResource:
    """
    The OHIF build of C{config}, with its generated C{app-config.js}; with
    gzip copies made in C{copies} of its files that have none.
    """
    web = config.web
    if not (web.ohif_root / "index.html").is_file():
        log.error(
            "There is no OHIF viewer in {root} ([web] ohif_root): the site answers 404"
            " until one is unpacked there (packaging/ohif {root})",
            root=str(web.ohif_root),
        )
    return ViewerResource(
        web.ohif_root, renderAppConfig(web), web.content_security_policy, web.cross_origin_isolation, copies
    )


def buildWebRoot(config: Config, orthanc: IOrthanc) -> Resource:
    """
    A site without accounts: C{/healthz} and the viewer (the routes of
    L{viewerRoutes}).
    """
    return SiteMap(viewerRoutes(HealthResource(orthanc, config.appliance.node_name), viewerResource(config))).root()


def buildSiteResource(
    config: Config,
    orthanc: IOrthanc,
    database: StateDatabase,
    authenticator: Authenticator,
    proxyRoutes: Mapping[bytes, Resource],
    copies: Optional[CompressedCopies] = None,
    provider: Optional[OpenIDProvider] = None,
    reactor=None,
    metrics: Optional[Resource] = None,
) -> AccessGate:
    """
    The daemon's HTTPS site: every route of L{appliance.web.sitemap}, the
    proxy's to Orthanc among them (C{proxyRoutes}, by segment), behind the
    access gate; the viewer's compressed copies in C{copies}; the single
    sign-on of C{provider}, if any, on the login page; C{metrics} at
    C{/metrics} (without one, it answers 404).
    """
    health = HealthResource(orthanc, config.appliance.node_name, database)
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    singleSignOn = (provider, database, reactor) if provider is not None else None
    routes = viewerRoutes(health, viewerResource(config, copies)) + archiveRoutes(
        LoginResource(authenticator, config.web, singleSignOn),
        LogoutResource(authenticator, config.web, provider),
        proxyRoutes[DICOMWEB],
        proxyRoutes[ADMIN],
        metrics if metrics is not None else notFound("No such page.", "This site keeps no metrics."),
    )
    return AccessGate(SiteMap(routes), authenticator, config.web, config.metrics.scrape_users)


def buildWebService(
    config: Config,
    resource: Resource,
    authenticator,
    tls: ServerTLS,
    reactor=None,
    onClosed=None,
    spoolQuota: Optional[SpoolQuota] = None,
    requestMetrics=None,
    auditEvents=None,
) -> MultiService:
    """
    The HTTPS listener serving C{resource} and, unless disabled, the HTTP
    one that redirects to it.

    @param resource: the site's root (L{buildSiteResource} for the daemon).
    @param authenticator: identifies the sender of each HTTPS request
        (L{appliance.web.authenticator.Authenticator}) before C{resource} sees it.
    @param tls: the connection creator; the same object can later be given
        a new certificate.
    @param spoolQuota: the shares of the request bodies being received (by
        default, new ones from C{[web]}).
    @param requestMetrics: told of each HTTPS request at its end.
    @param auditEvents: told of each HTTPS request at its end.
    """
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    web = config.web
    service = MultiService()
    # One spool, whichever listener a body comes through.
    quota = spoolQuota if spoolQuota is not None else SpoolQuota(web.max_spool_per_account, web.max_spool)
    site = ApplianceSite.fromConfig(config, resource, reactor, authenticator, True, quota, requestMetrics, auditEvents)
    https = ConnectionCap(
        TLSMemoryBIOFactory(tls, False, site),
        ConnectionLimits(web.max_connections, web.max_connections_per_address, "HTTPS", "web", reactor),
        onClosed,
    )
    Listener(reactor, web.listen_https, https, "https").setServiceParent(service)
    if web.listen_http is not None:
        redirect = ApplianceSite.fromConfig(
            config, RedirectToHTTPS(web.listen_https.port), reactor, NoCredentials(), False, quota
        )
        plain = ConnectionCap(
            redirect,
            ConnectionLimits(web.max_connections, web.max_connections_per_address, "HTTP", "web", reactor),
            onClosed,
        )
        Listener(reactor, web.listen_http, plain, "http").setServiceParent(service)
    return service
