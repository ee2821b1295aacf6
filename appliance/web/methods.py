"""
The answer of the site's read-only resources to methods other than GET and HEAD.
"""

from twisted.web import http
from twisted.web.server import Request

ALLOWED = b"GET, HEAD, OPTIONS"


def isRead(request: Request) -> bool:
    return request.method in (b"GET", b"HEAD")


def answerOtherMethod(request: Request) -> bytes:
    """
    OPTIONS: 204 with the methods allowed; anything else: 405 and a short text
    (twisted.web's own answer is 501 and an HTML page for most methods).
    """
    request.setHeader(b"Allow", ALLOWED)
    if request.method == b"OPTIONS":
        request.setResponseCode(http.NO_CONTENT)
        return b""
    request.setResponseCode(http.NOT_ALLOWED)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    return b"Method not allowed.\n"
