"""
The state database against the real thing: a SQLite file through adbapi's
threads, and Debian's PostgreSQL (a private server, tests/postgres.py) over
verified TLS, shared by two nodes: migrations, sessions that hold on both,
failed logins counted on both, and PostgreSQL stopped and started again.
"""

import sqlite3
import time

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase

from appliance.state.database import (
    SQLITE_FILE,
    DatabaseUnavailable,
    StateDatabase,
    Statements,
    openStateDatabase,
    sqliteDatabase,
)
from appliance.state.schema import SCHEMA_VERSION
from appliance.web.accounts import Account
from appliance.web.authenticator import Authenticator
from appliance.web.checkers import PasswordChecks
from appliance.web.loginevents import POLL_INTERVAL
from appliance.web.metadatacache import readEntry, writeEntry
from appliance.web.sessions import RECHECK_AFTER
from appliance.web.users import UsersFile
from tests.postgres import requirePostgres
from tests.support import TestAuthority, captureLogs, logText, temporaryFolder, testConfig, writeUser
from tests.webclients import CREDENTIALS

#: How long a test waits for the database to answer, or to come back.
WAIT = 60.0


@inlineCallbacks
def waitUntil(condition, what: str, timeout: float = WAIT):
    """
    Poll C{condition} on the real reactor every few milliseconds.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        yield deferLater(reactor, 0.01, lambda: None)


def version(statements: Statements) -> int:
    return statements.row("SELECT version FROM schema_version")[0]  # type: ignore[index]


def encrypted(statements: Statements) -> bool:
    return statements.row("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")[0]  # type: ignore[index]


class DatabaseCase(TestCase):
    timeout = 120

    def setUp(self):
        self.folder = temporaryFolder(self)
        self.events = captureLogs(self)

    def started(self, database: StateDatabase) -> StateDatabase:
        database.startService()
        self.addCleanup(lambda: database.stopService() if database.running else None)
        return database

    def postgresConfig(self, **overrides):
        server = requirePostgres(self.skipTest)
        self.server = server
        self.settings = server.newDatabase(self.addCleanup)
        return testConfig(self.folder, database=self.settings.section(**overrides))


class SQLiteTests(DatabaseCase):
    @inlineCallbacks
    def test_migratesAPrivateFile(self):
        database = self.started(sqliteDatabase(self.folder / "state", reactor))
        self.assertEqual((yield database.interact(version)), SCHEMA_VERSION)
        self.assertEqual((self.folder / "state" / SQLITE_FILE).stat().st_mode & 0o777, 0o600)

    @inlineCallbacks
    def test_aNewerSchemaIsRefused(self):
        """
        A database written by a later release is left alone, and said so:
        an older release does not guess at tables it does not know.
        """
        path = self.folder / SQLITE_FILE
        with sqlite3.connect(path) as connection:
            connection.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            connection.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION + 1,))
        database = self.started(sqliteDatabase(self.folder, reactor))
        yield waitUntil(lambda: "newer release" in logText(self.events), "the refusal")
        self.assertFalse(database.ready)
        yield self.assertFailure(database.interact(version), DatabaseUnavailable)
        with sqlite3.connect(path) as connection:
            self.assertEqual(connection.execute("SELECT name FROM sqlite_master WHERE name = 'sessions'").fetchall(), [])


class PostgreSQLTests(DatabaseCase):
    @inlineCallbacks
    def test_migratesOverVerifiedTLS(self):
        config = self.postgresConfig()
        database = self.started(openStateDatabase(config, reactor))
        self.assertEqual((yield database.interact(version)), SCHEMA_VERSION)
        self.assertTrue((yield database.interact(encrypted)))
        self.assertNotIn(self.settings.password, logText(self.events))

    @inlineCallbacks
    def test_nodesStartingTogetherMigrateOnce(self):
        config = self.postgresConfig()
        nodes = [self.started(openStateDatabase(config, reactor)) for _ in range(3)]
        yield waitUntil(lambda: all(node.ready for node in nodes), "every node")
        versions = []
        for node in nodes:
            versions.append((yield node.interact(version)))
        self.assertEqual(versions, [SCHEMA_VERSION] * 3)
        self.assertEqual(self.server.sql("SELECT count(*) FROM schema_version", self.settings.name).strip(), "1")
        self.assertNotIn("not available", logText(self.events))

    @inlineCallbacks
    def test_aServerNotSignedByTheAuthorityIsRefused(self):
        config = self.postgresConfig(ca_file=TestAuthority(self.folder / "other", "Another CA").path)
        database = self.started(openStateDatabase(config, reactor))
        yield waitUntil(lambda: "is not available" in logText(self.events), "the refusal")
        self.assertIn("certificate verify failed", logText(self.events))
        yield self.assertFailure(database.interact(version), DatabaseUnavailable)


class ClusterStateTests(DatabaseCase):
    """
    Two nodes' authenticators on one PostgreSQL database: the real pool and
    server, each node's own clock (advanced by the test).
    """

    def setUp(self):
        super().setUp()
        usersFile = self.folder / "users"
        for role in ("viewer", "admin"):
            writeUser(usersFile, *CREDENTIALS[role], [role])
        server = self.server = requirePostgres(self.skipTest)
        self.settings = server.newDatabase(self.addCleanup)
        self.config = testConfig(
            self.folder,
            database=self.settings.section(),
            auth={"users_file": usersFile, "max_login_failures": 3},
        )
        self.clock = Clock()
        self.users = UsersFile(usersFile, self.clock)
        self.users.startService()
        self.addCleanup(self.users.stopService)
        # Checks in threads, answering through the real reactor.
        self.checks = PasswordChecks(reactor)
        self.databases = []
        self.checks.startService()
        self.addCleanup(self.checks.stopService)

    def node(self, name: str) -> Authenticator:
        database = self.started(openStateDatabase(self.config, reactor))
        self.databases.append(database)
        node = Authenticator.forAccountStore(self.users, self.checks, self.config.auth, database, name, self.clock)
        node.startService()
        self.addCleanup(node.stopService)
        return node

    @inlineCallbacks
    def test_aSessionHoldsOnEveryNodeAndEndsOnAll(self):
        first, second = self.node("node1"), self.node("node2")
        viewer = Account(CREDENTIALS["viewer"][0], frozenset({"viewer"}))
        token = yield first.startSession(viewer, [])
        self.assertEqual((yield second.sessions.lookup(token)).name, viewer.name, "known to the other node at once")
        yield first.endSession(token)
        self.assertIsNone((yield first.sessions.lookup(token)))
        self.clock.advance(RECHECK_AFTER)
        self.assertIsNone((yield second.sessions.lookup(token)), "ended on the other node")

    @inlineCallbacks
    def test_failedLoginsCountOnEveryNode(self):
        first, second = self.node("node1"), self.node("node2")
        name, password = CREDENTIALS["viewer"]
        client = IPv4Address("TCP", "192.0.2.10", 50000)
        for attempt in range(3):
            checking = first.login(name, f"wrong {attempt}", client)
            self.clock.advance(30)
            self.assertIsNone((yield checking))
        self.assertGreater(first.retryAfter(name, client), 0)


        def counted() -> bool:
            # The nodes poll on the test's clock, once their last poll has
            # been answered (through the real reactor).
            self.clock.advance(POLL_INTERVAL)
            return second.retryAfter(name, client) > 0

        yield waitUntil(counted, "the other node to count the failures")
        self.assertIsNone((yield second.login(name, password, client)), "refused there too")

    @inlineCallbacks
    def test_metadataCachedByOneNodeIsReadByTheOther(self):
        """
        The metadata cache's table on PostgreSQL: an entry one node wrote is
        the other's (its bytes whole), and the oldest go first over the limit.
        """
        first, second = (self.started(openStateDatabase(self.config, reactor)) for _ in range(2))
        body = bytes(range(256)) * 40
        yield first.interact(writeEntry, "1.2/1.2.3", "facts", body, 15_000)
        self.assertEqual((yield second.interact(readEntry, "1.2/1.2.3")), ("facts", body))
        removed = yield second.interact(writeEntry, "1.2/1.2.4", "other facts", body, 15_000)
        self.assertEqual(removed, 1)
        self.assertIsNone((yield first.interact(readEntry, "1.2/1.2.3")))
        self.assertEqual((yield first.interact(readEntry, "1.2/1.2.4")), ("other facts", body))

    @inlineCallbacks
    def test_postgresqlStoppedAndStartedAgain(self):
        """
        While PostgreSQL is down, a node goes on answering for the sessions
        it has seen, refuses to start new ones (the login page says to try
        again), and the journal says so once; once it is back, everything
        works again without a restart of the node.
        """
        node = self.node("node1")
        [database] = self.databases
        viewer = Account(CREDENTIALS["viewer"][0], frozenset({"viewer"}))
        token = yield node.startSession(viewer, [])
        self.server.stop()
        self.addCleanup(lambda: self.server.process is None and self.server.start())
        self.clock.advance(RECHECK_AFTER)
        self.assertEqual((yield node.sessions.lookup(token)).name, viewer.name, "a session it has seen")
        self.assertFalse(database.ready)
        yield self.assertFailure(node.startSession(viewer, []), DatabaseUnavailable)
        self.clock.advance(RECHECK_AFTER)
        self.assertEqual((yield node.sessions.lookup(token)).name, viewer.name)
        said = [
            event for event in self.events if event.get("log_format", "").startswith("The state database ({where}) is not")
        ]
        self.assertEqual(len(said), 1, "said once")
        self.server.start()
        yield waitUntil(lambda: database.ready, "the node to find PostgreSQL again")
        again = yield node.startSession(viewer, [])
        self.assertEqual((yield node.sessions.lookup(again)).name, viewer.name)
        self.clock.advance(RECHECK_AFTER)
        self.assertEqual((yield node.sessions.lookup(token)).name, viewer.name, "the session survived the outage")
        self.assertIn("is available again", logText(self.events))
