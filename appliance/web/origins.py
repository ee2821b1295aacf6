"""
Where a request comes from, as browsers tell it: a page load or a script, a
browser or not, this site's own pages or another site's (CSRF), and where a
login may send the browser back to.
"""

from typing import Optional
from urllib.parse import urlsplit

from twisted.web.server import Request

from appliance.configvalues import normalOrigin
from appliance.web.credentials import sessionTokens

def isNavigation(request: Request) -> bool:
    """
    Is this a browser loading a page (not a script fetching data)?  Browsers
    say so with C{Sec-Fetch-Mode: navigate}; older ones are recognised by a
    GET that accepts HTML.
    """
    mode = request.getHeader(b"sec-fetch-mode")
    if mode is not None:
        return mode == b"navigate"
    accept = request.getHeader(b"accept") or b""
    return request.method in (b"GET", b"HEAD") and b"text/html" in accept


def isBrowser(request: Request) -> bool:
    """
    Did a browser send this request?  Every current browser sends
    C{Sec-Fetch-Mode}; an older one still carries the session cookie once
    it has logged in.
    """
    return request.getHeader(b"sec-fetch-mode") is not None or bool(sessionTokens(request.requestHeaders))


def _normalOrigin(origin: bytes) -> Optional[bytes]:
    try:
        normal = normalOrigin(origin.decode("ascii"))
    except UnicodeDecodeError:
        return None
    return normal.encode("ascii") if normal is not None else None


def _originOf(url: bytes) -> Optional[bytes]:
    try:
        parts = urlsplit(url.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    return _normalOrigin(f"{parts.scheme}://{parts.netloc}".encode("ascii"))


def requestOrigin(request: Request) -> Optional[bytes]:
    """
    The request's C{Origin}, written as L{appliance.config.normalOrigin}
    writes the site's own and C{[web] cors_allowed_origins}, so that equal
    origins compare equal; L{None} without the header.  Several headers, or
    a value that is no http(s) origin (C{null}), give C{null}, which is no
    site's origin.
    """
    origins = request.requestHeaders.getRawHeaders(b"origin")
    if origins is None:
        return None
    normal = _normalOrigin(origins[0]) if len(origins) == 1 else None
    return normal if normal is not None else b"null"


def ownOrigin(request: Request) -> Optional[bytes]:
    """
    The site's origin as the browser addressed it (from C{Host}), L{None}
    without a usable C{Host}.
    """
    host = request.getHeader(b"host")
    if not host:
        return None
    scheme = b"https://" if request.isSecure() else b"http://"
    return _normalOrigin(scheme + host)


def isSameOrigin(request: Request) -> bool:
    """
    Did a page of this site send this request?  C{Sec-Fetch-Site} (set by the
    browser, never by a page) answers first: it stays reliable when a
    referrer policy makes the browser send C{Origin: null} for same-origin
    form posts.  Without it, C{Origin} must be the site's own, or failing
    that C{Referer} must point into the site.
    """
    site = request.getHeader(b"sec-fetch-site")
    if site is not None:
        return site == b"same-origin"
    own = ownOrigin(request)
    if own is None:
        return False
    origin = requestOrigin(request)
    if origin is not None:
        return origin == own
    referer = request.getHeader(b"referer")
    return referer is not None and _originOf(referer) == own


def isCrossSite(request: Request) -> bool:
    """
    Did another site make the browser send this request (a link, a form, an
    image)?  C{Sec-Fetch-Site} answers first: C{cross-site} and C{same-site}
    are other sites, C{none} is the user's own doing (typed, bookmarked).
    Without it, an C{Origin} or failing that a C{Referer} that is not the
    site's own; a request with neither is not.
    """
    site = request.getHeader(b"sec-fetch-site")
    if site is not None:
        return site not in (b"same-origin", b"none")
    own = ownOrigin(request)
    origin = requestOrigin(request)
    if origin is not None:
        return origin != own
    referer = request.getHeader(b"referer")
    return referer is not None and _originOf(referer) != own


def localTarget(target: str) -> str:
    """
    C{target} if it is a path on this site (where the login may send the
    browser back to), else C{/}.  Rejects other hosts (C{//host},
    C{/\\host}, which browsers read as C{//host}) and anything not plain
    printable ASCII (browsers drop tabs and newlines from URLs).
    """
    if (
        target.startswith("/")
        and target[1:2] not in ("/", "\\")
        and all("\x21" <= character <= "\x7e" for character in target)
    ):
        return target
    return "/"


def requestTarget(request: Request) -> bytes:
    """
    The path and query C{request} asked for, or C{/} for a target that is
    no path (C{OPTIONS *}): where a redirect may bring the client back to.
    """
    return request.uri if request.uri.startswith(b"/") else b"/"
