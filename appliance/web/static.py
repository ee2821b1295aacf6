"""
The OHIF viewer's files, served the way a careful nginx operator would.

    /app-config.js           generated from our configuration (appconfig.py)
    /some/file.ext           the file under ohif_root, or 404
    /viewer, /viewer/x, /    index.html: OHIF routes in the browser (SPA fallback)

Every file is described once by an L{appliance.web.assets.Asset} (type,
caching, validators and its precompressed variants), cached and revalidated
with one C{stat} a request.  Small representations are kept in memory; large
bundles are streamed by a producer the transport pauses, so a slow client
holds one buffer, not the file.  Paths that try to leave the root are refused
and logged.
"""

import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from appliance.web.assets import Asset, AssetCatalog, Representation, generatedAsset, inlineScriptHashes
from appliance.web.compressedcopies import CompressedCopies
from appliance.web.methods import answerOtherMethod, isRead
from appliance.web.streaming import registerStreamingProducer

INDEX = "index.html"
APP_CONFIG = "app-config.js"

#: What makes a name a file name.  A numeric suffix does not: the last segment
#: of a deep link may be a DICOM UID (1.2.840...).
_EXTENSION = re.compile(r"\.[A-Za-z][A-Za-z0-9]*$")

class BadPath(Exception):
    """
    The request path tries to leave the root or is not a plain path.
    """


def checkedPath(segments: List[bytes]) -> str:
    """
    The relative file path named by the decoded path C{segments}.

    @raise BadPath: for dot segments, encoded slashes, backslashes, control
        characters, a C{%} left after decoding (double encoding), empty
        segments inside the path, or bytes that are not UTF-8.
    """
    names = []
    for index, segment in enumerate(segments):
        if segment == b"":
            if index == len(segments) - 1:
                continue
            raise BadPath("empty path segment")
        if segment in (b".", b".."):
            raise BadPath("dot segment")
        if any(byte < 0x20 or byte == 0x7F for byte in segment):
            raise BadPath("control character")
        for forbidden in (b"/", b"\\", b"%"):
            if forbidden in segment:
                raise BadPath(f"{forbidden.decode()} inside a segment")
        try:
            names.append(segment.decode("utf-8"))
        except UnicodeDecodeError:
            raise BadPath("not UTF-8")
    return "/".join(names)


def _entityTags(header: bytes) -> List[bytes]:
    return [tag.strip().removeprefix(b"W/") for tag in header.split(b",") if tag.strip()]


def _byteRange(header: bytes, size: int) -> Optional[Tuple[int, int]]:
    """
    The one range C{header} asks for, as (first, last) within C{size}; L{None}
    when the header is to be ignored (malformed or several ranges: the whole
    file is then a valid answer).

    @raise ValueError: if the range is well formed but outside the file.
    """
    match = re.fullmatch(rb"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:
        suffix = int(last)
        if suffix == 0:
            raise ValueError("empty suffix range")
        return max(size - suffix, 0), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size:
        raise ValueError("range starts after the end")
    if end < start:
        return None
    return start, min(end, size - 1)


def acceptedValues(header: Optional[bytes]) -> Dict[bytes, float]:
    """
    The values a negotiation header (Accept-Encoding, Accept) lists, lower
    case and without their parameters, with their quality.
    """
    accepted: Dict[bytes, float] = {}
    for item in (header or b"").split(b","):
        coding, _, parameters = item.strip().partition(b";")
        if not coding:
            continue
        quality = 1.0
        match = re.search(rb"q\s*=\s*([0-9.]+)", parameters)
        if match:
            try:
                quality = float(match.group(1))
            except ValueError:
                quality = 0.0
        accepted[coding.strip().lower()] = quality
    return accepted


def chooseRepresentation(asset: Asset, acceptEncoding: Optional[bytes]) -> Representation:
    accepted = acceptedValues(acceptEncoding)
    for representation in asset.representations:
        if representation.encoding is None:
            return representation
        quality = accepted.get(representation.encoding, accepted.get(b"*", 0.0))
        if quality > 0:
            return representation
    raise AssertionError("an asset always has its identity representation")


class ViewerResource(Resource):
    """
    The viewer's files under C{root}, at the root of the site.

    @param appConfig: the text of the generated C{app-config.js}.
    @param contentSecurityPolicy: the policy from the configuration; the hashes
        of index.html's inline scripts are added to its C{script-src}.
    @param crossOriginIsolation: send COOP/COEP so the viewer may use
        SharedArrayBuffer.
    @param copies: where gzip copies are made of the compressible files that
        the build ships without one; L{None}: they are sent as they are.
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        root: Path,
        appConfig: bytes,
        contentSecurityPolicy: str,
        crossOriginIsolation: bool,
        copies: Optional[CompressedCopies] = None,
    ) -> None:
        super().__init__()
        self._catalog = AssetCatalog(root, copies)
        self._appConfig = generatedAsset(APP_CONFIG, appConfig)
        self._policy = contentSecurityPolicy
        self._policyFor: Tuple[Optional[Asset], bytes] = (None, b"")
        self._isolation = crossOriginIsolation

    def render(self, request: Request) -> bytes:
        if not isRead(request):
            return answerOtherMethod(request)
        try:
            relative = checkedPath(request.postpath)
        except BadPath as reason:
            self.log.warn(
                "Refused path {path!r} from {client}: {reason}",
                path=request.uri.decode("latin-1"),
                client=request.getClientAddress().host if request.getClientAddress() else "-",
                reason=str(reason),
            )
            return self._refuse(request, http.BAD_REQUEST, b"Bad path.\n")
        asset = self._find(relative)
        if asset is None:
            return self._refuse(request, http.NOT_FOUND, b"Not found.\n")
        self._securityHeaders(request)
        return self._serve(request, asset)

    def _find(self, relative: str) -> Optional[Asset]:
        if relative == APP_CONFIG:
            return self._appConfig
        name = relative.rpartition("/")[2]
        if "/." in "/" + relative:
            # Hidden files and folders anywhere in the path (the build's
            # stamp, editor leftovers, a .git) are not part of it.
            return None
        asset = self._catalog.find(relative) if relative else None
        if asset is None and not _EXTENSION.search(name):
            # A route of the viewer, not a file: the browser-side router takes it.
            return self._catalog.find(INDEX)
        return asset

    def _refuse(self, request: Request, code: int, message: bytes) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        return message

    def _securityHeaders(self, request: Request) -> None:
        request.setHeader(b"Content-Security-Policy", self._contentSecurityPolicy())
        if self._isolation:
            request.setHeader(b"Cross-Origin-Opener-Policy", b"same-origin")
            request.setHeader(b"Cross-Origin-Embedder-Policy", b"require-corp")
        request.setHeader(b"Cross-Origin-Resource-Policy", b"same-origin")

    def _contentSecurityPolicy(self) -> bytes:
        """
        The policy with the current index.html's inline scripts allowed; made
        again only when index.html changes.  Its script hashes only matter to
        index.html, which is looked at again whenever it is served: other
        files take the index.html last seen, without a C{stat} of their own.
        """
        index = self._catalog.known(INDEX) or self._catalog.find(INDEX)
        cachedFor, policy = self._policyFor
        if index is not cachedFor:
            identity = index.representations[-1] if index else None
            html = identity.body if identity and identity.body is not None else b""
            hashes = " ".join(inlineScriptHashes(html))
            directives = []
            for directive in self._policy.split(";"):
                directive = directive.strip()
                if hashes and directive.split(" ", 1)[0] == "script-src":
                    directive = f"{directive} {hashes}"
                directives.append(directive)
            policy = "; ".join(d for d in directives if d).encode("ascii")
            self._policyFor = (index, policy)
        return policy

    def _serve(self, request: Request, asset: Asset) -> object:
        representation = chooseRepresentation(asset, request.getHeader(b"Accept-Encoding"))
        request.setHeader(b"Content-Type", asset.contentType)
        request.setHeader(b"Cache-Control", asset.cacheControl)
        request.setHeader(b"ETag", representation.etag)
        if asset.lastModified:
            request.setHeader(b"Last-Modified", asset.lastModified)
        if len(asset.representations) > 1:
            request.setHeader(b"Vary", b"Accept-Encoding")
        if representation.encoding is not None:
            request.setHeader(b"Content-Encoding", representation.encoding)
        request.setHeader(b"Accept-Ranges", b"bytes")

        if self._notModified(request, asset, representation):
            request.setResponseCode(http.NOT_MODIFIED)
            for header in (b"Content-Type", b"Content-Encoding", b"Accept-Ranges"):
                request.responseHeaders.removeHeader(header)
            return b""

        first, last = 0, representation.size - 1
        rangeHeader = request.getHeader(b"Range")
        if rangeHeader is not None and request.method == b"GET" and self._rangeApplies(request, representation):
            try:
                wanted = _byteRange(rangeHeader, representation.size)
            except ValueError:
                request.setResponseCode(http.REQUESTED_RANGE_NOT_SATISFIABLE)
                request.setHeader(b"Content-Range", b"bytes */%d" % (representation.size,))
                request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
                request.responseHeaders.removeHeader(b"Content-Encoding")
                return b"Range not satisfiable.\n"
            if wanted is not None:
                first, last = wanted
                request.setResponseCode(http.PARTIAL_CONTENT)
                request.setHeader(
                    b"Content-Range", b"bytes %d-%d/%d" % (first, last, representation.size)
                )
        length = last - first + 1 if representation.size else 0
        request.setHeader(b"Content-Length", b"%d" % (length,))
        if request.method == b"HEAD":
            return b""
        if representation.body is not None:
            return representation.body[first : last + 1]
        return self._stream(request, representation, first, length)

    def _notModified(self, request: Request, asset: Asset, representation: Representation) -> bool:
        """
        RFC 9110's evaluation: If-None-Match when given, else If-Modified-Since.
        """
        ifNoneMatch = request.getHeader(b"If-None-Match")
        if ifNoneMatch is not None:
            tags = _entityTags(ifNoneMatch)
            return b"*" in tags or representation.etag in tags
        ifModifiedSince = request.getHeader(b"If-Modified-Since")
        if ifModifiedSince is None or not asset.lastModified:
            return False
        try:
            since = http.stringToDatetime(ifModifiedSince)
        except ValueError:
            return False
        return asset.modified <= since

    def _rangeApplies(self, request: Request, representation: Representation) -> bool:
        """
        Without If-Range, or when it names this very representation.
        """
        ifRange = request.getHeader(b"If-Range")
        if ifRange is None:
            return True
        return ifRange.strip() == representation.etag

    def _stream(self, request: Request, representation: Representation, first: int, length: int) -> object:
        try:
            stream = representation.path.open("rb")
        except OSError as error:
            self.log.error(
                "Cannot read {path}: {error}", path=str(representation.path), error=error.strerror
            )
            request.setResponseCode(http.INTERNAL_SERVER_ERROR)
            request.responseHeaders.removeHeader(b"Content-Encoding")
            request.setHeader(b"Content-Length", b"0")
            return b""
        FileRangeProducer(request, stream, first, length).start()
        return NOT_DONE_YET


@implementer(IPushProducer)
class FileRangeProducer:
    """
    Writes C{length} bytes of an open file from C{offset} to a request, a
    block at a time for as long as the transport does not pause it: the
    transport pauses it as soon as its buffer is full and resumes it when the
    client has taken the data, so a slow client holds one buffer, not the file.
    """

    #: Each block costs the same Python work on its way through TLS whatever
    #: its size; larger blocks cost less CPU per megabyte (512 KiB about 15%
    #: less than 64 KiB) but leave more memory behind when clients leave in
    #: the middle of a transfer (see appliance.web.upstream.ORTHANC_READ_SIZE).
    #: A slow client holds one block.
    blockSize = 128 * 1024
    log = Logger()

    def __init__(self, request: Request, stream, offset: int, length: int) -> None:
        self._request: Optional[Request] = request
        self.stream = stream
        self._offset = offset
        self._remaining = length
        self._paused = False
        self._producing = False

    def start(self) -> None:
        self.stream.seek(self._offset)
        # The file is closed when the client goes away, whether or not the
        # transport stops its producer.
        self._request.notifyFinish().addErrback(lambda reason: self.stopProducing())
        registerStreamingProducer(self._request, self)
        self._produce()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._produce()

    def stopProducing(self) -> None:
        self._request = None
        self.stream.close()

    def _produce(self) -> None:
        # request.write may pause us, or (on error) stop us, from inside.
        if self._producing:
            return
        self._producing = True
        try:
            while not self._paused and self._request is not None:
                self._sendBlock(self._request)
        finally:
            self._producing = False

    def _sendBlock(self, request: Request) -> None:
        data = self.stream.read(min(self.blockSize, self._remaining))
        self._remaining -= len(data)
        if data:
            request.write(data)
        if self._remaining and data:
            return
        request.unregisterProducer()
        if self._remaining:
            # The file shrank under us: the promised length cannot be kept, so
            # the connection is dropped rather than the response left short.
            self.log.error("{path} shrank while it was being sent", path=self.stream.name)
            request.loseConnection()
        else:
            request.finish()
        self.stopProducing()
