"""
Cross-origin access to C{/pacs}, for a viewer hosted on another origin
(C{[web] cors_allowed_origins}; none by default).

Only origins on the list get CORS headers (compared as browsers write
origins: see L{appliance.web.origins.requestOrigin}); every answer
says C{Vary: Origin} so that no cache hands one origin's answer to another.
Preflight requests are answered here and never reach Orthanc: browsers send
them without credentials, so the access gate lets them through.
"""

from typing import Iterable, Optional, Tuple

from twisted.web import http
from twisted.web.server import Request

from appliance.web.origins import requestOrigin
from appliance.web.proxyheaders import addVary

#: How long a browser may reuse a preflight answer (Chromium caps it at 2 h):
#: short enough that a change of the list takes effect soon.
PREFLIGHT_MAX_AGE = 600

#: The request headers DICOMweb clients send beyond the CORS-safelisted ones.
ALLOWED_HEADERS = (
    b"Accept, Authorization, Cache-Control, Content-Type, If-Match, If-Modified-Since,"
    b" If-None-Match, Range, X-Requested-With"
)

#: Answer headers a script may read beyond the CORS-safelisted ones.
EXPOSED_HEADERS = b"Content-Encoding, Content-Location, Location, Retry-After, Warning"


class CorsPolicy:
    """
    The exact-origin allowlist of one route and the methods it offers.
    """

    def __init__(self, allowedOrigins: Iterable[str], methods: Tuple[bytes, ...]) -> None:
        # Written by appliance.config.normalOrigin, as requestOrigin writes the request's.
        self._origins = frozenset(origin.encode("ascii") for origin in allowedOrigins)
        self._methods = methods

    def _allowedOrigin(self, request: Request) -> Optional[bytes]:
        """
        The request's C{Origin} (as browsers write it, so as they sent it),
        if it is on the list.
        """
        origin = requestOrigin(request)
        return origin if origin in self._origins else None

    def decorate(self, request: Request) -> None:
        """
        Add the CORS headers every answer to C{request} carries.
        """
        addVary(request, b"Origin")
        origin = self._allowedOrigin(request)
        if origin is not None:
            request.setHeader(b"Access-Control-Allow-Origin", origin)
            request.setHeader(b"Access-Control-Allow-Credentials", b"true")
            request.setHeader(b"Access-Control-Expose-Headers", EXPOSED_HEADERS)

    def answerOptions(self, request: Request) -> bytes:
        """
        Answer an C{OPTIONS} request: the methods allowed, and for a preflight
        from an allowed origin asking for one of them, the CORS permissions.
        C{decorate} has been called.
        """
        allowed = b", ".join(self._methods)
        request.setResponseCode(http.NO_CONTENT)
        request.setHeader(b"Allow", allowed)
        asked = request.requestHeaders.getRawHeaders(b"Access-Control-Request-Method", [])
        if self._allowedOrigin(request) is not None and len(asked) == 1 and asked[0] in self._methods:
            addVary(request, b"Access-Control-Request-Method, Access-Control-Request-Headers")
            request.setHeader(b"Access-Control-Allow-Methods", allowed)
            request.setHeader(b"Access-Control-Allow-Headers", ALLOWED_HEADERS)
            request.setHeader(b"Access-Control-Max-Age", b"%d" % (PREFLIGHT_MAX_AGE,))
        return b""
