"""
Signing in with the hospital's single sign-on, for browsers: the
authorization code flow with PKCE, run by the appliance itself, which ends
in the appliance's own session cookie.

    GET /login/oidc?next=PATH     a new sign-in: its state, nonce and PKCE
                                  verifier kept in the state database (any
                                  node can finish it), the state in a cookie
                                  of this browser; 303 to the provider
    GET /login/oidc/callback      the provider sends the browser back with a
                                  code: the state must be this browser's and
                                  unused, the code is exchanged for tokens,
                                  the ID token checked, a session started;
                                  then on to PATH

The browser gets no access token (it is not kept), and the ID token only
as the C{id_token_hint} of the provider's logout; it stays in the session's
row until then.
"""

import hashlib
import hmac
import secrets
from typing import Callable, Optional
from urllib.parse import quote

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from appliance.connections import clientKey
from appliance.state.database import StateDatabase, Statements
from appliance.web.authenticator import Authenticator
from appliance.web.checkers import CredentialsUnchecked, NoRole
from appliance.web.credentials import cookieName, cookiePairs, sessionTokens, setHostCookie, setSessionCookie
from appliance.web.openid import SIGN_IN_TIMEOUT, InvalidToken, OpenIDProvider
from appliance.web.origins import isCrossSite, localTarget, ownOrigin
from appliance.web.pages import seeOther

#: The cookie that ties a sign-in to the browser that began it (against
#: login CSRF: a code from someone else's sign-in is refused).  Lax: the
#: provider sends the browser back with a cross-site navigation.
STATE_COOKIE = b"__Host-pacs-sign-in"

CALLBACK_PATH = b"/login/oidc/callback"

#: What a browser is told when a sign-in cannot be finished.
NOT_THIS_BROWSER = "This sign-in did not start in this browser, or was already used: sign in again."
FAILED = "The sign-in could not be checked: sign in again, or ask the administrators if it keeps failing."
#: What a browser is told when the state database could not keep a sign-in
#: or its session (it is down, or not yet reachable).
UNAVAILABLE = "The sign-in cannot be recorded now: try again in a few seconds."

#: Sign-ins under way at most, from all browsers together: each GET of
#: /login/oidc keeps a row for SIGN_IN_TIMEOUT, and a flood of them must not
#: fill the state database.
MAX_SIGN_INS_UNDER_WAY = 10000

ShowForm = Callable[..., bytes]


class TooManySignIns(CredentialsUnchecked):
    """
    L{MAX_SIGN_INS_UNDER_WAY} sign-ins are under way already.
    """

    message = "Too many sign-ins are under way: try again in a minute."
    retryAfter = 60


def _argument(request: Request, name: bytes) -> str:
    values = request.args.get(name) or [b""]
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        return ""


def _stateCookie(request: Request) -> Optional[bytes]:
    for header in request.requestHeaders.getRawHeaders(b"cookie", []):
        for pair in cookiePairs(header):
            if cookieName(pair) == STATE_COOKIE:
                return pair.partition(b"=")[2]
    return None


def _setStateCookie(request: Request, value: bytes, expire: bool = False) -> None:
    setHostCookie(request, STATE_COOKIE, value, "lax", int(SIGN_IN_TIMEOUT), expire)


def _hash(state: str) -> bytes:
    return hashlib.sha256(state.encode("ascii")).digest()


class SingleSignOnResource(Resource):
    """
    C{/login/oidc} and its C{callback}.

    @param showForm: renders the login page with an error:
        C{showForm(request, code, target, error)}.
    """

    log = Logger()

    def __init__(
        self, provider: OpenIDProvider, authenticator: Authenticator, database: StateDatabase, showForm: ShowForm, clock
    ) -> None:
        super().__init__()
        self._provider = provider
        self._authenticator = authenticator
        self._database = database
        self._showForm = showForm
        self._clock = clock
        self.putChild(b"callback", _Callback(self))

    def getChild(self, name: bytes, request: Request) -> Resource:
        if name == b"" and not request.postpath:
            return self
        return Resource.getChild(self, name, request)

    def render_HEAD(self, request: Request) -> bytes:
        # A GET keeps a sign-in under way; a link checker's or a browser's
        # prefetching HEAD must not.
        request.setResponseCode(http.NOT_ALLOWED)
        request.setHeader(b"Allow", b"GET")
        return b""

    def render_GET(self, request: Request):
        target = localTarget(_argument(request, b"next") or "/")
        if isCrossSite(request):
            # Another site may send a browser here, but not on to a page of
            # this one with its session: the sign-in ends at the start page.
            target = "/"
        origin = ownOrigin(request)
        if origin is None:
            return self._showForm(request, http.BAD_REQUEST, target, "The request has no usable Host header.")
        self._begin(request, target, (origin + CALLBACK_PATH).decode("ascii")).addErrback(
            lambda failure: self.log.failure("Could not answer a sign-in from {client}", failure, client=clientKey(request.getClientAddress()))
        )
        return NOT_DONE_YET

    @inlineCallbacks
    def _begin(self, request: Request, target: str, redirectURI: str):
        finished = request.notifyFinish()
        finished.addErrback(lambda failure: None)
        state, nonce, verifier = secrets.token_urlsafe(32), secrets.token_urlsafe(32), secrets.token_urlsafe(64)
        try:
            metadata = yield self._provider.metadata()
            now = self._clock.seconds()
            yield self._database.interact(_saveSignIn, _hash(state), verifier, nonce, target, redirectURI, now)
        except CredentialsUnchecked as unchecked:
            body = self._unavailable(request, target, unchecked)
        except Exception:
            self.log.failure("Could not begin a sign-in")
            body = self._showForm(request, http.SERVICE_UNAVAILABLE, target, UNAVAILABLE)
        else:
            _setStateCookie(request, state.encode("ascii"))
            location = self._provider.authorizationURL(metadata, state, nonce, verifier, redirectURI)
            body = seeOther(request, location.encode("ascii"))
        if not finished.called:
            request.write(body)
            request.finish()

    def _unavailable(self, request: Request, target: str, unchecked: CredentialsUnchecked) -> bytes:
        request.setHeader(b"Retry-After", b"%d" % (unchecked.retryAfter,))
        return self._showForm(request, http.SERVICE_UNAVAILABLE, target, unchecked.message)

    @inlineCallbacks
    def finish(self, request: Request):
        """
        The provider sent the browser back: finish its sign-in.
        """
        finished = request.notifyFinish()
        finished.addErrback(lambda failure: None)
        try:
            body = yield self._finish(request)
        except Exception:
            self.log.failure("Could not finish a sign-in")
            body = self._showForm(request, http.INTERNAL_SERVER_ERROR, "/", FAILED)
        if not finished.called:
            request.write(body)
            request.finish()

    @inlineCallbacks
    def _finish(self, request: Request):
        client = clientKey(request.getClientAddress())
        error = _argument(request, b"error")
        if error:
            description = _argument(request, b"error_description")
            self.log.warn(
                "The single sign-on refused a sign-in from {client}: {error} {description}",
                client=client,
                error=error[:64],
                description=description[:200],
            )
            _setStateCookie(request, b"", expire=True)
            return self._showForm(request, http.FORBIDDEN, "/", f"The hospital's single sign-on refused the sign-in ({error[:64]}).")
        state, code, mine = _argument(request, b"state"), _argument(request, b"code"), _stateCookie(request)
        if not state or not code or mine is None or not hmac.compare_digest(state.encode("utf-8"), mine):
            self.log.warn("Refused a sign-in callback from {client}: its state is not the browser's", client=client)
            return self._showForm(request, http.BAD_REQUEST, "/", NOT_THIS_BROWSER)
        _setStateCookie(request, b"", expire=True)
        try:
            signIn = yield self._database.interact(_takeSignIn, _hash(state), self._clock.seconds() - SIGN_IN_TIMEOUT)
        except Exception:
            self.log.failure("Could not read a sign-in from the state database")
            return self._showForm(request, http.SERVICE_UNAVAILABLE, "/", UNAVAILABLE)
        if signIn is None:
            self.log.warn("Refused a sign-in callback from {client}: unknown, used or expired state", client=client)
            return self._showForm(request, http.BAD_REQUEST, "/", NOT_THIS_BROWSER)
        verifier, nonce, target, redirectURI = signIn
        try:
            account, idToken = yield self._provider.exchange(code, verifier, redirectURI, nonce)
        except NoRole as refused:
            self._authenticator.signInRefused(refused.args[0], request.getClientAddress(), refused.reason)
            self.log.warn(
                "Refused a sign-in for {user} from {client}: {reason}", user=refused.args[0], client=client, reason=refused.reason
            )
            return self._showForm(request, http.FORBIDDEN, target, NoRole.MESSAGE)
        except InvalidToken as invalid:
            self._authenticator.signInRefused("-", request.getClientAddress(), invalid.reason)
            self.log.error("Refused a sign-in from {client}: {reason}", client=client, reason=invalid.reason)
            return self._showForm(request, http.FORBIDDEN, target, FAILED)
        except CredentialsUnchecked as unchecked:
            return self._unavailable(request, target, unchecked)
        try:
            token = yield self._authenticator.startSession(account, sessionTokens(request.requestHeaders), idToken)
        except Exception:
            self.log.failure("Could not start a session for {user}", user=account.label)
            return self._showForm(request, http.SERVICE_UNAVAILABLE, target, UNAVAILABLE)
        self._authenticator.signedIn(account, request.getClientAddress())
        setSessionCookie(request, token)
        return _onwards(request, target)


def _onwards(request: Request, target: str) -> bytes:
    """
    Send the browser on to C{target} from a page of this site.  A redirect
    straight there would continue a navigation the provider's page began,
    and browsers may withhold SameSite=Strict cookies (the session's) from
    a navigation another site began, redirects included (RFC 6265bis 5.2;
    Chromium sends them, others need not).  The Refresh header's navigation
    is this page's own.
    """
    location = quote(target, safe="/?&=%:;,+@!$'()*~.-_#")
    request.setResponseCode(http.OK)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"Refresh", b"0; url=" + location.encode("ascii"))
    return b"Signed in: on to " + location.encode("ascii") + b"\n"


class _Callback(Resource):
    isLeaf = True

    def __init__(self, signIn: SingleSignOnResource) -> None:
        super().__init__()
        self._signIn = signIn

    def render_GET(self, request: Request):
        self._signIn.finish(request).addErrback(
            lambda failure: SingleSignOnResource.log.failure("Could not answer a sign-in callback", failure)
        )
        return NOT_DONE_YET


def _saveSignIn(
    statements: Statements, key: bytes, verifier: str, nonce: str, target: str, redirectURI: str, now: float
) -> None:
    # Sign-ins never finished are forgotten with the next one.
    statements.execute("DELETE FROM oidc_logins WHERE created < ?", (now - SIGN_IN_TIMEOUT,))
    (underWay,) = statements.row("SELECT COUNT(*) FROM oidc_logins") or (0,)
    if underWay >= MAX_SIGN_INS_UNDER_WAY:
        raise TooManySignIns()
    statements.execute(
        "INSERT INTO oidc_logins (state_hash, verifier, nonce, target, redirect_uri, created) VALUES (?, ?, ?, ?, ?, ?)",
        (key, verifier, nonce, target, redirectURI, now),
    )


def _takeSignIn(statements: Statements, key: bytes, startedAfter: float) -> Optional[tuple]:
    """
    The sign-in under C{key}, removed (a state is used once), if it began
    after C{startedAfter}.
    """
    row = statements.row(
        "SELECT verifier, nonce, target, redirect_uri, created FROM oidc_logins WHERE state_hash = ?", (key,)
    )
    if row is None:
        return None
    statements.execute("DELETE FROM oidc_logins WHERE state_hash = ?", (key,))
    verifier, nonce, target, redirectURI, created = row
    return (verifier, nonce, target, redirectURI) if created > startedAfter else None
