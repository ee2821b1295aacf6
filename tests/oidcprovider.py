"""
A real OpenID Provider for the tests: panva's oidc-provider (OpenID
Certified; npm, pinned in tests/oidc/package-lock.json, installed by
packaging/dev test), run by Node.js from tests/oidc/provider.mjs, on a free
port of 127.0.0.1 with TLS from a test authority.  One provider serves the
whole test run (started at its first use, removed when the run ends); each
test registers a client of its own (L{OpenIDProvider.addClient}).

What the provider does, as the appliance sees it:

  - authorization code flow only, PKCE (S256) required, client_secret_basic
    or client_secret_post;
  - the ID token carries C{groups} (a list of strings) when the scope
    C{profile} or C{groups} is granted, C{email} with C{email}, and
    C{preferred_username} and C{name} with C{profile};
  - the access token is a JWT (RFC 9068, header typ C{at+jwt}) for
    L{OpenIDProvider.resource}, which every authorization is for unless the
    request names another resource (which is refused): C{aud} is the resource,
    and it carries C{groups} and C{preferred_username} whatever the scopes;
  - tokens are signed RS256 with the first of L{OpenIDProvider.privateKeys},
    whose kid is in the header; the JWKS publishes every key;
  - RP-initiated logout always shows a confirmation page (the library's rule
    while someone is signed in); the page submits itself in a browser, and
    L{OpenIDProvider.confirmLogout} submits it for a client without
    JavaScript;
  - sessions, grants and codes live in the provider's memory: a restart
    (L{OpenIDProvider.rotateKeys}) ends every session at the provider, and
    keeps clients, users and keys.
"""

import base64
import hashlib
import html
import http.cookiejar
import json
import os
import re
import secrets
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from tests.support import SharedServer, TestAuthority, freePort, stopProcess

#: The provider's npm package and the server around it.
PROVIDER_FOLDER = Path(__file__).parent / "oidc"
PROVIDER_SCRIPT = PROVIDER_FOLDER / "provider.mjs"

#: How long the provider may take to answer its discovery document.
START_TIMEOUT = 30.0

#: The users created with the provider: name, groups.
USERS = {
    "viewer2": ["pacs-viewers"],
    "uploader2": ["pacs-uploaders"],
    "admin2": ["pacs-admins"],
    "nogroup2": ["other"],
}

#: What L{OpenIDProvider.tokens} asks for unless told otherwise; what the
#: appliance asks for by default.
DEFAULT_SCOPE = "openid profile email"


def nodeProgram() -> Optional[str]:
    return shutil.which("node")


def requireOidcProvider(skip) -> "OpenIDProvider":
    """
    The shared provider, started if need be; calls C{skip} (a test case's
    C{skipTest}, or C{pytest.skip}) with the reason where Node.js or the
    provider's npm packages are missing (packaging/dev test installs both).
    """
    if nodeProgram() is None:
        skip("Node.js is not installed (the OpenID Provider runs on it)")
    if not (PROVIDER_FOLDER / "node_modules" / "oidc-provider").is_dir():
        skip("tests/oidc/node_modules is missing: npm ci --prefix tests/oidc")
    return OpenIDProvider.shared()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _intB64(value: int) -> str:
    return _b64(value.to_bytes((value.bit_length() + 7) // 8, "big"))


def newKey() -> Dict[str, str]:
    """
    A new RSA private key as a JWK (RS256, use sig), its kid the RFC 7638
    thumbprint.  Not published anywhere: sign with it to forge a token whose
    key the provider never had.
    """
    from cryptography.hazmat.primitives.asymmetric import rsa

    numbers = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_numbers()
    public = numbers.public_numbers
    n, e = _intB64(public.n), _intB64(public.e)
    thumbprint = _b64(hashlib.sha256(json.dumps({"e": e, "kty": "RSA", "n": n}, separators=(",", ":")).encode()).digest())
    return {
        "kty": "RSA", "kid": thumbprint, "use": "sig", "alg": "RS256", "n": n, "e": e,
        "d": _intB64(numbers.d), "p": _intB64(numbers.p), "q": _intB64(numbers.q),
        "dp": _intB64(numbers.dmp1), "dq": _intB64(numbers.dmq1), "qi": _intB64(numbers.iqmp),
    }


def publicKey(jwk: Mapping[str, str]) -> Dict[str, str]:
    """
    The public part of a JWK from L{newKey}, as a JWKS publishes it.
    """
    return {name: jwk[name] for name in ("kty", "kid", "use", "alg", "n", "e")}


def signToken(claims: Mapping[str, object], key: Mapping[str, str], header: Optional[Mapping[str, object]] = None) -> str:
    """
    A JWS (compact) of C{claims} signed RS256 with the JWK C{key}; the header
    is C{{"alg": "RS256", "typ": "at+jwt", "kid": key's kid}} updated with
    C{header} (a value of L{None} removes a field).  For negative tests:
    expired tokens, foreign keys, wrong audiences, tampered claims.
    """
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    fields: Dict[str, object] = {"alg": "RS256", "typ": "at+jwt", "kid": key["kid"]}
    for name, value in (header or {}).items():
        if value is None:
            fields.pop(name, None)
        else:
            fields[name] = value
    number = lambda name: int.from_bytes(_unb64(key[name]), "big")  # noqa: E731
    private = rsa.RSAPrivateNumbers(
        p=number("p"), q=number("q"), d=number("d"),
        dmp1=number("dp"), dmq1=number("dq"), iqmp=number("qi"),
        public_numbers=rsa.RSAPublicNumbers(e=number("e"), n=number("n")),
    ).private_key()
    signingInput = (
        _b64(json.dumps(fields, separators=(",", ":")).encode()) + "."
        + _b64(json.dumps(claims, separators=(",", ":")).encode())
    )
    signature = private.sign(signingInput.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
    return signingInput + "." + _b64(signature)


def decodeToken(token: str) -> Tuple[dict, dict]:
    """
    The header and the claims of a JWS, not verified.
    """
    header, payload, _ = token.split(".")
    return json.loads(_unb64(header)), json.loads(_unb64(payload))


@dataclass
class Response:
    status: int
    url: str
    headers: Mapping[str, str]
    body: str

    @property
    def location(self) -> Optional[str]:
        """
        Where a redirect points, absolute.
        """
        location = self.headers.get("Location")
        return urllib.parse.urljoin(self.url, location) if location else None


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class Browser:
    """
    A user agent without JavaScript: cookies, no automatic redirects, TLS
    verified against C{caFiles} (the provider's CA, and the appliance's where
    a test walks through both).
    """

    def __init__(self, caFiles: Iterable[Union[str, Path]] = (), sslContext: Optional[ssl.SSLContext] = None) -> None:
        if sslContext is None:
            sslContext = ssl.create_default_context()
            for caFile in caFiles:
                sslContext.load_verify_locations(cafile=str(caFile))
        self.cookies = http.cookiejar.CookieJar()
        self._opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=sslContext),
            urllib.request.HTTPCookieProcessor(self.cookies),
            _NoRedirects(),
        )

    def request(
        self, method: str, url: str, fields: Optional[Mapping[str, str]] = None,
        headers: Optional[Mapping[str, str]] = None, timeout: float = 10.0,
    ) -> Response:
        data = urllib.parse.urlencode(fields).encode() if fields is not None else None
        request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
        if data is not None:
            request.add_header("Content-Type", "application/x-www-form-urlencoded")
        try:
            answer = self._opener.open(request, timeout=timeout)
        except urllib.error.HTTPError as error:
            answer = error
        with answer:
            body = answer.read().decode("utf-8", "replace")
            return Response(answer.status, url, answer.headers, body)

    def follow(
        self, url: str, stop: Callable[[str], bool], method: str = "GET",
        fields: Optional[Mapping[str, str]] = None, limit: int = 20,
    ) -> Union[Response, str]:
        """
        Request C{url} and follow the redirects (as GETs); the first redirect
        target for which C{stop} is true is returned unrequested (a string),
        else the first answer that is not a redirect.
        """
        response = self.request(method, url, fields)
        for _ in range(limit):
            if response.status not in (301, 302, 303, 307, 308) or response.location is None:
                return response
            if stop(response.location):
                return response.location
            response = self.request("GET", response.location)
        raise RuntimeError(f"more than {limit} redirects from {url}")


@dataclass
class User:
    username: str
    password: str
    groups: List[str]
    email: str
    sub: str = field(default_factory=lambda: str(uuid.uuid4()))
    name: str = ""

    def settings(self) -> dict:
        return {
            "sub": self.sub, "username": self.username, "password": self.password,
            "groups": self.groups, "email": self.email, "name": self.name or self.username.capitalize(),
        }


class OpenIDProvider(SharedServer):
    def __init__(
        self,
        resource: str = "https://pacs.test/",
        accessTokenLifetime: int = 300,
        idTokenLifetime: int = 300,
        sessionLifetime: int = 3600,
    ) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="pacs-appliance-oidc-"))
        self.port = freePort()
        #: The issuer, and the base of every endpoint.
        self.issuer = f"https://localhost:{self.port}"
        #: The audience of the access tokens (an absolute URI).
        self.resource = resource
        self.authority = TestAuthority(self.folder / "tls")
        #: The provider's certificate (for localhost and 127.0.0.1) and key.
        self.certificate, self.key = self.authority.issue("server", "localhost", server=True)
        #: The CA of the provider's certificate (the appliance's ca_file).
        self.caFile = self.authority.path
        #: Private JWKs, newest first: the first signs, all are published.
        self.privateKeys: List[Dict[str, str]] = [newKey()]
        self.users: Dict[str, User] = {
            name: User(name, secrets.token_urlsafe(12), groups, f"{name}@hospital.test")
            for name, groups in USERS.items()
        }
        self.clients: List[dict] = []
        self._cookieKeys = [secrets.token_urlsafe(32)]
        self._ttl = {"accessToken": accessTokenLifetime, "idToken": idTokenLifetime, "session": sessionLifetime}
        self.settingsFile = self.folder / "settings.json"
        self.logFile = self.folder / "provider.log"
        self._discovery: Optional[dict] = None
        self.process: Optional[subprocess.Popen] = None
        self._writeSettings()
        self.start()

    @property
    def passwords(self) -> Dict[str, str]:
        """
        User name to password.
        """
        return {name: user.password for name, user in self.users.items()}

    def _writeSettings(self) -> None:
        settings = {
            "port": self.port,
            "issuer": self.issuer,
            "tls": {"certificate": str(self.certificate), "key": str(self.key)},
            "keys": self.privateKeys,
            "cookieKeys": self._cookieKeys,
            "resource": self.resource,
            "ttl": self._ttl,
            "clients": self.clients,
            "users": [user.settings() for user in self.users.values()],
        }
        # The provider rereads clients and users when the file changes: it
        # must never see half of it.
        temporary = self.settingsFile.with_suffix(".tmp")
        temporary.write_text(json.dumps(settings, indent=2))
        os.replace(temporary, self.settingsFile)

    def sslContext(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.caFile))

    def output(self) -> str:
        """
        What the provider wrote (every start, every request).
        """
        return self.logFile.read_text(errors="replace") if self.logFile.exists() else ""

    def start(self) -> None:
        """
        Start the provider (again, on the same port, with the same clients,
        users and keys); returns once it serves its discovery document.
        Nothing to do if it runs: a test that stops it starts it again in
        its cleanup, and perhaps before.
        """
        if self.process is not None and self.process.poll() is None:
            return
        with self.logFile.open("a") as log:
            log.write(f"--- starting, signing key {self.privateKeys[0]['kid']}\n")
            log.flush()
            self.process = subprocess.Popen(
                [nodeProgram() or "node", str(PROVIDER_SCRIPT), str(self.settingsFile)],
                cwd=PROVIDER_FOLDER,
                # Its end of the pipe closing stops the provider (provider.mjs).
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        context = self.sslContext()
        url = self.issuer + "/.well-known/openid-configuration"
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(url, timeout=0.5, context=context) as answer:
                    self._discovery = json.load(answer)
                    return
            except (OSError, ValueError):
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("The OpenID Provider did not start:\n" + self.output())
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            stopProcess(self.process, timeout=10)
            self.process.stdin.close()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def discovery(self) -> dict:
        """
        The discovery document (as of the last start).
        """
        assert self._discovery is not None
        return self._discovery

    def jwks(self) -> dict:
        with urllib.request.urlopen(self.discovery()["jwks_uri"], timeout=10, context=self.sslContext()) as answer:
            return json.load(answer)

    def addClient(
        self,
        redirectUris: Sequence[str],
        postLogoutRedirectUris: Sequence[str] = (),
        accessTokenLifetime: Optional[int] = None,
        authMethod: str = "client_secret_basic",
    ) -> Tuple[str, str]:
        """
        Register a confidential client (a code-flow web application); its id
        and secret.  Immediate, without a restart, and kept across restarts.

        @param accessTokenLifetime: seconds its access tokens last, if not the
            provider's default (a test of expiry gives 2).
        @param authMethod: its registered token endpoint authentication; the
            provider accepts client_secret_basic and client_secret_post from
            every client whatever is registered.
        """
        clientId = "appliance-" + secrets.token_hex(6)
        clientSecret = secrets.token_urlsafe(32)
        client = {
            "client_id": clientId,
            "client_secret": clientSecret,
            "client_name": f"PACS appliance {clientId}",
            "redirect_uris": list(redirectUris),
            "post_logout_redirect_uris": list(postLogoutRedirectUris),
            "grant_types": ["authorization_code"],
            "response_types": ["code"],
            "token_endpoint_auth_method": authMethod,
        }
        if accessTokenLifetime is not None:
            client["access_token_ttl"] = accessTokenLifetime
        self.clients.append(client)
        self._writeSettings()
        return clientId, clientSecret

    def addUser(self, username: str, groups: Sequence[str], email: Optional[str] = None) -> str:
        """
        Create (or replace) a user, without a restart; its password.
        """
        user = User(username, secrets.token_urlsafe(12), list(groups), email or f"{username}@hospital.test")
        self.users[username] = user
        self._writeSettings()
        return user.password

    def rotateKeys(self) -> Dict[str, str]:
        """
        Sign with a new key from now on, the old ones still published (a
        restart: sessions at the provider end, clients and users stay); the
        new private JWK.
        """
        key = newKey()
        self.privateKeys.insert(0, key)
        self._writeSettings()
        self.restart()
        return key

    def authorizationUrl(
        self, clientId: str, redirectUri: str, scope: str = DEFAULT_SCOPE, **parameters: str,
    ) -> Tuple[str, Dict[str, str]]:
        """
        An authorization request with PKCE, state and nonce; the URL, and the
        values the client keeps (code_verifier, state, nonce).
        """
        verifier = secrets.token_urlsafe(48)
        kept = {"code_verifier": verifier, "state": secrets.token_urlsafe(16), "nonce": secrets.token_urlsafe(16)}
        query = {
            "client_id": clientId,
            "redirect_uri": redirectUri,
            "response_type": "code",
            "scope": scope,
            "state": kept["state"],
            "nonce": kept["nonce"],
            "code_challenge": _b64(hashlib.sha256(verifier.encode("ascii")).digest()),
            "code_challenge_method": "S256",
            **parameters,
        }
        return self.discovery()["authorization_endpoint"] + "?" + urllib.parse.urlencode(query), kept

    def logIn(
        self, browser: Browser, page: Response, user: str, stop: Callable[[str], bool],
        password: Optional[str] = None,
    ) -> Union[Response, str]:
        """
        Submit the provider's login form C{page} as C{user} (with its password
        unless C{password} is given) and follow the redirects as
        L{Browser.follow} does: the redirect to the client, or the page
        that answered (the form again, with #error, for a wrong password).
        """
        match = re.search(r'<form id="login-form" method="post" action="([^"]+)"', page.body)
        if match is None:
            raise AssertionError(f"not the provider's login form ({page.status} {page.url}):\n{page.body[:2000]}")
        action = urllib.parse.urljoin(page.url, html.unescape(match.group(1)))
        fields = {"login": user, "password": self.users[user].password if password is None else password}
        return browser.follow(action, stop, method="POST", fields=fields)

    def confirmLogout(self, browser: Browser, page: Response, stop: Callable[[str], bool]) -> Union[Response, str]:
        """
        Submit the provider's logout confirmation C{page} (what a browser does
        by itself) and follow the redirects as L{Browser.follow} does.
        """
        form = re.search(r'<form id="op.logoutForm" method="post" action="([^"]+)">(.*?)</form>', page.body, re.S)
        if form is None:
            raise AssertionError(f"not the provider's logout page ({page.status} {page.url}):\n{page.body[:2000]}")
        fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"/?>', form.group(2)))
        fields["logout"] = "yes"
        return browser.follow(html.unescape(form.group(1)), stop, method="POST", fields=fields)

    def authorize(
        self, user: str, clientId: str, redirectUri: str, scope: str = DEFAULT_SCOPE,
        password: Optional[str] = None, browser: Optional[Browser] = None, **parameters: str,
    ) -> Tuple[Dict[str, str], Dict[str, str]]:
        """
        The front channel of a code flow: sign in as C{user} and catch the
        redirect to C{redirectUri} (nothing need listen there).  The callback's
        query parameters (code, state, iss; or error) and the values the client
        kept (code_verifier, state, nonce).
        """
        browser = browser or Browser([self.caFile])
        url, kept = self.authorizationUrl(clientId, redirectUri, scope, **parameters)
        back = lambda location: location.startswith(redirectUri)  # noqa: E731
        answer = browser.follow(url, back)
        if isinstance(answer, Response):
            answer = self.logIn(browser, answer, user, back, password)
        if isinstance(answer, Response):
            error = re.search(r'<p id="error"[^>]*>(.*?)</p>', answer.body, re.S)
            raise AssertionError(
                f"the sign-in of {user} did not come back to {redirectUri}: {answer.status} {answer.url} "
                + (html.unescape(error.group(1)) if error else answer.body[:2000])
            )
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(answer).query))
        return query, kept

    def exchange(
        self, code: str, clientId: str, clientSecret: str, redirectUri: str, codeVerifier: str,
        authMethod: str = "client_secret_basic",
    ) -> Tuple[int, dict]:
        """
        A token request for C{code}: the status and the JSON answer.
        """
        fields = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirectUri, "code_verifier": codeVerifier}
        headers = {"Accept": "application/json"}
        if authMethod == "client_secret_basic":
            # RFC 6749 2.3.1: both form-encoded before the Basic encoding.
            credentials = f"{urllib.parse.quote_plus(clientId)}:{urllib.parse.quote_plus(clientSecret)}"
            headers["Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode("ascii")
        else:
            fields.update(client_id=clientId, client_secret=clientSecret)
        answer = Browser(sslContext=self.sslContext()).request("POST", self.discovery()["token_endpoint"], fields, headers)
        return answer.status, json.loads(answer.body)

    def tokens(
        self, user: str, clientId: str, clientSecret: str, redirectUri: str,
        scope: str = DEFAULT_SCOPE, authMethod: str = "client_secret_basic",
    ) -> dict:
        """
        A whole authorization code flow with PKCE as C{user}: the token
        response (access_token: a JWT for L{resource}; id_token; expires_in;
        token_type; scope), plus the C{nonce} that was sent.
        """
        query, kept = self.authorize(user, clientId, redirectUri, scope)
        if "code" not in query:
            raise AssertionError(f"no code for {user}: {query}")
        if query.get("state") != kept["state"]:
            raise AssertionError(f"state changed: {query}")
        status, answer = self.exchange(query["code"], clientId, clientSecret, redirectUri, kept["code_verifier"], authMethod)
        if status != 200:
            raise AssertionError(f"token request refused: {status} {answer}")
        answer["nonce"] = kept["nonce"]
        return answer
