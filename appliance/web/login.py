"""
The login page and logout, for browsers.

    GET  /login?next=PATH    the form (user name, password)
    POST /login              checks the password (in a thread), starts a
                             session, 303 back to PATH (a path of this site)
    GET  /login/login.css    the pages' style sheet
    GET or POST /logout      ends the session on the server, clears the
                             cookie, 303 to /login; a GET another site
                             made the browser send, or a POST not from this
                             site's pages, gets a page with a button instead

The session cookie is a browser-session cookie (no Max-Age): it ends when the
browser closes, which suits shared workstations, and the server ends the
session anyway after [auth] session_idle_timeout of inactivity or
session_lifetime after the login.
"""

import hashlib
import html
from typing import Dict, List, Optional
from urllib.parse import parse_qs, quote

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from appliance.config import WebSection
from appliance.connections import clientKey
from appliance.state.database import reportFailure
from appliance.web.accounts import OIDC, IAccount
from appliance.web.authenticator import Authenticator
from appliance.web.sessions import SessionOwner
from appliance.web.signin import SingleSignOnResource
from appliance.web.checkers import CredentialsUnchecked, NoRole
from appliance.web.credentials import sessionTokens, setSessionCookie
from appliance.web.gate import cookieChallenge
from appliance.web.origins import isCrossSite, isSameOrigin, localTarget, ownOrigin
from appliance.web.pages import STYLESHEET_NAME, TOO_MANY_REQUESTS, Page, asset, seeOther

# The login form is a few hundred bytes: the request layer reads anonymous
# bodies up to ANONYMOUS_BODY_LIMIT, and a larger one is no login form.
from appliance.web.request import ANONYMOUS_BODY_LIMIT, mediaType
from appliance.web.sitemap import LOGIN_PATH
from appliance.web.throttle import tooManyFailures

#: What a browser is told when the state database could not record its
#: session's start or end (it is down, or not yet reachable).
SESSION_RETRY_AFTER = 5
SESSION_UNAVAILABLE = f"Your password is right, but the session could not be started: try again in {SESSION_RETRY_AFTER} seconds."
LOGOUT_UNAVAILABLE = f"The session could not be ended: try again in {SESSION_RETRY_AFTER} seconds."


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
    C{/login}: the form, the check of what it posts, and its style sheet;
    with a single sign-on, a link to it on the form, and its sign-in
    (C{/login/oidc}, L{appliance.web.signin}).
    """

    log = Logger()

    def __init__(self, authenticator: Authenticator, web: WebSection, singleSignOn=None) -> None:
        """
        @param singleSignOn: the provider (L{appliance.web.openid.OpenIDProvider})
            and the state database, or L{None}.
        """
        super().__init__()
        self._authenticator = authenticator
        self._siteName = web.site_name
        link = ""
        if singleSignOn is not None:
            provider, database, clock = singleSignOn
            self.putChild(b"oidc", SingleSignOnResource(provider, authenticator, database, self._form, clock))
            # A link, not a form: the page's form-action would not let a
            # form's answer lead to the provider.
            name = html.escape(provider.displayName).replace("$", "$$")
            link = f'<p class="links"><a id="single-sign-on" href="/login/oidc?next=$nextQuery">Sign in with {name}</a></p>'
        self._page = Page("login.html", "log in", web, {"singleSignOn": link})
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
        wait = self._authenticator.retryAfter(name, client)
        if wait > 0:
            return self._tooMany(request, target, name, wait)
        checking = self._authenticator.login(name, password, client)
        finished = request.notifyFinish()
        # Fails if the browser goes away: the check is skipped if it has not
        # started, and _checked has no one to answer.
        finished.addErrback(lambda failure: checking.cancel())
        checking.addCallbacks(
            self._checked,
            self._busy,
            (request, finished, name, target),
            errbackArgs=(request, finished, name, target),
        )
        checking.addErrback(
            lambda failure: self.log.failure("Could not answer a login from {client}", failure, client=clientKey(client))
        )
        return NOT_DONE_YET

    def _checked(self, account: Optional[IAccount], request: Request, finished: Deferred, name: str, target: str) -> None:
        if finished.called:
            # The browser went away while the password was checked.
            return
        if account is None:
            wait = self._authenticator.retryAfter(name, request.getClientAddress())
            if wait > 0:
                body = self._tooMany(request, target, name, wait)
            else:
                request.setHeader(b"WWW-Authenticate", cookieChallenge(self._siteName))
                body = self._form(request, http.UNAUTHORIZED, target, "The user name or password is incorrect.", name)
        else:
            starting = self._authenticator.startSession(account, sessionTokens(request.requestHeaders))
            starting.addCallbacks(
                self._started, self._notStarted, (request, finished, target), errbackArgs=(request, finished, name, target)
            )
            return
        request.write(body)
        request.finish()

    def _started(self, token: bytes, request: Request, finished: Deferred, target: str) -> None:
        if finished.called:
            return
        setSessionCookie(request, token)
        request.write(seeOther(request, target.encode("ascii")))
        request.finish()

    def _notStarted(self, failure: Failure, request: Request, finished: Deferred, name: str, target: str) -> None:
        reportFailure(self.log, failure, f"start a session for {name}")
        if finished.called:
            return
        request.setHeader(b"Retry-After", b"%d" % (SESSION_RETRY_AFTER,))
        request.write(self._form(request, http.SERVICE_UNAVAILABLE, target, SESSION_UNAVAILABLE, name))
        request.finish()

    def _busy(self, failure: Failure, request: Request, finished: Deferred, name: str, target: str) -> None:
        failure.trap(CredentialsUnchecked, NoRole)
        if finished.called:
            return
        if failure.check(NoRole):
            request.write(self._form(request, http.FORBIDDEN, target, NoRole.MESSAGE, name))
        else:
            unchecked = failure.value
            request.setHeader(b"Retry-After", b"%d" % (unchecked.retryAfter,))
            request.write(self._form(request, http.SERVICE_UNAVAILABLE, target, unchecked.message, name))
        request.finish()

    def _tooMany(self, request: Request, target: str, name: str, wait: float) -> bytes:
        seconds = max(1, round(wait))
        request.setHeader(b"Retry-After", b"%d" % (seconds,))
        return self._form(
            request,
            TOO_MANY_REQUESTS,
            target,
            tooManyFailures(seconds),
            name,
        )

    def _form(self, request: Request, code: int, target: str, error: str = "", name: str = "") -> bytes:
        return self._page.answer(request, code, error=error, user=name, next=target, nextQuery=quote(target, safe="/"))

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
        if mediaType(request.getHeader(b"content-type")) != b"application/x-www-form-urlencoded":
            return None
        request.content.seek(0)
        body = request.content.read(ANONYMOUS_BODY_LIMIT + 1)
        if len(body) > ANONYMOUS_BODY_LIMIT:
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

    Another site must not log the user out (a link or an image pointing
    here): a GET another site made the browser send (L{isCrossSite}), and a
    POST that did not come from this site's pages (L{isSameOrigin}), end
    nothing and get a page whose button posts the logout from this site.
    A GET from the site's own pages or typed by the user logs out at once.

    A session begun at the single sign-on ends there too, when the provider
    offers that: the browser goes to its logout, which sends it back to the
    login page.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, authenticator: Authenticator, web: WebSection, provider=None) -> None:
        """
        @param provider: the single sign-on's provider
            (L{appliance.web.openid.OpenIDProvider}), or L{None}.
        """
        super().__init__()
        self._authenticator = authenticator
        self._provider = provider
        # The confirmation's form leads to the provider's logout.
        targets = [provider.origin] if provider is not None else []
        self._page = Page("logout.html", "log out", web, formTargets=targets)

    def render_GET(self, request: Request) -> bytes:
        if isCrossSite(request):
            return self._confirmation(request, http.OK)
        return self._logOut(request)

    def render_POST(self, request: Request) -> bytes:
        if not isSameOrigin(request):
            self.log.warn(
                "Refused a logout from {client}: it was not posted from this site's pages",
                client=clientKey(request.getClientAddress()),
            )
            return self._confirmation(
                request, http.FORBIDDEN, "The logout was refused: it did not come from this site's pages."
            )
        return self._logOut(request)

    def _logOut(self, request: Request) -> bytes:
        ending = gatherResults(
            [
                self._authenticator.endSession(token, request.getClientAddress())
                for token in sessionTokens(request.requestHeaders)
            ],
            consumeErrors=True,
        )
        finished = request.notifyFinish()
        ending.addCallbacks(self._loggedOut, self._notLoggedOut, (request, finished), errbackArgs=(request, finished))
        ending.addErrback(lambda failure: self.log.failure("Could not answer a logout", failure))
        return NOT_DONE_YET

    def _loggedOut(self, owners: List[Optional[SessionOwner]], request: Request, finished: Deferred) -> None:
        # The browser may have gone: the session has ended all the same.
        if finished.called:
            return
        setSessionCookie(request, b"", expire=True)
        request.write(seeOther(request, self._afterLogout(owners, request)))
        request.finish()

    def _afterLogout(self, owners: List[Optional[SessionOwner]], request: Request) -> bytes:
        origin = ownOrigin(request)
        if self._provider is None or origin is None:
            return LOGIN_PATH
        for owner in owners:
            if owner is not None and owner.source == OIDC:
                location = self._provider.logoutURL(owner.logoutHint, (origin + LOGIN_PATH).decode("ascii"))
                if location is not None:
                    return location.encode("ascii")
        return LOGIN_PATH

    def _notLoggedOut(self, failure: Failure, request: Request, finished: Deferred) -> None:
        # The cookie stays: the user must know that the session lives on.
        reportFailure(self.log, failure.value.subFailure, "end a session at logout")
        if finished.called:
            return
        request.setHeader(b"Retry-After", b"%d" % (SESSION_RETRY_AFTER,))
        request.write(self._confirmation(request, http.SERVICE_UNAVAILABLE, LOGOUT_UNAVAILABLE))
        request.finish()

    def _confirmation(self, request: Request, code: int, error: str = "") -> bytes:
        return self._page.answer(request, code, error=error)

    def render_HEAD(self, request: Request) -> bytes:
        # HEAD is safe: it shows where logout leads but ends nothing.
        return seeOther(request, LOGIN_PATH)
