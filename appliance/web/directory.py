"""
The hospital's directory (Active Directory, OpenLDAP) as a source of
accounts ([ldap]): its users log in with the login form or HTTP Basic, and
the groups they are in, nested ones included, give their roles.

    DirectoryChecker ─▶ DirectoryService.authenticate ─┐
    Authenticator ───▶ DirectoryService.sessionAccount ┴▶ CheckThreads ─▶ Directory (ldap3, blocking)

A check searches the user with the bind account, refuses a disabled one,
binds as the user with the password given, then searches the groups whose
C{member} is the user, and the groups those are members of, level by level
(this works on Active Directory and OpenLDAP alike).  The servers of C{url}
are tried in order; every connection is TLS (LDAPS, or StartTLS before
anything else is sent) with the server's certificate and name checked.

The calls block, so they run on threads of their own (L{CheckThreads}): a
slow directory never holds the reactor, nor the local accounts' password
checks.  A directory that cannot be reached fails the check with
L{DirectoryUnavailable} (503: the password may be right, and a 401 would
have its owner retype it until the throttle locks them out), and the
journal says so once, and once more when it answers again.
"""

import math
import re
import ssl
from collections import OrderedDict
from typing import Callable, Dict, FrozenSet, Iterator, List, Optional, Sequence, Set, Tuple

from twisted.application.service import Service
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from appliance.config import LdapSection
from appliance.configvalues import DirectoryServer
from appliance.deferreds import SharedOutcome, shortDescription
from appliance.secretfiles import readSecret
from appliance.web.accounts import LDAP, ROLES, Account, IAccount
from appliance.web.checkers import (
    AccountDisabled,
    CheckThreads,
    CredentialsUnchecked,
    NoRole,
    RunInThread,
    UnknownUser,
    WrongPassword,
)

#: Directory calls run on this many threads at most, and this many wait or
#: run at most (more are refused with 503): a directory that hangs ties up
#: these threads, and nothing else.
DIRECTORY_THREADS = 4
MAX_PENDING_LOOKUPS = 64

#: How many levels of nested groups are followed, and how many groups in
#: all: a loop of groups, or a huge tree, ends there.
MAX_NESTING = 16
MAX_GROUPS = 5000

#: Members asked about in one search filter.
MEMBERS_A_SEARCH = 50

#: What a user may type as a directory name: no white space or control
#: characters (no directory name has them, and they would forge log fields).
DIRECTORY_NAME = re.compile(r"[^\s\x00-\x1f\x7f]{1,256}")

#: How long, while the directory cannot be reached, a session's account is
#: taken as the directory last gave it before it is looked up again.
UNAVAILABLE_RECHECK = 30.0

#: Remembered directory checks of sessions, at most.
MAX_REMEMBERED = 10000

#: Active Directory's reasons for a refused bind (the "data" of its
#: diagnostic message), for the journal.
ACTIVE_DIRECTORY_REFUSALS = {
    "52e": "wrong password",
    "525": "no such user",
    "530": "not permitted to log on at this time",
    "531": "not permitted to log on at this workstation",
    "532": "the password has expired",
    "533": "the account is disabled",
    "701": "the account has expired",
    "773": "the password must be changed",
    "775": "the account is locked out",
}

#: userAccountControl's ACCOUNTDISABLE bit (Active Directory).
ACCOUNT_DISABLED = 0x2

#: pwdAccountLockedTime's value for an account an administrator locked
#: (OpenLDAP's password policy): locked until unlocked.
LOCKED_FOR_GOOD = b"000001010000Z"


class DirectoryUnavailable(CredentialsUnchecked):
    """
    No server of the directory answered: C{problems} says what each did.
    """

    message = (
        "The hospital directory cannot be reached, so directory accounts cannot log in now"
        " (the appliance's own accounts can): try again in a minute."
    )
    retryAfter = 30

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = tuple(problems)


class DirectoryBusy(CredentialsUnchecked):
    """
    L{MAX_PENDING_LOOKUPS} directory calls are waiting or running already.
    """

    message = "The appliance is waiting for the hospital directory to answer many logins: try again in a few seconds."
    retryAfter = 5


class _ServerFailed(Exception):
    """
    One server could not be used; the message says why.  The next is tried.
    """


def normalDN(dn: str) -> str:
    """
    C{dn} in one spelling (attribute types and values lower case, no space
    around separators), for comparing DNs as directories do.
    """
    from ldap3.utils.dn import parse_dn

    return ",".join(f"{kind.strip().lower()}={value.strip().lower()}" for kind, value, _ in parse_dn(dn))


def domainOf(dn: str) -> str:
    """
    The domain part (the C{DC=} components) of C{dn}.
    """
    from ldap3.utils.dn import parse_dn

    return ",".join(f"{kind}={value}" for kind, value, _ in parse_dn(dn) if kind.strip().lower() == "dc")


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _bindRefusal(result: dict) -> str:
    message = result.get("message") or ""
    match = re.search(r"data ([0-9a-f]{3})", message)
    if match and match.group(1) in ACTIVE_DIRECTORY_REFUSALS:
        return ACTIVE_DIRECTORY_REFUSALS[match.group(1)]
    return "wrong password"


class Directory:
    """
    The directory's servers, asked synchronously (call on a thread).

    @param section: the [ldap] configuration.
    @param bindPassword: the bind account's password.
    """

    def __init__(self, section: LdapSection, bindPassword: str) -> None:
        self._section = section
        self._bindPassword = bindPassword
        self._servers = section.url
        self._groupBase = section.group_base or domainOf(section.user_base)
        self._bindDN = normalDN(section.bind_dn)
        self._roleGroups: Dict[str, FrozenSet[str]] = {
            "viewer": frozenset(normalDN(dn) for dn in section.viewer_groups),
            "uploader": frozenset(normalDN(dn) for dn in section.uploader_groups),
            "admin": frozenset(normalDN(dn) for dn in section.admin_groups),
        }

    def _server(self, server: DirectoryServer):
        # A new one for each connection: ldap3's remembers an address that
        # failed as unavailable, and would refuse it for a while after the
        # directory is back.
        from ldap3 import NONE, Server, Tls

        tls = Tls(
            validate=ssl.CERT_REQUIRED,
            ca_certs_file=str(self._section.ca_file) if self._section.ca_file is not None else None,
            # Python's default context: TLS 1.2 and later, its ciphers.
            version=None,
            sni=server.host,
        )
        return Server(
            server.host,
            port=server.port,
            use_ssl=not server.startTLS,
            tls=tls,
            get_info=NONE,
            connect_timeout=self._section.timeout,
        )

    # --- what the appliance asks --------------------------------------------

    def authenticate(self, name: str, password: str) -> FrozenSet[str]:
        """
        The roles of directory user C{name}, once C{password} is checked.

        @raise UnknownUser: no (single) entry matches the name.
        @raise AccountDisabled: the entry is disabled.
        @raise WrongPassword: the password is not the user's.
        @raise NoRole: the user is in no group that gives a role.
        @raise DirectoryUnavailable: no server answered.
        """
        if not DIRECTORY_NAME.fullmatch(name):
            raise UnknownUser(name, "not a name a directory holds")
        if not password:
            # LDAP takes a bind with a DN and no password as an anonymous
            # one, which succeeds: it proves nothing.
            raise WrongPassword(name, "an empty password")

        def check(server: DirectoryServer, connection) -> FrozenSet[str]:
            dn = self._findUser(connection, name)
            self._checkPassword(server, dn, name, password)
            return self._roles(connection, dn)

        roles = self._onAnyServer(check)
        if not roles:
            raise NoRole(name)
        return roles

    def currentRoles(self, name: str) -> Optional[FrozenSet[str]]:
        """
        The roles directory user C{name} has now (empty if none), without
        their password; L{None} if there is no such user any more, or they
        are disabled.

        @raise DirectoryUnavailable: no server answered.
        """

        def look(server: DirectoryServer, connection) -> Optional[FrozenSet[str]]:
            try:
                dn = self._findUser(connection, name)
            except (UnknownUser, AccountDisabled):
                return None
            return self._roles(connection, dn)

        return self._onAnyServer(look)

    def probe(self) -> List[str]:
        """
        What is wrong with each server that cannot be used with the bind
        account (empty if all can).
        """
        problems = []
        for server in self._servers:
            try:
                self._onServers([server], lambda server, connection: None)
            except DirectoryUnavailable as unavailable:
                problems.extend(unavailable.problems)
        return problems

    # --- the steps ----------------------------------------------------------

    def _onAnyServer(self, work: Callable):
        return self._onServers(self._servers, work)

    def _onServers(self, servers: Sequence[DirectoryServer], work: Callable):
        from ldap3.core.exceptions import LDAPException

        problems = []
        for server in servers:
            try:
                connection = self._connect(server, self._section.bind_dn, self._bindPassword, bindAccount=True)
            except (_ServerFailed, LDAPException, OSError) as error:
                problems.append(f"{server.url}: {shortDescription(error)}")
                continue
            try:
                return work(server, connection)
            except (_ServerFailed, LDAPException, OSError) as error:
                problems.append(f"{server.url}: {shortDescription(error)}")
            finally:
                _close(connection)
        raise DirectoryUnavailable(problems)

    def _connect(self, server: DirectoryServer, dn: str, password: str, bindAccount: bool = False):
        """
        A connection to C{server}, encrypted, bound as C{dn}; the bind's
        result is in its C{result}, and it is not bound if that failed
        (with C{bindAccount}, the appliance's own: then the server is of no
        use, and L{_ServerFailed} says why).
        """
        from ldap3 import Connection, SIMPLE

        connection = Connection(
            self._server(server),
            user=dn,
            password=password,
            authentication=SIMPLE,
            read_only=True,
            # Referrals could lead anywhere, in the clear.
            auto_referrals=False,
            # Whole seconds: ldap3 packs it into SO_RCVTIMEO as an integer.
            receive_timeout=max(1, math.ceil(self._section.timeout)),
            raise_exceptions=False,
        )
        try:
            connection.open()
            if server.startTLS and not connection.start_tls():
                raise _ServerFailed(f"StartTLS failed: {connection.result.get('description')}")
            if not connection.bind() and bindAccount:
                raise _ServerFailed(
                    f"the bind account {dn} was refused ({connection.result.get('description')}):"
                    " check bind_dn and bind_password_file"
                )
        except BaseException:
            _close(connection)
            raise
        return connection

    def _findUser(self, connection, name: str) -> str:
        from ldap3 import SUBTREE
        from ldap3.utils.conv import escape_filter_chars

        query = self._section.user_filter.replace("{user}", escape_filter_chars(name))
        connection.search(
            self._section.user_base,
            query,
            SUBTREE,
            attributes=["userAccountControl", "pwdAccountLockedTime"],
            size_limit=2,
        )
        code = connection.result.get("result")
        if code not in (0, 4):
            raise _ServerFailed(f"searching users under {self._section.user_base} failed: {connection.result.get('description')}")
        entries = [entry for entry in connection.response or () if entry.get("type") == "searchResEntry"]
        if not entries:
            raise UnknownUser(name)
        if len(entries) > 1:
            raise UnknownUser(name, "user_filter matches several directory entries")
        entry = entries[0]
        if normalDN(entry["dn"]) == self._bindDN:
            # The appliance's own account is no one's login: its password
            # must not be guessable through the login form.
            raise UnknownUser(name, "the directory account the appliance searches with")
        attributes = entry.get("raw_attributes", {})
        control = attributes.get("userAccountControl") or [b"0"]
        try:
            disabled = int(control[0]) & ACCOUNT_DISABLED
        except ValueError:
            disabled = False
        if disabled or LOCKED_FOR_GOOD in (attributes.get("pwdAccountLockedTime") or ()):
            raise AccountDisabled(name)
        return entry["dn"]

    def _checkPassword(self, server: DirectoryServer, dn: str, name: str, password: str) -> None:
        from ldap3.core.exceptions import LDAPSASLPrepError

        try:
            connection = self._connect(server, dn, password)
        except LDAPSASLPrepError:
            # The client's doing, not the server's: ldap3 refuses to send a
            # password with control characters (RFC 4013's SASLprep).
            raise WrongPassword(name, "the password holds characters no directory password has")
        try:
            if not connection.bound:
                if connection.result.get("result") == 49:
                    raise WrongPassword(name, _bindRefusal(connection.result))
                raise _ServerFailed(f"binding as a user failed: {connection.result.get('description')}")
        finally:
            _close(connection)

    def _roles(self, connection, dn: str) -> FrozenSet[str]:
        groups = self._groups(connection, dn)
        return frozenset(role for role in ROLES if self._roleGroups[role] & groups)

    def _groups(self, connection, dn: str) -> Set[str]:
        """
        The groups C{dn} is a member of, directly or through other groups
        (normalised DNs).
        """
        from ldap3 import NO_ATTRIBUTES, SUBTREE
        from ldap3.utils.conv import escape_filter_chars

        found: Set[str] = set()
        frontier = [dn]
        for _ in range(MAX_NESTING):
            nextLevel = []
            for members in _chunks(frontier, MEMBERS_A_SEARCH):
                query = "(|" + "".join(f"(member={escape_filter_chars(member)})" for member in members) + ")"
                connection.search(self._groupBase, query, SUBTREE, attributes=[NO_ATTRIBUTES])
                if connection.result.get("result") not in (0, 4):
                    raise _ServerFailed(
                        f"searching groups under {self._groupBase} failed: {connection.result.get('description')}"
                    )
                for entry in connection.response or ():
                    if entry.get("type") != "searchResEntry":
                        continue
                    group = normalDN(entry["dn"])
                    if group not in found:
                        found.add(group)
                        nextLevel.append(entry["dn"])
            if not nextLevel or len(found) >= MAX_GROUPS:
                break
            frontier = nextLevel
        return found


def _close(connection) -> None:
    try:
        connection.unbind()
    except Exception:
        pass


class DirectoryService(Service):
    """
    The directory, asked on threads of its own, with what the reactor side
    needs: accounts for the checker, sessions' accounts checked again every
    C{recheck_interval}, and the journal told once when the directory cannot
    be reached and once when it answers again.
    """

    log = Logger()

    def __init__(self, directory: Directory, recheckInterval: float, reactor=None, runInThread: Optional[RunInThread] = None) -> None:
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self._directory = directory
        self._clock = reactor
        self.recheckInterval = recheckInterval
        self._threads = CheckThreads("directory", DIRECTORY_THREADS, MAX_PENDING_LOOKUPS, DirectoryBusy, reactor, runInThread)
        self._unavailable = False
        #: Sessions' accounts by name: the account (L{None}: none any
        #: more) and until when it holds.
        self._checked: "OrderedDict[str, Tuple[Optional[IAccount], float]]" = OrderedDict()
        self._lookups: Dict[str, SharedOutcome] = {}

    @classmethod
    def fromConfig(cls, section: LdapSection, reactor=None) -> "DirectoryService":
        """
        The directory of C{section}, its bind password read now.
        """
        assert section.bind_password_file is not None
        return cls(Directory(section, readSecret(section.bind_password_file)), section.recheck_interval, reactor)

    def startService(self) -> None:
        super().startService()
        self._threads.startService()
        # The directory may be down while the box boots: a warning, not a
        # refusal to start.
        probing = self._threads.run(self._directory.probe)
        probing.addCallbacks(self._probed, lambda failure: self.log.failure("Could not try the directory", failure))

    def stopService(self) -> None:
        super().stopService()
        self._threads.stopService()

    def _probed(self, problems: List[str]) -> None:
        for problem in problems:
            self.log.warn("Directory server {problem}: the next one is tried for each login", problem=problem)

    def authenticate(self, name: str, password: str) -> "Deferred[IAccount]":
        """
        The account of directory user C{name} once C{password} is checked;
        fails as L{Directory.authenticate} says.
        """
        checking = self._threads.run(self._directory.authenticate, name, password)
        checking.addCallbacks(self._answered, self._failed)
        checking.addCallback(lambda roles: self._remember(name, Account(name, roles, LDAP)))
        return checking

    def sessionAccount(self, name: str, lastRoles: FrozenSet[str]) -> "Deferred[Optional[IAccount]]":
        """
        The account of a session of directory user C{name}: looked up again
        once C{recheck_interval} has passed since the last check, and
        L{None} once the user is gone, disabled, or in no group that gives a
        role.  While the directory cannot be reached, the session keeps
        the account the directory gave last (C{lastRoles}, the roles of its
        login, if it has said nothing since the start).
        """
        remembered = self._checked.get(name)
        if remembered is not None and remembered[1] > self._clock.seconds():
            return succeed(remembered[0])
        shared = self._lookups.get(name)
        if shared is None:
            lookup = self._threads.run(self._directory.currentRoles, name)
            lookup.addCallbacks(self._answered, self._failed)
            lookup.addCallbacks(self._looked, self._notLooked, (name,), errbackArgs=(name, lastRoles))
            # Registered once it exists; forgotten when it ends, even at once.
            shared = self._lookups[name] = SharedOutcome(lookup)
            lookup.addBoth(self._lookedUp, name)
        return shared.follow()

    def _looked(self, roles: Optional[FrozenSet[str]], name: str) -> Optional[IAccount]:
        account = Account(name, roles, LDAP) if roles else None
        if account is None:
            self.log.info(
                "The directory user {user} is gone, disabled or in no group that gives a role: their sessions end",
                user=name,
            )
        return self._remember(name, account)

    def _notLooked(self, failure: Failure, name: str, lastRoles: FrozenSet[str]) -> Optional[IAccount]:
        if failure.check(CancelledError):
            # Every session that asked has left.
            return None
        if failure.check(DirectoryUnavailable, DirectoryBusy):
            # What the directory said last (a role taken away stays away),
            # else the roles the session was given at login.
            remembered = self._checked.get(name)
            account = remembered[0] if remembered is not None else Account(name, lastRoles, LDAP)
            return self._remember(name, account, UNAVAILABLE_RECHECK)
        self.log.failure("Could not look up the directory user {user}", failure, user=name)
        return None

    def _lookedUp(self, result: object, name: str) -> object:
        self._lookups.pop(name, None)
        return result

    def _remember(self, name: str, account: Optional[IAccount], lifetime: Optional[float] = None) -> Optional[IAccount]:
        self._checked[name] = (account, self._clock.seconds() + (lifetime or self.recheckInterval))
        self._checked.move_to_end(name)
        while len(self._checked) > MAX_REMEMBERED:
            self._checked.popitem(last=False)
        return account

    def _answered(self, result: object) -> object:
        if self._unavailable:
            self._unavailable = False
            self.log.info("The directory answers again: directory users can log in")
        return result

    def _failed(self, failure: Failure) -> Failure:
        if failure.check(DirectoryUnavailable) and not self._unavailable:
            self._unavailable = True
            self.log.error(
                "The directory cannot be reached ({problems}): directory users cannot log in until it answers;"
                " the appliance's own accounts still can",
                problems="; ".join(failure.value.problems),
            )
        elif failure.check(AccountDisabled, UnknownUser, WrongPassword, NoRole):
            # The directory answered.
            self._answered(None)
        return failure


@implementer(ICredentialsChecker)
class DirectoryChecker:
    """
    User names and passwords of the directory; the avatar id is the
    account itself (L{Account}, source C{ldap}), with the roles its groups
    give.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, directory: DirectoryService) -> None:
        self._directory = directory

    def requestAvatarId(self, credentials: IUsernamePassword) -> "Deferred[IAccount]":
        return self._directory.authenticate(
            credentials.username.decode("utf-8"), credentials.password.decode("utf-8")
        )
