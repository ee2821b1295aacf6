"""
The access gate in front of every route of the HTTPS site: whether a
request's account may make it, judged from its route's policy (see
L{appliance.web.sitemap}), and the refusal it gets otherwise.
"""

from typing import Optional, Sequence, Tuple
from urllib.parse import quote_from_bytes

from twisted.logger import Logger
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request

from appliance.config import WebSection
from appliance.connections import clientKey
from appliance.web.authenticator import Authenticator
from appliance.web.credentials import SESSION_COOKIE, authorization, basicCredentials, decodeBasic
from appliance.web.origins import isBrowser, isNavigation, isSameOrigin, ownOrigin, requestOrigin, requestTarget
from appliance.web.pages import TOO_MANY_REQUESTS, Page, jsonError
from appliance.web.accounts import LOCAL
from appliance.web.sitemap import LOGIN_PATH, SAFE_METHODS, SCRAPE, Route, SiteMap
from appliance.web.throttle import tooManyFailures


class Refusal(Resource):
    """
    A leaf answering one refusal: C{code}, C{headers}, and a JSON body
    C{{"error": message}} or, for C{page}, that HTML page with C{message}.
    """

    isLeaf = True

    def __init__(
        self,
        code: int,
        message: str,
        headers: Tuple[Tuple[bytes, bytes], ...] = (),
        page: Optional[Page] = None,
    ) -> None:
        super().__init__()
        self.code = code
        self.message = message
        self.headers = headers
        self._page = page

    def render(self, request: Request) -> bytes:
        for name, value in self.headers:
            request.setHeader(name, value)
        if self._page is None:
            return jsonError(request, self.code, self.message)
        return self._page.answer(request, self.code, error=self.message)


def _quoted(text: str) -> bytes:
    return b'"' + text.replace("\\", "\\\\").replace('"', '\\"').encode("utf-8") + b'"'


def basicChallenge(siteName: str) -> bytes:
    """
    The C{WWW-Authenticate} value of a 401 for API clients: HTTP Basic, in
    the site's name, with UTF-8 credentials (RFC 7617).
    """
    return b"Basic realm=" + _quoted(siteName) + b', charset="UTF-8"'


def bearerChallenge(siteName: str) -> bytes:
    """
    The C{WWW-Authenticate} value of a 401 to a request whose Bearer token
    was refused (RFC 6750 3.1).
    """
    return b"Bearer realm=" + _quoted(siteName) + b', error="invalid_token"'


def cookieChallenge(siteName: str) -> bytes:
    """
    The C{WWW-Authenticate} value of a 401 for browsers: the C{Cookie} scheme
    (draft-broyer-http-cookie-auth) names the login page, and no browser
    answers it with a password prompt.
    """
    return b"Cookie realm=" + _quoted(siteName) + b', form-action="' + LOGIN_PATH + b'", cookie-name="' + SESSION_COOKIE + b'"'


class AccessGate(Resource):
    """
    The site's root as clients reach it: checks each request against its
    route's policy (L{appliance.web.sitemap}), then hands it to the site's
    root.

    A request without an account (C{request.account} is L{None}):
      - a browser loading a page other than /pacs/... goes to the login page
        (302 to C{/login?next=PATH}), which brings it back;
      - anything else gets 401 and a JSON body.  Only a client that is not a
        browser (no C{Sec-Fetch-Mode}, no session cookie) is challenged with
        C{WWW-Authenticate: Basic}: a browser shown that challenge would pop
        up its own password prompt over the viewer for every background
        request once a session expired, and would then send the credentials
        it remembers with every request, from any site.  Browsers get the
        C{Cookie} scheme instead (draft-broyer-http-cookie-auth), which names
        the login page and prompts nothing.  A refused Bearer token is told
        so in the Bearer scheme (RFC 6750);
      - 429 with C{Retry-After} when it brought HTTP Basic credentials from an
        address that has failed to log in too often (see
        L{appliance.web.throttle.LoginThrottle});
      - 503 with C{Retry-After} and a JSON body when its credentials could
        not be checked (too many password checks waiting, the directory
        unreachable: the request layer then sets
        C{request.credentialsUnchecked}, see
        L{appliance.web.checkers.CredentialsUnchecked}).  Public routes are
        still served.

    A request whose account lacks the role gets 403, an HTML page for a page
    load and JSON otherwise.  An unsafe request (not GET, HEAD or OPTIONS)
    authenticated by the session cookie must come from this site's own pages
    (L{isSameOrigin}), else 403 (CSRF).  One authenticated by HTTP Basic or
    a Bearer token needs no C{Origin} (scripts send none), but a browser sending an
    C{Origin} of a site other than this one or a C{[web]
    cors_allowed_origins} entry is refused too: a browser only sends Basic
    credentials by itself, to any site's forms, if the user typed them into
    its prompt once.
    """

    log = Logger()

    def __init__(
        self, siteMap: SiteMap, authenticator: Authenticator, web: WebSection, scrapeUsers: Sequence[str] = ()
    ) -> None:
        """
        @param scrapeUsers: the appliance's own accounts that may read
            C{/metrics} besides administrators ([metrics] scrape_users).
        """
        super().__init__()
        self._scrapeUsers = frozenset(scrapeUsers)
        self._map = siteMap
        self._root = siteMap.root()
        self._authenticator = authenticator
        self._corsOrigins = frozenset(origin.encode("ascii") for origin in web.cors_allowed_origins)
        self._forbiddenPage = Page("forbidden.html", "not allowed", web)
        self._basicChallenge = basicChallenge(web.site_name)
        self._cookieChallenge = cookieChallenge(web.site_name)
        self._bearerChallenge = bearerChallenge(web.site_name)

    def getChildWithDefault(self, name: bytes, request: Request) -> Resource:
        refusal = self._check(name, request.postpath, request)
        if refusal is not None:
            return refusal
        return self._root.getChildWithDefault(name, request)

    def refusalBeforeBody(self, request: Request) -> Optional[Refusal]:
        """
        The refusal of C{request}, which comes with a body, judged from its
        head and account alone (its C{postpath} still whole): the request
        layer asks before reading the body, so that a request refused here,
        or one whose route reads no body, never has its body read.
        """
        name, rest = request.postpath[0], request.postpath[1:]
        refusal = self._check(name, rest, request)
        if refusal is None and not self._map.route(name).takesBody(request.method, rest):
            refusal = Refusal(413, "This request takes no body: send it without one.")
        return refusal

    def _check(self, name: bytes, rest: Sequence[bytes], request: Request) -> Optional[Refusal]:
        route = self._map.route(name)
        role = route.role(request.method, rest)
        if role is None:
            return None
        account = getattr(request, "account", None)
        if account is None:
            return self._anonymous(route, request)
        if request.method not in SAFE_METHODS and not self._fromOwnPages(request):
            self.log.warn(
                "Refused {method} {path} by {user} from {client}: it did not come from this"
                " site's pages (Origin {origin})",
                method=request.method.decode("latin-1"),
                path=request.path.decode("latin-1"),
                user=account.label,
                client=clientKey(request.getClientAddress()),
                origin=(request.getHeader(b"origin") or b"-").decode("latin-1"),
            )
            return self._refuse(
                request,
                http.FORBIDDEN,
                "This request was refused: it did not come from this site's own pages.",
            )
        if not self._permits(account, role):
            self.log.info(
                "Refused {method} {path} to {user}: it needs the {role} role",
                method=request.method.decode("latin-1"),
                path=request.path.decode("latin-1"),
                user=account.label,
                role=role,
            )
            return self._refuse(
                request,
                http.FORBIDDEN,
                f"The account {account.name} may not do this: it needs the {role} role"
                " (ask an administrator, or log in as another user).",
            )
        return None

    def _permits(self, account, role: str) -> bool:
        if role == SCRAPE:
            return account.has("admin") or (account.source == LOCAL and account.name in self._scrapeUsers)
        return account.has(role)

    def _fromOwnPages(self, request: Request) -> bool:
        if authorization(request.requestHeaders) is None:
            return isSameOrigin(request)
        origin = requestOrigin(request)
        if origin is None:
            return True
        return origin == ownOrigin(request) or origin in self._corsOrigins

    def _anonymous(self, route: Route, request: Request) -> Refusal:
        unchecked = getattr(request, "credentialsUnchecked", None)
        if unchecked is not None:
            return Refusal(http.SERVICE_UNAVAILABLE, unchecked.message, ((b"Retry-After", b"%d" % (unchecked.retryAfter,)),))
        credentials = basicCredentials(request.requestHeaders)
        decoded = decodeBasic(credentials) if credentials is not None else None
        if decoded is not None:
            wait = self._authenticator.retryAfter(decoded[0], request.getClientAddress())
            if wait > 0:
                seconds = max(1, round(wait))
                return Refusal(
                    TOO_MANY_REQUESTS,
                    tooManyFailures(seconds),
                    ((b"Retry-After", b"%d" % (seconds,)),),
                )
        if route.loginPage and isNavigation(request):
            location = LOGIN_PATH + b"?next=" + quote_from_bytes(requestTarget(request), safe="/").encode("ascii")
            return Refusal(http.FOUND, "Log in first.", ((b"Location", location),))
        if authorization(request.requestHeaders) is not None and credentials is None:
            challenge = self._bearerChallenge
        elif isBrowser(request):
            challenge = self._cookieChallenge
        else:
            challenge = self._basicChallenge
        return Refusal(
            http.UNAUTHORIZED,
            "Log in first: send HTTP Basic credentials, or log in at " + LOGIN_PATH.decode("ascii") + ".",
            ((b"WWW-Authenticate", challenge),),
        )

    def _refuse(self, request: Request, code: int, message: str) -> Refusal:
        if not isNavigation(request):
            return Refusal(code, message)
        return Refusal(code, message, page=self._forbiddenPage)
