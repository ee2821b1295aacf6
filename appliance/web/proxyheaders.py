"""
The headers of the proxy to Orthanc: what passes each way, what is
dropped (hop-by-hop headers, the client's credentials, the appliance's
session cookie, Orthanc's authentication), and the forwarding headers
from which Orthanc's DICOMweb plugin writes public URLs.
"""

import re
from typing import Callable, List, Optional, Set

from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.server import Request

from appliance.web.credentials import SESSION_COOKIE, cookieName, cookiePairs
from appliance.web.request import HOST_NAME

#: Headers that describe one connection, not the message (RFC 9110 7.6.1),
#: plus the proxy-authentication ones, which are for the hop that asks.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

#: Request headers that never reach Orthanc: the Agent writes Host and
#: Content-Length itself, the client's credentials are for the appliance, the
#: forwarding headers are ours to set, and the body was read already (Expect).
_REQUEST_DROPPED = frozenset(
    {b"host", b"content-length", b"authorization", b"forwarded", b"x-real-ip", b"expect"}
)

#: Answer headers that never reach the client: Orthanc's login prompt (its
#: credentials are the appliance's business) and its server banner.  CORS is
#: the appliance's too (see L{appliance.web.cors}).
_RESPONSE_DROPPED = frozenset({b"www-authenticate", b"server"})

#: A Host header as browsers write it: a name or an address, and a port.
#: Nothing else (no quote, comma, semicolon, space or line break) can pass
#: into the Forwarded header built from it.
_PUBLIC_HOST = re.compile(rb"(?:%s|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?" % (HOST_NAME.pattern,))

#: Signature of a route's rewriting of Orthanc's answer headers: given a
#: lower-case name and a value, the value to send, or None to drop it.
HeaderRewriter = Callable[[bytes, bytes], Optional[bytes]]

def addVary(request: Request, names: bytes) -> None:
    """
    Add the comma-separated header C{names} to the answer's C{Vary}, once each.
    """
    current = b", ".join(request.responseHeaders.getRawHeaders(b"Vary", []))
    present = {token.strip().lower() for token in current.split(b",") if token.strip()}
    added = [token.strip() for token in names.split(b",") if token.strip()]
    added = [token for token in added if token.lower() not in present]
    if added:
        merged = b", ".join(([current] if current else []) + added)
        request.responseHeaders.setRawHeaders(b"Vary", [merged])


def connectionTokens(headers: Headers) -> Set[bytes]:
    """
    The lower-case names a message's C{Connection} header lists: hop-by-hop too.
    """
    return {
        token.strip().lower()
        for value in headers.getRawHeaders(b"Connection", [])
        for token in value.split(b",")
        if token.strip()
    }


def withoutSessionCookie(value: bytes) -> bytes:
    """
    A C{Cookie} header value without the appliance's session cookie.
    """
    return b"; ".join(pair for pair in cookiePairs(value) if cookieName(pair) != SESSION_COOKIE)


def publicHost(request: Request) -> Optional[bytes]:
    """
    The host and port the client asked for, if its C{Host} header (the
    request layer lets one at most through) is sane.
    """
    host = request.getHeader(b"Host")
    if host is None or not _PUBLIC_HOST.fullmatch(host):
        return None
    return host


def forwardingHeaders(request: Request, host: bytes) -> List[tuple]:
    """
    C{Forwarded} (RFC 7239) and the C{X-Forwarded-*} headers for C{request}.

    The host goes unquoted: Orthanc's DICOMweb plugin takes the value verbatim,
    quotes included, into the URLs it writes; L{publicHost} keeps anything
    that would need quoting out of it.
    """
    address = request.getClientAddress()
    client = getattr(address, "host", None)
    client = client.encode("ascii", "replace") if client else b"unknown"
    node = b'"[%s]"' % (client,) if b":" in client else client
    proto = b"https" if request.isSecure() else b"http"
    return [
        (b"Forwarded", b"for=%s;host=%s;proto=%s" % (node, host, proto)),
        (b"X-Forwarded-For", client),
        (b"X-Forwarded-Proto", proto),
        (b"X-Forwarded-Host", host),
    ]


def upstreamHeaders(request: Request, authorization: bytes, host: bytes) -> Headers:
    """
    The headers of the request to Orthanc for the client's C{request}.
    """
    dropped = HOP_BY_HOP | _REQUEST_DROPPED | connectionTokens(request.requestHeaders)
    headers = Headers()
    for name, values in request.requestHeaders.getAllRawHeaders():
        lower = name.lower()
        if lower in dropped or lower.startswith(b"x-forwarded-"):
            continue
        if lower == b"cookie":
            values = [kept for kept in (withoutSessionCookie(value) for value in values) if kept]
            if not values:
                continue
        headers.setRawHeaders(name, values)
    headers.setRawHeaders(b"Authorization", [authorization])
    for name, value in forwardingHeaders(request, host):
        headers.setRawHeaders(name, [value])
    return headers


def copyAnswerHeaders(response: IResponse, request: Request, rewrite: Optional[HeaderRewriter]) -> None:
    """
    Copy Orthanc's answer headers to C{request}, less what must not pass.

    The Agent keeps the connection headers of an answer (Connection,
    Content-Length, Keep-Alive, Transfer-Encoding...) to itself: the headers
    Orthanc's C{Connection} might name cannot be known here, and Orthanc
    names none but C{keep-alive}.
    """
    dropped = HOP_BY_HOP | _RESPONSE_DROPPED
    for name, values in response.headers.getAllRawHeaders():
        lower = name.lower()
        if lower in dropped or lower.startswith(b"access-control-"):
            continue
        if rewrite is not None:
            values = [kept for kept in (rewrite(lower, value) for value in values) if kept is not None]
        if lower == b"set-cookie":
            # Through request.cookies, which Twisted writes as Set-Cookie (the
            # header itself would be replaced by any cookie the site adds).
            request.cookies.extend(value for value in values if cookieName(value) != SESSION_COOKIE)
        elif lower == b"vary":
            for value in values:
                addVary(request, value)
        elif values:
            request.responseHeaders.setRawHeaders(name, values)


def describeStatus(response: IResponse) -> str:
    """
    The reason phrase of Orthanc's answer, as printable ASCII.
    """
    phrase = response.phrase.decode("ascii", "replace")
    return "".join(character for character in phrase if character.isprintable()) or "error"
