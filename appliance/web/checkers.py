"""
Checking a user name and password, the twisted.cred way: an
L{ICredentialsChecker} per source of accounts (a store of password hashes:
the users file, or the shared database's accounts; the hospital's directory,
L{appliance.web.directory}), an L{IRealm} that yields the account with its
roles, and the bounded pools of threads the checks run on.

    Authenticator ──Portal.login(UsernamePassword)──▶ FirstKnownChecker
                                                        ├─▶ AccountStoreChecker ──▶ PasswordChecks (scrypt, 2 threads)
                                                        └─▶ DirectoryChecker ─────▶ CheckThreads (LDAP binds)
                  ◀── IAccount ── AccountStoreRealm ◀── the user's name, or a directory user's account

The checkers' refusals say why (L{UnknownUser}, L{WrongPassword}), so that a
failed login is logged with its reason; an account that changed while its
password was checked (L{AccountChanged}) is neither a success nor a failure,
nor is a check that could not be made (L{CredentialsUnchecked}).
"""

from typing import Callable, Optional, Sequence

from twisted.application.service import Service
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from appliance.web.accounts import IAccount, IAccountStore
from appliance.web.passwords import verifyPassword

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


class CredentialsUnchecked(Exception):
    """
    Credentials could not be checked, through no fault of the client's: it
    is told C{message} and to try again after C{retryAfter} seconds (503 and
    C{Retry-After}).  Not a failed login.
    """

    message = BUSY_MESSAGE
    retryAfter = BUSY_RETRY_AFTER


class PasswordChecksBusy(CredentialsUnchecked):
    """
    A password check was not started: L{MAX_PENDING_CHECKS} are waiting or
    running already.
    """


class RefusedLogin(UnauthorizedLogin):
    """
    A refused login, with the C{reason} the journal gives.
    """

    reason = "refused"

    def __init__(self, name: str, reason: Optional[str] = None) -> None:
        super().__init__(name)
        if reason is not None:
            self.reason = reason


class UnknownUser(RefusedLogin):
    """
    No account has this name (its password was checked all the same).
    """

    reason = "no such user"


class WrongPassword(RefusedLogin):
    """
    The password is not the account's.
    """

    reason = "wrong password"


class AccountDisabled(RefusedLogin):
    """
    The account exists but is disabled (in the directory).
    """

    reason = "the account is disabled"


class NoRole(RefusedLogin):
    """
    The credentials are right, but the account's source gives it no role
    here (a directory user in no mapped group, a provider's user without a
    mapped claim value).  Not a failed login: guessing cannot get further,
    and its owner is told why.
    """

    reason = "no group or claim value gives the account a role here"

    MESSAGE = (
        "Your account is known, but it has no access to this appliance: ask the administrators"
        " to add it to a group that does."
    )


class AccountChanged(Exception):
    """
    The account changed (or went) while its password was checked: neither a
    success nor a failure.
    """


RunInThread = Callable[..., Deferred]


class _QueuedCheck:
    """
    A check handed to a thread pool: C{wanted} turns false when nobody waits
    for its outcome any more (the client left).
    """

    wanted = True


def _runIfWanted(check: _QueuedCheck, function: Callable[..., object], *arguments: object) -> object:
    # On a thread of the pool: a check whose client left while it waited for
    # its turn costs nothing.
    if not check.wanted:
        return None
    return function(*arguments)


class CheckThreads(Service):
    """
    Blocking checks of credentials (a password hash, a directory's bind) on
    a small thread pool of its own, started and stopped with the service
    (C{runInThread} replaces it in tests), with at most C{maxPending}
    waiting or running: more fail at once with C{busy()}.
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        threads: int,
        maxPending: int,
        busy: Callable[[], CredentialsUnchecked],
        reactor=None,
        runInThread: Optional[RunInThread] = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self._name = name
        self._maxPending = maxPending
        self._busyError = busy
        self._threadPool: Optional[ThreadPool] = None
        if runInThread is None:
            self._threadPool = ThreadPool(minthreads=0, maxthreads=threads, name=name)
            pool = self._threadPool

            def runInThread(function, *arguments):
                return deferToThreadPool(reactor, pool, function, *arguments)

        self._runInThread = runInThread
        self.pending = 0
        self._busy = False

    def startService(self) -> None:
        super().startService()
        if self._threadPool is not None:
            self._threadPool.start()

    def stopService(self) -> None:
        super().stopService()
        if self._threadPool is not None:
            self._threadPool.stop()

    def run(self, function: Callable[..., object], *arguments: object) -> Deferred:
        """
        C{function(*arguments)} on the pool; fails with C{busy()} if
        C{maxPending} checks are there already.  Cancelling the result skips
        the call if it has not started.
        """
        if self.pending >= self._maxPending:
            if not self._busy:
                self._busy = True
                self.log.warn(
                    "{count} checks are waiting for the {name} threads: refusing more with 503 until they are done",
                    count=self.pending,
                    name=self._name,
                )
            return fail(self._busyError())
        check = _QueuedCheck()

        def abandon(outcome: Deferred) -> None:
            check.wanted = False

        outcome: Deferred = Deferred(abandon)
        self.pending += 1
        running = maybeDeferred(self._runInThread, _runIfWanted, check, function, *arguments)
        running.addBoth(self._done, outcome)
        return outcome

    def _done(self, result: object, outcome: Deferred) -> None:
        self.pending -= 1
        if self.pending == 0:
            self._busy = False
        if not outcome.called:
            if isinstance(result, Failure):
                outcome.errback(result)
            else:
                outcome.callback(result)
        elif isinstance(result, Failure):
            # Its client left, but a check that failed is still worth a line.
            self.log.failure("A check on the {name} threads failed", result, name=self._name)


class PasswordChecks(CheckThreads):
    """
    Password hashes checked on L{VERIFY_THREADS} threads, with at most
    L{MAX_PENDING_CHECKS} waiting or running (L{PasswordChecksBusy}).
    """

    def __init__(self, reactor=None, runInThread: Optional[RunInThread] = None) -> None:
        super().__init__(
            "password-verification", VERIFY_THREADS, MAX_PENDING_CHECKS, PasswordChecksBusy, reactor, runInThread
        )

    def verify(self, password: str, stored: str) -> "Deferred[bool]":
        """
        Whether C{password} matches the stored hash, checked on the pool
        (see L{CheckThreads.run}).
        """
        return self.run(verifyPassword, password, stored)


@implementer(ICredentialsChecker)
class AccountStoreChecker:
    """
    User names and passwords of a store of accounts (the users file, the
    shared database's); the avatar id is the user's name.  An unknown user
    costs the same scrypt work as most known ones (the store's
    C{dummyHash}).
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, users: IAccountStore, checks: PasswordChecks) -> None:
        self._users = users
        self._checks = checks

    def requestAvatarId(self, credentials: IUsernamePassword) -> "Deferred[str]":
        name = credentials.username.decode("utf-8")
        entry = self._users.lookup(name)
        stored = entry.passwordHash if entry is not None else self._users.dummyHash

        def checked(matches: bool) -> str:
            if entry is None:
                raise UnknownUser(name)
            if not matches:
                raise WrongPassword(name)
            if self._users.lookup(name) != entry:
                raise AccountChanged(name)
            return name

        return self._checks.verify(credentials.password.decode("utf-8"), stored).addCallback(checked)


@implementer(ICredentialsChecker)
class FirstKnownChecker:
    """
    Checkers of user names and passwords asked in order: the first that
    knows the user answers, and a later one is asked only when every
    earlier one said L{UnknownUser}.  The appliance's own accounts come
    first, so that an administrator's local account is never shadowed by a
    directory entry of the same name.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, checkers: Sequence[ICredentialsChecker]) -> None:
        self._checkers = tuple(checkers)

    def requestAvatarId(self, credentials: IUsernamePassword) -> Deferred:
        return self._askFrom(0, credentials)

    def _askFrom(self, index: int, credentials: IUsernamePassword) -> Deferred:
        asking = maybeDeferred(self._checkers[index].requestAvatarId, credentials)
        if index + 1 < len(self._checkers):

            def unknown(failure: Failure) -> Deferred:
                failure.trap(UnknownUser)
                return self._askFrom(index + 1, credentials)

            asking.addErrback(unknown)
        return asking


@implementer(IRealm)
class AccountStoreRealm:
    """
    The accounts of a store, by name (the avatar id of
    L{AccountStoreChecker}, and the name a browser session holds).
    """

    def __init__(self, users: IAccountStore) -> None:
        self._users = users

    def account(self, name: str) -> Optional[IAccount]:
        """
        The account named C{name}, if there is one now.
        """
        entry = self._users.lookup(name)
        return entry.account if entry is not None else None

    def subscribe(self, observer: Callable[[frozenset], None]) -> None:
        """
        Call C{observer(names)} whenever accounts change or go.
        """
        self._users.subscribe(observer)

    def requestAvatar(self, avatarId: object, mind: object, *interfaces):
        if IAccount not in interfaces:
            raise NotImplementedError("the realm only gives accounts (IAccount)")
        if IAccount.providedBy(avatarId):
            # A directory's or a provider's checker names the account whole:
            # its roles come from there, not from this store.
            return IAccount, avatarId, lambda: None
        account = self.account(avatarId)
        if account is None:
            raise AccountChanged(avatarId)
        return IAccount, account, lambda: None
