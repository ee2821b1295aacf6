"""
Single sign-on ([oidc]) against a real, OpenID Certified provider (panva's
oidc-provider, tests/oidcprovider.py): the provider's access tokens checked
as Bearer credentials, and every forged or misused token refused; then the
daemon's sign-in for browsers, without JavaScript and in headless Chromium
from the viewer to the study on the canvas, and its logout at the provider.
"""

import base64
import hashlib
import hmac
import html
import json
import re
import time
import urllib.parse
from pathlib import Path
from typing import Dict, List

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from appliance.web.accounts import OIDC, Account
from appliance.web.checkers import NoRole
from appliance.web.credentials import BearerToken
from appliance.web.openid import InvalidToken, OpenIDProvider, TokenChecker
from tests.daemon import DaemonClient, addUser, startDaemon
from tests.oidcprovider import Browser, Response, decodeToken, newKey, publicKey, requireOidcProvider, signToken
from tests.browser import CANVAS_PIXELS, waitUntil
from tests.support import ctSeries, freePort, temporaryFolder, testConfig
from tests.viewerbuild import ARTIFACTS, VIEWER, requireViewer, startChromium
from tests.webclients import stowBody


def oidcSection(provider, clientId: str, secretFile: Path, **overrides: object) -> Dict[str, object]:
    """
    The appliance's [oidc] for C{provider}'s client C{clientId}.
    """
    section: Dict[str, object] = {
        "issuer": provider.issuer,
        "client_id": clientId,
        "client_secret_file": secretFile,
        "ca_file": provider.caFile,
        "display_name": "Hospital sign-in",
        "audience": provider.resource,
        "viewer_values": "pacs-viewers",
        "uploader_values": "pacs-uploaders",
        "admin_values": "pacs-admins",
    }
    section.update(overrides)
    return section


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class BearerTokenTests(TestCase):
    """
    L{TokenChecker} and L{OpenIDProvider} in this process, against the
    provider: its access tokens give accounts; nothing else does.
    """

    @inlineCallbacks
    def setUp(self):
        self.provider = requireOidcProvider(self.skipTest)
        folder = temporaryFolder(self)
        self.redirectURI = "https://localhost:1/login/oidc/callback"
        self.clientId, secret = self.provider.addClient([self.redirectURI])
        secretFile = folder / "secret"
        secretFile.write_text(secret + "\n")
        self.secret = secret
        config = testConfig(folder, oidc=oidcSection(self.provider, self.clientId, secretFile))
        self.openid = OpenIDProvider.fromConfig(config.oidc, reactor)
        self.openid.startService()
        self.addCleanup(self.openid.stopService)
        self.checker = TokenChecker(self.openid)
        yield self.openid.metadata()

    def tokens(self, user: str) -> dict:
        return self.provider.tokens(user, self.clientId, self.secret, self.redirectURI)

    def check(self, token: str):
        return self.checker.requestAvatarId(BearerToken(token.encode("ascii")))

    @inlineCallbacks
    def test_accessTokensGiveAccounts(self):
        """
        Each user's access token gives the role its groups map to; a user
        in no mapped group gets none.
        """
        for user, role in (("viewer2", "viewer"), ("uploader2", "uploader"), ("admin2", "admin")):
            tokens = yield deferToThread(self.tokens, user)
            account = yield self.check(tokens["access_token"])
            self.assertEqual(account, Account(user, frozenset({role}), OIDC))
        tokens = yield deferToThread(self.tokens, "nogroup2")
        yield self.assertFailure(self.check(tokens["access_token"]), NoRole)

    @inlineCallbacks
    def test_forgedAndMisusedTokensRefused(self):
        """
        Expired, not yet valid, for another audience, from another issuer,
        signed with a key the provider never published, unsigned (alg
        none), "signed" with HMAC keyed by the provider's public key, an ID
        token instead of an access token, and a tampered one: each refused
        with its reason.
        """
        real = yield deferToThread(self.tokens, "admin2")
        header, claims = decodeToken(real["access_token"])
        key = self.provider.privateKeys[0]
        now = int(time.time())

        def resigned(**changes: object) -> str:
            return signToken({**claims, **changes}, key, {"kid": header["kid"], "typ": header.get("typ", "JWT")})

        cases = {
            "expired": resigned(exp=now - 600, iat=now - 1200),
            "not yet valid": resigned(nbf=now + 600),
            "another audience": resigned(aud="https://other.example/"),
            "another issuer": resigned(iss="https://evil.example"),
        }
        stranger = newKey()
        cases["unknown key"] = signToken(claims, stranger, {"kid": stranger["kid"], "typ": "at+jwt"})
        cases["a stranger's key under a known kid"] = signToken(claims, stranger, {"kid": header["kid"], "typ": "at+jwt"})
        unsigned = _b64(json.dumps({"alg": "none", "kid": header["kid"]}).encode()) + "." + _b64(json.dumps(claims).encode())
        cases["alg none"] = unsigned + "."
        public = json.dumps(publicKey(key), separators=(",", ":")).encode()
        hmacHeader = _b64(json.dumps({"alg": "HS256", "kid": header["kid"]}).encode())
        body = hmacHeader + "." + _b64(json.dumps(claims).encode())
        cases["HMAC with the public key"] = body + "." + _b64(hmac.new(public, body.encode(), hashlib.sha256).digest())
        cases["an ID token"] = real["id_token"]
        signedPart, signature = real["access_token"].rsplit(".", 1)
        cases["tampered"] = signedPart[:-4] + ("AAAA" if not signedPart.endswith("AAAA") else "BBBB") + "." + signature
        reasons = {}
        for name, token in cases.items():
            failure = yield self.assertFailure(self.check(token), InvalidToken)
            reasons[name] = failure.reason
        self.assertRegex(reasons["expired"], "expired")
        self.assertRegex(reasons["not yet valid"], "not yet valid")
        self.assertRegex(reasons["another audience"], "[Aa]udience")
        self.assertRegex(reasons["another issuer"], "[Ii]ssuer")
        self.assertRegex(reasons["unknown key"], "does not publish")
        self.assertRegex(reasons["alg none"], "'none'")
        self.assertRegex(reasons["HMAC with the public key"], "'HS256'")
        self.assertRegex(reasons["an ID token"], "[Aa]udience")
        # The real one still passes: the refusals were the changes'.
        account = yield self.check(real["access_token"])
        self.assertEqual(account.roles, {"admin"})

    @inlineCallbacks
    def test_anIDTokenIsNoAccessToken(self):
        """
        Where access tokens are for the client itself (audience = client
        id, as some providers issue them), the client's ID tokens have that
        audience too: they carry the nonce of a sign-in, and are refused.
        """
        folder = temporaryFolder(self)
        secretFile = folder / "secret"
        secretFile.write_text(self.secret)
        config = testConfig(folder, oidc=oidcSection(self.provider, self.clientId, secretFile, audience=""))
        openid = OpenIDProvider.fromConfig(config.oidc, reactor)
        self.addCleanup(openid.stopService)
        tokens = yield deferToThread(self.tokens, "admin2")
        failure = yield self.assertFailure(TokenChecker(openid).requestAvatarId(BearerToken(tokens["id_token"].encode())), InvalidToken)
        self.assertEqual(failure.reason, "an ID token is not an access token")

    @inlineCallbacks
    def test_keyRotation(self):
        """
        The provider signs with a new key: its tokens are taken once the
        keys are fetched again (the new key id asks for it), and tokens of
        the old key, still published, still are.
        """
        before = yield deferToThread(self.tokens, "viewer2")
        yield deferToThread(self.provider.rotateKeys)
        after = yield deferToThread(self.tokens, "viewer2")
        self.assertNotEqual(decodeToken(before["access_token"])[0]["kid"], decodeToken(after["access_token"])[0]["kid"])
        for tokens in (after, before):
            account = yield self.check(tokens["access_token"])
            self.assertEqual(account.name, "viewer2")


class SignInTests(DaemonClient, TestCase):
    """
    The daemon with [oidc], seen by a client without JavaScript (the
    fixture's L{Browser}): the sign-in from the login page to the session,
    its refusals, Bearer tokens on /pacs, and the logout at the provider.
    The appliance presents the provider's certificate (both are localhost
    to the test authority), so that one authority checks both.
    """

    timeout = 300

    @inlineCallbacks
    def setUp(self):
        self.provider = requireOidcProvider(self.skipTest)
        folder = temporaryFolder(self)
        port = freePort()
        self.base = f"https://localhost:{port}"
        self.clientId, self.secret = self.provider.addClient(
            [self.base + "/login/oidc/callback"], [self.base + "/login"]
        )
        secretFile = folder / "oidc-secret"
        secretFile.write_text(self.secret + "\n")
        users = folder / "users"
        addUser(users, "keeper", "break glass 1234", ["admin"])
        self.config = testConfig(
            folder,
            web={"listen_https": f"127.0.0.1:{port}"},
            tls={"certificate": self.provider.certificate, "private_key": self.provider.key},
            auth={"users_file": users},
            oidc=oidcSection(self.provider, self.clientId, secretFile),
        )
        self.output, _ = yield startDaemon(self, self.config)
        self.context = self.provider.sslContext()

    def signIn(self, browser: Browser, user: str, path: str = "/pacs/studies"):
        """
        From the login page of C{path}, through the link to the single
        sign-on and the provider's form, back to the appliance: its last
        answer.
        """
        page = browser.request("GET", self.base + "/login?next=" + urllib.parse.quote(path, safe=""))
        link = re.search(r'<a id="single-sign-on" href="([^"]+)">Sign in with Hospital sign-in</a>', page.body)
        self.assertIsNotNone(link, page.body)
        form = browser.follow(self.base + html.unescape(link.group(1)), lambda url: False)
        return self.provider.logIn(browser, form, user, lambda url: False)

    def bearer(self, token: str) -> Dict[str, str]:
        return {"Authorization": "Bearer " + token}

    @inlineCallbacks
    def test_signInAndOutAtTheProvider(self):
        """
        A sign-in ends in the appliance's session (the browser holds no
        token, only the session cookie), sent on from a page of the site;
        the journal and the access log name oidc:viewer2; logging out ends
        the session and the provider's, and comes back to the login page.
        """
        browser = Browser(sslContext=self.context)
        answer = yield deferToThread(self.signIn, browser, "viewer2", "/pacs/studies")
        self.assertEqual((answer.status, answer.headers["Refresh"]), (200, "0; url=/pacs/studies"))
        # The jar holds the provider's cookies too (both are localhost).
        ours = sorted(cookie.name for cookie in browser.cookies if cookie.name.startswith("__Host-pacs"))
        self.assertEqual(ours, ["__Host-pacs-session"], "the sign-in's state cookie is gone, and no token was set")
        status = (yield deferToThread(browser.request, "GET", self.base + "/pacs/studies")).status
        self.assertEqual(status, 200)
        yield self.output.waitFor("oidc:viewer2 logged in")
        yield self.output.waitFor('"127.0.0.1" - oidc:viewer2 [')

        back = lambda url: url.startswith(self.base + "/login")  # noqa: E731
        confirmation = yield deferToThread(browser.follow, self.base + "/logout", back)
        self.assertIsInstance(confirmation, Response, "the logout did not go to the provider")
        self.assertTrue(confirmation.url.startswith(self.provider.issuer), confirmation.url)
        returned = yield deferToThread(self.provider.confirmLogout, browser, confirmation, back)
        self.assertIsInstance(returned, str)
        status = (yield deferToThread(browser.request, "GET", self.base + "/pacs/studies")).status
        self.assertEqual(status, 401)
        yield self.output.waitFor("oidc:viewer2 logged out")

    @inlineCallbacks
    def test_refusedSignIns(self):
        """
        A user whose groups give no role is told so; a callback replayed,
        or brought to another browser (login CSRF), is refused.
        """
        answer = yield deferToThread(self.signIn, Browser(sslContext=self.context), "nogroup2")
        self.assertEqual(answer.status, 403)
        self.assertIn("has no access to this appliance", answer.body)

        browser = Browser(sslContext=self.context)
        head = yield deferToThread(browser.request, "HEAD", self.base + "/login/oidc?next=/")
        self.assertEqual(head.status, 405, "a HEAD would keep a sign-in under way")
        callback = lambda url: "/login/oidc/callback" in url  # noqa: E731
        page = yield deferToThread(browser.request, "GET", self.base + "/login/oidc?next=/")
        form = yield deferToThread(browser.follow, page.location, lambda url: False)
        url = yield deferToThread(self.provider.logIn, browser, form, "viewer2", callback)
        self.assertIsInstance(url, str)
        stranger = Browser(sslContext=self.context)
        answer = yield deferToThread(stranger.request, "GET", url)
        self.assertEqual(answer.status, 400, "another browser's callback")
        answer = yield deferToThread(browser.request, "GET", url)
        self.assertEqual(answer.status, 200)
        answer = yield deferToThread(browser.request, "GET", url)
        self.assertEqual(answer.status, 400, "a replayed callback")
        self.assertIn("did not start in this browser, or was already used", answer.body)

    @inlineCallbacks
    def test_bearerTokens(self):
        """
        The provider's access tokens are credentials on /pacs, each with its
        role; an expired one is refused with a Bearer challenge.
        """
        redirect = self.base + "/login/oidc/callback"
        viewer = yield deferToThread(self.provider.tokens, "viewer2", self.clientId, self.secret, redirect)
        admin = yield deferToThread(self.provider.tokens, "admin2", self.clientId, self.secret, redirect)
        for headers, path, expected in (
            (self.bearer(viewer["access_token"]), "/pacs/studies", 200),
            (self.bearer(viewer["access_token"]), "/pacs-admin/system", 403),
            (self.bearer(admin["access_token"]), "/pacs-admin/system", 200),
        ):
            status = yield deferToThread(self.statusOf, path, headers)
            self.assertEqual(status, expected, path)
        header, claims = decodeToken(viewer["access_token"])
        expired = signToken({**claims, "exp": int(time.time()) - 600}, self.provider.privateKeys[0], {"kid": header["kid"]})
        status, challenge = yield deferToThread(self.statusAndChallenge, "/pacs/studies", self.bearer(expired))
        self.assertEqual(status, 401)
        self.assertIn('Bearer realm="PACS", error="invalid_token"', challenge)
        yield self.output.waitFor("Refused a Bearer token from 127.0.0.1: Signature has expired")

    def statusOf(self, path: str, headers: Dict[str, str]) -> int:
        return Browser(sslContext=self.context).request("GET", self.base + path, headers=headers).status

    def statusAndChallenge(self, path: str, headers: Dict[str, str]):
        answer = Browser(sslContext=self.context).request("GET", self.base + path, headers=headers)
        return answer.status, ", ".join(answer.headers.get_all("WWW-Authenticate") or [])


class ViewerSignInTests(DaemonClient, TestCase):
    """
    The whole browser flow in headless Chromium: the viewer's link to a
    study, the login page, the provider's sign-in, and the study on the
    canvas, every request carried by the appliance's session.
    """

    timeout = 420

    @inlineCallbacks
    def setUp(self):
        requireViewer(self)
        self.provider = requireOidcProvider(self.skipTest)
        self.folder = temporaryFolder(self)
        port = freePort()
        self.base = f"https://localhost:{port}"
        clientId, secret = self.provider.addClient([self.base + "/login/oidc/callback"], [self.base + "/login"])
        secretFile = self.folder / "oidc-secret"
        secretFile.write_text(secret)
        self.config = testConfig(
            self.folder,
            web={"listen_https": f"127.0.0.1:{port}", "ohif_root": VIEWER},
            tls={"certificate": self.provider.certificate, "private_key": self.provider.key},
            oidc=oidcSection(self.provider, clientId, secretFile),
        )
        self.output, _ = yield startDaemon(self, self.config)
        # The study, stored with an uploader's access token.
        tokens = yield deferToThread(self.provider.tokens, "uploader2", clientId, secret, self.base + "/login/oidc/callback")
        self.series = ctSeries(4, rows=256, columns=256)
        for instance in self.series:
            contentType, body = stowBody(instance)
            status = yield deferToThread(self.post, "/pacs/studies", body, {
                "Authorization": "Bearer " + tokens["access_token"], "Content-Type": contentType,
            })
            self.assertEqual(status, 200)

    def post(self, path: str, body: bytes, headers: Dict[str, str]) -> int:
        import http.client

        connection = http.client.HTTPSConnection("localhost", self.config.web.listen_https.port, context=self.provider.sslContext(), timeout=60)
        try:
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()

    def test_fromTheViewerThroughTheProviderToTheStudy(self):
        studyUID = self.series[0].StudyInstanceUID

        def browse() -> List[dict]:
            from selenium.webdriver.common.by import By

            browser = startChromium(self.provider.certificate, str(self.folder / "chromium"))
            try:
                browser.get(f"{self.base}/viewer?StudyInstanceUIDs={studyUID}")
                waitUntil(browser, lambda b: "/login" in b.current_url, message="no redirect to the login page")
                browser.find_element(By.ID, "single-sign-on").click()
                waitUntil(browser, lambda b: b.current_url.startswith(self.provider.issuer), message="not at the provider")
                browser.find_element(By.CSS_SELECTOR, "input[name=login]").send_keys("viewer2")
                browser.find_element(By.CSS_SELECTOR, "input[name=password]").send_keys(self.provider.passwords["viewer2"])
                browser.find_element(By.ID, "submit").click()
                canvases = waitUntil(
                    browser,
                    lambda b: "/viewer" in b.current_url and [
                        c for c in b.execute_script(CANVAS_PIXELS) if c["levels"] > 20 and c["litFraction"] > 0.2
                    ],
                    timeout=120,
                    message="the study is not on a canvas after the sign-in",
                )
                ARTIFACTS.mkdir(exist_ok=True)
                browser.save_screenshot(str(ARTIFACTS / "single-sign-on-study.png"))
                return canvases
            finally:
                browser.quit()

        return deferToThread(browse).addCallback(self.drawn)

    def drawn(self, canvases: List[dict]) -> None:
        self.assertTrue(canvases)
        dicomweb = [line for line in self.output.lines if '"GET /pacs/' in line]
        self.assertTrue(dicomweb)
        for line in dicomweb:
            self.assertIn(" - oidc:", line)


class ProviderDownTests(DaemonClient, TestCase):
    """
    The provider stopped: what the appliance already holds keeps working,
    what needs the provider gets 503, and the appliance's own accounts are
    the way in.
    """

    timeout = 300

    @inlineCallbacks
    def test_providerDown(self):
        provider = requireOidcProvider(self.skipTest)
        folder = temporaryFolder(self)
        port = freePort()
        base = f"https://localhost:{port}"
        clientId, secret = provider.addClient([base + "/login/oidc/callback"])
        secretFile = folder / "oidc-secret"
        secretFile.write_text(secret)
        users = folder / "users"
        addUser(users, "keeper", "break glass 1234", ["admin"])
        self.config = testConfig(
            folder,
            web={"listen_https": f"127.0.0.1:{port}"},
            tls={"certificate": provider.certificate, "private_key": provider.key},
            auth={"users_file": users},
            oidc=oidcSection(provider, clientId, secretFile),
        )
        self.output, process = yield startDaemon(self, self.config)
        tokens = yield deferToThread(provider.tokens, "viewer2", clientId, secret, base + "/login/oidc/callback")
        bearer = {"Authorization": "Bearer " + tokens["access_token"]}
        keeper = {"Authorization": "Basic " + base64.b64encode(b"keeper:break glass 1234").decode()}
        context = provider.sslContext()

        def status(path: str, headers: Dict[str, str]) -> int:
            return Browser(sslContext=context).request("GET", base + path, headers=headers).status

        provider.stop()
        self.addCleanup(provider.start)
        # The provider's keys are held: its tokens still pass.
        self.assertEqual((yield deferToThread(status, "/pacs/studies", bearer)), 200)

        # A daemon started while the provider is down has nothing to go on.
        process.signalProcess("TERM")
        yield self.output.ended
        self.output, _ = yield startDaemon(self, self.config)
        yield self.output.waitFor("cannot be used")
        for attempt in range(2):
            answer = yield deferToThread(Browser(sslContext=context).request, "GET", base + "/login/oidc?next=/")
            self.assertEqual(answer.status, 503)
            self.assertIn("single sign-on cannot be reached", answer.body)
            self.assertIn("Retry-After", answer.headers)
        self.assertEqual((yield deferToThread(status, "/pacs/studies", bearer)), 503)
        self.assertEqual((yield deferToThread(status, "/pacs/studies", keeper)), 200)
        self.assertEqual(len(self.linesSince(0, "cannot be used")), 1)

        provider.start()
        yield self.poll(lambda: status("/login/oidc?next=/", {}) == 303, "the sign-in going to the provider again")
        self.assertEqual((yield deferToThread(status, "/pacs/studies", bearer)), 200)
        yield self.output.waitFor("answers again")


def test_checkConfigWarnsOfAnUnreachableProvider(tmp_path: Path) -> None:
    """
    check-config accepts a provider it cannot reach (it may be down while
    the box boots), and says so.
    """
    import subprocess

    import pytest

    from tests.commandline import COMMAND
    from tests.support import writeTestConfig

    provider = requireOidcProvider(pytest.skip)
    secretFile = tmp_path / "secret"
    secretFile.write_text("secret")
    path = writeTestConfig(tmp_path, oidc=oidcSection(provider, "appliance", secretFile))
    check = lambda: subprocess.run([COMMAND, "check-config", "--config", str(path)], capture_output=True, text=True, timeout=120)  # noqa: E731
    result = check()
    assert (result.returncode, result.stderr) == (0, "")
    provider.stop()
    try:
        result = check()
    finally:
        provider.start()
    assert result.returncode == 0
    assert result.stderr.startswith(f"warning: {path}: [oidc] issuer: the provider's discovery document "), result.stderr


class SignInStateTests(TestCase):
    """
    The sign-ins under way, in the state database.
    """

    def test_boundedAndUsedOnce(self):
        from twisted.internet.task import Clock

        from appliance.web import signin
        from tests.support import inlineStateDatabase

        clock = Clock()
        database = inlineStateDatabase(clock)
        self.patch(signin, "MAX_SIGN_INS_UNDER_WAY", 2)
        for state in (b"a", b"b"):
            self.successResultOf(database.interact(signin._saveSignIn, state, "verifier", "nonce", "/", "https://x/cb", 0.0))
        self.failureResultOf(
            database.interact(signin._saveSignIn, b"c", "verifier", "nonce", "/", "https://x/cb", 1.0), signin.TooManySignIns
        )
        taken = self.successResultOf(database.interact(signin._takeSignIn, b"a", -1.0))
        self.assertEqual(taken, ("verifier", "nonce", "/", "https://x/cb"))
        self.assertIsNone(self.successResultOf(database.interact(signin._takeSignIn, b"a", -1.0)), "used once")
        self.assertIsNone(self.successResultOf(database.interact(signin._takeSignIn, b"b", 0.0)), "expired")
        # Old ones make room: they are forgotten with the next.
        self.successResultOf(
            database.interact(signin._saveSignIn, b"d", "verifier", "nonce", "/", "https://x/cb", 1.0 + signin.SIGN_IN_TIMEOUT)
        )
