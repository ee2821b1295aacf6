"""
Checking a user name and password, the twisted.cred way: an
L{ICredentialsChecker} per source of accounts (here a store of password
hashes: the users file, or the shared database's accounts; a directory or a
single sign-on would each be one more), an L{IRealm} that yields the account
with its roles, and the bounded pool of threads the password hashes are
checked on.

    Authenticator ──Portal.login(UsernamePassword)──▶ AccountStoreChecker ──▶ PasswordChecks (scrypt, 2 threads)
                                                   ◀── the user's name ──┘
                  ◀── IAccount ── AccountStoreRealm

The checker's refusals say why (L{UnknownUser}, L{WrongPassword}), so that a
failed login is logged with its reason; an account that changed while its
password was checked (L{AccountChanged}) is neither a success nor a failure.
"""

from typing import Callable, Optional

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


class PasswordChecksBusy(Exception):
    """
    A password check was not started: L{MAX_PENDING_CHECKS} are waiting or
    running already.  The client should try again after L{BUSY_RETRY_AFTER}
    seconds (503 and C{Retry-After}, with L{BUSY_MESSAGE}).
    """


class UnknownUser(UnauthorizedLogin):
    """
    No account has this name (its password was checked all the same).
    """


class WrongPassword(UnauthorizedLogin):
    """
    The password is not the account's.
    """


class AccountChanged(Exception):
    """
    The account changed (or went) while its password was checked: neither a
    success nor a failure.
    """


RunInThread = Callable[..., Deferred]


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


class PasswordChecks(Service):
    """
    Password hashes checked on a small thread pool of its own, started and
    stopped with the service (C{runInThread} replaces it in tests), with at
    most L{MAX_PENDING_CHECKS} waiting or running.
    """

    log = Logger()

    def __init__(self, reactor=None, runInThread: Optional[RunInThread] = None) -> None:
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self._threadPool: Optional[ThreadPool] = None
        if runInThread is None:
            self._threadPool = ThreadPool(minthreads=0, maxthreads=VERIFY_THREADS, name="password-verification")
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

    def verify(self, password: str, stored: str) -> "Deferred[bool]":
        """
        Whether C{password} matches the stored hash, checked on the pool;
        fails with L{PasswordChecksBusy} if L{MAX_PENDING_CHECKS} are there
        already.  Cancelling the result skips the check if it has not
        started.
        """
        if self.pending >= MAX_PENDING_CHECKS:
            if not self._busy:
                self._busy = True
                self.log.warn(
                    "{count} password checks are waiting: refusing more with 503 until they are done",
                    count=self.pending,
                )
            return fail(PasswordChecksBusy())
        check = _QueuedCheck()

        def abandon(outcome: Deferred) -> None:
            check.wanted = False

        outcome: Deferred = Deferred(abandon)
        self.pending += 1
        running = maybeDeferred(self._runInThread, _verifyIfWanted, check, password, stored)
        running.addBoth(self._verified, outcome)
        return outcome

    def _verified(self, result: object, outcome: Deferred) -> None:
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
            self.log.failure("Could not check a password", result)


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

    def requestAvatar(self, avatarId: str, mind: object, *interfaces):
        if IAccount not in interfaces:
            raise NotImplementedError("the realm only gives accounts (IAccount)")
        account = self.account(avatarId)
        if account is None:
            raise AccountChanged(avatarId)
        return IAccount, account, lambda: None
