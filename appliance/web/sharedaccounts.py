"""
User accounts kept in the shared PostgreSQL database, for a cluster: what
C{pacs-appliance passwd --config} writes on one node is in force on every
node within L{CHECK_INTERVAL} seconds.

    pacs-appliance passwd ──▶ accounts table ◀── every node reads it again every 2 s
                                                   │ the names that changed or went
                                Authenticator ◀────┘ (their sessions end)
"""

from typing import Dict, FrozenSet, List, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.state.database import StateDatabase, Statements, ignoreUnavailable
from appliance.web.users import AccountEntries, UserEntry, formatRoles, parseLine

#: How often each node reads the accounts again: how long a change made on
#: another node (or by the command) takes to be in force here.
CHECK_INTERVAL = 2.0


class DatabaseAccounts(Service, AccountEntries):
    """
    The accounts of the state database's C{accounts} table, read when the
    service starts and every L{CHECK_INTERVAL} seconds after.  A row that is
    not a valid account is skipped with one log line; while the database
    cannot be read, the accounts read before stay in force.
    """

    log = Logger()

    def __init__(self, database: StateDatabase, reactor) -> None:
        AccountEntries.__init__(self)
        self._database = database
        self._skipped: FrozenSet[str] = frozenset()
        #: Whether the table has been read once.
        self._everRead = False
        self._checking = LoopingCall(self.check)
        self._checking.clock = reactor

    def startService(self) -> None:
        Service.startService(self)
        self._checking.start(CHECK_INTERVAL, now=True).addErrback(
            lambda failure: self.log.failure("Stopped reading the accounts", failure)
        )

    def stopService(self) -> None:
        Service.stopService(self)
        if self._checking.running:
            self._checking.stop()

    def reload(self) -> None:
        """
        Read the accounts again now (SIGHUP).
        """
        self.check()

    def check(self) -> Deferred:
        """
        Read the accounts again.
        """
        reading = self._database.interact(readAccounts)
        return reading.addCallbacks(self._read, self._unread)

    def _unread(self, failure: Failure) -> None:
        ignoreUnavailable(self.log, failure, "read the accounts")

    def _read(self, rows: List[tuple]) -> None:
        users: Dict[str, UserEntry] = {}
        skipped = set()
        for name, passwordHash, roles in rows:
            try:
                entry = parseLine(f"{name}:{passwordHash}:{roles}")
            except ValueError as error:
                skipped.add(name)
                if name not in self._skipped:
                    self.log.error("Skipped the account {user} of the database: {problem}", user=name, problem=str(error))
                continue
            if entry is not None:
                users[entry.name] = entry
        self._skipped = frozenset(skipped)
        added = users.keys() - self._users.keys()
        if not users and not self._users and not self._everRead:
            self.log.warn(
                "The database holds no account: nobody can log in. Create the first administrator"
                " with: pacs-appliance passwd admin --roles admin"
            )
        self._everRead = True
        if self._replace(users) or added:
            self.log.info("Read {count} accounts from the database", count=len(users))


def readAccounts(statements: Statements) -> List[tuple]:
    return statements.rows("SELECT name, password_hash, roles FROM accounts ORDER BY name")


def writeAccount(statements: Statements, entry: UserEntry, now: float) -> bool:
    """
    Add or change an account; whether it replaced one.
    """
    replaced = statements.row("SELECT 1 FROM accounts WHERE name = ?", (entry.name,)) is not None
    statements.execute(
        "INSERT INTO accounts (name, password_hash, roles, changed) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (name) DO UPDATE SET password_hash = excluded.password_hash, roles = excluded.roles,"
        " changed = excluded.changed",
        (entry.name, entry.passwordHash, formatRoles(entry.roles), now),
    )
    return replaced


def removeAccount(statements: Statements, name: str) -> bool:
    """
    Remove an account; whether there was one.
    """
    return statements.execute("DELETE FROM accounts WHERE name = ?", (name,)) > 0


def findAccount(statements: Statements, name: str) -> Optional[UserEntry]:
    row = statements.row("SELECT name, password_hash, roles FROM accounts WHERE name = ?", (name,))
    return None if row is None else parseLine(":".join(row))
