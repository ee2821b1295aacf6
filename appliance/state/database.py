"""
The database that holds the appliance's own state: a SQLite file under
C{state_dir} on a single box, or the PostgreSQL server of C{[database]} that
every node of a cluster shares.

Statements run in threads (L{twisted.enterprise.adbapi}), each interaction
one transaction; the schema is brought to this release's version when the
service starts (L{appliance.state.schema}), and retried until it is, so that
a database that is down at boot holds nothing else up.
"""

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from twisted.application.service import Service
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.config import Config, DatabaseSection, DatabaseTLSMode
from appliance.secretfiles import readSecret
from appliance.state.schema import MIGRATIONS, SCHEMA_VERSION

#: The file of the appliance's own state on a single box, under state_dir.
SQLITE_FILE = "appliance.sqlite3"

#: Connections each node keeps to PostgreSQL at most: the state's queries
#: are short, and a cluster of nodes shares the server's max_connections
#: (100 by default) with Orthanc's index.
POSTGRESQL_CONNECTIONS = 4

#: How long connecting to PostgreSQL may take, in seconds.
CONNECT_TIMEOUT = 5

#: How long a failed attempt to reach the database (or bring its schema up
#: to date) waits before the next, doubling from the first to the last.
RETRY_FIRST = 1.0
RETRY_LAST = 10.0


class DatabaseUnavailable(Exception):
    """
    The state database cannot be used yet: it could not be reached, or its
    schema is not up to date.
    """


class NewerSchema(Exception):
    """
    The database was written by a newer release of the appliance.
    """


def reportFailure(log: Logger, failure: Failure, what: str) -> None:
    """
    Log a failed use of the state database, that nobody else will report:
    one line if the database is unavailable (it has told the journal why,
    once), the whole failure otherwise.

    @param what: what could not be done, after "Could not".
    """
    if failure.check(DatabaseUnavailable):
        log.warn("Could not {what}: the state database is not available", what=what)
    else:
        log.failure("Could not {what}", failure, what=what)


def ignoreUnavailable(log: Logger, failure: Failure, what: str) -> None:
    """
    The failure of a use of the state database that nobody waits for (a
    note of a session's use, a login shared with other nodes): nothing
    while the database is unavailable (said once, by itself), the whole
    failure otherwise.
    """
    if not failure.check(DatabaseUnavailable):
        log.failure("Could not {what}", failure, what=what)


@dataclass(frozen=True)
class Dialect:
    """
    What differs between the databases, as far as the appliance's tables go.
    """

    name: str
    #: How a statement marks its parameters (statements are written with ?).
    placeholder: str
    #: The types the schema names in braces.
    types: Mapping[str, str]
    #: Starts each transaction, if the driver does not.
    begin: Optional[str]
    #: Taken at the start of a migration, so that nodes starting together
    #: migrate one after the other.
    migrationLock: Optional[str]
    #: The database's clock, in seconds since the epoch.
    now: str
    #: The driver's errors that mean the database cannot be reached (by
    #: qualified name: the driver is imported only where it is used).
    connectionErrors: Tuple[str, ...]

    def statement(self, sql: str) -> str:
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)


SQLITE = Dialect(
    name="SQLite",
    placeholder="?",
    types={"blob": "BLOB", "real": "REAL", "serial": "INTEGER PRIMARY KEY AUTOINCREMENT"},
    # Immediate: the write lock is taken at the start, so that two writers
    # (the daemon, a command) never deadlock upgrading their read locks.
    begin="BEGIN IMMEDIATE",
    migrationLock=None,
    now="((julianday('now') - 2440587.5) * 86400.0)",
    # A file that cannot be read or written (a full disk, an I/O error).
    connectionErrors=("sqlite3.OperationalError",),
)

POSTGRESQL = Dialect(
    name="PostgreSQL",
    placeholder="%s",
    types={"blob": "BYTEA", "real": "DOUBLE PRECISION", "serial": "BIGSERIAL PRIMARY KEY"},
    begin=None,
    # Any constant would do: the appliance's own, spelled "PACS" in ASCII.
    migrationLock="SELECT pg_advisory_xact_lock(1346454355)",
    now="extract(epoch from clock_timestamp())::double precision",
    # A server that is down, restarting, or unreachable, and a connection
    # that it dropped.
    connectionErrors=("psycopg.OperationalError", "psycopg.InterfaceError"),
)


class Statements:
    """
    What an interaction is given: statements run in its transaction, with
    ? for their parameters whatever the database.
    """

    def __init__(self, cursor: Any, dialect: Dialect) -> None:
        self._cursor = cursor
        self.dialect = dialect

    def execute(self, sql: str, parameters: Sequence[object] = ()) -> int:
        """
        Run a statement; returns how many rows it changed.
        """
        self._cursor.execute(self.dialect.statement(sql), tuple(parameters))
        return self._cursor.rowcount

    def rows(self, sql: str, parameters: Sequence[object] = ()) -> List[tuple]:
        self._cursor.execute(self.dialect.statement(sql), tuple(parameters))
        return [tuple(row) for row in self._cursor.fetchall()]

    def row(self, sql: str, parameters: Sequence[object] = ()) -> Optional[tuple]:
        rows = self.rows(sql, parameters)
        return rows[0] if rows else None


def migrate(statements: Statements) -> int:
    """
    Bring the schema to L{SCHEMA_VERSION}; returns the version it had.

    @raise NewerSchema: if the database is of a later version.
    """
    dialect = statements.dialect
    if dialect.migrationLock is not None:
        statements.execute(dialect.migrationLock)
    statements.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = statements.row("SELECT version FROM schema_version")
    found = 0 if row is None else row[0]
    if found > SCHEMA_VERSION:
        raise NewerSchema(
            f"the database's schema is version {found}, from a newer release of the appliance"
            f" (this one knows versions up to {SCHEMA_VERSION})"
        )
    for migration in MIGRATIONS[found:]:
        for sql in migration:
            statements.execute(sql.format(**dialect.types))
    if row is None:
        statements.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
    elif found < SCHEMA_VERSION:
        statements.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
    return found


class StateDatabase(Service):
    """
    The appliance's own tables, through a pool of connections (an
    L{adbapi.ConnectionPool}, or anything with its C{runInteraction} and
    C{close}).

    Interactions asked for while the schema is first brought up to date
    wait for it.  When the database cannot be reached (at start, or when an
    interaction finds it gone), the journal says so once, L{ready} is false,
    interactions fail at once with L{DatabaseUnavailable}, and the database
    is tried again every few seconds until it answers; callers answer from
    what they remember, or tell the client to try again.

    @param where: the database, as the journal names it.
    """

    log = Logger()

    def __init__(self, pool: Any, dialect: Dialect, where: str, reactor) -> None:
        self._pool = pool
        self.dialect = dialect
        self._where = where
        self._reactor = reactor
        self._retry = RETRY_FIRST
        self._retrying: Any = None
        #: Why the database is unavailable, once the journal has been told.
        self._problem: Optional[str] = None
        #: The interactions waiting for the first migration.
        self._waiting: Optional[List[Deferred]] = None
        self._observers: List[Callable[[], None]] = []
        self.ready = False

    def subscribe(self, observer: Callable[[], None]) -> None:
        """
        Call C{observer()} each time the database becomes available or
        unavailable, or is unavailable for another reason (L{describe} says
        which).
        """
        self._observers.append(observer)

    def describe(self) -> str:
        """
        The database and whether it is available, in a few words.
        """
        if self.ready:
            return f"the state database ({self._where}) is available"
        if self._problem is not None:
            return f"the state database ({self._where}) is not available: {self._problem}"
        return f"the state database ({self._where}) is being opened"

    def _tell(self) -> None:
        for observer in self._observers:
            observer()

    def startService(self) -> None:
        Service.startService(self)
        self._waiting = []
        self._migrate()

    def stopService(self) -> None:
        Service.stopService(self)
        if self._retrying is not None and self._retrying.active():
            self._retrying.cancel()
        self.ready = False
        self._pool.close()

    def interact(self, interaction: Callable[..., Any], *arguments: object) -> Deferred:
        """
        Run C{interaction(statements, *arguments)} in a thread, in one
        transaction: committed if it returns, rolled back if it raises.
        Fails with L{DatabaseUnavailable} if the database cannot be reached.
        """
        if self._waiting is not None:
            waiting: Deferred = Deferred()
            self._waiting.append(waiting)
            return waiting.addCallback(lambda ignored: self.interact(interaction, *arguments))
        if not self.ready:
            return fail(DatabaseUnavailable(f"the state database ({self._where}) is not available"))
        running = self._pool.runInteraction(self._transaction, interaction, *arguments)
        return running.addErrback(self._interactionFailed)

    def _transaction(self, cursor: Any, interaction: Callable[..., Any], *arguments: object) -> Any:
        if self.dialect.begin is not None:
            cursor.execute(self.dialect.begin)
        return interaction(Statements(cursor, self.dialect), *arguments)

    def _interactionFailed(self, failure: Failure) -> Failure:
        if not failure.check(*self.dialect.connectionErrors):
            return failure
        if self.ready and self.running:
            self.ready = False
            self._unavailable(failure)
        return Failure(DatabaseUnavailable(f"the state database ({self._where}) is not available"))

    def _migrate(self) -> None:
        self._retrying = None
        migrating = self._pool.runInteraction(self._transaction, migrate)
        migrating.addCallbacks(self._migrated, self._unavailable)
        migrating.addErrback(lambda failure: self.log.failure("Could not open the state database", failure))
        migrating.addBoth(self._release)

    def _release(self, ignored: None) -> None:
        waiting, self._waiting = self._waiting, None
        for interaction in waiting or ():
            interaction.callback(None)

    def _migrated(self, found: int) -> None:
        if not self.running:
            return
        if found != SCHEMA_VERSION:
            self.log.info(
                "Brought the state database ({where}) from schema version {found} to {version}",
                where=self._where,
                found=found,
                version=SCHEMA_VERSION,
            )
        if self._problem is not None:
            self.log.info("The state database ({where}) is available again", where=self._where)
        self._problem = None
        self._retry = RETRY_FIRST
        if not self.ready:
            self.ready = True
            self._tell()

    def _unavailable(self, failure: Failure) -> None:
        if not self.running:
            return
        problem = " ".join((failure.getErrorMessage() or failure.type.__name__).split())
        # Once per problem, not once per attempt.
        if problem != self._problem:
            self.log.error(
                "The state database ({where}) is not available: {problem}; trying again every {seconds:.0f}s at most",
                where=self._where,
                problem=problem,
                seconds=RETRY_LAST,
            )
            self._problem = problem
            self._tell()
        if self._retrying is None:
            self._retrying = self._reactor.callLater(self._retry, self._migrate)
            self._retry = min(self._retry * 2, RETRY_LAST)


def _sqliteSettings(connection: sqlite3.Connection) -> None:
    # Write-ahead logging: readers never wait for the writer; `full`: a
    # committed session or account survives a power cut; a command writing
    # at the same time is waited for, not failed.
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = FULL")
    connection.execute("PRAGMA busy_timeout = 10000")


def sqliteDatabase(stateDir: Path, reactor) -> StateDatabase:
    """
    The state database of a single box: a SQLite file under C{stateDir},
    readable by the daemon's user alone, on one connection (SQLite writes
    one transaction at a time anyway).
    """
    path = stateDir / SQLITE_FILE
    try:
        stateDir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Created private before SQLite opens it: its write-ahead log and
        # index files take the same mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    except OSError as error:
        raise DatabaseUnavailable(f"cannot create {path}: {error.strerror} (check [appliance] state_dir)")
    pool = adbapi.ConnectionPool(
        "sqlite3",
        str(path),
        check_same_thread=False,
        # Transactions are begun by StateDatabase (BEGIN IMMEDIATE), so that
        # a migration's CREATE TABLEs are one transaction too.
        isolation_level=None,
        cp_min=1,
        cp_max=1,
        cp_openfun=_sqliteSettings,
        cp_reactor=reactor,
    )
    return StateDatabase(pool, SQLITE, str(path), reactor)


class _Connection(adbapi.Connection):
    """
    A pooled connection that a failed rollback gives up: the next
    interaction on its thread connects again.  adbapi's own reconnection
    logs a traceback at every failed interaction; the outage is told once,
    by whoever waited for the interaction.
    """

    def rollback(self) -> None:
        try:
            self._connection.rollback()
        except Exception:
            self._pool.disconnect(self._connection)


class _ConnectionPool(adbapi.ConnectionPool):
    connectionFactory = _Connection


def databasePassword(section: DatabaseSection) -> str:
    """
    The password of [database], from its file (one line).

    @raise OSError: if the file cannot be read.
    """
    assert section.password_file is not None
    return readSecret(section.password_file)


def libpqKeywords(section: DatabaseSection, applicationName: str) -> Dict[str, Any]:
    """
    libpq's connection keywords for [database], but for the password: the
    one place that says how the server is reached and verified, for the
    appliance's own connections and for Orthanc's.
    """
    keywords: Dict[str, Any] = {
        "host": section.host,
        "port": section.port,
        "dbname": section.name,
        "user": section.user,
        "sslmode": section.ssl_mode.value,
        "application_name": applicationName,
        # libpq waits for ever on a host that does not answer.
        "connect_timeout": CONNECT_TIMEOUT,
    }
    if section.ssl_mode is DatabaseTLSMode.VERIFY_FULL:
        keywords["sslrootcert"] = str(section.ca_file)
    return keywords


def _postgresqlKeywords(section: DatabaseSection, node: str) -> Dict[str, Any]:
    """
    psycopg's connection keywords for [database] (reads the password file).
    """
    return {**libpqKeywords(section, f"pacs-appliance {node}"), "password": databasePassword(section)}


def postgresqlDatabase(section: DatabaseSection, node: str, reactor) -> StateDatabase:
    """
    The state database of a cluster: PostgreSQL, through psycopg (libpq).
    Reads the password file (before the reactor runs).
    """
    keywords = _postgresqlKeywords(section, node)
    pool = _ConnectionPool(
        "psycopg", cp_min=1, cp_max=POSTGRESQL_CONNECTIONS, cp_noisy=False, cp_reactor=reactor, **keywords
    )
    where = f"PostgreSQL {section.user}@{section.host}:{section.port}/{section.name}"
    return StateDatabase(pool, POSTGRESQL, where, reactor)


def interactOnce(section: DatabaseSection, interaction: Callable[..., Any], *arguments: object) -> Any:
    """
    Run C{interaction(statements, *arguments)} on the PostgreSQL database of
    C{section} in one transaction, the schema brought up to date first, on a
    connection of its own (blocking: for commands, not for the daemon).

    @raise DatabaseUnavailable: if the database cannot be reached.
    """
    import psycopg

    try:
        with psycopg.connect(**_postgresqlKeywords(section, "command")) as connection:
            with connection.cursor() as cursor:
                statements = Statements(cursor, POSTGRESQL)
                migrate(statements)
                return interaction(statements, *arguments)
    except psycopg.OperationalError as error:
        raise DatabaseUnavailable(f"cannot reach the database: {' '.join(str(error).split())}") from None
    except psycopg.Error as error:
        raise DatabaseUnavailable(f"the database refused: {' '.join(str(error).split())}") from None
    except NewerSchema as error:
        raise DatabaseUnavailable(str(error)) from None


def openStateDatabase(config: Config, reactor) -> StateDatabase:
    """
    The state database C{config} names: PostgreSQL if [database] has a host,
    else the SQLite file under state_dir.
    """
    if config.database.host:
        return postgresqlDatabase(config.database, config.appliance.node_name, reactor)
    return sqliteDatabase(config.appliance.state_dir, reactor)
