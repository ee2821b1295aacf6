"""
What a request carries to say who sent it: HTTP Basic credentials, a Bearer
token of the single sign-on's provider, and the session cookie of a browser
that logged in.
"""

import binascii
from typing import List, Optional, Tuple

from twisted.cred.credentials import ICredentials
from twisted.web.http_headers import Headers
from zope.interface import Attribute, implementer

#: The browser session's cookie: the __Host- prefix makes browsers insist on
#: Secure, Path=/ and no Domain, so no other host can set or shadow it.
SESSION_COOKIE = b"__Host-pacs-session"

#: What an expired cookie is given as its Expires.
EXPIRED = b"Thu, 01 Jan 1970 00:00:00 GMT"


def setHostCookie(request, name: bytes, value: bytes, sameSite: str, maxAge: Optional[int] = None, expire: bool = False) -> None:
    """
    Give the browser the C{__Host-} cookie C{name} (Secure, HttpOnly, for
    the whole site; for C{maxAge} seconds, else for the browser's session),
    or, with C{expire}, take it back.
    """
    lifetime = {"max_age": b"0", "expires": EXPIRED} if expire else {}
    if maxAge is not None and not expire:
        lifetime = {"max_age": b"%d" % (maxAge,)}
    request.addCookie(name, value, path=b"/", secure=True, httpOnly=True, sameSite=sameSite, **lifetime)


def setSessionCookie(request, value: bytes, expire: bool = False) -> None:
    """
    Give the browser the session cookie C{value} (a browser-session cookie,
    never sent cross-site), or, with C{expire}, take it back.
    """
    setHostCookie(request, SESSION_COOKIE, value, "strict", expire=expire)

def displayName(name: str) -> str:
    """
    A user name as given by a client, safe for one log line.
    """
    return repr(name[:64] + ("…" if len(name) > 64 else ""))


#: The schemes of C{Authorization} the appliance takes.
AUTHORIZATION_SCHEMES = (b"basic", b"bearer")


def authorization(headers: Headers) -> Optional[Tuple[bytes, bytes]]:
    """
    The scheme (lower case: one of L{AUTHORIZATION_SCHEMES}) and the token
    of the request's C{Authorization} header, or L{None} if it has none
    (another scheme, or more than one header, counts as none).
    """
    values = headers.getRawHeaders(b"authorization")
    if not values or len(values) != 1:
        return None
    scheme, _, token = values[0].strip().partition(b" ")
    scheme = scheme.lower()
    if scheme not in AUTHORIZATION_SCHEMES:
        return None
    return scheme, token.strip()


def basicCredentials(headers: Headers) -> Optional[bytes]:
    """
    The base64 token of the request's HTTP Basic C{Authorization} header, or
    L{None} if it has none (see L{authorization}).
    """
    given = authorization(headers)
    return given[1] if given is not None and given[0] == b"basic" else None


class IBearerToken(ICredentials):
    """
    An access token of the single sign-on's provider (RFC 6750).
    """

    token = Attribute("The token, as sent (a JWT's compact form).")


@implementer(IBearerToken)
class BearerToken:
    def __init__(self, token: bytes) -> None:
        self.token = token


def cookiePairs(header: bytes) -> List[bytes]:
    """
    The C{name=value} pairs of a C{Cookie} header value, as sent.
    """
    return [pair.strip() for pair in header.split(b";") if pair.strip()]


def cookieName(pair: bytes) -> bytes:
    """
    The name of a cookie given as C{name=value}: a pair of a C{Cookie}
    header, or a whole C{Set-Cookie} value (its attributes follow a C{;}).
    """
    return pair.split(b";", 1)[0].partition(b"=")[0].strip()


def sessionTokens(headers: Headers) -> List[bytes]:
    """
    Every value of the session cookie the request carries.
    """
    tokens = []
    for header in headers.getRawHeaders(b"cookie", []):
        for pair in cookiePairs(header):
            value = pair.partition(b"=")[2]
            if cookieName(pair) == SESSION_COOKIE and value:
                tokens.append(value)
    return tokens


def decodeBasic(token: bytes) -> Optional[Tuple[str, str]]:
    """
    The user name and password of a Basic token, or L{None} if it is not
    base64 of UTF-8 C{name:password}.
    """
    try:
        decoded = binascii.a2b_base64(token, strict_mode=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    name, colon, password = decoded.partition(":")
    return (name, password) if colon else None
