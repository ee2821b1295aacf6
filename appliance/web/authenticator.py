"""
Who sent a request, and logging users in and out.

    request ──▶ identify(headers, client) ──▶ an account, or None
                 HTTP Basic: remembered briefly, else checked through the
                 portal (the throttle first); a Bearer token: checked through
                 the portal; a session cookie: its account

Browsers log in on the login page (L{appliance.web.login}), or through the
single sign-on (L{appliance.web.openid}), and carry the session cookie; API
clients send HTTP Basic or a Bearer token with every request (Basic checked
once and then remembered briefly).  The gate (L{appliance.web.gate}) decides
what the account may do.
"""

import hashlib
import hmac
import secrets
from collections import OrderedDict
from functools import partial
from typing import Dict, FrozenSet, List, Optional, Tuple

from twisted.application.service import Service
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import CancelledError, Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from appliance.config import AuthSection
from appliance.deferreds import SharedOutcome
from appliance.connections import clientKey
from appliance.state.database import StateDatabase, ignoreUnavailable, reportFailure
from appliance.web.accounts import LDAP, LOCAL, OIDC, Account, IAccount, IAccountStore
from appliance.web.checkers import (
    AccountChanged,
    AccountStoreChecker,
    AccountStoreRealm,
    CredentialsUnchecked,
    FirstKnownChecker,
    NoRole,
    PasswordChecks,
    RefusedLogin,
)
from appliance.web.credentials import BearerToken, authorization, decodeBasic, displayName, sessionTokens
from appliance.web.directory import DirectoryChecker
from appliance.web.loginevents import LoginEventFeed
from appliance.web.sessions import SessionOwner, SessionStore
from appliance.web.throttle import LoginThrottle

#: How long a verified HTTP Basic credential is remembered (unless the users
#: file changes first), and how many are.
BASIC_CACHE_LIFETIME = 300.0
BASIC_CACHE_SIZE = 1000

#: How often expired sessions and old failures are forgotten.
PURGE_INTERVAL = 60.0


class Authenticator(Service):
    """
    Identifies the user behind a request, and logs users in and out.

    Passwords are checked through C{portal} (twisted.cred: a checker per
    source of accounts, see L{appliance.web.checkers}), after the login
    throttle has had its say; verified Basic credentials are remembered
    briefly, and sessions name their account, which C{accounts} looks up.
    Sessions and the throttle's counts are kept in the state database,
    which other nodes share.  The service also forgets expired sessions and
    failures periodically.

    @param portal: checks user names and passwords, and yields accounts
        (L{IAccount}).
    @param accounts: the accounts by name (C{account(name)}), telling of
        changes (C{subscribe}): an L{AccountStoreRealm}.
    @param auth: the [auth] configuration.
    @param database: the state database.
    @param node: this node's name, beside the logins it counts.
    @param directory: the hospital's directory, if [ldap] names one
        (L{appliance.web.directory.DirectoryService}): its users' sessions
        are checked against it again.
    @param singleSignOn: whether [oidc] names a provider: its users'
        sessions and Bearer tokens are refused without one.
    """

    log = Logger()

    def __init__(
        self,
        portal: Portal,
        accounts: AccountStoreRealm,
        auth: AuthSection,
        database: StateDatabase,
        node: str,
        reactor=None,
        directory=None,
        singleSignOn: bool = False,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self._reactor = reactor
        self._portal = portal
        self._accounts = accounts
        self._directory = directory
        self._singleSignOn = singleSignOn
        #: Failed logins (wrong password, unknown user...) since the start.
        self.failedLogins = 0
        #: The audit trail's events (L{appliance.audit.events.AuditEvents}), if any.
        self.audit = None
        #: Sessions in the state database, as last counted (L{countSessions});
        #: L{None} until then.
        self.liveSessions: Optional[int] = None
        self.sessions = SessionStore(database, auth.session_idle_timeout, auth.session_lifetime, reactor)
        self.throttle = LoginThrottle(
            auth.max_login_failures, auth.max_address_failures, auth.login_failure_window, reactor
        )
        self._loginEvents = LoginEventFeed(database, self.throttle, node, auth.login_failure_window, reactor)
        # Verified Basic credentials, under a keyed hash of the header: the
        # table holds no password, nor anything that could be replayed.
        self._cacheKey = secrets.token_bytes(32)
        self._basicCache: "OrderedDict[bytes, Tuple[IAccount, float]]" = OrderedDict()
        # Basic credentials being checked, under the same keyed hash: the
        # requests that bring them meanwhile share that check.
        self._pending: Dict[bytes, SharedOutcome] = {}
        self._purging = LoopingCall(self._purge)
        self._purging.clock = reactor
        accounts.subscribe(self._accountsChanged)

    @classmethod
    def forAccountStore(
        cls,
        users: IAccountStore,
        checks: PasswordChecks,
        auth: AuthSection,
        database: StateDatabase,
        node: str,
        reactor=None,
        directory=None,
        tokens=None,
    ) -> "Authenticator":
        """
        The authenticator of the accounts of a store (the users file, the
        shared database's accounts), their passwords checked by C{checks};
        then of the users of C{directory}
        (L{appliance.web.directory.DirectoryService}), if given; and of the
        Bearer tokens C{tokens} checks (an L{ICredentialsChecker} of
        L{appliance.web.credentials.IBearerToken}), if given.
        """
        realm = AccountStoreRealm(users)
        passwords = AccountStoreChecker(users, checks)
        if directory is not None:
            passwords = FirstKnownChecker([passwords, DirectoryChecker(directory)])
        checkers = [passwords] if tokens is None else [passwords, tokens]
        return cls(Portal(realm, checkers), realm, auth, database, node, reactor, directory, tokens is not None)

    def startService(self) -> None:
        Service.startService(self)
        self._loginEvents.start()
        self._purging.start(PURGE_INTERVAL, now=False).addErrback(
            lambda failure: self.log.failure("Stopped forgetting expired sessions", failure)
        )

    def stopService(self) -> None:
        Service.stopService(self)
        self._loginEvents.stop()
        if self._purging.running:
            self._purging.stop()

    # --- identification -----------------------------------------------------

    def identify(self, headers: Headers, client) -> "Deferred[Optional[IAccount]]":
        """
        The account behind a request: from its HTTP Basic credentials if it
        carries an C{Authorization: Basic} header (invalid ones give L{None},
        whatever cookie comes with them), else from its session cookie.

        A Bearer token is checked against the single sign-on's keys (none
        without [oidc]: L{None}).

        Fires at once when memory answers (a session seen in the last few
        seconds, a Basic credential verified recently, an address refused by
        the L{LoginThrottle}); reads the session from the state database, or
        checks the password in a thread (after the throttle's back-off),
        otherwise.  Fails only with L{CredentialsUnchecked}, when the
        credentials could not be checked (too many checks waiting, the
        directory unreachable): other errors are logged and give L{None}.
        Cancelling the Deferred (the client left) skips a check still
        waiting for a thread.
        """
        try:
            identified = self._identify(headers, client)
        except Exception:
            self.log.failure("Could not identify a request from {client}", client=str(client))
            return succeed(None)
        return identified.addErrback(self._identifyFailed, client)

    def _identifyFailed(self, failure: Failure, client) -> Optional[Failure]:
        if failure.check(CredentialsUnchecked, CancelledError):
            return failure
        self.log.failure("Could not identify a request from {client}", failure, client=str(client))
        return None

    def _identify(self, headers: Headers, client) -> "Deferred[Optional[IAccount]]":
        given = authorization(headers)
        if given is not None:
            scheme, credentials = given
            if scheme == b"basic":
                return self._basic(credentials, client)
            # Credentials in the header are the request's own: never the
            # cookie's account instead (the gate judges those as such).
            return self._bearer(credentials, client)
        return self._fromSessions(list(sessionTokens(headers)))

    def _bearer(self, token: bytes, client) -> "Deferred[Optional[IAccount]]":
        if not self._singleSignOn:
            self.log.info("Refused a Bearer token from {client}: no single sign-on is set up ([oidc])", client=clientKey(client))
            return succeed(None)
        checking = self._portal.login(BearerToken(token), None, IAccount)

        def refused(failure: Failure) -> Optional[Failure]:
            if failure.check(RefusedLogin):
                self.log.info(
                    "Refused a Bearer token from {client}: {reason}", client=clientKey(client), reason=failure.value.reason
                )
                return None
            return failure

        return checking.addCallbacks(lambda loggedIn: loggedIn[1], refused)

    def _fromSessions(self, tokens: List[bytes]) -> "Deferred[Optional[IAccount]]":
        """
        The account of the first live session among C{tokens} (a browser
        may hold an old cookie beside the current one).
        """
        if not tokens:
            return succeed(None)

        def found(owner: Optional[SessionOwner]) -> "Optional[IAccount] | Deferred[Optional[IAccount]]":
            if owner is None:
                return self._fromSessions(tokens[1:])
            return maybeDeferred(self._sessionAccount, owner).addCallback(accountOf, owner)

        def accountOf(account: Optional[IAccount], owner: SessionOwner) -> "Optional[IAccount] | Deferred[Optional[IAccount]]":
            if account is not None:
                return account
            if owner.source != LOCAL:
                # Its source no longer gives the account a role here.
                self.sessions.end(tokens[0]).addErrback(
                    partial(reportFailure, self.log), "end a session whose account lost its roles"
                )
            return self._fromSessions(tokens[1:])

        return self.sessions.lookup(tokens[0]).addCallback(found)

    def _sessionAccount(self, owner: SessionOwner) -> "Optional[IAccount] | Deferred[Optional[IAccount]]":
        if owner.source == LOCAL:
            return self._accounts.account(owner.name)
        if owner.source == LDAP and self._directory is not None and owner.roles:
            return self._directory.sessionAccount(owner.name, owner.roles)
        if owner.source == OIDC and self._singleSignOn and owner.roles:
            # The provider's roles at login hold for the session's life.
            return Account(owner.name, owner.roles, OIDC)
        return None

    def _basic(self, credentials: bytes, client) -> "Deferred[Optional[IAccount]]":
        key = hmac.new(self._cacheKey, credentials, hashlib.sha256).digest()
        cached = self._basicCache.get(key)
        if cached is not None:
            account, expires = cached
            if expires > self._reactor.seconds():
                self._basicCache.move_to_end(key)
                return succeed(account)
            del self._basicCache[key]
        decoded = decodeBasic(credentials)
        if decoded is None:
            self.log.info("Refused malformed HTTP Basic credentials from {client}", client=clientKey(client))
            return succeed(None)
        shared = self._pending.get(key)
        if shared is None:
            name, password = decoded
            checking = self._check(name, password, client, "HTTP Basic")
            checking.addCallbacks(self._basicChecked, self._basicRefused, (key,))
            # Registered only once the check exists (nothing is left behind
            # if starting it raises), and forgotten when it ends, even at once.
            shared = self._pending[key] = SharedOutcome(checking)
            checking.addBoth(self._basicSettled, key)
        return shared.follow()

    def _basicSettled(self, result: None, key: bytes) -> None:
        self._pending.pop(key, None)

    def _basicRefused(self, failure: Failure) -> None:
        # The gate's 401 is all an API client needs; the journal says why.
        failure.trap(NoRole)

    def _basicChecked(self, account: Optional[IAccount], key: bytes) -> Optional[IAccount]:
        if account is None:
            return None
        # A directory's answer holds only as long as [ldap] says.
        lifetime = self._directory.recheckInterval if account.source == LDAP else BASIC_CACHE_LIFETIME
        self._basicCache[key] = (account, self._reactor.seconds() + lifetime)
        while len(self._basicCache) > BASIC_CACHE_SIZE:
            self._basicCache.popitem(last=False)
        return account

    # --- logging in and out -------------------------------------------------

    def retryAfter(self, name: str, client) -> float:
        """
        Seconds before user C{name} may try to log in from C{client}.
        """
        return self.throttle.retryAfter(name, client)

    def login(self, name: str, password: str, client) -> "Deferred[Optional[IAccount]]":
        """
        Check a user name and password from the login form (in a thread);
        fires with the account, or L{None} (counted as a failed login).
        Fails with L{NoRole} when the password is right but the account has
        no role here, and with L{CredentialsUnchecked} (see L{identify});
        cancelling it skips a check still waiting for a thread.
        """
        return self._check(name, password, client, "login form")

    def startSession(self, account: IAccount, previous: List[bytes], logoutHint: Optional[str] = None) -> "Deferred[bytes]":
        """
        End the C{previous} sessions of the browser and start one for
        C{account} (with the single sign-on's C{logoutHint}, if any); fires
        with its token once every node knows it.
        """
        for token in previous:
            self.sessions.end(token).addErrback(partial(reportFailure, self.log), "end a browser's previous session")

        def started(token: bytes) -> bytes:
            self.log.info("{user} logged in", user=account.label)
            return token

        # The appliance's own accounts' roles are looked up at each use.
        roles = None if account.source == LOCAL else frozenset(account.roles)
        owner = SessionOwner(account.name, account.source, roles, logoutHint)
        return self.sessions.create(owner).addCallback(started)

    def endSession(self, token: bytes, client=None) -> "Deferred[Optional[SessionOwner]]":
        """
        End the session C{token} (its user logging out from C{client});
        fires with its owner (L{None} if it had ended already) once it has
        ended on every node.
        """

        def ended(owner: Optional[SessionOwner]) -> Optional[SessionOwner]:
            if owner is not None:
                label = f"{owner.source}:{owner.name}"
                self.log.info("{user} logged out", user=label)
                if self.audit is not None and client is not None:
                    self.audit.loggedOut(label, owner.name, client)
            return owner

        return self.sessions.end(token).addCallback(ended)

    def _check(self, name: str, password: str, client, method: str) -> "Deferred[Optional[IAccount]]":
        delay = self.throttle.attempt(name, client)
        if delay is None:
            return succeed(None)
        credentials = UsernamePassword(name.encode("utf-8"), password.encode("utf-8"))
        if delay > 0:
            checking = deferLater(self._reactor, delay, self._portal.login, credentials, None, IAccount)
        else:
            checking = self._portal.login(credentials, None, IAccount)
        checking.addCallbacks(self._succeeded, self._refused, (name, client), errbackArgs=(name, client, method))
        return checking

    def _succeeded(self, loggedIn: tuple, name: str, client) -> IAccount:
        _, account, _ = loggedIn
        self._loginEvents.record(self.throttle.succeeded(name, client))
        self.signedIn(account, client)
        return account

    def signedIn(self, account: IAccount, client) -> None:
        """
        C{account} proved who it is (a password, the single sign-on): the
        audit trail's login.
        """
        if self.audit is not None:
            self.audit.loggedIn(account.label, account.name, client)

    def signInRefused(self, name: str, client, reason: str) -> None:
        """
        A login of C{name} was refused for C{reason}: the audit trail's
        failed login.
        """
        if self.audit is not None:
            self.audit.loginRefused(name, client, reason)

    def _refused(self, failure: Failure, name: str, client, method: str) -> "Optional[IAccount] | Failure":
        if failure.check(UnauthorizedLogin) and not failure.check(NoRole):
            self.failedLogins += 1
            self._loginEvents.record(self.throttle.failed(name, client))
            self.signInRefused(name, client, getattr(failure.value, "reason", "refused"))
            self.log.warn(
                "Failed login for {user} from {client} ({method}): {reason}",
                user=displayName(name),
                client=clientKey(client),
                method=method,
                reason=getattr(failure.value, "reason", "refused"),
            )
            return None
        # The check's slot is given back: anything else is not a failed login.
        self.throttle.abandoned(name, client)
        if failure.check(NoRole):
            self.signInRefused(name, client, failure.value.reason)
            self.log.warn(
                "Refused a login for {user} from {client} ({method}): the password is right, but {reason}",
                user=displayName(name),
                client=clientKey(client),
                method=method,
                reason=failure.value.reason,
            )
            return failure
        if failure.check(AccountChanged):
            self.log.info("The account {user} changed while its password was checked", user=name)
            return None
        if failure.check(CredentialsUnchecked):
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

    def _accountsChanged(self, names: FrozenSet[str]) -> None:
        self._basicCache.clear()

        def ended(count: int) -> None:
            if count:
                self.log.info(
                    "Ended {count} sessions of changed or removed users: {users}",
                    count=count,
                    users=", ".join(sorted(names)),
                )

        # If the table cannot be told now, this node refuses those sessions
        # and tells the table later (SessionStore.purge).
        self.sessions.endUsers(names).addCallbacks(
            ended, partial(reportFailure, self.log), errbackArgs=("end the sessions of changed or removed users in the table",)
        )

    def _purge(self) -> Deferred:
        self.throttle.purge()
        now = self._reactor.seconds()
        for key in [key for key, (_, expires) in self._basicCache.items() if expires <= now]:
            del self._basicCache[key]
        purging = DeferredList([self.sessions.purge(), self._loginEvents.purge()], consumeErrors=True)
        return purging.addCallback(self._purged)

    def countSessions(self) -> "Deferred[None]":
        """
        Count the sessions in the state database into C{liveSessions}.
        """

        def counted(count: int) -> None:
            self.liveSessions = count

        return self.sessions.count().addCallback(counted)

    def _purged(self, results: list) -> None:
        for succeeded, result in results:
            if not succeeded:
                ignoreUnavailable(self.log, result, "forget expired sessions and logins")
