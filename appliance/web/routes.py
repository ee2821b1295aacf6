"""
The two doors to Orthanc, and what each lets through.

    /pacs/...        Orthanc's DICOMweb API (DicomWeb.Root is /pacs/ there too):
                     QIDO-RS, WADO-RS, STOW-RS, WADO-URI; optional CORS
    /pacs-admin/...  Orthanc's HTTP root (Orthanc Explorer and the REST API),
                     with redirects and cookies kept under /pacs-admin/, and
                     only the routes its table allows (appliance.web.adminroutes)

Every path is resolved the way Orthanc's HTTP server (civetweb) will
understand it (percent-decoded, an encoded slash separating too, empty and dot
segments resolved) and sent to Orthanc re-encoded from that resolution, so
what the policy checked is exactly what Orthanc serves.  Orthanc's "method
faking" (an C{X-HTTP-Method-Override} header, or C{?_method=} on a GET) is
refused: it would let a GET change things behind the appliance's back.  A
request whose head Orthanc's web server could not read whole (over 16 KiB, or
too many headers) is answered 414 or 431 here.
"""

import re
from dataclasses import dataclass
from functools import partial
from typing import Dict, Optional, Tuple
from urllib.parse import quote, unquote_to_bytes

from twisted.logger import Logger
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from appliance.config import Config
from appliance.orthanc.space import StorageSpace
from appliance.orthanc.state import IOrthanc
from appliance.web.adminroutes import RouteTable
from appliance.state.database import StateDatabase
from appliance.web.cors import CorsPolicy
from appliance.web.metadatacache import MetadataCache, MetadataKey
from appliance.web.orthancrest import OrthancRest
from appliance.web.pages import describeSize, jsonError
from appliance.web.proxy import OrthancProxy
from appliance.web.turns import MAX_ORTHANC_REQUESTS
from appliance.web.sitemap import ADMIN, DICOMWEB, SAFE_METHODS

#: The DICOMweb resources of Orthanc's plugin that clients use: the plugin's
#: own client (C{servers}) and its pages (C{app}) are for administrators.
DICOMWEB_RESOURCES = frozenset({b"studies", b"series", b"instances", b"wado"})

STOW_METHODS = (b"GET", b"HEAD", b"POST", b"OPTIONS")
ADMIN_METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS")

#: A path segment, re-encoded: what RFC 3986 allows unencoded in a segment,
#: except the characters some parser might treat as a separator.
_SEGMENT_SAFE = "-._~!$'()*+,=:@"

#: A query string as it may be passed on: printable ASCII, no space.
_QUERY = re.compile(rb"[\x21-\x7e]*")

_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")

#: Wildcard for one path segment in L{READING_WRITES}.
ANY = None


#: What Orthanc's web server (CivetWeb 1.15 on Debian 12) reads of a request
#: head, measured: beyond 16 KiB it answers 400 "Malformed message", and beyond
#: about 64 header lines it ignores the rest, the appliance's credentials
#: among them, so that Orthanc answers 401.
ORTHANC_MAX_HEAD = 16 * 1024
ORTHANC_MAX_HEADERS = 64

#: What the proxy adds to a request's head on its way to Orthanc (Host,
#: Orthanc's credentials, Forwarded and X-Forwarded-*, Content-Length), at most.
PROXY_HEAD_LINES = 8
PROXY_HEAD_BYTES = 1024

#: Request Header Fields Too Large (RFC 6585), which twisted.web.http does not name.
HEADERS_TOO_LARGE = 431


#: Orthanc's POST endpoints that write nothing into the archive: every other
#: POST or PUT on /pacs-admin may (uploads, STOW-RS, create-dicom, modify,
#: anonymize, merge, split, retrieves from other nodes, attachments), and is
#: refused while its storage is full.  Deleting, which frees space, goes on.
READING_WRITES = (
    (b"tools", b"find"),
    (b"tools", b"lookup"),
    (b"tools", b"create-archive"),
    (b"tools", b"create-media"),
    (b"tools", b"create-media-extended"),
    (b"modalities", ANY, b"echo"),
    (b"modalities", ANY, b"query"),
    (b"modalities", ANY, b"store"),
    (b"peers", ANY, b"store"),
    (DICOMWEB, b"servers", ANY, b"stow"),
)


def isStow(segments: Tuple[bytes, ...]) -> bool:
    """
    Whether C{segments}, under Orthanc's DICOMweb root, are a STOW-RS
    resource: C{studies} or C{studies/{StudyInstanceUID}}.  Without case,
    as L{_matches}: it takes in at least every route Orthanc would serve.
    """
    return 1 <= len(segments) <= 2 and segments[0].lower() == b"studies"


def _matches(target: "Target", pattern: Tuple[Optional[bytes], ...]) -> bool:
    """
    Whether C{target}'s path starts with C{pattern} (L{ANY} matching any
    segment).  Orthanc's routes are case-sensitive; comparing without case
    matches at least everything Orthanc would serve.
    """
    segments = target.segments
    return len(segments) >= len(pattern) and all(
        wanted is ANY or wanted == segment.lower() for wanted, segment in zip(pattern, segments)
    )


class BadPath(Exception):
    """
    The request's path or query cannot be passed on; the message says why.
    """


@dataclass(frozen=True)
class Target:
    """
    Where a request goes, as Orthanc will understand it.

    @ivar segments: the decoded path segments after the route's mount.
    @ivar trailingSlash: whether the path ends with a slash.
    @ivar query: the query string as sent, with its C{?}, or empty.
    """

    segments: Tuple[bytes, ...]
    trailingSlash: bool
    query: bytes

    def upstream(self, *prefix: bytes) -> bytes:
        """
        The path and query to ask Orthanc for, under the segments C{prefix}.
        """
        segments = prefix + self.segments
        path = b"/" + b"/".join(quote(segment, safe=_SEGMENT_SAFE).encode("ascii") for segment in segments)
        if self.trailingSlash and segments:
            path += b"/"
        return path + self.query


#: A path segment Orthanc's web server (civetweb) reads exactly as we do.
#: It takes a backslash (raw or %5C) for a slash and drops the dots that end
#: a segment (C{/tools/shutdown.} is C{/tools/shutdown}): either would let a
#: path past the checks made here on its decoded form.  UIDs, Orthanc's
#: identifiers and its REST paths need nothing beyond RFC 3986's path
#: characters.
_SEGMENT = re.compile(rb"\.\.|[A-Za-z0-9_~!$&'()*+,;=:@.-]*[A-Za-z0-9_~!$&'()*+,;=:@-]")


def resolveTarget(request: Request, mount: bytes) -> Target:
    """
    The L{Target} of C{request}, which the site routed to C{mount}.

    @raise BadPath: for an invalid percent-encoding, a NUL, a path that climbs
        out of the mount, a query with raw non-ASCII or control characters,
        or Orthanc's method faking.
    """
    raw = request.path
    if not raw.startswith(b"/"):
        raise BadPath("The request's path must start with a slash.")
    if _BAD_ESCAPE.search(raw):
        raise BadPath("The request's path has an invalid percent-encoding.")
    decoded = unquote_to_bytes(raw)
    if b"\0" in decoded:
        raise BadPath("The request's path contains a NUL character.")
    segments = []
    parts = decoded.split(b"/")[1:]
    for part in parts:
        if part in (b"", b"."):
            continue
        if not _SEGMENT.fullmatch(part):
            raise BadPath(
                "The request's path has a segment Orthanc would read differently (a backslash, a"
                " character outside URL path characters, or a trailing dot)."
            )
        if part == b"..":
            if len(segments) <= 1:
                raise BadPath(f"The request's path leaves /{mount.decode('ascii')}/.")
            segments.pop()
            continue
        segments.append(part)
    if segments[:1] != [mount]:
        raise BadPath(f"The request's path leaves /{mount.decode('ascii')}/.")
    _, question, query = request.uri.partition(b"?")
    if not _QUERY.fullmatch(query):
        raise BadPath("The query string has characters that must be percent-encoded.")
    if b"\0" in unquote_to_bytes(query):
        # Orthanc's web server would cut the query short there.
        raise BadPath("The query string contains a NUL character.")
    if request.requestHeaders.hasHeader(b"X-HTTP-Method-Override") or _fakesMethod(query):
        raise BadPath(
            "Method overrides (X-HTTP-Method-Override, _method) are not accepted; send the method itself."
        )
    trailingSlash = parts[-1] in (b"", b".", b"..")
    return Target(tuple(segments[1:]), trailingSlash, question + query)


def _fakesMethod(query: bytes) -> bool:
    for argument in query.split(b"&"):
        name = unquote_to_bytes(argument.partition(b"=")[0].replace(b"+", b" "))
        if name.strip().lower() == b"_method":
            return True
    return False


def tooLargeForOrthanc(request: Request, upstream: bytes) -> Optional[bytes]:
    """
    If Orthanc could not read C{request} sent to C{upstream} (the path and
    query asked of it), prepare a 431 or 414 answer with a sentence and return
    its body; else L{None}.  The client's headers are all counted, even those
    the proxy drops.
    """
    headers = [(name, value) for name, values in request.requestHeaders.getAllRawHeaders() for value in values]
    limit = describeSize(ORTHANC_MAX_HEAD)
    size = len(request.method) + len(upstream) + PROXY_HEAD_BYTES
    if len(headers) + PROXY_HEAD_LINES > ORTHANC_MAX_HEADERS:
        status = HEADERS_TOO_LARGE
        sentence = f"The request has more than the {ORTHANC_MAX_HEADERS - PROXY_HEAD_LINES} headers the archive reads."
    elif size > ORTHANC_MAX_HEAD:
        status = http.REQUEST_URI_TOO_LONG
        sentence = (
            f"The request's URL is too long for the archive, which reads {limit} of URL and headers:"
            " ask for less at once."
        )
    elif size + sum(len(name) + len(value) + len(b": \r\n") for name, value in headers) > ORTHANC_MAX_HEAD:
        status = HEADERS_TOO_LARGE
        sentence = f"The request's headers are too large for the archive, which reads {limit} of URL and headers."
    else:
        return None
    return jsonError(request, status, sentence)


def notAllowed(request: Request, allowed: Tuple[bytes, ...]) -> bytes:
    """
    A 405 answer listing the C{allowed} methods.
    """
    methods = b", ".join(allowed)
    request.setHeader(b"Allow", methods)
    sentence = f"{request.method.decode('latin-1')} is not allowed here (allowed: {methods.decode('ascii')})."
    return jsonError(request, http.NOT_ALLOWED, sentence)


class PacsResource(Resource):
    """
    C{/pacs/...}: Orthanc's DICOMweb API, for the viewer and API clients;
    study and series metadata from C{metadata}, the cache, when it can
    answer them (L{appliance.web.metadatacache}).
    """

    isLeaf = True

    def __init__(self, proxy: OrthancProxy, cors: CorsPolicy, metadata: Optional[MetadataCache] = None) -> None:
        super().__init__()
        self._proxy = proxy
        self._cors = cors
        self._metadata = metadata

    def render(self, request: Request):
        self._cors.decorate(request)
        if request.method == b"OPTIONS":
            return self._cors.answerOptions(request)
        try:
            target = resolveTarget(request, DICOMWEB)
        except BadPath as error:
            return jsonError(request, http.BAD_REQUEST, str(error))
        if not target.segments or target.segments[0] not in DICOMWEB_RESOURCES:
            return jsonError(request, http.NOT_FOUND, "This is not a DICOMweb resource of the archive.")
        stow = isStow(target.segments)
        allowed = STOW_METHODS if stow else SAFE_METHODS
        if request.method not in allowed:
            return notAllowed(request, allowed)
        upstream = target.upstream(DICOMWEB)
        refusal = tooLargeForOrthanc(request, upstream)
        if refusal is not None:
            return refusal
        uploads = stow and request.method == b"POST"
        key = MetadataKey.fromSegments(target.segments) if not target.query and not target.trailingSlash else None
        if self._metadata is not None and key is not None:
            return self._metadata.answer(request, key, lambda: self._proxy.forward(request, upstream))
        return self._proxy.forward(request, upstream, stores=uploads, stow=uploads)


#: The Content-Security-Policy of Orthanc Explorer's pages (Orthanc 1.10.1's
#: explorer.html: jQuery 1.7 and jQuery Mobile 1.1), found with headless
#: Chromium through each of its pages and actions, violations reported:
#:   - scripts: its own files, and the one inline handler of the upload
#:     button (C{$('#fileupload').click()}), by its hash;
#:   - style elements: its own style sheets, and the two that jQuery Mobile
#:     inserts to test the browser (by their hashes: blocked, it takes the
#:     browser for an unsupported one and builds no page);
#:   - style attributes: inline, as its markup and its libraries write them
#:     at run time (a style runs nothing);
#:   - its own images; requests to Orthanc's REST API only; no form is ever
#:     submitted (uploads go by XMLHttpRequest); jQuery Mobile's own <base>;
#:     no other site may frame it.
ORTHANC_EXPLORER_POLICY = (
    b"default-src 'none'; script-src 'self' 'unsafe-hashes' 'sha256-Sii8hGRfSHoJ5vCqzknXRD7Kn5fF/c8F8MpnZ8aUqFc=';"
    b" style-src 'self' 'sha256-+6rqrHwM0iNbWs+08gR3sxT4/H+IRXQV5XSfsge+AsI='"
    b" 'sha256-KHi2lMak6BG2zxgTIQUBn6hWbOxbIEVC56WJ+f1AEBA='; style-src-attr 'unsafe-inline'; img-src 'self';"
    b" connect-src 'self'; base-uri 'self'; form-action 'none'; frame-ancestors 'none'"
)

#: The policy of the DICOMweb plugin's client (Vue 2.6, opened from
#: Explorer's plugin page), found the same way: its page template is
#: compiled in the browser (C{new Function}: 'unsafe-eval'), it has one
#: style element of its own (by its hash), and loads its own fonts and
#: data: images.
DICOMWEB_CLIENT_POLICY = (
    b"default-src 'none'; script-src 'self' 'unsafe-eval';"
    b" style-src 'self' 'sha256-ROG1VnQz01Y4QM0wyOYNKFTjMaR1dmkehQw9jPXubkg='; style-src-attr 'unsafe-inline';"
    b" img-src 'self' data:; font-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none';"
    b" frame-ancestors 'none'"
)

#: Where Orthanc's own web applications keep their pages, and the policy of
#: each: Orthanc Explorer, and the DICOMweb plugin's client.
ORTHANC_PAGES = (
    ((DICOMWEB, b"app"), DICOMWEB_CLIENT_POLICY),
    ((b"app",), ORTHANC_EXPLORER_POLICY),
)


def pagePolicy(method: bytes, target: Target) -> Optional[bytes]:
    """
    The policy under which C{target} may be answered with a page of one of
    Orthanc's own web applications (read with GET or HEAD); L{None} if it
    may not be answered with a page.
    """
    if method not in (b"GET", b"HEAD"):
        return None
    for prefix, policy in ORTHANC_PAGES:
        if target.segments[: len(prefix)] == prefix:
            return policy
    return None


class PacsAdminResource(Resource):
    """
    C{/pacs-admin/...}: Orthanc's HTTP API and Orthanc Explorer, for
    administrators: the routes C{table} allows, or every one with
    C{allowUnsafe}.
    """

    isLeaf = True
    log = Logger()
    prefix = b"/" + ADMIN

    def __init__(self, proxy: OrthancProxy, allowUnsafe: bool, table: RouteTable, audit=None) -> None:
        """
        @param audit: the audit trail's events
            (L{appliance.audit.events.AuditEvents}), told of deletions.
        """
        super().__init__()
        self._proxy = proxy
        self._allowUnsafe = allowUnsafe
        self._table = table
        self._audit = audit

    def render(self, request: Request):
        if request.method == b"OPTIONS":
            request.setResponseCode(http.NO_CONTENT)
            request.setHeader(b"Allow", b", ".join(ADMIN_METHODS))
            return b""
        if request.method not in ADMIN_METHODS:
            return notAllowed(request, ADMIN_METHODS)
        try:
            target = resolveTarget(request, ADMIN)
        except BadPath as error:
            return jsonError(request, http.BAD_REQUEST, str(error))
        if not target.segments and not target.trailingSlash:
            # Orthanc's pages use relative links: they need the slash.
            request.setResponseCode(http.MOVED_PERMANENTLY)
            request.setHeader(b"Location", self.prefix + b"/" + target.query)
            request.setHeader(b"Content-Length", b"0")
            return b""
        refusal = self._refusal(request.method, target)
        if refusal is not None:
            account = getattr(request, "account", None)
            self.log.warn(
                "Refused {method} {path} to {user}: {why} ([web] admin_unsafe_endpoints is no)",
                method=request.method.decode("latin-1"),
                path=request.path.decode("latin-1"),
                user=account.label if account is not None else "-",
                why=refusal,
            )
            return jsonError(
                request,
                http.FORBIDDEN,
                f"{refusal}; the appliance refuses it unless [web] admin_unsafe_endpoints is yes.",
            )
        upstream = target.upstream()
        refusal = tooLargeForOrthanc(request, upstream)
        if refusal is not None:
            return refusal
        stores = request.method in (b"POST", b"PUT") and not any(
            _matches(target, pattern) for pattern in READING_WRITES
        )
        # STOW-RS to Orthanc's DICOMweb root under Orthanc's own API.
        stow = (
            request.method == b"POST"
            and target.segments[:1] == (DICOMWEB,)
            and isStow(target.segments[1:])
        )
        forwarding = partial(
            self._proxy.forward,
            request,
            upstream,
            self.rewriteHeader,
            stores=stores,
            pagePolicy=pagePolicy(request.method, target),
            stow=stow,
        )
        finding = None
        if self._audit is not None:
            self._audit.beforeForwarding(request, target.segments)
            finding = self._audit.beforeChange(request.method, target.segments)
        if finding is None:
            return forwarding()

        def found(change) -> None:
            # The audit trail names what changed, as it was before.
            request.auditedChange = change
            forwarding()

        finding.addCallback(found).addErrback(
            lambda failure: self.log.failure("Could not forward a deletion", failure)
        )
        return NOT_DONE_YET

    def _refusal(self, method: bytes, target: Target) -> Optional[str]:
        """
        Why the table refuses C{method} on C{target}, in a sentence's first
        half; L{None} if it is allowed.
        """
        if self._allowUnsafe:
            return None
        route = self._table.decide(method, target.segments)
        if route is None:
            return "This is no route of Orthanc 1.10 that the appliance knows"
        if not route.allowed:
            return f"This Orthanc endpoint {route.reason}"
        return None

    def rewriteHeader(self, name: bytes, value: bytes) -> Optional[bytes]:
        """
        Keep Orthanc's redirects and cookies under /pacs-admin/.
        """
        if name in (b"location", b"content-location"):
            return self._rewriteLocation(value)
        if name == b"set-cookie":
            return self._rewriteCookie(value)
        return value

    _ORTHANC_URL = re.compile(
        rb"(?i:https?)://(?:127\.0\.0\.1|localhost|\[::1\])(?::[0-9]+)?(?P<path>/[^\s]*)?"
    )

    def _rewriteLocation(self, value: bytes) -> bytes:
        absolute = self._ORTHANC_URL.fullmatch(value.strip())
        if absolute is not None:
            return self.prefix + (absolute.group("path") or b"/")
        if value.startswith(b"/") and not value.startswith(b"//"):
            return self.prefix + value
        # Relative references resolve under /pacs-admin/ already.
        return value

    def _rewriteCookie(self, value: bytes) -> bytes:
        nameValue, *attributes = value.split(b";")
        kept = [nameValue.strip()]
        path = b"/"
        for attribute in attributes:
            key = attribute.partition(b"=")[0].strip().lower()
            if key == b"path":
                given = attribute.partition(b"=")[2].strip()
                path = given if given.startswith(b"/") else b"/"
            elif key != b"domain":
                # A Domain would share the cookie with other hosts.
                kept.append(attribute.strip())
        kept.insert(1, b"Path=" + self.prefix + path)
        return b"; ".join(kept)


def buildProxyResources(
    config: Config,
    orthanc: IOrthanc,
    space: StorageSpace,
    reactor=None,
    maxRequests: int = MAX_ORTHANC_REQUESTS,
) -> Tuple[OrthancProxy, Dict[bytes, Resource]]:
    """
    The proxy to Orthanc and the resources of its two routes, by segment,
    without a metadata cache.  The proxy is a service: add it to the
    daemon's service tree so that its connections to Orthanc are closed when
    it stops.

    @param orthanc: Orthanc's state and credentials.
    @param space: the free space of Orthanc's storage (see L{OrthancProxy}).
    @param maxRequests: how many exchanges with Orthanc may be under way at a
        time (see L{OrthancProxy}).
    """
    proxy = OrthancProxy(config, orthanc, space, reactor, maxRequests)
    return proxy, proxyResources(config, proxy)


def proxyResources(
    config: Config, proxy: OrthancProxy, metadata: Optional[MetadataCache] = None, audit=None
) -> Dict[bytes, Resource]:
    """
    The resources of the proxy's two routes, by segment; /pacs answers the
    metadata resources from C{metadata} if given; /pacs-admin tells
    C{audit} of deletions, if given.
    """
    return {
        DICOMWEB: PacsResource(proxy, CorsPolicy(config.web.cors_allowed_origins, STOW_METHODS), metadata),
        ADMIN: PacsAdminResource(proxy, config.web.admin_unsafe_endpoints, RouteTable.load(), audit),
    }


def metadataCache(config: Config, proxy: OrthancProxy, database: StateDatabase, reactor) -> Optional[MetadataCache]:
    """
    The metadata cache of [web] metadata_cache_size (a service), if any.
    """
    if not config.web.metadata_cache_size:
        return None
    rest = OrthancRest(proxy)
    return MetadataCache(rest, database, config.web.metadata_cache_size, config.appliance.node_name, reactor)
