"""
User accounts in memory: password hashes, the users file and its re-reading,
sessions, HTTP Basic, throttling, the access gate in front of every route,
and the login page, against a Clock and a real Site over StringTransport.
"""

import base64
import hashlib
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from urllib.parse import urlencode

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred, fail, inlineCallbacks, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from twisted.web.test.requesthelper import DummyChannel, DummyRequest

from appliance.config import DEFAULT_CONTENT_SECURITY_POLICY
from appliance.connections import clientKey, networkKey
from appliance.reload import ReloadOnSighup
from appliance.state.database import RETRY_LAST, DatabaseUnavailable
from appliance.web import checkers
from appliance.web.accounts import ROLES, Account
from appliance.web.authenticator import BASIC_CACHE_LIFETIME, Authenticator
from appliance.web.checkers import BUSY_MESSAGE, MAX_PENDING_CHECKS, PasswordChecks, PasswordChecksBusy
from appliance.web.credentials import SESSION_COOKIE
from appliance.web.gate import AccessGate
from appliance.web.login import LoginResource, LogoutResource
from appliance.web.loginevents import POLL_INTERVAL
from appliance.web.origins import localTarget, requestOrigin
from appliance.web.pages import Page
from appliance.web.passwords import (
    DEFAULT_PARAMETERS,
    PasswordHash,
    PasswordHashError,
    ScryptParameters,
    hashPassword,
    verifyPassword,
)
from appliance.web.sessions import RECHECK_AFTER, SessionOwner, SessionStore
from appliance.web.sharedaccounts import CHECK_INTERVAL as SHARED_ACCOUNTS_INTERVAL
from appliance.web.sharedaccounts import DatabaseAccounts, removeAccount, writeAccount
from appliance.web.sitemap import ADMIN, DICOMWEB, HEALTHZ, METRICS, SiteMap, archiveRoutes, viewerRoutes
from appliance.web.throttle import LoginEvent
from appliance.web.users import UserEntry, UsersFile
from tests.support import captureLogs, inlineStateDatabase, logText, temporaryFolder, testConfig

#: Cheap parameters for the tests' users: the format is the same.
FAST = ScryptParameters(ln=4, r=8, p=1)

HOST = "pacs.example:8443"
OWN_ORIGIN = "https://" + HOST
CLIENT = IPv4Address("TCP", "192.0.2.10", 50000)
OTHER_CLIENT = IPv4Address("TCP", "192.0.2.11", 50000)

PASSWORDS = {
    "vera": "viewer-password-1",
    "uli": "uploader-password-2",
    "ada": "admin-password-3",
}
ROLES_OF = {"vera": "viewer", "uli": "uploader", "ada": "admin"}


def writeUsers(path: Path, lines: List[str]) -> None:
    """
    Replace the users file as passwd does (rename over it), with a new
    modification time so the change shows whatever the clock's resolution.
    """
    temporary = path.with_name(path.name + ".new")
    temporary.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    stamp = (path.stat().st_mtime_ns + 10**9) if path.exists() else 10**18
    os.utime(temporary, ns=(stamp, stamp))
    os.replace(temporary, path)


def userLine(name: str, password: Optional[str] = None, roles: Optional[str] = None) -> str:
    return f"{name}:{hashPassword(password or PASSWORDS[name], FAST)}:{roles or ROLES_OF[name]}"


def basicHeader(name: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{name}:{password}".encode("utf-8"))


def headers(**values: bytes) -> Headers:
    return Headers({name.replace("_", "-").encode("ascii"): [value] for name, value in values.items()})


def clientNumber(number: int) -> IPv4Address:
    """
    The address of client C{number}: each gets its own throttle.
    """
    return IPv4Address("TCP", f"198.51.100.{number}", 50000)


class InlineThreads:
    """
    Stands in for the password-checking thread pool: records each call and
    runs it at once, or holds it until L{release} when C{hold} is set, or
    fails it with C{broken} when that is set.
    """

    def __init__(self) -> None:
        self.calls: List[Tuple[object, tuple]] = []
        self.hold = False
        self.broken: Optional[Exception] = None
        self.held: List[Tuple[Deferred, object, tuple]] = []

    def __call__(self, function, *arguments) -> Deferred:
        self.calls.append((function, arguments))
        if self.broken is not None:
            return fail(self.broken)
        if self.hold:
            waiting: Deferred = Deferred()
            self.held.append((waiting, function, arguments))
            return waiting
        return succeed(function(*arguments))

    def release(self) -> None:
        held, self.held = self.held, []
        for waiting, function, arguments in held:
            waiting.callback(function(*arguments))


class AuthFixture:
    """
    A users file with a viewer, an uploader and an admin, read by a
    L{UsersFile} and an L{Authenticator} on a Clock, their password checks
    run inline by L{InlineThreads}; C{verified} records each password and
    stored hash scrypt was run for.
    """

    def __init__(self, case, **authSettings: object) -> None:
        self.folder = temporaryFolder(case)
        self.usersPath = self.folder / "users"
        writeUsers(self.usersPath, [userLine(name) for name in PASSWORDS])
        settings = {"max_login_failures": 4, "login_failure_window": "10m"}
        settings.update(authSettings)
        self.config = testConfig(
            self.folder,
            auth={"users_file": self.usersPath, **settings},
            # Not as browsers write it: origins are compared normalised.
            web={"site_name": 'Radiology "North"', "cors_allowed_origins": "HTTPS://Viewer.Example:443"},
        )
        self.clock = MemoryReactorClock()
        self.threads = InlineThreads()
        self.verified: List[Tuple[str, str]] = []

        def recordingVerify(password: str, stored: str) -> bool:
            self.verified.append((password, stored))
            return verifyPassword(password, stored)

        case.patch(checkers, "verifyPassword", recordingVerify)
        self.users = UsersFile(self.usersPath, self.clock)
        self.checks = PasswordChecks(self.clock, runInThread=self.threads)
        self.database = inlineStateDatabase(self.clock)
        self.authenticator = Authenticator.forAccountStore(
            self.users, self.checks, self.config.auth, self.database, "node1", self.clock
        )
        self.users.startService()
        case.addCleanup(self.users.stopService)

    def rewriteUsers(self, lines: List[str]) -> None:
        writeUsers(self.usersPath, lines)
        self.clock.advance(2)

    def identify(self, client=CLIENT, **values: bytes) -> Optional[Account]:
        identified = self.authenticator.identify(headers(**values), client)
        return identified.result

    def fillPasswordChecks(self) -> List[Deferred]:
        """
        Start L{MAX_PENDING_CHECKS} password checks from as many addresses,
        held on the pool (until C{threads.release()}); their Deferreds.
        """
        self.threads.hold = True
        return [
            self.authenticator.identify(
                headers(authorization=basicHeader(f"user{number}", "a guess")), clientNumber(number)
            )
            for number in range(MAX_PENDING_CHECKS)
        ]


class PasswordHashTests(SynchronousTestCase):
    def test_roundTrip(self):
        stored = hashPassword("correct horse", FAST)
        self.assertTrue(verifyPassword("correct horse", stored))
        self.assertFalse(verifyPassword("correct horsE", stored))
        self.assertFalse(verifyPassword("", stored))

    def test_formatIsSelfDescribingAndColonFree(self):
        stored = hashPassword("p", FAST)
        self.assertRegex(stored, r"^scrypt\$ln=4\$r=8\$p=1\$[A-Za-z0-9+/]{22}\$[A-Za-z0-9+/]{43}$")
        self.assertNotIn(":", stored)
        self.assertNotEqual(stored, hashPassword("p", FAST), "every hash has its own salt")

    def test_defaultParametersAreMemoryHard(self):
        self.assertEqual((DEFAULT_PARAMETERS.ln, DEFAULT_PARAMETERS.r, DEFAULT_PARAMETERS.p), (15, 8, 1))
        self.assertEqual(DEFAULT_PARAMETERS.memory, 32 * 1024 * 1024)
        stored = hashPassword("default")
        self.assertTrue(stored.startswith("scrypt$ln=15$r=8$p=1$"))
        self.assertTrue(verifyPassword("default", stored))

    def test_parametersComeFromTheStoredHash(self):
        """
        A hash written with other parameters (older, weaker defaults) still
        verifies: ln is the base-2 logarithm of scrypt's N.
        """
        salt = b"0123456789abcdef"
        key = hashlib.scrypt(b"old password", salt=salt, n=2**6, r=4, p=2, dklen=32)
        stored = PasswordHash(ScryptParameters(6, 4, 2), salt, key).encode()
        self.assertTrue(stored.startswith("scrypt$ln=6$r=4$p=2$"))
        self.assertTrue(verifyPassword("old password", stored))
        self.assertFalse(verifyPassword("new password", stored))

    def test_hostileParametersAreRefused(self):
        for ln, r, p in ((25, 8, 1), (20, 64, 1), (10, 8, 99)):
            text = PasswordHash(ScryptParameters(ln, r, p), bytes(16), bytes(32)).encode()
            self.assertRaises(PasswordHashError, verifyPassword, "x", text)

    def test_passwordsAreComparedInNormalForm(self):
        composed, decomposed = "caf\u00e9-password", "cafe\u0301-password"
        self.assertTrue(verifyPassword(decomposed, hashPassword(composed, FAST)))



class AccountTests(SynchronousTestCase):
    def test_rolesAreCumulative(self):
        viewer = Account("v", frozenset({"viewer"}))
        uploader = Account("u", frozenset({"uploader"}))
        admin = Account("a", frozenset({"admin"}))
        self.assertEqual([viewer.has(role) for role in ROLES], [True, False, False])
        self.assertEqual([uploader.has(role) for role in ROLES], [True, True, False])
        self.assertEqual([admin.has(role) for role in ROLES], [True, True, True])


class UsersFileTests(SynchronousTestCase):
    def setUp(self):
        self.folder = temporaryFolder(self)
        self.path = self.folder / "users"
        self.clock = MemoryReactorClock()
        self.events = captureLogs(self)

    def errors(self) -> List[str]:
        return [formatEvent(event) for event in self.events if event["log_level"] >= LogLevel.error]

    def test_parsesUsersSkippingCommentsAndMalformedLines(self):
        good = userLine("vera")
        lines = [
            "# The appliance's users",
            "",
            good,
            "   ",
            "uli:" + hashPassword("x", FAST),
            "bad name:" + hashPassword("x", FAST) + ":viewer",
            "eve:" + hashPassword("x", FAST) + ":viewer,root",
            "mallory:plaintext:viewer",
            "nobody:" + hashPassword("x", FAST) + ":",
            userLine("ada", roles="viewer,admin"),
            userLine("vera", password="another password"),
        ]
        writeUsers(self.path, lines)
        users = UsersFile(self.path, self.clock).users
        self.assertEqual(sorted(users), ["ada", "vera"])
        self.assertEqual(users["vera"].line(), good)
        self.assertEqual(users["ada"].account, Account("ada", frozenset({"viewer", "admin"})))
        problems = self.errors()
        self.assertEqual(len(problems), 6)
        for number, problem in zip((5, 6, 7, 8, 9, 11), problems):
            self.assertTrue(problem.startswith(f"{self.path}, line {number}: skipped, "), problem)
        self.assertIn("unknown role 'root'", problems[2])
        self.assertIn("already on an earlier line", problems[5])

    def test_missingFileMeansNoUsersAndSaysHowToCreateOne(self):
        users = UsersFile(self.path, self.clock)
        self.assertEqual(dict(users.users), {})
        [warning] = [formatEvent(event) for event in self.events if event["log_level"] == LogLevel.warn]
        self.assertIn(str(self.path), warning)
        self.assertIn("pacs-appliance passwd admin --roles admin", warning)

    def test_readAgainWhenTheFileChanges(self):
        writeUsers(self.path, [userLine("vera")])
        users = UsersFile(self.path, self.clock, interval=2)
        users.startService()
        self.addCleanup(users.stopService)
        changes: List[frozenset] = []
        users.subscribe(changes.append)
        self.assertEqual(sorted(users.users), ["vera"])

        vera = userLine("vera", roles="uploader")
        writeUsers(self.path, [vera, userLine("ada")])
        self.clock.advance(1.9)
        self.assertEqual(sorted(users.users), ["vera"])
        self.clock.advance(0.1)
        self.assertEqual(sorted(users.users), ["ada", "vera"])
        self.assertEqual(users.lookup("vera").roles, frozenset({"uploader"}))
        self.assertEqual(changes, [frozenset({"vera"})], "changed users only, not added ones")

        writeUsers(self.path, [vera])
        self.clock.advance(2)
        self.assertEqual(changes[-1], frozenset({"ada"}))
        self.assertIsNone(users.lookup("ada"))

    def test_unchangedFileIsNotReadAgain(self):
        writeUsers(self.path, [userLine("vera")])
        users = UsersFile(self.path, self.clock)
        users.startService()
        self.addCleanup(users.stopService)
        self.clock.advance(2)
        self.clock.advance(2)
        reads = [event for event in self.events if event.get("log_format", "").startswith("Read {count}")]
        self.assertEqual(len(reads), 1)

    def test_corruptedFileKeepsThePreviousUsers(self):
        writeUsers(self.path, [userLine("vera")])
        users = UsersFile(self.path, self.clock)
        users.startService()
        self.addCleanup(users.stopService)
        self.path.write_bytes(b"vera:\xff\xfe\0garbage\n")
        self.clock.advance(2)
        self.assertEqual(sorted(users.users), ["vera"])
        [problem] = self.errors()
        self.assertIn(str(self.path), problem)
        self.assertIn("the 1 users read before stay in force", problem)

    def test_garbageKeepsThePreviousUsersWithOneLogLine(self):
        """
        Text in which no line is a user (garbage, another file in its place)
        is refused whole, in one log line, rather than read as no user: until
        the file changes again, or a SIGHUP, it is not read again.
        """
        writeUsers(self.path, [userLine("vera")])
        users = UsersFile(self.path, self.clock)
        users.startService()
        self.addCleanup(users.stopService)
        changes: List[frozenset] = []
        users.subscribe(changes.append)
        self.path.write_text("[appliance]\nstate_dir = /var/lib/pacs-appliance\n# a comment\nlast: line\n")
        self.clock.advance(2)
        self.assertEqual(sorted(users.users), ["vera"])
        self.assertEqual(changes, [])
        [problem] = self.errors()
        self.assertEqual(
            problem,
            f"{self.path} holds no valid user line (line 1: a user line is NAME:HASH:ROLES; 2 other"
            " malformed lines): it is not a users file: the 1 users read before stay in force",
        )
        self.clock.advance(10)
        self.assertEqual(len(self.errors()), 1)
        users.reload()
        self.assertEqual(len(self.errors()), 2)
        writeUsers(self.path, [userLine("ada")])
        self.clock.advance(2)
        self.assertEqual(sorted(users.users), ["ada"])
        self.assertEqual(changes, [frozenset({"vera"})])

    def test_garbageAtStartLetsNobodyIn(self):
        self.path.write_text("garbage\n")
        users = UsersFile(self.path, self.clock)
        self.assertEqual(dict(users.users), {})
        [problem] = self.errors()
        self.assertIn("nobody can log in until it is fixed", problem)

    def test_onlyCommentsIsAFileWithoutUsers(self):
        writeUsers(self.path, [userLine("vera")])
        users = UsersFile(self.path, self.clock)
        writeUsers(self.path, ["# everyone left"])
        users.reload()
        self.assertEqual(dict(users.users), {})
        self.assertEqual(self.errors(), [])

    def test_unreadableFileKeepsThePreviousUsers(self):
        writeUsers(self.path, [userLine("vera")])
        users = UsersFile(self.path, self.clock)
        self.path.unlink()
        self.path.mkdir()
        users.reload()
        self.assertEqual(sorted(users.users), ["vera"])
        [problem] = self.errors()
        self.assertIn(f"cannot read {self.path}", problem)

    def test_removedFileMeansNoUsers(self):
        writeUsers(self.path, [userLine("vera")])
        users = UsersFile(self.path, self.clock)
        self.path.unlink()
        users.reload()
        self.assertEqual(dict(users.users), {})

    def test_reloadReadsAtOnce(self):
        writeUsers(self.path, [userLine("vera")])
        users = UsersFile(self.path, self.clock)
        writeUsers(self.path, [userLine("ada")])
        users.reload()
        self.assertEqual(sorted(users.users), ["ada"])

    def test_dummyHashHasTheParametersMostUsersHave(self):
        """
        An unknown user's password is checked against a hash with the
        parameters most users' hashes have (older defaults included), read
        again with the file; the defaults when there is no user.
        """
        older = ScryptParameters(ln=5, r=8, p=1)

        def dummyParameters(users: UsersFile) -> ScryptParameters:
            return PasswordHash.parse(users.dummyHash).parameters

        users = UsersFile(self.path, self.clock)
        self.assertEqual(dummyParameters(users), DEFAULT_PARAMETERS)
        writeUsers(self.path, [userLine("vera"), userLine("uli"), f"ada:{hashPassword('x', older)}:admin"])
        users.reload()
        self.assertEqual(dummyParameters(users), FAST)
        writeUsers(self.path, [userLine("vera"), f"uli:{hashPassword('x', older)}:uploader", f"ada:{hashPassword('x', older)}:admin"])
        users.reload()
        self.assertEqual(dummyParameters(users), older)
        writeUsers(self.path, ["# nobody"])
        users.reload()
        self.assertEqual(dummyParameters(users), DEFAULT_PARAMETERS)


class SighupTests(TestCase):
    @inlineCallbacks
    def test_sighupReadsTheUsersFileAgain(self):
        """
        ReloadOnSighup has the users file read again at once, whatever the
        configuration says (here it is refused).
        """

        class Notify:
            def reloading(self):
                pass

            def reloaded(self, outcome):
                pass

        folder = temporaryFolder(self)
        path = folder / "users"
        writeUsers(path, [userLine("vera")])
        config = testConfig(folder)
        users = UsersFile(path, MemoryReactorClock())
        reloader = ReloadOnSighup(config, [], Notify(), reloadables=[users])
        writeUsers(path, [userLine("ada")])
        config.sources[0].write_text("[nonsense]\n")
        reloaded = reloader.reload()
        self.assertEqual(sorted(users.users), ["ada"])
        self.assertEqual((yield reloaded), "Reload refused (see the log)")


def storedSessions(database) -> List[tuple]:
    """
    The rows of the sessions table of an L{inlineStateDatabase}.
    """
    return database._pool.connection.execute("SELECT token_hash, account, created, last_used FROM sessions").fetchall()


class SessionStoreTests(SynchronousTestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.database = inlineStateDatabase(self.clock)
        self.sessions = self.newNode()

    def newNode(self) -> SessionStore:
        """
        Another node's (or a restarted daemon's) sessions, on the same table.
        """
        return SessionStore(self.database, idleTimeout=60, lifetime=300, clock=self.clock)

    def create(self, name: str, sessions: Optional[SessionStore] = None) -> bytes:
        return self.successResultOf((sessions or self.sessions).create(SessionOwner(name)))

    def lookup(self, token: bytes, sessions: Optional[SessionStore] = None) -> Optional[str]:
        owner = self.successResultOf((sessions or self.sessions).lookup(token))
        return owner.name if owner is not None else None

    def test_tokensAreRandom256Bits(self):
        first, second = self.create("vera"), self.create("vera")
        self.assertNotEqual(first, second)
        self.assertEqual(len(base64.urlsafe_b64decode(first + b"=")), 32)

    def test_idleExpiry(self):
        token = self.create("vera")
        self.clock.advance(59)
        self.assertEqual(self.lookup(token), "vera")
        self.clock.advance(59)
        self.assertEqual(self.lookup(token), "vera", "each use restarts the idle timer")
        self.clock.advance(60)
        self.assertIsNone(self.lookup(token))
        self.assertEqual(storedSessions(self.database), [])

    def test_absoluteExpiry(self):
        token = self.create("vera")
        for _ in range(9):
            self.clock.advance(30)
            self.assertEqual(self.lookup(token), "vera")
        self.clock.advance(30)
        self.assertIsNone(self.lookup(token), "300 s after the login, however active")

    def test_endAndEndUsers(self):
        vera, ada, ada2 = (self.create(name) for name in ("vera", "ada", "ada"))
        self.assertEqual(self.successResultOf(self.sessions.end(vera)), SessionOwner("vera"))
        self.assertIsNone(self.lookup(vera))
        self.assertEqual(self.successResultOf(self.sessions.endUsers(frozenset({"ada"}))), 2)
        self.assertIsNone(self.lookup(ada))
        self.assertIsNone(self.lookup(ada2))

    def test_purgeForgetsExpiredSessions(self):
        self.create("vera")
        self.clock.advance(30)
        live = self.create("ada")
        self.clock.advance(40)
        self.successResultOf(self.sessions.purge())
        self.assertEqual([row[1] for row in storedSessions(self.database)], ["ada"])
        self.assertEqual(self.lookup(live), "ada")

    def test_tokensAreNotKept(self):
        token = self.create("vera")
        self.assertNotIn(token, repr(self.sessions.__dict__).encode("ascii"))
        self.assertNotIn(token, repr(storedSessions(self.database)).encode("ascii"))

    def test_sessionsOutliveTheProcess(self):
        """
        A session started before a restart (or on another node) is known to
        the new store, with its times.
        """
        token = self.create("vera")
        self.clock.advance(50)
        restarted = self.newNode()
        self.assertEqual(self.lookup(token, restarted), "vera")
        self.clock.advance(50)
        self.assertEqual(self.lookup(token, restarted), "vera")
        self.clock.advance(60)
        self.assertIsNone(self.lookup(token, restarted), "the idle timer went on across the restart")

    def test_endOnOneNodeEndsItOnTheOthers(self):
        other = self.newNode()
        token = self.create("vera")
        self.assertEqual(self.lookup(token, other), "vera")
        self.successResultOf(self.sessions.end(token))
        self.assertIsNone(self.lookup(token), "at once on the node that ended it")
        self.clock.advance(RECHECK_AFTER)
        self.assertIsNone(self.lookup(token, other), "within RECHECK_AFTER on the others")

    def test_useOnOneNodeKeepsItAliveOnTheOthers(self):
        """
        The last use reaches the table often enough that a session in use on
        one node does not time out on another.
        """
        other = self.newNode()
        token = self.create("vera")
        for _ in range(10):
            self.clock.advance(20)
            self.assertEqual(self.lookup(token), "vera")
        self.assertEqual(self.lookup(token, other), "vera", "200 s of use on the first node, idle timeout 60 s")
        self.successResultOf(other.purge())
        self.assertEqual(len(storedSessions(self.database)), 1)

    def test_rememberedSessionsLastWhileTheDatabaseIsDown(self):
        events = captureLogs(self)
        token, unseen = self.create("vera"), self.create("ada", self.newNode())
        self.database._pool.broken = sqlite3.OperationalError("disk I/O error")
        self.clock.advance(RECHECK_AFTER)
        self.assertEqual(self.lookup(token), "vera")
        self.assertFalse(self.database.ready)
        self.assertIsNone(self.lookup(unseen), "a session this node never saw cannot be checked")
        self.failureResultOf(self.sessions.create(SessionOwner("vera")), DatabaseUnavailable)
        self.clock.advance(30)
        self.assertEqual(self.lookup(token), "vera")
        self.clock.advance(60)
        self.assertIsNone(self.lookup(token), "it still times out")
        said = [event for event in events if event.get("log_format", "").startswith("The state database ({where}) is not")]
        self.assertEqual(len(said), 1, "said once, however often it is tried again")
        self.assertNotIn("Traceback", logText(events))
        self.assertIn("disk I/O error", logText(said))
        self.database._pool.broken = None
        self.clock.advance(RETRY_LAST)
        self.assertTrue(self.database.ready, "tried again until it answers")
        self.assertEqual(self.lookup(self.create("ada", self.newNode())), "ada")
        self.assertIn("is available again", logText(events))


    def test_aChangedUsersSessionsEndWhileTheDatabaseIsDown(self):
        """
        A user whose account changed while the table could not be written
        is logged out all the same: refused on this node at once, and ended
        in the table once it answers again.
        """
        other = self.newNode()
        token = self.create("vera")
        self.assertEqual(self.lookup(token, other), "vera")
        self.database._pool.broken = sqlite3.OperationalError("disk I/O error")
        self.failureResultOf(self.sessions.endUsers(frozenset({"vera"})), DatabaseUnavailable)
        self.assertIsNone(self.lookup(token), "refused here at once")
        self.database._pool.broken = None
        self.clock.advance(RETRY_LAST)
        self.assertTrue(self.database.ready)
        self.assertIsNone(self.lookup(token), "not taken back from the table")
        self.successResultOf(self.sessions.purge())
        self.assertEqual(storedSessions(self.database), [])
        self.clock.advance(RECHECK_AFTER)
        self.assertIsNone(self.lookup(token, other), "ended on the other node too")
        self.assertEqual(self.lookup(self.create("vera")), "vera", "a new login is not refused")


class DatabaseAccountsTests(SynchronousTestCase):
    """
    A cluster's accounts, read from the state database's table.
    """

    def setUp(self):
        self.events = captureLogs(self)
        self.clock = MemoryReactorClock()
        self.database = inlineStateDatabase(self.clock)
        self.accounts = DatabaseAccounts(self.database, self.clock)
        self.changes: List[frozenset] = []
        self.accounts.subscribe(self.changes.append)
        self.accounts.startService()
        self.addCleanup(self.accounts.stopService)

    def write(self, name: str, password: str = "a password", roles: str = "viewer") -> None:
        entry = UserEntry(name, hashPassword(password, FAST), frozenset(roles.split(",")))
        self.successResultOf(self.database.interact(writeAccount, entry, self.clock.seconds()))

    def test_changesElsewhereAreReadWithinTheInterval(self):
        self.assertEqual(self.accounts.users, {})
        self.write("vera")
        self.write("ada", roles="admin")
        self.clock.advance(SHARED_ACCOUNTS_INTERVAL)
        self.assertEqual(sorted(self.accounts.users), ["ada", "vera"])
        self.assertEqual(self.accounts.lookup("ada").account, Account("ada", frozenset({"admin"})))
        self.assertEqual(self.changes, [], "new accounts change nobody's sessions")
        self.write("vera", password="a new password")
        self.successResultOf(self.database.interact(removeAccount, "ada"))
        self.clock.advance(SHARED_ACCOUNTS_INTERVAL)
        self.assertEqual(self.changes, [frozenset({"vera", "ada"})])
        self.assertEqual(sorted(self.accounts.users), ["vera"])

    def test_aBrokenRowIsSkippedAndTheDatabaseBeingDownKeepsTheAccounts(self):
        self.write("vera")
        self.database._pool.connection.execute(
            "INSERT INTO accounts (name, password_hash, roles, changed) VALUES ('uli', 'not a hash', 'viewer', 0)"
        )
        self.clock.advance(SHARED_ACCOUNTS_INTERVAL)
        self.assertEqual(sorted(self.accounts.users), ["vera"])
        self.clock.advance(SHARED_ACCOUNTS_INTERVAL)
        skipped = [event for event in self.events if "Skipped the account" in event.get("log_format", "")]
        self.assertEqual(len(skipped), 1, "said once")
        self.database._pool.broken = sqlite3.OperationalError("disk I/O error")
        self.clock.advance(SHARED_ACCOUNTS_INTERVAL)
        self.assertEqual(sorted(self.accounts.users), ["vera"], "kept while the database is away")

    def test_authenticatesThroughTheStore(self):
        self.write("vera", password=PASSWORDS["vera"])
        self.clock.advance(SHARED_ACCOUNTS_INTERVAL)
        checks = PasswordChecks(self.clock, runInThread=InlineThreads())
        authenticator = Authenticator.forAccountStore(
            self.accounts, checks, testConfig(temporaryFolder(self)).auth, self.database, "node1", self.clock
        )
        checking = authenticator.login("vera", PASSWORDS["vera"], CLIENT)
        self.assertEqual(self.successResultOf(checking), Account("vera", frozenset({"viewer"})))


class AuthenticatorTests(SynchronousTestCase):
    def setUp(self):
        self.events = captureLogs(self)
        self.fixture = AuthFixture(self)
        self.threads = self.fixture.threads
        self.authenticator = self.fixture.authenticator

    def test_sessionCookie(self):
        token = self.successResultOf(self.authenticator.startSession(Account("vera", frozenset({"viewer"})), []))
        cookie = b"other=1; " + SESSION_COOKIE + b"=" + token
        self.assertEqual(self.fixture.identify(cookie=cookie), Account("vera", frozenset({"viewer"})))
        self.assertIsNone(self.fixture.identify(cookie=SESSION_COOKIE + b"=forged"))
        self.assertIsNone(self.fixture.identify())
        self.assertEqual(self.threads.calls, [], "sessions need no password check")

    def test_sessionEndsWhenTheUserIsDeletedOrChanged(self):
        vera = self.successResultOf(self.authenticator.startSession(Account("vera", frozenset({"viewer"})), []))
        ada = self.successResultOf(self.authenticator.startSession(Account("ada", frozenset({"admin"})), []))
        uli = self.successResultOf(self.authenticator.startSession(Account("uli", frozenset({"uploader"})), []))
        self.fixture.rewriteUsers([userLine("ada", password="a new password"), self.fixture.users.lookup("uli").line()])
        self.assertIsNone(self.fixture.identify(cookie=SESSION_COOKIE + b"=" + vera), "deleted")
        self.assertIsNone(self.fixture.identify(cookie=SESSION_COOKIE + b"=" + ada), "password changed")
        self.assertEqual(self.fixture.identify(cookie=SESSION_COOKIE + b"=" + uli).name, "uli")

    def test_basic(self):
        account = self.fixture.identify(authorization=basicHeader("uli", PASSWORDS["uli"]))
        self.assertEqual(account, Account("uli", frozenset({"uploader"})))
        self.assertEqual(len(self.threads.calls), 1)
        self.assertEqual(self.fixture.verified, [(PASSWORDS["uli"], self.fixture.users.lookup("uli").passwordHash)])

    def test_basicRunsInAThreadAndShares(self):
        """
        The check is handed to the thread pool, and requests with the same
        credentials arriving meanwhile wait for that one check.
        """
        self.threads.hold = True
        header = basicHeader("uli", PASSWORDS["uli"])
        first = self.authenticator.identify(headers(authorization=header), CLIENT)
        second = self.authenticator.identify(headers(authorization=header), CLIENT)
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.threads.release()
        self.assertEqual(self.successResultOf(first).name, "uli")
        self.assertEqual(self.successResultOf(second).name, "uli")
        self.assertEqual(len(self.threads.calls), 1)

    def test_basicCache(self):
        header = basicHeader("vera", PASSWORDS["vera"])
        for _ in range(3):
            self.assertEqual(self.fixture.identify(authorization=header).name, "vera")
        self.assertEqual(len(self.threads.calls), 1, "verified once, then remembered")
        self.assertIsNone(self.fixture.identify(authorization=basicHeader("vera", "wrong password")))
        self.assertEqual(len(self.threads.calls), 2, "other credentials are checked")

        self.fixture.clock.advance(BASIC_CACHE_LIFETIME)
        self.assertEqual(self.fixture.identify(authorization=header).name, "vera")
        self.assertEqual(len(self.threads.calls), 3, "remembered briefly")

        self.fixture.rewriteUsers([userLine(name) for name in PASSWORDS] + ["# a comment"])
        self.assertEqual(self.fixture.identify(authorization=header).name, "vera")
        self.assertEqual(len(self.threads.calls), 4, "forgotten when the users file changes")

        self.fixture.rewriteUsers([userLine("vera", password="a new password")])
        self.assertIsNone(self.fixture.identify(authorization=header))

    def test_basicCacheHoldsNoPassword(self):
        self.fixture.identify(authorization=basicHeader("vera", PASSWORDS["vera"]))
        state = repr(self.authenticator.__dict__)
        self.assertNotIn(PASSWORDS["vera"], state)
        self.assertNotIn(base64.b64encode(b"vera:" + PASSWORDS["vera"].encode()).decode(), state)

    def test_unknownUserCostsTheSameWork(self):
        """
        An unknown name is checked against a hash with the parameters of the
        users' hashes (here the tests' cheap ones, not the defaults).
        """
        self.assertIsNone(self.fixture.identify(authorization=basicHeader("nobody", "some password")))
        self.assertEqual(len(self.threads.calls), 1)
        [(password, stored)] = self.fixture.verified
        self.assertEqual((password, stored), ("some password", self.fixture.users.dummyHash))
        self.assertEqual(PasswordHash.parse(stored).parameters, FAST)
        [warning] = [formatEvent(event) for event in self.events if event["log_level"] == LogLevel.warn]
        self.assertEqual(warning, "Failed login for 'nobody' from 192.0.2.10 (HTTP Basic): no such user")

    def test_failedLoginIsLoggedWithoutThePassword(self):
        self.assertIsNone(self.fixture.identify(authorization=basicHeader("vera", "guessed-secret")))
        self.successResultOf(self.authenticator.login("ada", "another-guess", OTHER_CLIENT))
        warnings = [formatEvent(event) for event in self.events if event["log_level"] == LogLevel.warn]
        self.assertEqual(
            warnings,
            [
                "Failed login for 'vera' from 192.0.2.10 (HTTP Basic): wrong password",
                "Failed login for 'ada' from 192.0.2.11 (login form): wrong password",
            ],
        )
        text = logText(self.events)
        for secret in ("guessed-secret", "another-guess", base64.b64encode(b"vera:guessed-secret").decode()):
            self.assertNotIn(secret, text)

    def test_malformedBasicIsRefusedWithoutACheck(self):
        for value in (b"Basic !!!", b"Basic " + base64.b64encode(b"no colon"), b"Basic " + base64.b64encode(b"\xff:x")):
            self.assertIsNone(self.fixture.identify(authorization=value))
        self.assertEqual(self.threads.calls, [])

    def test_basicWinsOverTheCookie(self):
        token = self.successResultOf(self.authenticator.startSession(Account("vera", frozenset({"viewer"})), []))
        cookie = SESSION_COOKIE + b"=" + token
        self.assertIsNone(self.fixture.identify(cookie=cookie, authorization=basicHeader("ada", "wrong")))
        # A Bearer token is the request's own credential too: without a
        # single sign-on to check it, the request has no account.
        self.assertIsNone(self.fixture.identify(cookie=cookie, authorization=b"Bearer x"))
        self.assertEqual(self.fixture.identify(cookie=cookie, authorization=b"Negotiate x").name, "vera")

    def test_throttling(self):
        clock = self.fixture.clock
        self.assertIsNone(self.fixture.identify(authorization=basicHeader("vera", "wrong 1")))
        self.assertIsNone(self.fixture.identify(authorization=basicHeader("vera", "wrong 2")), "no wait after one failure")
        # After two failures the next check waits 1 s, then 2 s, doubling.
        for attempt, wait in ((3, 1), (4, 2)):
            checks = len(self.threads.calls)
            identified = self.authenticator.identify(headers(authorization=basicHeader("vera", f"wrong {attempt}")), CLIENT)
            clock.advance(wait - 0.5)
            self.assertEqual(len(self.threads.calls), checks)
            self.assertNoResult(identified)
            clock.advance(0.5)
            self.assertIsNone(self.successResultOf(identified))
            self.assertEqual(self.authenticator.retryAfter("vera", CLIENT), 0 if attempt < 4 else 600 - 3)
        # 4 failures (max_login_failures) within the window: the name is
        # refused from that address without a check, until the first is 10
        # minutes old.
        checks = len(self.threads.calls)
        self.assertIsNone(self.fixture.identify(authorization=basicHeader("vera", PASSWORDS["vera"])))
        self.assertEqual(len(self.threads.calls), checks)
        # From elsewhere it is only slowed; another user from that address
        # is not refused.
        self.assertEqual(self.authenticator.retryAfter("vera", OTHER_CLIENT), 0)
        self.assertEqual(self.authenticator.retryAfter("uli", CLIENT), 0)
        self.assertEqual(self.fixture.identify(authorization=basicHeader("uli", PASSWORDS["uli"])).name, "uli")
        clock.advance(600 - 3)
        self.assertEqual(self.authenticator.retryAfter("vera", CLIENT), 0)
        # Two failures are still in the window: the check waits its back-off (counted from the last failure).
        identified = self.authenticator.identify(headers(authorization=basicHeader("vera", PASSWORDS["vera"])), CLIENT)
        self.assertEqual(self.successResultOf(identified).name, "vera")
        self.assertIsNone(self.fixture.identify(authorization=basicHeader("vera", "wrong 5")), "a success forgets the failures")
        [blocked] = [event for event in self.events if event.get("log_format", "").startswith("Refusing logins as")]
        self.assertEqual((blocked["user"], blocked["client"]), ("'vera'", "192.0.2.10"))

    def test_guessesFromElsewhereSlowTheOwnerButCannotLockThemOut(self):
        """
        Anyone may guess at a name: from many addresses, the guesses slow
        every check for it down, but its owner, from an address with no
        failure for it, is never refused.
        """
        clock = self.fixture.clock
        for number in range(12):
            clock.advance(60)
            self.fixture.identify(clientNumber(number), authorization=basicHeader("ada", f"guess {number}"))
        self.assertEqual(self.authenticator.retryAfter("ada", CLIENT), 0)
        identified = self.authenticator.identify(headers(authorization=basicHeader("ada", PASSWORDS["ada"])), CLIENT)
        self.assertNoResult(identified)
        clock.advance(30)
        self.assertEqual(self.successResultOf(identified).name, "ada")

    def test_loggingInAsOneselfClearsNoGuess(self):
        """
        The review's cycle: guess at the admin's password, log in as oneself
        (a viewer), guess again.  The success clears only the viewer's own
        failures: the admin's name is refused after max_login_failures.
        """
        outcomes = []
        for attempt in range(6):
            self.fixture.clock.advance(60)
            self.fixture.identify(authorization=basicHeader("ada", f"guess {attempt}"))
            self.fixture.clock.advance(60)
            outcomes.append(self.authenticator.retryAfter("ada", CLIENT) > 0)
            own = self.authenticator.login("vera", PASSWORDS["vera"], CLIENT)
            self.assertEqual(self.successResultOf(own).name, "vera")
        self.assertEqual(outcomes, [False, False, False, True, True, True])

    def test_successClearsOnlyThatUsersFailuresFromThatAddress(self):
        guesses = [(CLIENT, "wrong 1"), (OTHER_CLIENT, "wrong 2"), (OTHER_CLIENT, "wrong 3")]
        for client, password in guesses:
            self.fixture.clock.advance(60)
            self.fixture.identify(client, authorization=basicHeader("vera", password))
        self.fixture.clock.advance(60)
        self.assertEqual(self.fixture.identify(OTHER_CLIENT, authorization=basicHeader("vera", PASSWORDS["vera"])).name, "vera")
        # The guess from CLIENT stays counted: three more there make four.
        for attempt in range(3):
            self.fixture.clock.advance(60)
            self.fixture.identify(authorization=basicHeader("vera", f"again {attempt}"))
        self.assertGreater(self.authenticator.retryAfter("vera", CLIENT), 0)
        self.assertEqual(self.authenticator.retryAfter("vera", OTHER_CLIENT), 0)

    def test_sprayingFromOneAddressIsRefusedForEveryone(self):
        """
        Failures for many names from one address: nobody's name reaches its
        limit, but the address does (max_address_failures), and then even a
        right password from there is refused, while another address logs in.
        """
        fixture = AuthFixture(self, max_address_failures=6)
        for number in range(6):
            self.assertIsNone(fixture.identify(authorization=basicHeader(f"user{number}", "spring2026")))
        checks = len(fixture.threads.calls)
        self.assertIsNone(fixture.identify(authorization=basicHeader("uli", PASSWORDS["uli"])))
        self.assertEqual(len(fixture.threads.calls), checks, "refused without a check")
        self.assertEqual(fixture.authenticator.retryAfter("uli", CLIENT), 600)
        self.assertEqual(fixture.identify(OTHER_CLIENT, authorization=basicHeader("uli", PASSWORDS["uli"])).name, "uli")
        warnings = [formatEvent(event) for event in self.events if "Refusing logins from" in event.get("log_format", "")]
        self.assertEqual(warnings, ["Refusing logins from 192.0.2.10 for 600s: 6 failed logins within 600s"])

    def test_parallelGuessesGetNoMoreChecks(self):
        self.threads.hold = True
        guesses = [
            self.authenticator.identify(headers(authorization=basicHeader("vera", f"guess {n}")), CLIENT)
            for n in range(10)
        ]
        self.fixture.clock.advance(60)
        self.assertEqual(len(self.threads.calls), 4, "max_login_failures checks at once, the rest refused")
        self.assertGreater(self.authenticator.retryAfter("vera", CLIENT), 0)
        self.threads.release()
        for guess in guesses:
            self.assertIsNone(self.successResultOf(guess))

    def test_ipv6AddressesAreThrottledWithTheirNetwork(self):
        """
        Guesses at a name from addresses of one /64 count together; someone
        else in that /64 is refused only once the /64 has failed
        NETWORK_SHARE times the limit of one address.
        """
        self.assertEqual(clientKey(IPv6Address("TCP", "2001:db8:1:2:3:4:5:6", 1)), "2001:db8:1:2:3:4:5:6")
        self.assertEqual(networkKey(IPv6Address("TCP", "2001:db8:1:2:3:4:5:6", 1)), "2001:db8:1:2::/64")
        self.assertEqual(clientKey(IPv6Address("TCP", "::ffff:192.0.2.1", 1)), "192.0.2.1")
        self.assertIsNone(networkKey(IPv6Address("TCP", "::ffff:192.0.2.1", 1)))
        fixture = AuthFixture(self, max_address_failures=4)
        guesser = [IPv6Address("TCP", f"2001:db8:1:2::{number:x}", 1) for number in range(1, 40)]
        for number, address in enumerate(guesser[:4]):
            fixture.clock.advance(60)
            self.assertIsNone(fixture.identify(address, authorization=basicHeader("vera", f"guess {number}")))
        self.assertGreater(fixture.authenticator.retryAfter("vera", guesser[5]), 0, "the /64 is one guesser")
        neighbour = IPv6Address("TCP", "2001:db8:1:2::ffff", 1)
        self.assertEqual(fixture.authenticator.retryAfter("uli", neighbour), 0)
        for number, address in enumerate(guesser[4:36]):
            fixture.clock.advance(10)
            fixture.identify(address, authorization=basicHeader(f"user{number}", "spring2026"))
        self.assertGreater(fixture.authenticator.retryAfter("uli", neighbour), 0, "the /64 sprayed")

    def test_identifyNeverFails(self):
        self.threads.broken = RuntimeError("thread pool is gone")
        self.assertIsNone(self.fixture.identify(authorization=basicHeader("vera", "x")))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_checkThatCannotStartLeavesNothingBehind(self):
        """
        A check that raises as it starts answers nobody (logged), and the
        next request with the same credentials is checked, not left waiting
        for it.
        """
        attempt = self.authenticator.throttle.attempt

        def broken(name, client):
            raise RuntimeError("throttle table corrupted")

        self.authenticator.throttle.attempt = broken
        header = basicHeader("vera", PASSWORDS["vera"])
        self.assertIsNone(self.fixture.identify(authorization=header))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.authenticator.throttle.attempt = attempt
        self.assertEqual(self.fixture.identify(authorization=header).name, "vera")

    def test_busyBeyondTheCap(self):
        """
        Beyond MAX_PENDING_CHECKS waiting or running, from any addresses,
        identify and login fail with PasswordChecksBusy without queueing
        anything (the address's throttle slot is given back), logged once;
        once the checks are done, passwords are checked again.
        """
        waiting = self.fixture.fillPasswordChecks()
        self.assertEqual(len(self.threads.calls), MAX_PENDING_CHECKS)
        late = self.authenticator.identify(headers(authorization=basicHeader("ada", PASSWORDS["ada"])), CLIENT)
        self.failureResultOf(late, PasswordChecksBusy)
        self.failureResultOf(self.authenticator.login("ada", PASSWORDS["ada"], CLIENT), PasswordChecksBusy)
        self.assertEqual(len(self.threads.calls), MAX_PENDING_CHECKS)
        self.assertEqual(self.authenticator.throttle._byAddress._checking.get(clientKey(CLIENT)), None)
        token = self.successResultOf(self.authenticator.startSession(Account("uli", frozenset({"uploader"})), []))
        self.assertEqual(self.fixture.identify(cookie=SESSION_COOKIE + b"=" + token).name, "uli", "sessions need no check")
        busy = [event for event in self.events if "checks are waiting for the {name} threads" in event.get("log_format", "")]
        self.assertEqual(len(busy), 1)

        self.threads.release()
        for identified in waiting:
            self.assertIsNone(self.successResultOf(identified))
        self.threads.hold = False
        self.assertEqual(self.fixture.identify(authorization=basicHeader("ada", PASSWORDS["ada"])).name, "ada")

    def test_namesCountedWithoutRegardToCase(self):
        """
        A directory matches names without regard to case: guesses at one
        name in other cases count as guesses at it.
        """
        for attempt, name in enumerate(("Vera", "VERA", "vErA", "vera")):
            identified = self.authenticator.identify(headers(authorization=basicHeader(name, f"wrong {attempt}")), CLIENT)
            self.fixture.clock.advance(60)
            self.assertIsNone(self.successResultOf(identified))
        self.assertGreater(self.authenticator.retryAfter("vera", CLIENT), 0)

    def test_busyAfterTheBackOff(self):
        """
        A check delayed by the throttle's back-off is refused at the end of
        the wait if the checks are busy then: waiting costs no slot.
        """
        for attempt in range(2):
            self.assertIsNone(self.fixture.identify(authorization=basicHeader("vera", f"wrong {attempt}")))
        delayed = self.authenticator.identify(headers(authorization=basicHeader("vera", PASSWORDS["vera"])), CLIENT)
        self.fixture.fillPasswordChecks()
        self.fixture.clock.advance(1)
        self.failureResultOf(delayed, PasswordChecksBusy)

    def test_checkWhoseClientLeftIsSkipped(self):
        """
        Cancelling identify (the client left) skips a check still waiting
        for a thread, unless another request with the same credentials
        still waits for it; nothing is logged as an error.
        """
        self.threads.hold = True
        alone = self.authenticator.identify(headers(authorization=basicHeader("ada", PASSWORDS["ada"])), CLIENT)
        header = headers(authorization=basicHeader("vera", PASSWORDS["vera"]))
        leaving = self.authenticator.identify(header, CLIENT)
        staying = self.authenticator.identify(header, OTHER_CLIENT)
        alone.cancel()
        leaving.cancel()
        self.failureResultOf(alone, CancelledError)
        self.failureResultOf(leaving, CancelledError)
        self.threads.release()
        self.assertEqual(self.successResultOf(staying).name, "vera")
        self.assertEqual([password for password, _ in self.fixture.verified], [PASSWORDS["vera"]])
        self.assertEqual(self.authenticator.throttle._byName._checking, {})
        self.assertEqual([event for event in self.events if event["log_level"] >= LogLevel.error], [])

        # Cancelled during the back-off: never handed to the pool.
        self.threads.hold = False
        for attempt in range(2):
            self.fixture.identify(OTHER_CLIENT, authorization=basicHeader("uli", f"wrong {attempt}"))
        calls = len(self.threads.calls)
        delayed = self.authenticator.identify(headers(authorization=basicHeader("uli", PASSWORDS["uli"])), OTHER_CLIENT)
        delayed.cancel()
        self.failureResultOf(delayed, CancelledError)
        self.fixture.clock.advance(60)
        self.assertEqual(len(self.threads.calls), calls)
        self.assertEqual(self.authenticator.throttle._byName._checking, {})

    def test_purge(self):
        self.authenticator.startService()
        self.addCleanup(self.authenticator.stopService)
        self.successResultOf(self.authenticator.startSession(Account("vera", frozenset({"viewer"})), []))
        self.fixture.identify(authorization=basicHeader("vera", "wrong"))
        self.fixture.clock.advance(3600)
        self.assertEqual(storedSessions(self.fixture.database), [])
        throttle = self.authenticator.throttle
        self.assertEqual([throttle._byName._failures, throttle._byPair._failures, throttle._byAddress._failures], [{}, {}, {}])
        self.assertEqual(loginEvents(self.fixture.database), [], "the shared log is purged too")


def loginEvents(database) -> List[tuple]:
    """
    The rows of the login_events table of an L{inlineStateDatabase}.
    """
    return database._pool.connection.execute("SELECT node, succeeded, name, address FROM login_events").fetchall()


class SharedLoginsTests(SynchronousTestCase):
    """
    Failed logins count on every node that shares the state database, and
    across a restart (L{appliance.web.loginevents}).
    """

    def setUp(self):
        self.fixture = AuthFixture(self)
        self.clock = self.fixture.clock

    def node(self, name: str) -> Authenticator:
        fixture = self.fixture
        node = Authenticator.forAccountStore(fixture.users, fixture.checks, fixture.config.auth, fixture.database, name, self.clock)
        node.startService()
        self.addCleanup(node.stopService)
        return node

    def login(self, node: Authenticator, name: str, password: str, client=CLIENT) -> Optional[Account]:
        checking = node.login(name, password, client)
        # Past the throttle's back-off (30 s at most).
        self.clock.advance(30)
        return self.successResultOf(checking)

    def test_failuresCountOnEveryNode(self):
        first, second = self.node("node1"), self.node("node2")
        for attempt in range(4):
            self.assertIsNone(self.login(first, "vera", f"wrong {attempt}"))
        self.assertGreater(first.retryAfter("vera", CLIENT), 0)
        self.assertEqual(
            loginEvents(self.fixture.database), [("node1", 0, "vera", "192.0.2.10")] * 4, "no password is written"
        )
        self.clock.advance(POLL_INTERVAL)
        self.assertGreater(second.retryAfter("vera", CLIENT), 0, "refused on the other node too")
        self.assertEqual(second.retryAfter("vera", OTHER_CLIENT), 0, "from that address only")
        self.assertIsNone(self.login(second, "vera", PASSWORDS["vera"]), "the right password is not even checked")

    def test_aSuccessElsewhereForgetsTheFailures(self):
        first, second = self.node("node1"), self.node("node2")
        for attempt in range(3):
            self.assertIsNone(self.login(first, "vera", f"wrong {attempt}"))
        self.assertEqual(self.login(second, "vera", PASSWORDS["vera"]).name, "vera")
        self.clock.advance(POLL_INTERVAL)
        self.assertIsNone(self.login(first, "vera", "wrong again"))
        self.assertEqual(first.retryAfter("vera", CLIENT), 0, "three failures were forgotten: one counts")

    def test_failuresOutliveARestart(self):
        first = self.node("node1")
        for attempt in range(4):
            self.login(first, "vera", f"wrong {attempt}")
        first.stopService()
        restarted = self.node("node1")
        self.assertGreater(restarted.retryAfter("vera", CLIENT), 0)
        self.clock.advance(self.fixture.config.auth.login_failure_window)
        self.assertEqual(restarted.retryAfter("vera", CLIENT), 0, "until the window has passed")

    def test_aRefusalIsLoggedOnceHoweverManyFailuresFollow(self):
        """
        Other nodes' failures keep arriving after a refusal has started: it
        is said once, not once a failure.
        """
        events = captureLogs(self)
        throttle = self.fixture.authenticator.throttle
        now = self.clock.seconds()
        for offset in range(8):
            throttle.apply(LoginEvent(now - 60 + offset, False, "vera", "192.0.2.10", None))
        said = [event for event in events if "Refusing logins as" in event.get("log_format", "")]
        self.assertEqual(len(said), 1)

    def test_lateFailuresTakeTheirPlaceInTime(self):
        """
        Another node's failure arrives after later ones of this node: the
        throttle's window still ends with the oldest of the last few.
        """
        throttle = self.fixture.authenticator.throttle
        now = self.clock.seconds()
        for at in (now - 10, now - 30, now - 20, now - 40):
            throttle.apply(LoginEvent(at, False, "vera", "192.0.2.10", None))
        self.assertEqual([at for at, _ in throttle._byPair.recent(("vera", "192.0.2.10"))], [now - 40, now - 30, now - 20, now - 10])
        window = self.fixture.config.auth.login_failure_window
        self.assertEqual(throttle.retryAfter("vera", CLIENT), window - 40)


class ThreadTests(TestCase):
    """
    The Authenticator with its own thread pool and the real reactor.
    """

    @inlineCallbacks
    def test_passwordIsCheckedOutsideTheReactorThread(self):
        fixture = AuthFixture(self)
        checks = PasswordChecks()
        checks.startService()
        self.addCleanup(checks.stopService)
        authenticator = Authenticator.forAccountStore(fixture.users, checks, fixture.config.auth, fixture.database, "node1")
        authenticator.startService()
        self.addCleanup(authenticator.stopService)
        threads = []

        def recordingVerify(password, stored):
            threads.append(threading.current_thread())
            return verifyPassword(password, stored)

        self.patch(checkers, "verifyPassword", recordingVerify)
        identified = authenticator.identify(headers(authorization=basicHeader("ada", PASSWORDS["ada"])), CLIENT)
        self.assertNoResult(identified)
        self.assertEqual((yield identified).name, "ada")
        self.assertEqual(len(threads), 1)
        self.assertIsNot(threads[0], threading.main_thread())


# --- the gate and the login page, over HTTP ---------------------------------


class Echo(Resource):
    """
    A route behind the gate: answers 200 and its own name for any method.
    """

    isLeaf = True

    def __init__(self, name: bytes) -> None:
        super().__init__()
        self.name = name

    def render(self, request):
        request.setHeader(b"Content-Type", b"text/plain")
        return self.name + b" " + request.method


class IdentifiedRequest(Request):
    """
    What the site's request layer does, in short: identify the sender
    before any resource runs, and mark credentials the busy password
    checks could not look at.  Over TLS in the real site.
    """

    def process(self):
        identified = self.channel.site.authenticator.identify(self.requestHeaders, self.getClientAddress())

        def identifiedAs(account):
            self.account = account
            Request.process(self)

        def busy(failure):
            self.credentialsUnchecked = failure.trap(PasswordChecksBusy) and failure.value
            identifiedAs(None)

        identified.addCallbacks(identifiedAs, busy)

    def isSecure(self):
        return True


class Response:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        statusLine, *lines = head.split(b"\r\n")
        self.statusLine = statusLine
        self.code = int(statusLine.split()[1])
        self.headers: Dict[str, List[str]] = {}
        for line in lines:
            name, _, value = line.decode("latin-1").partition(":")
            self.headers.setdefault(name.strip().lower(), []).append(value.strip())

    def header(self, name: str) -> Optional[str]:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def json(self) -> dict:
        return json.loads(self.body)

    def cookie(self) -> Optional[bytes]:
        value = self.header("set-cookie")
        if value is None:
            return None
        return value.split(";")[0].encode("ascii")


NAVIGATE = {"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Site": "none", "Accept": "text/html"}
SCRIPT = {"Sec-Fetch-Mode": "cors", "Sec-Fetch-Site": "same-origin", "Accept": "application/json"}


class GateTests(SynchronousTestCase):
    def setUp(self):
        self.events = captureLogs(self)
        self.fixture = AuthFixture(self)
        authenticator = self.fixture.authenticator
        web = self.fixture.config.web
        siteMap = SiteMap(
            viewerRoutes(Echo(HEALTHZ), Echo(b"viewer"))
            + archiveRoutes(
                LoginResource(authenticator, web),
                LogoutResource(authenticator, web),
                Echo(DICOMWEB),
                Echo(ADMIN),
                Echo(METRICS),
            )
        )
        self.site = Site(AccessGate(siteMap, authenticator, web), reactor=self.fixture.clock)
        self.site.requestFactory = IdentifiedRequest
        self.site.authenticator = authenticator

    def request(
        self,
        method: str,
        path: str,
        headers: Optional[Dict[str, str]] = None,
        body: bytes = b"",
        cookie: Optional[bytes] = None,
        user: Optional[str] = None,
        password: Optional[str] = None,
    ) -> Response:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        if cookie is not None:
            lines.append("Cookie: " + cookie.decode("ascii"))
        if user is not None:
            lines.append("Authorization: " + basicHeader(user, password or PASSWORDS[user]).decode("ascii"))
        if body:
            lines.append(f"Content-Length: {len(body)}")
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8443), peerAddress=CLIENT
        )
        channel = self.site.buildProtocol(transport.getPeer())
        channel.makeConnection(transport)
        channel.dataReceived(raw)
        response = Response(transport.value())
        channel.connectionLost(Failure(ConnectionDone()))
        return response

    def login(self, user: str, password: Optional[str] = None, target: str = "/", cookie=None) -> Response:
        form = urlencode({"user": user, "password": password or PASSWORDS[user], "next": target}).encode("ascii")
        return self.request(
            "POST",
            "/login",
            {"Origin": OWN_ORIGIN, "Content-Type": "application/x-www-form-urlencoded"},
            form,
            cookie=cookie,
        )

    def session(self, user: str) -> bytes:
        response = self.login(user)
        self.assertEqual(response.code, 303)
        return response.cookie()

    def assertPage(self, response: Response, code: int, title: str) -> str:
        """
        C{response} is one of the site's pages, C{code}, titled C{title},
        uncached and without script or inline style (the site's policy);
        returns its text.
        """
        self.assertEqual(response.code, code)
        self.assertEqual(response.header("Content-Type"), "text/html; charset=utf-8")
        self.assertEqual(response.header("Content-Security-Policy"), DEFAULT_CONTENT_SECURITY_POLICY)
        self.assertEqual(response.header("Cache-Control"), "no-store")
        page = response.body.decode("utf-8")
        self.assertIn(f"<title>Radiology &quot;North&quot;: {title}</title>", page)
        self.assertIn('<link rel="stylesheet" href="/login/login.css">', page)
        for forbidden in ("<script", "style=", "<style"):
            self.assertNotIn(forbidden, page)
        return page

    # anonymous

    def test_publicRoutes(self):
        self.assertEqual(self.request("GET", "/healthz").body, b"healthz GET")
        self.assertEqual(self.request("GET", "/login").code, 200)
        self.assertEqual(self.request("GET", "/login/login.css").code, 200)
        self.assertEqual(self.request("GET", "/logout").code, 303)
        preflight = self.request(
            "OPTIONS", "/pacs/studies", {"Origin": "https://viewer.example", "Access-Control-Request-Method": "GET"}
        )
        self.assertEqual(preflight.body, b"pacs OPTIONS")

    def test_anonymousApiClientIsChallengedWithBasic(self):
        for path in ("/pacs/studies", "/", "/app-config.js", "/pacs-admin/system"):
            response = self.request("GET", path)
            self.assertEqual(response.code, 401, path)
            self.assertEqual(response.header("WWW-Authenticate"), 'Basic realm="Radiology \\"North\\"", charset="UTF-8"')
            self.assertEqual(response.header("Content-Type"), "application/json")
            self.assertIn("Log in", response.json()["error"])

    def test_anonymousNavigationGoesToTheLoginPage(self):
        response = self.request("GET", "/viewer?StudyInstanceUIDs=1.2.3&x=%2F", NAVIGATE)
        self.assertEqual(response.code, 302)
        self.assertEqual(response.header("Location"), "/login?next=/viewer%3FStudyInstanceUIDs%3D1.2.3%26x%3D%252F")
        # An older browser: no Sec-Fetch headers, but it asks for HTML.
        response = self.request("GET", "/pacs-admin/", {"Accept": "text/html,application/xhtml+xml"})
        self.assertEqual(response.header("Location"), "/login?next=/pacs-admin/")

    def test_anonymousBrowserRequestsGetNoBasicPrompt(self):
        """
        The viewer's background requests after its session expired: 401,
        but with a challenge browsers do not answer with a password prompt.
        """
        for headers, cookie in ((SCRIPT, None), ({}, SESSION_COOKIE + b"=expired"), (NAVIGATE, None)):
            response = self.request("GET", "/pacs/studies", headers, cookie=cookie)
            self.assertEqual(response.code, 401)
            challenge = response.header("WWW-Authenticate")
            self.assertTrue(challenge.startswith('Cookie realm="Radiology \\"North\\"", form-action="/login"'), challenge)

    # roles

    def test_viewer(self):
        self.assertEqual(self.request("GET", "/pacs/studies", user="vera").code, 200)
        self.assertEqual(self.request("HEAD", "/pacs/studies", user="vera").code, 200)
        self.assertEqual(self.request("GET", "/", user="vera").body, b"viewer GET")
        upload = self.request("POST", "/pacs/studies", body=b"x", user="vera")
        self.assertEqual(upload.code, 403)
        self.assertEqual(
            upload.json()["error"],
            "The account vera may not do this: it needs the uploader role (ask an administrator, or log in as another user).",
        )
        self.assertEqual(self.request("GET", "/pacs-admin/system", user="vera").code, 403)

    def test_forbiddenPageForNavigation(self):
        response = self.request("GET", "/pacs-admin/", NAVIGATE, user="vera")
        page = self.assertPage(response, 403, "not allowed")
        self.assertIn("it needs the admin role", page)
        self.assertIn('href="/logout"', page)
        self.assertIn("<h1>Radiology &quot;North&quot;</h1>", page)

    def test_uploader(self):
        self.assertEqual(self.request("POST", "/pacs/studies", body=b"x", user="uli").body, b"pacs POST")
        self.assertEqual(self.request("DELETE", "/pacs/studies/1", user="uli").code, 403)
        self.assertEqual(self.request("GET", "/pacs-admin/", user="uli").code, 403)

    def test_admin(self):
        self.assertEqual(self.request("GET", "/pacs-admin/app/explorer.html", user="ada").body, b"pacs-admin GET")
        self.assertEqual(self.request("POST", "/pacs-admin/instances", body=b"x", user="ada").code, 200)
        self.assertEqual(self.request("POST", "/pacs/studies", body=b"x", user="ada").code, 200)

    def test_pathSegmentsAreCheckedDecoded(self):
        self.assertEqual(self.request("GET", "/pacs%2Dadmin/system", user="vera").code, 403)

    # sessions, CSRF

    def test_sessionCarriesTheRoles(self):
        cookie = self.session("uli")
        self.assertEqual(self.request("GET", "/pacs/studies", SCRIPT, cookie=cookie).code, 200)
        self.assertEqual(self.request("GET", "/pacs-admin/", NAVIGATE, cookie=cookie).code, 403)

    def test_unsafeSessionRequestsMustComeFromTheSite(self):
        cookie = self.session("uli")
        cases = [
            ({}, 403),
            ({"Origin": "https://evil.example"}, 403),
            ({"Origin": "null"}, 403),
            ({"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"}, 403),
            ({"Sec-Fetch-Site": "same-site", "Origin": "https://other.pacs.example:8443"}, 403),
            ({"Origin": "https://viewer.example"}, 403),
            ({"Origin": OWN_ORIGIN}, 200),
            ({"Origin": "HTTPS://PACS.example:8443"}, 200),
            # Under Referrer-Policy: no-referrer browsers send "Origin: null"
            # even for their own site's forms; Sec-Fetch-Site still tells.
            ({"Sec-Fetch-Site": "same-origin", "Origin": "null"}, 200),
            ({"Referer": OWN_ORIGIN + "/viewer?StudyInstanceUIDs=1"}, 200),
            ({"Referer": "https://evil.example/"}, 403),
        ]
        for headers, code in cases:
            response = self.request("POST", "/pacs/studies", headers, b"x", cookie=cookie)
            self.assertEqual(response.code, code, headers)
        refusals = [event for event in self.events if event.get("log_format", "").startswith("Refused {method}")]
        self.assertEqual(len(refusals), 7)
        self.assertEqual(self.request("GET", "/pacs/studies", {"Origin": "https://evil.example"}, cookie=cookie).code, 200)

    def test_basicIsExemptFromTheOriginCheck(self):
        self.assertEqual(self.request("POST", "/pacs/studies", {}, b"x", user="uli").code, 200)
        # Configured as HTTPS://Viewer.Example:443.
        allowed = {"Origin": "https://viewer.example"}
        self.assertEqual(self.request("POST", "/pacs/studies", allowed, b"x", user="uli").code, 200)
        own = {"Origin": "https://PACS.example:8443"}
        self.assertEqual(self.request("POST", "/pacs/studies", own, b"x", user="uli").code, 200)
        # A browser replaying credentials it remembers from a Basic prompt.
        foreign = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
        self.assertEqual(self.request("POST", "/pacs/studies", foreign, b"x", user="uli").code, 403)

    def test_requestOrigin(self):
        """
        The request's Origin as browsers write it; C{null}, which matches no
        site, for what is no origin and for several headers.
        """
        request = Request(DummyChannel())
        self.assertIsNone(requestOrigin(request))
        for values, origin in (
            ([b"HTTPS://PACS.Example:443"], b"https://pacs.example"),
            ([b"http://pacs.example:80"], b"http://pacs.example"),
            ([b"https://[2001:DB8::1]:8443"], b"https://[2001:db8::1]:8443"),
            ([b"null"], b"null"),
            ([b"https://pacs.example/path"], b"null"),
            ([b"https://caf\xe9.example"], b"null"),
            ([b"https://evil.example", b"https://pacs.example"], b"null"),
        ):
            request.requestHeaders.setRawHeaders(b"Origin", values)
            self.assertEqual(requestOrigin(request), origin, values)

    # throttling

    def test_tooManyFailuresGet429(self):
        for attempt in range(4):
            self.fixture.clock.advance(30)
            response = self.request("GET", "/pacs/studies", user="vera", password=f"wrong {attempt}")
            self.assertEqual(response.code, 401 if attempt < 3 else 429)
        response = self.request("GET", "/pacs/studies", user="vera")
        self.assertEqual(response.code, 429)
        self.assertEqual(response.header("Retry-After"), str(600 - 90))
        self.assertEqual(
            response.json()["error"], "Too many failed logins for this user or from your address: try again in 510 seconds."
        )
        self.fixture.clock.advance(600)
        self.assertEqual(self.request("GET", "/pacs/studies", user="vera").code, 200)

    # the login page

    def test_loginPage(self):
        response = self.request("GET", "/login?next=/viewer%3FStudyInstanceUIDs%3D1.2", NAVIGATE)
        page = self.assertPage(response, 200, "log in")
        self.assertIn('<form method="post" action="/login"', page)
        self.assertIn('name="user"', page)
        self.assertIn('type="password"', page)
        self.assertIn('<input type="hidden" name="next" value="/viewer?StudyInstanceUIDs=1.2">', page)
        stylesheet = self.request("GET", "/login/login.css")
        self.assertEqual(stylesheet.header("Content-Type"), "text/css; charset=utf-8")
        self.assertIn(b"body {", stylesheet.body)
        etag = stylesheet.header("ETag")
        self.assertEqual(self.request("GET", "/login/login.css", {"If-None-Match": etag}).code, 304)
        self.assertEqual(self.request("GET", "/login/other.css").code, 404)

    def test_loginSetsTheCookieAndReturns(self):
        response = self.login("vera", target="/viewer?StudyInstanceUIDs=1.2")
        self.assertEqual(response.code, 303)
        self.assertEqual(response.header("Location"), "/viewer?StudyInstanceUIDs=1.2")
        setCookie = response.header("Set-Cookie")
        self.assertRegex(setCookie, r"^__Host-pacs-session=[A-Za-z0-9_-]{43}; ")
        attributes = sorted(part.strip().lower() for part in setCookie.split(";")[1:])
        self.assertEqual(attributes, ["httponly", "path=/", "samesite=strict", "secure"], "and no Max-Age")
        self.assertEqual(self.request("GET", "/", NAVIGATE, cookie=response.cookie()).body, b"viewer GET")

    def test_loginGoesBackOnlyToThisSite(self):
        for target, location in (
            ("/pacs-admin/", "/pacs-admin/"),
            ("//evil.example/", "/"),
            ("/\\evil.example/", "/"),
            ("https://evil.example/", "/"),
            ("/\t/evil.example", "/"),
            ("", "/"),
        ):
            self.assertEqual(self.login("ada", target=target).header("Location"), location, target)
        self.assertEqual(localTarget("/viewer?a=b&c=%2F"), "/viewer?a=b&c=%2F")

    def test_failedLogin(self):
        response = self.login("vera", password="not-her-password")
        self.assertEqual(response.code, 401)
        self.assertTrue(response.header("WWW-Authenticate").startswith("Cookie realm="))
        self.assertIsNone(response.header("Set-Cookie"))
        page = response.body.decode("utf-8")
        self.assertIn("The user name or password is incorrect.", page)
        self.assertIn('value="vera"', page)
        self.assertNotIn("not-her-password", logText(self.events))

    def test_loginPageEscapesWhatItShows(self):
        response = self.login('<script>alert("x")</script>', password="whatever-password")
        self.assertNotIn(b"<script>", response.body)
        self.assertIn(b"&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;", response.body)

    def test_loginMustComeFromTheLoginPage(self):
        form = urlencode({"user": "vera", "password": PASSWORDS["vera"]}).encode("ascii")
        for headers in (
            {},
            {"Origin": "https://evil.example"},
            {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"},
        ):
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            response = self.request("POST", "/login", headers, form)
            self.assertEqual(response.code, 403, headers)
            self.assertIsNone(response.header("Set-Cookie"))
        self.assertEqual(self.fixture.threads.calls, [], "no password was checked")
        sameOrigin = {"Sec-Fetch-Site": "same-origin", "Origin": "null", "Content-Type": "application/x-www-form-urlencoded"}
        self.assertEqual(self.request("POST", "/login", sameOrigin, form).code, 303)

    def test_malformedLoginForms(self):
        for contentType, body in (
            ("application/json", b'{"user": "vera"}'),
            ("application/x-www-form-urlencoded", b"user=vera&password=%ff%fe"),
            ("application/x-www-form-urlencoded", b"&".join(b"f%d=1" % (n,) for n in range(20))),
        ):
            response = self.request("POST", "/login", {"Origin": OWN_ORIGIN, "Content-Type": contentType}, body)
            self.assertEqual(response.code, 400, body)
            self.assertIn(b"The login form could not be read", response.body)
        response = self.request(
            "POST", "/login", {"Origin": OWN_ORIGIN, "Content-Type": "application/x-www-form-urlencoded"}, b"user=vera"
        )
        self.assertIn(b"Enter your user name and password.", response.body)

    def test_loginRotatesTheSession(self):
        first = self.session("vera")
        second = self.login("uli", cookie=first).cookie()
        self.assertNotEqual(first, second)
        self.assertEqual(self.request("GET", "/pacs/studies", SCRIPT, cookie=first).code, 401)
        self.assertEqual(self.request("GET", "/pacs/studies", SCRIPT, cookie=second).code, 200)

    def test_logoutEndsTheSessionOnTheServer(self):
        cookie = self.session("vera")
        response = self.request("GET", "/logout", NAVIGATE, cookie=cookie)
        self.assertEqual(response.code, 303)
        self.assertEqual(response.header("Location"), "/login")
        cleared = response.header("Set-Cookie")
        self.assertTrue(cleared.startswith("__Host-pacs-session=; "), cleared)
        self.assertIn("Max-Age=0", cleared)
        # A copy of the old cookie is worth nothing now.
        self.assertEqual(self.request("GET", "/pacs/studies", SCRIPT, cookie=cookie).code, 401)
        self.assertEqual(self.request("GET", "/", NAVIGATE, cookie=cookie).code, 302)

    def test_loginAndLogoutWhileTheStateDatabaseIsDown(self):
        """
        A right password cannot start a session that no node could find:
        the form answers 503 and says to try again; a logout that could not
        be recorded keeps the cookie and says so, and the session still
        works on this node.
        """
        cookie = self.session("vera")
        self.fixture.database._pool.broken = sqlite3.OperationalError("disk I/O error")
        response = self.login("ada")
        self.assertEqual((response.code, response.header("Retry-After")), (503, "5"))
        self.assertIn("session could not be started", response.body.decode("utf-8"))
        self.assertIsNone(response.header("Set-Cookie"))
        response = self.request("POST", "/logout", {"Origin": OWN_ORIGIN}, cookie=cookie)
        self.assertEqual(response.code, 503)
        self.assertIn("The session could not be ended", response.body.decode("utf-8"))
        self.assertIsNone(response.header("Set-Cookie"))
        self.assertEqual(self.request("GET", "/pacs/studies", SCRIPT, cookie=cookie).code, 200)
        self.assertNotIn("Traceback", logText(self.events))

    def test_logoutByPost(self):
        cookie = self.session("vera")
        self.assertEqual(self.request("POST", "/logout", {"Origin": OWN_ORIGIN}, cookie=cookie).code, 303)
        self.assertEqual(self.request("GET", "/pacs/studies", SCRIPT, cookie=cookie).code, 401)

    def test_logoutTypedOrFromTheSite(self):
        """
        A GET the user typed (Sec-Fetch-Site: none, or an older browser's
        request without Sec-Fetch headers) or one from the site's own pages
        logs out at once.
        """
        for headers in (
            NAVIGATE,
            {},
            {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "navigate"},
            {"Referer": OWN_ORIGIN + "/viewer?StudyInstanceUIDs=1"},
        ):
            cookie = self.session("vera")
            response = self.request("GET", "/logout", headers, cookie=cookie)
            self.assertEqual((response.code, response.header("Location")), (303, "/login"), headers)
            self.assertIn("Max-Age=0", response.header("Set-Cookie"))
            self.assertEqual(self.request("GET", "/pacs/studies", SCRIPT, cookie=cookie).code, 401, headers)

    def test_logoutNotFromTheSiteEndsNothing(self):
        """
        A GET another site made the browser send (a link, an image), and a
        POST not from this site's pages, end nothing and keep the cookie:
        they get a page whose button posts the logout from this site.
        """
        cookie = self.session("vera")
        refused = "The logout was refused: it did not come from this site&#x27;s pages."
        for method, headers, code, error in (
            ("GET", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}, 200, ""),
            ("GET", {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "no-cors"}, 200, ""),
            ("GET", {"Origin": "https://evil.example"}, 200, ""),
            ("GET", {"Origin": "null"}, 200, ""),
            ("GET", {"Referer": "https://evil.example/page"}, 200, ""),
            ("POST", {}, 403, refused),
            ("POST", {"Origin": "https://evil.example"}, 403, refused),
            ("POST", {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"}, 403, refused),
        ):
            response = self.request(method, "/logout", headers, cookie=cookie)
            page = self.assertPage(response, code, "log out")
            self.assertIsNone(response.header("Set-Cookie"), headers)
            self.assertIn(f'<p class="error" role="alert">{error}</p>', page)
            self.assertIn('<form method="post" action="/logout">', page)
            self.assertIn('<button type="submit">Log out</button>', page)
        self.assertEqual(self.request("GET", "/pacs/studies", SCRIPT, cookie=cookie).code, 200)
        # The button.
        button = {"Sec-Fetch-Site": "same-origin", "Origin": OWN_ORIGIN}
        self.assertEqual(self.request("POST", "/logout", button, cookie=cookie).code, 303)
        self.assertEqual(self.request("GET", "/pacs/studies", SCRIPT, cookie=cookie).code, 401)

    def test_sessionExpiresThroughTheSite(self):
        cookie = self.session("vera")
        self.fixture.clock.advance(29 * 60)
        self.assertEqual(self.request("GET", "/", NAVIGATE, cookie=cookie).code, 200)
        self.fixture.clock.advance(30 * 60)
        self.assertEqual(self.request("GET", "/", NAVIGATE, cookie=cookie).code, 302)

    def test_guessingBetweenOwnLoginsGets429(self):
        """
        The outside review's cycle over HTTP: twelve guesses at the admin's
        password, each followed by the guesser's own successful request as a
        viewer; the guesses get 429 once the admin's name has
        max_login_failures (4 here), the guesser's own requests go on.
        """
        guesses, own = [], []
        for attempt in range(12):
            self.fixture.clock.advance(30)
            guesses.append(self.request("GET", "/pacs/studies", user="ada", password=f"guess {attempt}").code)
            # The login form checks the password every time (Basic is remembered).
            own.append(self.login("vera").code)
        self.assertEqual(guesses, [401] * 3 + [429] * 9)
        self.assertEqual(own, [303] * 12)
        response = self.request("GET", "/pacs/studies", user="ada", password="guess 12")
        self.assertEqual(response.statusLine, b"HTTP/1.1 429 Too Many Requests")

    def test_othersFailuresLockNobodyElseOut(self):
        """
        After failed guesses from one address, a user of the same address
        whose password had never been tried logs in (the review got 429).
        """
        for attempt in range(4):
            self.fixture.clock.advance(30)
            self.request("GET", "/pacs/studies", user="ada", password=f"guess {attempt}")
        self.assertEqual(self.request("GET", "/pacs/studies", user="ada").code, 429)
        self.assertEqual(self.request("GET", "/pacs/studies", user="uli").code, 200)
        self.assertEqual(self.login("vera").code, 303)

    def test_loginThrottling(self):
        for attempt in range(4):
            self.fixture.clock.advance(30)
            response = self.login("vera", password=f"wrong password {attempt}")
            self.assertEqual(response.code, 401 if attempt < 3 else 429)
        response = self.login("vera")
        self.assertEqual(response.code, 429)
        self.assertEqual(response.header("Retry-After"), "510")
        self.assertIn(b"Too many failed logins for this user or from your address: try again in 510 seconds.", response.body)
        self.fixture.clock.advance(600)
        self.assertEqual(self.login("vera").code, 303)

    def test_busyPasswordChecksAre503(self):
        """
        While MAX_PENDING_CHECKS are waiting, credentials that need a check
        get 503 with Retry-After: JSON behind the gate, the form on the
        login page.  Public routes and sessions still work.
        """
        cookie = self.session("uli")
        self.fixture.fillPasswordChecks()
        response = self.request("GET", "/pacs/studies", user="vera")
        self.assertEqual((response.code, response.header("Retry-After")), (503, "5"))
        self.assertEqual(response.header("Content-Type"), "application/json")
        self.assertEqual(response.json()["error"], BUSY_MESSAGE)
        self.assertEqual(self.request("GET", "/healthz", user="vera").body, b"healthz GET")
        self.assertEqual(self.request("GET", "/pacs/studies", SCRIPT, cookie=cookie).code, 200)
        login = self.login("vera")
        page = self.assertPage(login, 503, "log in")
        self.assertEqual(login.header("Retry-After"), "5")
        self.assertIn(BUSY_MESSAGE, page)
        self.assertIn('value="vera"', page)
        self.assertIsNone(login.header("Set-Cookie"))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_loginAnswersNobodyWhenTheBrowserLeft(self):
        self.fixture.threads.hold = True
        form = urlencode({"user": "vera", "password": PASSWORDS["vera"]}).encode("ascii")
        raw = (
            f"POST /login HTTP/1.1\r\nHost: {HOST}\r\nOrigin: {OWN_ORIGIN}\r\n"
            f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(form)}\r\n\r\n"
        ).encode("ascii") + form
        transport = StringTransport(peerAddress=CLIENT)
        channel = self.site.buildProtocol(transport.getPeer())
        channel.makeConnection(transport)
        channel.dataReceived(raw)
        channel.connectionLost(Failure(ConnectionDone()))
        self.fixture.threads.release()
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.fixture.verified, [], "the check was skipped")
        self.assertEqual(self.flushLoggedErrors(), [])


class PageTests(SynchronousTestCase):
    def test_siteNameEscapedEverywhere(self) -> None:
        """
        The site's name goes into the layout and into page bodies as text:
        HTML is escaped, and a "$" is no placeholder.
        """
        web = testConfig(temporaryFolder(self), web={"site_name": "Clinic $5 <A&B>"}).web
        request = DummyRequest([b""])
        page = Page("logout.html", "log out", web).answer(request, 403, error="No $error here.").decode()
        self.assertEqual(page.count("Clinic $5 &lt;A&amp;B&gt;"), 3)
        self.assertIn("No $error here.", page)
        self.assertEqual(request.responseCode, 403)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"Cache-Control"), [b"no-store"])
