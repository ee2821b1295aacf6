"""
The hospital's single sign-on ([oidc], OpenID Connect) as a source of
accounts: browsers sign in at the provider and come back with the
appliance's own session; API clients send the provider's access tokens.

    browser ─ GET /login/oidc ──▶ provider's sign-in ──▶ GET /login/oidc/callback ─▶ session cookie
                (state, nonce, PKCE kept             (code exchanged for tokens; the ID token
                 in the state database)               checked; its claims give the roles)
    API client ─ Authorization: Bearer ─▶ TokenChecker ─▶ signature, issuer, audience, times

The provider is found by discovery (C{ISSUER/.well-known/openid-configuration})
and its keys (JWKS) are kept by key id, fetched again every hour and when a
token names a key not seen yet (a rotation), at most every
L{UNKNOWN_KEY_REFETCH} seconds.  Only asymmetric algorithms are taken
(L{SIGNING_ALGORITHMS}), each with a key of its own type: C{alg: none}, and
an HMAC "signed" with a public key, are refused before any key is used.
Everything is fetched over Twisted's HTTP client, TLS 1.2 or later with the
provider's certificate checked.  The browser gets no access token; its ID
token goes back to the provider only as the logout's C{id_token_hint}.
"""

import base64
import hashlib
import hmac
import json
import re
from io import BytesIO
from typing import Dict, FrozenSet, Iterable, Mapping, Optional, Tuple
from urllib.parse import urlencode, urlsplit

from twisted.application.service import Service
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks, succeed
from twisted.internet.ssl import Certificate, TLSVersion, optionsForClientTLS, platformTrust, trustRootFromCertificates
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from appliance.config import OidcSection
from appliance.deferreds import SharedOutcome, shortDescription
from appliance.secretfiles import readSecret
from appliance.tls import readAuthorities
from appliance.web.accounts import OIDC, ROLES, Account, IAccount
from appliance.web.bodies import readLimited
from appliance.web.checkers import CredentialsUnchecked, NoRole, RefusedLogin
from appliance.web.credentials import IBearerToken

#: The signature algorithms taken, all asymmetric: a token's header names
#: one of these, and its key must be of the matching type.
SIGNING_ALGORITHMS = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", "Ed25519"),
}

#: How far the provider's clock and ours may disagree, in seconds.
CLOCK_SKEW = 60

#: How often the provider's metadata and keys are fetched again.
REFRESH_INTERVAL = 3600.0

#: A token naming a key not seen yet fetches the keys again, at most this
#: often: random key ids cannot make the appliance hammer the provider.
UNKNOWN_KEY_REFETCH = 10.0

#: After the provider could not be reached, it is asked again at most this
#: often (each sign-in or token meanwhile gets 503 at once).
UNREACHABLE_RETRY = 5.0

#: The largest document taken from the provider.
MAX_DOCUMENT = 512 * 1024

#: How long a sign-in may take at the provider, from the appliance's
#: redirect to the browser's return.
SIGN_IN_TIMEOUT = 600.0

#: The provider's answer names the user with this claim when the configured
#: one is missing or unusable.
SUBJECT = "sub"

#: What a name from the provider may hold to be used as the account's name
#: (else the subject is): no white space or control characters.
USABLE_NAME = re.compile(r"[^\s\x00-\x1f\x7f]{1,256}")


class ProviderUnavailable(CredentialsUnchecked):
    """
    The provider (its metadata, its keys, its token endpoint) could not be
    reached or did not answer as OpenID Connect says.
    """

    message = (
        "The hospital's single sign-on cannot be reached: try again in a minute"
        " (the appliance's own accounts can still log in)."
    )
    retryAfter = 30


class InvalidToken(RefusedLogin):
    """
    A token was refused; C{reason} says why.
    """

    reason = "the token is invalid"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def pkceChallenge(verifier: str) -> str:
    """
    The S256 code challenge of C{verifier} (RFC 7636).
    """
    return _b64url(hashlib.sha256(verifier.encode("ascii")).digest())


def claimValues(claims: Mapping[str, object], path: str) -> FrozenSet[str]:
    """
    The string values of the claim at C{path}: a name, or names with dots
    between them for a nested claim (Keycloak's C{realm_access.roles}); a
    list of strings or one string.
    """
    value: object = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return frozenset()
        value = value[part]
    if isinstance(value, str):
        return frozenset([value])
    if isinstance(value, list):
        return frozenset(item for item in value if isinstance(item, str))
    return frozenset()


@implementer(IPolicyForHTTPS)
class ProviderTLS:
    """
    TLS to the provider: 1.2 or later, its certificate checked against the
    authorities of C{[oidc] ca_file} (the system's without one) and its name
    against the host of the URL.
    """

    def __init__(self, authorities: Optional[Iterable] = None) -> None:
        if authorities is None:
            self._trustRoot = platformTrust()
        else:
            from cryptography.hazmat.primitives.serialization import Encoding

            self._trustRoot = trustRootFromCertificates(
                [Certificate.loadPEM(authority.public_bytes(Encoding.PEM)) for authority in authorities]
            )

    def creatorForNetloc(self, hostname: bytes, port: int):
        return optionsForClientTLS(
            hostname.decode("idna"), self._trustRoot, extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2}
        )


class OpenIDProvider(Service):
    """
    The provider of C{[oidc]}: its metadata and keys, fetched and kept
    fresh, the exchange of a code for tokens, and the checks of a token.

    @param section: the [oidc] configuration.
    @param clientSecret: the client's secret.
    @param agent: the HTTP client (by default one with L{ProviderTLS}).
    """

    log = Logger()

    def __init__(self, section: OidcSection, clientSecret: str, reactor=None, agent=None) -> None:
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self._section = section
        self._clientSecret = clientSecret
        self._reactor = reactor
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        if agent is None:
            authorities = readAuthorities(section.ca_file) if section.ca_file is not None else None
            agent = Agent(reactor, ProviderTLS(authorities), connectTimeout=section.timeout, pool=self._pool)
        self._agent = agent
        self.issuer = section.issuer
        self.displayName = section.display_name
        #: Where the provider's pages are (its logout's form posts there).
        self.origin = "https://" + urlsplit(section.issuer).netloc
        self.clientId = section.client_id
        self.audience = section.audience or section.client_id
        self._metadata: Optional[dict] = None
        self._keys: Dict[Optional[str], dict] = {}
        #: When a token naming an unknown key last had the keys fetched.
        self._unknownKeyFetched = float("-inf")
        self._unreachableSince: Optional[float] = None
        self._lastFailure = float("-inf")
        self._fetching: Optional[SharedOutcome] = None
        self._refreshing = LoopingCall(self._refresh)
        self._refreshing.clock = reactor
        self._roleValues = {
            "viewer": frozenset(section.viewer_values),
            "uploader": frozenset(section.uploader_values),
            "admin": frozenset(section.admin_values),
        }

    @classmethod
    def fromConfig(cls, section: OidcSection, reactor=None) -> "OpenIDProvider":
        """
        The provider of C{section}, its client secret read now.
        """
        assert section.client_secret_file is not None
        return cls(section, readSecret(section.client_secret_file), reactor)

    def startService(self) -> None:
        super().startService()
        # The provider may be down while the box boots: said, and asked
        # again at each sign-in.
        self._refreshing.start(REFRESH_INTERVAL, now=True).addErrback(
            lambda failure: self.log.failure("Stopped refreshing the single sign-on's keys", failure)
        )

    def stopService(self) -> Deferred:
        super().stopService()
        if self._refreshing.running:
            self._refreshing.stop()
        return self._pool.closeCachedConnections()

    def _refresh(self) -> Deferred:
        refreshing = self._fetch()
        refreshing.addErrback(lambda failure: failure.trap(ProviderUnavailable) and None)
        return refreshing

    # --- the provider's documents -------------------------------------------

    def metadata(self) -> "Deferred[dict]":
        """
        The provider's metadata, fetched if need be; fails with
        L{ProviderUnavailable}.
        """
        if self._metadata is not None:
            return succeed(self._metadata)
        return self._fetch().addCallback(lambda ignored: self._metadata)

    def _fetch(self) -> Deferred:
        """
        Fetch the metadata and the keys (once at a time: callers meanwhile
        share the fetch), unless the provider failed less than
        L{UNREACHABLE_RETRY} seconds ago.
        """
        if self._fetching is None:
            if self._reactor.seconds() - self._lastFailure < UNREACHABLE_RETRY:
                return defer.fail(ProviderUnavailable("the provider failed a moment ago"))
            fetching = self._fetchDocuments()
            fetching.addBoth(self._fetched)
            # Registered once it exists; forgotten when it ends, even at once.
            self._fetching = SharedOutcome(fetching)
            fetching.addBoth(self._settled)
        return self._fetching.follow()

    def _settled(self, ignored: None) -> None:
        self._fetching = None

    def _fetched(self, result: object) -> object:
        if isinstance(result, Failure) and result.check(CancelledError):
            # Everyone who waited for it left: that says nothing of the provider.
            return result
        if isinstance(result, Failure):
            self._lastFailure = self._reactor.seconds()
            if self._unreachableSince is None:
                self._unreachableSince = self._lastFailure
                self.log.error(
                    "The single sign-on {issuer} cannot be used ({problem}): its users cannot sign in until it answers;"
                    " the appliance's own accounts still can",
                    issuer=self.issuer,
                    problem=shortDescription(result.value),
                )
            return Failure(ProviderUnavailable(shortDescription(result.value)))
        if self._unreachableSince is not None:
            self._unreachableSince = None
            self.log.info("The single sign-on {issuer} answers again", issuer=self.issuer)
        return result

    @inlineCallbacks
    def _fetchDocuments(self):
        metadata = yield self._getJSON(self.issuer.rstrip("/") + "/.well-known/openid-configuration")
        if metadata.get("issuer") != self.issuer:
            raise ValueError(f"the discovery document names the issuer {metadata.get('issuer')!r}, not {self.issuer!r}")
        for endpoint in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            if not _isHTTPS(metadata.get(endpoint)):
                raise ValueError(f"the discovery document's {endpoint} is not an https URL")
        jwks = yield self._getJSON(metadata["jwks_uri"])
        keys = jwks.get("keys")
        if not isinstance(keys, list):
            raise ValueError("the provider's key set has no keys")
        self._metadata = metadata
        self._keys = {key.get("kid"): key for key in keys if isinstance(key, dict) and key.get("use", "sig") == "sig"}

    @inlineCallbacks
    def _getJSON(self, url: str, method: bytes = b"GET", body: Optional[bytes] = None, headers: Iterable[Tuple[bytes, bytes]] = ()):
        sent = Headers({b"Accept": [b"application/json"]})
        for name, value in headers:
            sent.addRawHeader(name, value)
        producer = FileBodyProducer(BytesIO(body)) if body is not None else None
        requesting = self._agent.request(method, url.encode("ascii"), sent, producer)
        requesting.addTimeout(self._section.timeout, self._reactor)
        response = yield requesting
        reading = readLimited(response, MAX_DOCUMENT, "the provider").addTimeout(self._section.timeout, self._reactor)
        answer = yield reading
        try:
            document = json.loads(answer)
        except ValueError:
            raise ValueError(f"{urlsplit(url).path} answered {response.code} with something other than JSON")
        if not isinstance(document, dict):
            raise ValueError(f"{urlsplit(url).path} answered {response.code} with JSON that is not an object")
        if response.code != 200:
            raise TokenRefused(response.code, document)
        return document

    # --- signing in ---------------------------------------------------------

    def authorizationURL(self, metadata: dict, state: str, nonce: str, verifier: str, redirectURI: str) -> str:
        """
        Where to send a browser to sign in (the code flow with PKCE).
        """
        query = urlencode(
            {
                "response_type": "code",
                "client_id": self.clientId,
                "redirect_uri": redirectURI,
                "scope": " ".join(self._section.scopes),
                "state": state,
                "nonce": nonce,
                "code_challenge": pkceChallenge(verifier),
                "code_challenge_method": "S256",
            }
        )
        endpoint = metadata["authorization_endpoint"]
        return endpoint + ("&" if "?" in endpoint else "?") + query

    def logoutURL(self, idToken: Optional[str], returnTo: str) -> Optional[str]:
        """
        Where to send a browser to sign out at the provider too, if it
        offers that (RP-initiated logout); it comes back to C{returnTo}.
        """
        endpoint = (self._metadata or {}).get("end_session_endpoint")
        if not _isHTTPS(endpoint):
            return None
        query = {"client_id": self.clientId, "post_logout_redirect_uri": returnTo}
        if idToken:
            query["id_token_hint"] = idToken
        return endpoint + ("&" if "?" in endpoint else "?") + urlencode(query)

    @inlineCallbacks
    def exchange(self, code: str, verifier: str, redirectURI: str, nonce: str):
        """
        Exchange an authorization C{code} for tokens, and check the ID
        token; fires with the account it gives and the ID token.  Fails
        with L{InvalidToken} or L{NoRole} when the answer is refused, with
        L{ProviderUnavailable} when there is none.
        """
        metadata = yield self.metadata()
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirectURI, "code_verifier": verifier}
        methods = metadata.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        headers = [(b"Content-Type", b"application/x-www-form-urlencoded")]
        if "client_secret_basic" in methods or "client_secret_post" not in methods:
            # RFC 6749 2.3.1: each part form-encoded before base64.
            pair = f"{_formEncoded(self.clientId)}:{_formEncoded(self._clientSecret)}".encode("ascii")
            headers.append((b"Authorization", b"Basic " + base64.b64encode(pair)))
        else:
            form.update(client_id=self.clientId, client_secret=self._clientSecret)
        try:
            answer = yield self._getJSON(metadata["token_endpoint"], b"POST", urlencode(form).encode("ascii"), headers)
        except TokenRefused as refused:
            raise InvalidToken("", f"the provider refused the code: {refused}")
        except Exception as error:
            raise ProviderUnavailable(shortDescription(error))
        idToken = answer.get("id_token")
        if not isinstance(idToken, str):
            raise InvalidToken("", "the provider's answer has no ID token")
        claims = yield self.verify(idToken, self.clientId)
        if not hmac.compare_digest(str(claims.get("nonce", "")), nonce):
            raise InvalidToken("", "the ID token's nonce is not the one sent")
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if len(audiences) > 1 and claims.get("azp") != self.clientId:
            raise InvalidToken("", "the ID token is for several audiences and not authorized for this client (azp)")
        return self.account(claims), idToken

    # --- tokens -------------------------------------------------------------

    @inlineCallbacks
    def verify(self, token: str, audience: str):
        """
        The claims of C{token} once its signature (by a key of the
        provider's, with an allowed algorithm), issuer, audience, expiry
        and not-before are checked; fails with L{InvalidToken}.
        """
        import jwt

        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as error:
            raise InvalidToken("", f"not a signed token ({error})")
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in SIGNING_ALGORITHMS:
            raise InvalidToken("", f"signed with {algorithm!r}, which is not an algorithm taken here")
        if self._metadata is None:
            yield self._fetch()
        key = yield self._key(header.get("kid"))
        keyType, curve = SIGNING_ALGORITHMS[algorithm]
        if key.get("kty") != keyType or (curve is not None and key.get("crv") != curve) or key.get("alg", algorithm) != algorithm:
            raise InvalidToken("", f"signed with {algorithm}, which its key ({key.get('kty')}) is not for")
        try:
            publicKey = jwt.PyJWK(key, algorithm)
            return jwt.decode(
                token,
                publicKey,
                algorithms=[algorithm],
                audience=audience,
                issuer=self.issuer,
                leeway=CLOCK_SKEW,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError as error:
            raise InvalidToken("", str(error) or error.__class__.__name__)

    def _key(self, keyId: Optional[str]) -> "Deferred[dict]":
        key = self._keys.get(keyId) if keyId is not None else self._onlyKey()
        if key is not None:
            return succeed(key)
        now = self._reactor.seconds()
        if self._fetching is None:
            if now - self._unknownKeyFetched < UNKNOWN_KEY_REFETCH:
                return defer.fail(InvalidToken("", f"signed with a key the provider does not publish ({keyId!r})"))
            self._unknownKeyFetched = now

        def fetched(ignored: None) -> dict:
            key = self._keys.get(keyId) if keyId is not None else self._onlyKey()
            if key is None:
                raise InvalidToken("", f"signed with a key the provider does not publish ({keyId!r})")
            return key

        # The keys being fetched (for this token or another with the new key).
        return self._fetch().addCallback(fetched)

    def _onlyKey(self) -> Optional[dict]:
        # A token without a key id names the provider's key only if it has one.
        return next(iter(self._keys.values())) if len(self._keys) == 1 else None

    def account(self, claims: Mapping[str, object]) -> IAccount:
        """
        The account the claims of a checked token give; L{NoRole} if no
        claim value maps to a role.
        """
        name = claims.get(self._section.user_claim)
        if not (isinstance(name, str) and USABLE_NAME.fullmatch(name)):
            name = str(claims[SUBJECT])
        values = claimValues(claims, self._section.roles_claim)
        roles = frozenset(role for role in ROLES if self._roleValues[role] & values)
        if not roles:
            raise NoRole(name)
        return Account(name, roles, OIDC)


class TokenRefused(Exception):
    """
    The provider answered with an error (OAuth's C{error}, C{error_description}).
    """

    def __init__(self, code: int, document: Mapping[str, object]) -> None:
        description = document.get("error_description") or ""
        super().__init__(f"{code} {document.get('error', 'error')}" + (f": {description}" if description else ""))


@implementer(ICredentialsChecker)
class TokenChecker:
    """
    Bearer access tokens of the provider (RFC 6750, RFC 9068): the avatar
    id is the account the token's claims give.  An ID token of this client
    (it carries the nonce of a sign-in) is no access token, and is refused.
    """

    credentialInterfaces = (IBearerToken,)

    def __init__(self, provider: OpenIDProvider) -> None:
        self._provider = provider

    def requestAvatarId(self, credentials: IBearerToken) -> "Deferred[IAccount]":
        try:
            token = credentials.token.decode("ascii")
        except UnicodeDecodeError:
            return defer.fail(InvalidToken("", "not a token"))
        checking = self._provider.verify(token, self._provider.audience)

        def checked(claims: dict) -> IAccount:
            if "nonce" in claims:
                raise InvalidToken("", "an ID token is not an access token")
            return self._provider.account(claims)

        return checking.addCallback(checked)


def _isHTTPS(url: object) -> bool:
    return isinstance(url, str) and url.startswith("https://") and len(url) <= 2048


def _formEncoded(text: str) -> str:
    return urlencode({"": text})[1:]
