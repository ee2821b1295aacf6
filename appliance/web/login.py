"""
The login page and logout, for browsers.

    GET  /login?next=PATH    the form (user name, password)
    POST /login              checks the password (in a thread), starts a
                             session, 303 back to PATH (a path of this site)
    GET  /login/login.css    the pages' style sheet
    GET or POST /logout      ends the session on the server, clears the
                             cookie, 303 to /login

The session cookie is a browser-session cookie (no Max-Age): it ends when the
browser closes, which suits shared workstations, and the server ends the
session anyway after [auth] session_idle_timeout of inactivity or
session_lifetime after the login.
"""

import hashlib
from typing import Dict, List, Optional
from urllib.parse import parse_qs

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web import http
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from appliance.config import WebSection
from appliance.web.auth import (
    SESSION_COOKIE,
    TOO_MANY_REQUESTS,
    Account,
    Authenticator,
    clientKey,
    cookieChallenge,
    isSameOrigin,
    localTarget,
    sessionTokens,
)
from appliance.web.pages import STYLESHEET_NAME, Page, asset

#: The login form is a few hundred bytes; anything larger is not one.
MAX_FORM_SIZE = 16 * 1024

_EXPIRED = b"Thu, 01 Jan 1970 00:00:00 GMT"


def _setSessionCookie(request: Request, value: bytes, expire: bool = False) -> None:
    request.addCookie(
        SESSION_COOKIE,
        value,
        path=b"/",
        secure=True,
        httpOnly=True,
        sameSite="strict",
        **({"max_age": b"0", "expires": _EXPIRED} if expire else {}),
    )


def _seeOther(request: Request, location: bytes) -> bytes:
    request.setResponseCode(http.SEE_OTHER)
    request.setHeader(b"Location", location)
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return b"See " + location + b"\n"


class StyleSheet(Resource):
    """
    The pages' style sheet, from memory, revalidated with its ETag.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self._body = asset(STYLESHEET_NAME)
        self._etag = b'"' + hashlib.sha256(self._body).hexdigest()[:16].encode("ascii") + b'"'

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/css; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-cache")
        if request.setETag(self._etag) == http.CACHED:
            return b""
        return self._body

    render_HEAD = render_GET


class LoginResource(Resource):
    """
    C{/login}: the form, the check of what it posts, and its style sheet.
    """

    log = Logger()

    def __init__(self, authenticator: Authenticator, web: WebSection) -> None:
        super().__init__()
        self._authenticator = authenticator
        self._siteName = web.site_name
        self._contentSecurityPolicy = web.content_security_policy.encode("ascii")
        self._page = Page("login.html")
        self.putChild(STYLESHEET_NAME.encode("ascii"), StyleSheet())

    def getChild(self, name: bytes, request: Request) -> Resource:
        if name == b"" and not request.postpath:
            return self
        return notFound("No such page.", "The login page has no such part.")

    def render_GET(self, request: Request) -> bytes:
        target = localTarget(self._argument(request.args, b"next"))
        return self._form(request, http.OK, target)

    render_HEAD = render_GET

    def render_POST(self, request: Request):
        client = request.getClientAddress()
        if not isSameOrigin(request):
            self.log.warn(
                "Refused a login from {client}: the form was not posted from this site's login page",
                client=clientKey(client),
            )
            return self._form(request, http.FORBIDDEN, "/", "The login was refused: it did not come from this site's login page.")
        form = self._readForm(request)
        if form is None:
            return self._form(request, http.BAD_REQUEST, "/", "The login form could not be read: try again.")
        name, password = form.get("user", ""), form.get("password", "")
        target = localTarget(form.get("next", "/"))
        if not name or not password:
            return self._form(request, http.BAD_REQUEST, target, "Enter your user name and password.", name)
        wait = self._authenticator.retryAfter(client)
        if wait > 0:
            return self._tooMany(request, target, name, wait)
        checking = self._authenticator.login(name, password, client)
        finished = request.notifyFinish()
        # Fails if the browser goes away: _checked then has no one to answer.
        finished.addErrback(lambda failure: None)
        checking.addCallback(self._checked, request, finished, name, target)
        checking.addErrback(
            lambda failure: self.log.failure("Could not answer a login from {client}", failure, client=clientKey(client))
        )
        return NOT_DONE_YET

    def _checked(self, account: Optional[Account], request: Request, finished: Deferred, name: str, target: str) -> None:
        if finished.called:
            # The browser went away while the password was checked.
            return
        if account is None:
            wait = self._authenticator.retryAfter(request.getClientAddress())
            if wait > 0:
                body = self._tooMany(request, target, name, wait)
            else:
                request.setHeader(b"WWW-Authenticate", cookieChallenge(self._siteName))
                body = self._form(request, http.UNAUTHORIZED, target, "The user name or password is incorrect.", name)
        else:
            token = self._authenticator.startSession(account, sessionTokens(request.requestHeaders))
            _setSessionCookie(request, token)
            body = _seeOther(request, target.encode("ascii"))
        request.write(body)
        request.finish()

    def _tooMany(self, request: Request, target: str, name: str, wait: float) -> bytes:
        seconds = max(1, round(wait))
        request.setHeader(b"Retry-After", b"%d" % (seconds,))
        return self._form(
            request,
            TOO_MANY_REQUESTS,
            target,
            f"Too many failed logins from your address: try again in {seconds} seconds.",
            name,
        )

    def _form(self, request: Request, code: int, target: str, error: str = "", name: str = "") -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Content-Security-Policy", self._contentSecurityPolicy)
        # The site's no-referrer policy would make browsers post the form
        # with "Origin: null"; same-origin still tells other sites nothing.
        request.setHeader(b"Referrer-Policy", b"same-origin")
        return self._page.render(siteName=self._siteName, error=error, user=name, next=target)

    @staticmethod
    def _argument(arguments: Dict[bytes, List[bytes]], name: bytes) -> str:
        values = arguments.get(name)
        if not values:
            return "/"
        try:
            return values[0].decode("utf-8")
        except UnicodeDecodeError:
            return "/"

    def _readForm(self, request: Request) -> Optional[Dict[str, str]]:
        """
        The fields of the posted form, or L{None} if the body is not a small
        URL-encoded UTF-8 form.
        """
        contentType = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if contentType != b"application/x-www-form-urlencoded":
            return None
        request.content.seek(0)
        body = request.content.read(MAX_FORM_SIZE + 1)
        if len(body) > MAX_FORM_SIZE:
            return None
        try:
            fields = parse_qs(body.decode("ascii"), keep_blank_values=True, max_num_fields=10, errors="strict")
        except (UnicodeDecodeError, ValueError):
            return None
        return {name: values[0] for name, values in fields.items()}


class LogoutResource(Resource):
    """
    C{/logout}: ends the browser's session on the server, clears its cookie,
    and sends it to the login page.  Needs no session: without one it only
    clears the cookie.
    """

    isLeaf = True

    def __init__(self, authenticator: Authenticator) -> None:
        super().__init__()
        self._authenticator = authenticator

    def render_GET(self, request: Request) -> bytes:
        for token in sessionTokens(request.requestHeaders):
            self._authenticator.endSession(token)
        _setSessionCookie(request, b"", expire=True)
        return _seeOther(request, b"/login")

    render_POST = render_GET

    def render_HEAD(self, request: Request) -> bytes:
        # HEAD is safe: it shows where logout leads but ends nothing.
        return _seeOther(request, b"/login")
