"""
Who is asking, and may they: accounts, browser sessions, HTTP Basic, failed
login throttling, and the gate in front of every route.

    request ──▶ Authenticator.identify ──▶ request.account ──▶ AccessGate ──▶ WebRoot
                 session cookie, or                            public, 302 to /login,
                 HTTP Basic (scrypt in a thread)               401, 403, 429, or on

Browsers log in on the login page (appliance.web.login) and carry the session
cookie; API clients send HTTP Basic with every request, verified once in a
thread and then remembered briefly.  The users themselves come from the users
file (appliance.web.users).
"""

import binascii
import hashlib
import hmac
import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable, Deque, Dict, FrozenSet, List, Optional, Sequence, Tuple
from urllib.parse import quote_from_bytes, urlsplit

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web import http
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request

from appliance.config import AuthSection, WebSection, normalOrigin
from appliance.connections import NETWORK_SHARE, clientKey, networkKey
from appliance.web.pages import TOO_MANY_REQUESTS, Page, jsonError

# Account is part of this module's interface; it lives with the users file
# that defines the accounts (and ROLES).
from appliance.web.users import Account, UserEntry, UsersFile, verifyPassword

#: The browser session's cookie: the __Host- prefix makes browsers insist on
#: Secure, Path=/ and no Domain, so no other host can set or shadow it.
SESSION_COOKIE = b"__Host-pacs-session"

#: How long a verified HTTP Basic credential is remembered (unless the users
#: file changes first), and how many are.
BASIC_CACHE_LIFETIME = 300.0
BASIC_CACHE_SIZE = 1000

#: How often expired sessions and old failures are forgotten.
PURGE_INTERVAL = 60.0

#: Password checks run on this many threads at most: each scrypt takes a core
#: and tens of MiB, so a burst of logins queues instead of starving the box.
VERIFY_THREADS = 2

#: The most password checks waiting for a thread or running, from all
#: addresses together; more are refused (L{PasswordChecksBusy}) rather than
#: queued.  Credentials from many addresses would otherwise queue scrypt
#: work without bound, and a real login behind them would wait as long:
#: 32 checks drain in about 2 s on the reference machine (2 threads, 0.13 s
#: each).
MAX_PENDING_CHECKS = 32

#: What a client refused for busy password checks is told: wait this many
#: seconds (the queue drains in about 2), and why.
BUSY_RETRY_AFTER = 5
BUSY_MESSAGE = f"The appliance is busy checking other passwords: try again in {BUSY_RETRY_AFTER} seconds."

#: The methods that change nothing (RFC 9110 9.2.1), all that read-only
#: routes allow.
SAFE_METHODS = (b"GET", b"HEAD", b"OPTIONS")


def displayName(name: str) -> str:
    """
    A user name as given by a client, safe for one log line.
    """
    return repr(name[:64] + ("…" if len(name) > 64 else ""))


def basicCredentials(headers: Headers) -> Optional[bytes]:
    """
    The base64 token of the request's HTTP Basic C{Authorization} header, or
    L{None} if it has none (another scheme, or more than one header, counts
    as none).
    """
    values = headers.getRawHeaders(b"authorization")
    if not values or len(values) != 1:
        return None
    scheme, _, token = values[0].strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    return token.strip()


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


def _decodeBasic(token: bytes) -> Optional[Tuple[str, str]]:
    try:
        decoded = binascii.a2b_base64(token, strict_mode=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    name, colon, password = decoded.partition(":")
    return (name, password) if colon else None


@dataclass
class _Session:
    name: str
    created: float
    lastUsed: float


class SessionStore:
    """
    Browser sessions, in memory: a random 256-bit token each, ended after
    C{idleTimeout} seconds without use, C{lifetime} seconds after the login,
    at logout, or when the user's line in the users file changes.

    Sessions are kept under a hash of their token, so that the table itself
    holds nothing a client could present.  A restart ends every session.
    """

    def __init__(self, idleTimeout: float, lifetime: float, clock) -> None:
        self._idleTimeout = idleTimeout
        self._lifetime = lifetime
        self._clock = clock
        self._sessions: Dict[bytes, _Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    @staticmethod
    def _key(token: bytes) -> bytes:
        return hashlib.sha256(token).digest()

    def create(self, name: str) -> bytes:
        """
        Start a session for user C{name}; returns its token (the cookie value).
        """
        token = secrets.token_urlsafe(32).encode("ascii")
        now = self._clock.seconds()
        self._sessions[self._key(token)] = _Session(name, now, now)
        return token

    def lookup(self, token: bytes) -> Optional[str]:
        """
        The user of the live session C{token}, which counts as a use; L{None}
        if there is no such session (any more).
        """
        key = self._key(token)
        session = self._sessions.get(key)
        if session is None:
            return None
        now = self._clock.seconds()
        if self._expired(session, now):
            del self._sessions[key]
            return None
        session.lastUsed = now
        return session.name

    def end(self, token: bytes) -> None:
        self._sessions.pop(self._key(token), None)

    def endUsers(self, names: FrozenSet[str]) -> int:
        """
        End every session of the users C{names}; returns how many ended.
        """
        ended = [key for key, session in self._sessions.items() if session.name in names]
        for key in ended:
            del self._sessions[key]
        return len(ended)

    def purge(self) -> None:
        """
        Forget the sessions that have expired.
        """
        now = self._clock.seconds()
        for key in [key for key, session in self._sessions.items() if self._expired(session, now)]:
            del self._sessions[key]

    def _expired(self, session: _Session, now: float) -> bool:
        return now - session.lastUsed >= self._idleTimeout or now - session.created >= self._lifetime


def backoff(attempts: int) -> float:
    """
    How long a password check for a user name waits when the name has
    C{attempts} failed (or unfinished) attempts in the window, counted from
    its last failure: nothing for the first two, then 1 s doubling up to 30 s.
    """
    return 0.0 if attempts < 2 else float(min(2 ** (attempts - 2), 30))


#: The longest user name the throttle keeps apart: longer names are counted
#: under their first characters (a name is the attacker's choice).
THROTTLED_NAME_LENGTH = 256


class FailureCounter:
    """
    Failed logins by key, within C{window} seconds, each noted with the
    other half of who failed (the name under an address, the address under a
    name), and the checks under way by key.

    The tables stay small: every failure costs a password check, and at most
    L{MAX_PENDING_CHECKS} run or wait.
    """

    def __init__(self, limit: Optional[int], window: float, clock) -> None:
        #: How many failed or unfinished attempts refuse the key; L{None}: never.
        self.limit = limit
        self._window = window
        self._clock = clock
        self._failures: Dict[object, Deque[Tuple[float, str]]] = {}
        self._checking: Dict[object, int] = {}

    def recent(self, key: object) -> Deque[Tuple[float, str]]:
        failures = self._failures.get(key)
        if failures is None:
            return deque()
        horizon = self._clock.seconds() - self._window
        while failures and failures[0][0] <= horizon:
            failures.popleft()
        if not failures:
            del self._failures[key]
        return failures

    def attempts(self, key: object) -> int:
        return len(self.recent(key)) + self._checking.get(key, 0)

    def refuses(self, key: object) -> bool:
        return self.limit is not None and self.attempts(key) >= self.limit

    def wait(self, key: object) -> float:
        """
        Seconds before C{key} is no longer refused; 0 if it is not.
        """
        if not self.refuses(key):
            return 0.0
        failures = self.recent(key)
        if len(failures) < self.limit:
            # Refused for checks still running: their outcome decides.
            return 1.0
        return max(1.0, failures[-self.limit][0] + self._window - self._clock.seconds())

    def reserve(self, key: object) -> None:
        self._checking[key] = self._checking.get(key, 0) + 1

    def release(self, key: object) -> None:
        left = self._checking.pop(key, 0) - 1
        if left > 0:
            self._checking[key] = left

    def add(self, key: object, other: str) -> bool:
        """
        Note a failure; whether it makes C{key} refused.
        """
        # Only the last `limit` failures decide (the oldest of them, when
        # the refusal ends); a name's are kept for its back-off.
        failures = self._failures.setdefault(key, deque(maxlen=self.limit or BACKOFF_MEMORY))
        failures.append((self._clock.seconds(), other))
        return self.limit is not None and len(self.recent(key)) == self.limit

    def forget(self, key: object, other: Optional[str] = None) -> None:
        """
        Forget the failures of C{key}: all, or those noted with C{other}.
        """
        failures = self._failures.get(key)
        if failures is None:
            return
        kept = [failure for failure in failures if other is not None and failure[1] != other]
        if kept:
            self._failures[key] = deque(kept, maxlen=failures.maxlen)
        else:
            del self._failures[key]

    def purge(self) -> None:
        for key in list(self._failures):
            self.recent(key)


#: How many of a name's failures are kept for its back-off (which stops
#: growing long before).
BACKOFF_MEMORY = 16


class LoginThrottle:
    """
    Failed logins (login form and HTTP Basic):

      - a user name under attack is slowed wherever the guesses come from:
        after two failures for it, each check waits (L{backoff}), counted
        from its last failure;
      - a user name is refused (429) from an address that has failed
        C{maxFailures} times for it within C{window} seconds, until the
        oldest of those is C{window} seconds old: guesses from elsewhere slow
        the account's owner down, but cannot lock them out;
      - an address that fails C{maxAddressFailures} times within the window,
        whatever the names (password spraying), is refused for every name;
      - an IPv6 address counts with its /64 (see
        L{appliance.connections.networkKey}), which may fail
        L{NETWORK_SHARE} times as often before it is refused: an attacker
        who changes addresses within it is still counted, and one host's
        failures do not refuse its whole network;
      - a successful login forgets that user's failures from that address,
        and nothing else: logging in as oneself clears no guess at another
        account.

    Unfinished attempts count, so that a burst of parallel guesses gets no
    more checks than a slow sequence.
    """

    log = Logger()

    def __init__(self, maxFailures: int, maxAddressFailures: int, window: float, clock) -> None:
        self._window = window
        self._byName = FailureCounter(None, window, clock)
        self._byPair = FailureCounter(maxFailures, window, clock)
        self._byAddress = FailureCounter(maxAddressFailures, window, clock)
        self._byNetwork = FailureCounter(maxAddressFailures * NETWORK_SHARE, window, clock)
        self._clock = clock

    @staticmethod
    def _keys(name: str, client) -> Tuple[str, str, Optional[str], object]:
        """
        The name, the address, its IPv6 network, and the pair (the name with
        the network the address lies in, or the address itself).
        """
        name, address, network = name[:THROTTLED_NAME_LENGTH], clientKey(client), networkKey(client)
        return name, address, network, (name, network or address)

    def attempt(self, name: str, client) -> Optional[float]:
        """
        Reserve a password check for user C{name} from C{client}: L{None} if
        it must wait (see L{retryAfter}), else the seconds to wait before the
        check.  End every reserved check with L{succeeded}, L{failed} or
        L{abandoned}.
        """
        name, address, network, pair = self._keys(name, client)
        if self._byPair.refuses(pair) or self._byAddress.refuses(address):
            return None
        if network is not None and self._byNetwork.refuses(network):
            return None
        attempts = self._byName.attempts(name)
        for counter, key in self._counters(name, address, network, pair):
            counter.reserve(key)
        failures = self._byName.recent(name)
        now = self._clock.seconds()
        last = failures[-1][0] if failures else now
        return max(0.0, last + backoff(attempts) - now)

    def retryAfter(self, name: str, client) -> float:
        """
        Seconds before user C{name} may try to log in again from C{client};
        0 if now.
        """
        name, address, network, pair = self._keys(name, client)
        return max(counter.wait(key) for counter, key in self._counters(name, address, network, pair))

    def succeeded(self, name: str, client) -> None:
        name, address, network, pair = self._keys(name, client)
        self._release(name, address, network, pair)
        self._byPair.forget(pair)
        self._byName.forget(name, network or address)
        self._byAddress.forget(address, name)
        if network is not None:
            self._byNetwork.forget(network, name)

    def failed(self, name: str, client) -> None:
        name, address, network, pair = self._keys(name, client)
        self._release(name, address, network, pair)
        self._byName.add(name, network or address)
        if self._byPair.add(pair, address):
            self.log.warn(
                "Refusing logins as {user} from {client} for {seconds:.0f}s: {count} failed logins within {window:.0f}s",
                user=displayName(name),
                client=network or address,
                seconds=self._byPair.wait(pair),
                count=self._byPair.limit,
                window=self._window,
            )
        for counter, key in ((self._byAddress, address), (self._byNetwork, network)):
            if key is not None and counter.add(key, name):
                self.log.warn(
                    "Refusing logins from {client} for {seconds:.0f}s: {count} failed logins within {window:.0f}s",
                    client=key,
                    seconds=counter.wait(key),
                    count=counter.limit,
                    window=self._window,
                )

    def abandoned(self, name: str, client) -> None:
        """
        A reserved check ended without an answer (an error): it counts for
        nothing.
        """
        self._release(*self._keys(name, client))

    def purge(self) -> None:
        """
        Forget the failures older than the window.
        """
        for counter in (self._byName, self._byPair, self._byAddress, self._byNetwork):
            counter.purge()

    def _counters(self, name: str, address: str, network: Optional[str], pair: object):
        counters = [(self._byName, name), (self._byPair, pair), (self._byAddress, address)]
        if network is not None:
            counters.append((self._byNetwork, network))
        return counters

    def _release(self, name: str, address: str, network: Optional[str], pair: object) -> None:
        for counter, key in self._counters(name, address, network, pair):
            counter.release(key)


def tooManyFailures(seconds: int) -> str:
    """
    What a client refused by the L{LoginThrottle} is told: not which of the
    user name or the address is refused.
    """
    return f"Too many failed logins for this user or from your address: try again in {seconds} seconds."


class PasswordChecksBusy(Exception):
    """
    A password check was not started: L{MAX_PENDING_CHECKS} are waiting or
    running already.  The client should try again after L{BUSY_RETRY_AFTER}
    seconds (503 and C{Retry-After}, with L{BUSY_MESSAGE}).
    """


class _QueuedCheck:
    """
    A password check handed to the thread pool: C{wanted} turns false when
    nobody waits for its outcome any more (the client left).
    """

    wanted = True


def _verifyIfWanted(check: _QueuedCheck, password: str, stored: str) -> Optional[bool]:
    # On a thread of the pool: a check whose client left while it waited for
    # its turn costs nothing.
    if not check.wanted:
        return None
    return verifyPassword(password, stored)


def _fire(deferred: Deferred, result: object) -> Deferred:
    """
    Fire C{deferred} with C{result}, a value or a L{Failure}; returns it.
    """
    if isinstance(result, Failure):
        deferred.errback(result)
    else:
        deferred.callback(result)
    return deferred


class _SharedOutcome:
    """
    The outcome of one Deferred for several callers, each with a Deferred of
    its own (L{follow}).  A caller that cancels its Deferred leaves; the
    shared one is cancelled when the last caller has left.
    """

    def __init__(self, shared: Deferred) -> None:
        self._shared = shared
        self._followers: List[Deferred] = []
        self._outcome: Optional[Tuple[object]] = None
        shared.addBoth(self._fired)

    def follow(self) -> Deferred:
        if self._outcome is not None:
            return _fire(Deferred(), self._outcome[0])
        follower: Deferred = Deferred(self._left)
        self._followers.append(follower)
        return follower

    def _left(self, follower: Deferred) -> None:
        self._followers.remove(follower)
        if not self._followers:
            self._shared.cancel()

    def _fired(self, result: object) -> None:
        self._outcome = (result,)
        followers, self._followers = self._followers, []
        for follower in followers:
            _fire(follower, result)


RunInThread = Callable[..., Deferred]


class Authenticator(Service):
    """
    Identifies the user behind a request, and logs users in and out.

    Password checks (scrypt) run on a small thread pool of its own, started
    and stopped with the service; C{runInThread} replaces it in tests.  The
    service also forgets expired sessions and failures periodically.

    @param users: the users file.
    @param auth: the [auth] configuration.
    """

    log = Logger()

    def __init__(
        self,
        users: UsersFile,
        auth: AuthSection,
        reactor=None,
        runInThread: Optional[RunInThread] = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self._reactor = reactor
        self._users = users
        self.sessions = SessionStore(auth.session_idle_timeout, auth.session_lifetime, reactor)
        self.throttle = LoginThrottle(
            auth.max_login_failures, auth.max_address_failures, auth.login_failure_window, reactor
        )
        self._threadPool: Optional[ThreadPool] = None
        if runInThread is None:
            self._threadPool = ThreadPool(minthreads=0, maxthreads=VERIFY_THREADS, name="password-verification")
            pool = self._threadPool

            def runInThread(function, *arguments):
                return deferToThreadPool(reactor, pool, function, *arguments)

        self._runInThread = runInThread
        # Verified Basic credentials, under a keyed hash of the header: the
        # table holds no password, nor anything that could be replayed.
        self._cacheKey = secrets.token_bytes(32)
        self._basicCache: "OrderedDict[bytes, Tuple[UserEntry, float]]" = OrderedDict()
        # Basic credentials being checked, under the same keyed hash: the
        # requests that bring them meanwhile share that check.
        self._pending: Dict[bytes, _SharedOutcome] = {}
        self._checksPending = 0
        self._busy = False
        self._purging = LoopingCall(self._purge)
        self._purging.clock = reactor
        users.subscribe(self._usersChanged)

    def startService(self) -> None:
        Service.startService(self)
        if self._threadPool is not None:
            self._threadPool.start()
        self._purging.start(PURGE_INTERVAL, now=False).addErrback(
            lambda failure: self.log.failure("Stopped forgetting expired sessions", failure)
        )

    def stopService(self) -> None:
        Service.stopService(self)
        if self._purging.running:
            self._purging.stop()
        if self._threadPool is not None:
            self._threadPool.stop()

    # --- identification -----------------------------------------------------

    def identify(self, headers: Headers, client) -> "Deferred[Optional[Account]]":
        """
        The account behind a request: from its HTTP Basic credentials if it
        carries an C{Authorization: Basic} header (invalid ones give L{None},
        whatever cookie comes with them), else from its session cookie.

        Fires at once when memory answers (a session, a Basic credential
        verified recently, an address refused by the L{LoginThrottle});
        checks the password in a thread otherwise, after the throttle's
        back-off.  Fails only with L{PasswordChecksBusy}, when the password
        could not be checked for too many checks waiting: other errors are
        logged and give L{None}.  Cancelling the Deferred (the client left)
        skips a check still waiting for a thread.
        """
        try:
            identified = self._identify(headers, client)
        except Exception:
            self.log.failure("Could not identify a request from {client}", client=str(client))
            return succeed(None)
        return identified.addErrback(self._identifyFailed, client)

    def _identifyFailed(self, failure: Failure, client) -> Optional[Failure]:
        if failure.check(PasswordChecksBusy, CancelledError):
            return failure
        self.log.failure("Could not identify a request from {client}", failure, client=str(client))
        return None

    def _identify(self, headers: Headers, client) -> "Deferred[Optional[Account]]":
        credentials = basicCredentials(headers)
        if credentials is not None:
            return self._basic(credentials, client)
        for token in sessionTokens(headers):
            name = self.sessions.lookup(token)
            entry = self._users.lookup(name) if name is not None else None
            if entry is not None:
                return succeed(entry.account)
        return succeed(None)

    def _basic(self, credentials: bytes, client) -> "Deferred[Optional[Account]]":
        key = hmac.new(self._cacheKey, credentials, hashlib.sha256).digest()
        cached = self._basicCache.get(key)
        if cached is not None:
            entry, expires = cached
            if expires > self._reactor.seconds() and self._users.lookup(entry.name) == entry:
                self._basicCache.move_to_end(key)
                return succeed(entry.account)
            del self._basicCache[key]
        decoded = _decodeBasic(credentials)
        if decoded is None:
            self.log.info("Refused malformed HTTP Basic credentials from {client}", client=clientKey(client))
            return succeed(None)
        shared = self._pending.get(key)
        if shared is None:
            name, password = decoded
            checking = self._check(name, password, client, "HTTP Basic").addCallback(self._basicChecked, key)
            # Registered only once the check exists (nothing is left behind
            # if starting it raises), and forgotten when it ends, even at once.
            shared = self._pending[key] = _SharedOutcome(checking)
            checking.addBoth(self._basicSettled, key)
        return shared.follow()

    def _basicSettled(self, result: None, key: bytes) -> None:
        self._pending.pop(key, None)

    def _basicChecked(self, entry: Optional[UserEntry], key: bytes) -> Optional[Account]:
        if entry is None:
            return None
        self._basicCache[key] = (entry, self._reactor.seconds() + BASIC_CACHE_LIFETIME)
        while len(self._basicCache) > BASIC_CACHE_SIZE:
            self._basicCache.popitem(last=False)
        return entry.account

    # --- logging in and out -------------------------------------------------

    def retryAfter(self, name: str, client) -> float:
        """
        Seconds before user C{name} may try to log in from C{client}.
        """
        return self.throttle.retryAfter(name, client)

    def login(self, name: str, password: str, client) -> "Deferred[Optional[Account]]":
        """
        Check a user name and password from the login form (in a thread);
        fires with the account, or L{None} (counted as a failed login).
        Fails only with L{PasswordChecksBusy} (see L{identify}); cancelling
        it skips a check still waiting for a thread.
        """
        checking = self._check(name, password, client, "login form")
        return checking.addCallback(lambda entry: entry.account if entry is not None else None)

    def startSession(self, account: Account, previous: List[bytes]) -> bytes:
        """
        End the C{previous} sessions of the browser and start one for
        C{account}; returns its token.
        """
        for token in previous:
            self.sessions.end(token)
        self.log.info("{user} logged in", user=account.name)
        return self.sessions.create(account.name)

    def endSession(self, token: bytes) -> None:
        name = self.sessions.lookup(token)
        self.sessions.end(token)
        if name is not None:
            self.log.info("{user} logged out", user=name)

    def _check(self, name: str, password: str, client, method: str) -> "Deferred[Optional[UserEntry]]":
        delay = self.throttle.attempt(name, client)
        if delay is None:
            return succeed(None)
        entry = self._users.lookup(name)
        # An unknown user costs the same scrypt work as most known ones.
        stored = entry.passwordHash if entry is not None else self._users.dummyHash
        if delay > 0:
            checking = deferLater(self._reactor, delay, self._verify, password, stored)
        else:
            checking = self._verify(password, stored)
        checking.addCallback(self._checked, name, entry, client, method)
        return checking.addErrback(self._checkFailed, name, client)

    def _verify(self, password: str, stored: str) -> "Deferred[bool]":
        """
        Verify C{password} against C{stored} on the thread pool; fails with
        L{PasswordChecksBusy} if L{MAX_PENDING_CHECKS} are there already.
        Cancelling the result skips the check if it has not started.
        """
        if self._checksPending >= MAX_PENDING_CHECKS:
            if not self._busy:
                self._busy = True
                self.log.warn(
                    "{count} password checks are waiting: refusing more with 503 until they are done",
                    count=self._checksPending,
                )
            return fail(PasswordChecksBusy())
        check = _QueuedCheck()

        def abandon(outcome: Deferred) -> None:
            check.wanted = False

        outcome: Deferred = Deferred(abandon)
        self._checksPending += 1
        running = maybeDeferred(self._runInThread, _verifyIfWanted, check, password, stored)
        running.addBoth(self._verified, outcome)
        return outcome

    def _verified(self, result: object, outcome: Deferred) -> None:
        self._checksPending -= 1
        if self._checksPending == 0:
            self._busy = False
        if not outcome.called:
            _fire(outcome, result)
        elif isinstance(result, Failure):
            # Its client left, but a check that failed is still worth a line.
            self.log.failure("Could not check a password", result)

    def _checked(self, matches: bool, name: str, entry: Optional[UserEntry], client, method: str) -> Optional[UserEntry]:
        if matches and entry is not None:
            if self._users.lookup(name) != entry:
                self.throttle.abandoned(name, client)
                self.log.info("The account {user} changed while its password was checked", user=name)
                return None
            self.throttle.succeeded(name, client)
            return entry
        self.throttle.failed(name, client)
        self.log.warn(
            "Failed login for {user} from {client} ({method}): {reason}",
            user=displayName(name),
            client=clientKey(client),
            method=method,
            reason="wrong password" if entry is not None else "no such user",
        )
        return None

    def _checkFailed(self, failure: Failure, name: str, client) -> Optional[Failure]:
        # The check's slot is given back: an error is not a failed login.
        self.throttle.abandoned(name, client)
        if failure.check(PasswordChecksBusy):
            return failure
        if failure.check(CancelledError):
            # The client left: nobody looks at the outcome.
            return None
        self.log.failure(
            "Could not check the password of {user} from {client}",
            failure,
            user=displayName(name),
            client=clientKey(client),
        )
        return None

    def _usersChanged(self, names: FrozenSet[str]) -> None:
        self._basicCache.clear()
        ended = self.sessions.endUsers(names)
        if ended:
            self.log.info(
                "Ended {count} sessions of changed or removed users: {users}",
                count=ended,
                users=", ".join(sorted(names)),
            )

    def _purge(self) -> None:
        self.sessions.purge()
        self.throttle.purge()
        now = self._reactor.seconds()
        for key in [key for key, (_, expires) in self._basicCache.items() if expires <= now]:
            del self._basicCache[key]


# --- the gate ---------------------------------------------------------------


def isNavigation(request: Request) -> bool:
    """
    Is this a browser loading a page (not a script fetching data)?  Browsers
    say so with C{Sec-Fetch-Mode: navigate}; older ones are recognised by a
    GET that accepts HTML.
    """
    mode = request.getHeader(b"sec-fetch-mode")
    if mode is not None:
        return mode == b"navigate"
    accept = request.getHeader(b"accept") or b""
    return request.method in (b"GET", b"HEAD") and b"text/html" in accept


def isBrowser(request: Request) -> bool:
    """
    Did a browser send this request?  Every current browser sends
    C{Sec-Fetch-Mode}; an older one still carries the session cookie once
    it has logged in.
    """
    return request.getHeader(b"sec-fetch-mode") is not None or bool(sessionTokens(request.requestHeaders))


def _normalOrigin(origin: bytes) -> Optional[bytes]:
    try:
        normal = normalOrigin(origin.decode("ascii"))
    except UnicodeDecodeError:
        return None
    return normal.encode("ascii") if normal is not None else None


def _originOf(url: bytes) -> Optional[bytes]:
    try:
        parts = urlsplit(url.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    return _normalOrigin(f"{parts.scheme}://{parts.netloc}".encode("ascii"))


def requestOrigin(request: Request) -> Optional[bytes]:
    """
    The request's C{Origin}, written as L{appliance.config.normalOrigin}
    writes the site's own and C{[web] cors_allowed_origins}, so that equal
    origins compare equal; L{None} without the header.  Several headers, or
    a value that is no http(s) origin (C{null}), give C{null}, which is no
    site's origin.
    """
    origins = request.requestHeaders.getRawHeaders(b"origin")
    if origins is None:
        return None
    normal = _normalOrigin(origins[0]) if len(origins) == 1 else None
    return normal if normal is not None else b"null"


def ownOrigin(request: Request) -> Optional[bytes]:
    """
    The site's origin as the browser addressed it (from C{Host}), L{None}
    without a usable C{Host}.
    """
    host = request.getHeader(b"host")
    if not host:
        return None
    scheme = b"https://" if request.isSecure() else b"http://"
    return _normalOrigin(scheme + host)


def isSameOrigin(request: Request) -> bool:
    """
    Did a page of this site send this request?  C{Sec-Fetch-Site} (set by the
    browser, never by a page) answers first: it stays reliable when a
    referrer policy makes the browser send C{Origin: null} for same-origin
    form posts.  Without it, C{Origin} must be the site's own, or failing
    that C{Referer} must point into the site.
    """
    site = request.getHeader(b"sec-fetch-site")
    if site is not None:
        return site == b"same-origin"
    own = ownOrigin(request)
    if own is None:
        return False
    origin = requestOrigin(request)
    if origin is not None:
        return origin == own
    referer = request.getHeader(b"referer")
    return referer is not None and _originOf(referer) == own


def isCrossSite(request: Request) -> bool:
    """
    Did another site make the browser send this request (a link, a form, an
    image)?  C{Sec-Fetch-Site} answers first: C{cross-site} and C{same-site}
    are other sites, C{none} is the user's own doing (typed, bookmarked).
    Without it, an C{Origin} or failing that a C{Referer} that is not the
    site's own; a request with neither is not.
    """
    site = request.getHeader(b"sec-fetch-site")
    if site is not None:
        return site not in (b"same-origin", b"none")
    own = ownOrigin(request)
    origin = requestOrigin(request)
    if origin is not None:
        return origin != own
    referer = request.getHeader(b"referer")
    return referer is not None and _originOf(referer) != own


#: Files of the viewer's build that browsers fetch without credentials (a
#: web app manifest is fetched without cookies unless its link says
#: otherwise), or for the login page too; none holds patient data.
PUBLIC_VIEWER_FILES = (b"favicon.ico", b"manifest.json")


def requiredRole(name: bytes, method: bytes, rest: Sequence[bytes] = ()) -> Optional[str]:
    """
    The role a request needs, by the first segment of its path (C{rest}:
    the segments after it) and its method; L{None} for the public routes.
    """
    if name in (b"healthz", b"login", b"logout"):
        return None
    if name in PUBLIC_VIEWER_FILES and not rest and method in (b"GET", b"HEAD"):
        return None
    if name == b"pacs":
        if method == b"OPTIONS":
            # CORS preflights carry no credentials; the proxy answers them.
            return None
        if method in (b"GET", b"HEAD"):
            return "viewer"
        if method == b"POST":
            return "uploader"
        return "admin"
    if name == b"pacs-admin":
        return "admin"
    return "viewer"


def takesBody(name: bytes, method: bytes, rest: Sequence[bytes]) -> bool:
    """
    Whether a request to the route C{name} (C{rest}: the segments after it)
    may carry a body: the login and logout forms, STOW-RS, and writes to
    Orthanc's REST API.  Nothing else reads one.
    """
    if name in (b"login", b"logout"):
        return method == b"POST"
    if name == b"pacs":
        segments = list(rest)
        while segments and segments[-1] == b"":
            segments.pop()
        return method == b"POST" and segments[:1] == [b"studies"] and len(segments) <= 2
    if name == b"pacs-admin":
        return method in (b"POST", b"PUT")
    return False


def localTarget(target: str) -> str:
    """
    C{target} if it is a path on this site (where the login may send the
    browser back to), else C{/}.  Rejects other hosts (C{//host},
    C{/\\host}, which browsers read as C{//host}) and anything not plain
    printable ASCII (browsers drop tabs and newlines from URLs).
    """
    if (
        target.startswith("/")
        and target[1:2] not in ("/", "\\")
        and all("\x21" <= character <= "\x7e" for character in target)
    ):
        return target
    return "/"


def requestTarget(request: Request) -> bytes:
    """
    The path and query C{request} asked for, or C{/} for a target that is
    no path (C{OPTIONS *}): where a redirect may bring the client back to.
    """
    return request.uri if request.uri.startswith(b"/") else b"/"


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


def cookieChallenge(siteName: str) -> bytes:
    """
    The C{WWW-Authenticate} value of a 401 for browsers: the C{Cookie} scheme
    (draft-broyer-http-cookie-auth) names the login page, and no browser
    answers it with a password prompt.
    """
    return b"Cookie realm=" + _quoted(siteName) + b', form-action="/login", cookie-name="' + SESSION_COOKIE + b'"'


class AccessGate(Resource):
    """
    The site's root as clients reach it: checks each request against the
    route's policy, then hands it to the wrapped C{root}.

        public       /healthz, /login (and its style sheet), /logout,
                     OPTIONS /pacs/... (CORS preflight, answered by the proxy)
        viewer       GET/HEAD /pacs/..., and every other path (the viewer)
        uploader     POST /pacs/... (STOW-RS); other methods there need admin
        admin        /pacs-admin/...

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
        the login page and prompts nothing;
      - 429 with C{Retry-After} when it brought HTTP Basic credentials from an
        address that has failed to log in too often (see L{LoginThrottle});
      - 503 with C{Retry-After} and a JSON body when its credentials could
        not be checked for too many password checks waiting (the request
        layer then sets C{request.credentialsUnchecked}; see
        L{PasswordChecksBusy}).  Public routes are still served.

    A request whose account lacks the role gets 403, an HTML page for a page
    load and JSON otherwise.  An unsafe request (not GET, HEAD or OPTIONS)
    authenticated by the session cookie must come from this site's own pages
    (L{isSameOrigin}), else 403 (CSRF).  One authenticated by HTTP Basic
    needs no C{Origin} (scripts send none), but a browser sending an
    C{Origin} of a site other than this one or a C{[web]
    cors_allowed_origins} entry is refused too: a browser only sends Basic
    credentials by itself, to any site's forms, if the user typed them into
    its prompt once.
    """

    log = Logger()

    def __init__(self, root: Resource, authenticator: Authenticator, web: WebSection) -> None:
        super().__init__()
        self._root = root
        self._authenticator = authenticator
        self._corsOrigins = frozenset(origin.encode("ascii") for origin in web.cors_allowed_origins)
        self._forbiddenPage = Page("forbidden.html", "not allowed", web)
        self._basicChallenge = basicChallenge(web.site_name)
        self._cookieChallenge = cookieChallenge(web.site_name)

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
        if refusal is None and not takesBody(name, request.method, rest):
            refusal = Refusal(413, "This request takes no body: send it without one.")
        return refusal

    def _check(self, name: bytes, rest: Sequence[bytes], request: Request) -> Optional[Refusal]:
        role = requiredRole(name, request.method, rest)
        if role is None:
            return None
        account = getattr(request, "account", None)
        if account is None:
            return self._anonymous(name, request)
        if request.method not in SAFE_METHODS and not self._fromOwnPages(request):
            self.log.warn(
                "Refused {method} {path} by {user} from {client}: it did not come from this"
                " site's pages (Origin {origin})",
                method=request.method.decode("latin-1"),
                path=request.path.decode("latin-1"),
                user=account.name,
                client=clientKey(request.getClientAddress()),
                origin=(request.getHeader(b"origin") or b"-").decode("latin-1"),
            )
            return self._refuse(
                request,
                http.FORBIDDEN,
                "This request was refused: it did not come from this site's own pages.",
            )
        if not account.has(role):
            self.log.info(
                "Refused {method} {path} to {user}: it needs the {role} role",
                method=request.method.decode("latin-1"),
                path=request.path.decode("latin-1"),
                user=account.name,
                role=role,
            )
            return self._refuse(
                request,
                http.FORBIDDEN,
                f"The account {account.name} may not do this: it needs the {role} role"
                " (ask an administrator, or log in as another user).",
            )
        return None

    def _fromOwnPages(self, request: Request) -> bool:
        if basicCredentials(request.requestHeaders) is None:
            return isSameOrigin(request)
        origin = requestOrigin(request)
        if origin is None:
            return True
        return origin == ownOrigin(request) or origin in self._corsOrigins

    def _anonymous(self, name: bytes, request: Request) -> Refusal:
        if getattr(request, "credentialsUnchecked", False):
            return Refusal(http.SERVICE_UNAVAILABLE, BUSY_MESSAGE, ((b"Retry-After", b"%d" % (BUSY_RETRY_AFTER,)),))
        credentials = basicCredentials(request.requestHeaders)
        decoded = _decodeBasic(credentials) if credentials is not None else None
        if decoded is not None:
            wait = self._authenticator.retryAfter(decoded[0], request.getClientAddress())
            if wait > 0:
                seconds = max(1, round(wait))
                return Refusal(
                    TOO_MANY_REQUESTS,
                    tooManyFailures(seconds),
                    ((b"Retry-After", b"%d" % (seconds,)),),
                )
        if name != b"pacs" and isNavigation(request):
            location = b"/login?next=" + quote_from_bytes(requestTarget(request), safe="/").encode("ascii")
            return Refusal(http.FOUND, "Log in first.", ((b"Location", location),))
        challenge = self._cookieChallenge if isBrowser(request) else self._basicChallenge
        return Refusal(
            http.UNAUTHORIZED,
            "Log in first: send HTTP Basic credentials, or log in at /login.",
            ((b"WWW-Authenticate", challenge),),
        )

    def _refuse(self, request: Request, code: int, message: str) -> Refusal:
        if not isNavigation(request):
            return Refusal(code, message)
        return Refusal(code, message, page=self._forbiddenPage)
