"""
Browser sessions: the server's half of the session cookie, kept in the state
database so that they outlive a restart and hold on every node of a cluster.
Each names its account's source; a directory's or a single sign-on's holds
the roles given at login too (see L{SessionOwner}).
"""

import hashlib
import secrets
from dataclasses import dataclass
from functools import partial
from typing import Dict, FrozenSet, List, Optional

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.state.database import StateDatabase, Statements, ignoreUnavailable
from appliance.web.accounts import LOCAL

#: How long a node answers for a session from memory before it reads the
#: table again: how long a logout, or the end of a user's sessions, on
#: another node takes to reach this one.
RECHECK_AFTER = 5.0

#: How often a session in use has its last use written to the table, at
#: most (and at most a quarter of the idle timeout): the other nodes'
#: idle timer is that much behind.
LAST_USE_WRITES = 60.0


@dataclass(frozen=True)
class SessionOwner:
    """
    Whose session it is.
    """

    name: str
    #: One of L{appliance.web.accounts.SOURCES}.
    source: str = LOCAL
    #: The roles the account's source gave at login: L{None} for the
    #: appliance's own accounts, whose roles are looked up at each use.
    roles: Optional[FrozenSet[str]] = None
    #: For a single sign-on session: the ID token, as the provider's logout
    #: asks for it (C{id_token_hint}).
    logoutHint: Optional[str] = None


@dataclass
class _Remembered:
    owner: SessionOwner
    created: float
    lastUsed: float
    #: The last use as the table holds it.
    lastWritten: float
    #: When the table was last read or written for it.
    checked: float


class SessionStore:
    """
    Browser sessions: a random 256-bit token each, ended after
    C{idleTimeout} seconds without use, C{lifetime} seconds after the login,
    at logout, or when the user's account changes.

    Sessions are kept under a hash of their token, so that the table holds
    nothing a client could present.  Each node remembers the sessions it has
    seen for L{RECHECK_AFTER} seconds; while the database is unavailable, it
    goes on answering for those it remembers (and for no other).
    """

    log = Logger()

    def __init__(self, database: StateDatabase, idleTimeout: float, lifetime: float, clock) -> None:
        self._database = database
        self._idleTimeout = idleTimeout
        self._lifetime = lifetime
        self._writeEvery = min(LAST_USE_WRITES, idleTimeout / 4)
        self._clock = clock
        self._remembered: Dict[bytes, _Remembered] = {}
        #: The users whose sessions started up to a time have ended, until
        #: the table no longer holds those (the database may have been
        #: unavailable when their account changed).
        self._usersEnded: Dict[str, float] = {}

    @staticmethod
    def _key(token: bytes) -> bytes:
        return hashlib.sha256(token).digest()

    def create(self, owner: SessionOwner) -> "Deferred[bytes]":
        """
        Start a session for C{owner}; fires with its token (the cookie
        value) once the table holds it, so that any node knows it at once.
        """
        token = secrets.token_urlsafe(32).encode("ascii")
        key, now = self._key(token), self._clock.seconds()
        creating = self._database.interact(_insert, key, owner, now)

        def created(ignored: None) -> bytes:
            self._remembered[key] = _Remembered(owner, now, now, now, self._clock.seconds())
            return token

        return creating.addCallback(created)

    def lookup(self, token: bytes) -> "Deferred[Optional[SessionOwner]]":
        """
        The owner of the live session C{token}, which counts as a use;
        L{None} if there is no such session (any more).
        """
        key, now = self._key(token), self._clock.seconds()
        remembered = self._remembered.get(key)
        if remembered is not None and now - remembered.checked < RECHECK_AFTER:
            return succeed(self._used(key, remembered, now))
        reading = self._database.interact(_select, key)
        reading.addCallbacks(self._read, self._unreadable, (key,), errbackArgs=(key,))
        return reading

    def _read(self, row: Optional[tuple], key: bytes) -> Optional[SessionOwner]:
        now = self._clock.seconds()
        remembered = self._remembered.pop(key, None)
        if row is None:
            return None
        name, created, lastUsed, source, roles, logoutHint = row
        if remembered is not None:
            lastUsed = max(lastUsed, remembered.lastUsed)
        owner = SessionOwner(name, source, _parseRoles(roles), logoutHint)
        return self._used(key, _Remembered(owner, created, lastUsed, row[2], now), now)

    def _unreadable(self, failure: Failure, key: bytes) -> Optional[SessionOwner]:
        ignoreUnavailable(self.log, failure, "read a session from the state database")
        remembered = self._remembered.get(key)
        return self._used(key, remembered, self._clock.seconds(), write=False) if remembered is not None else None

    def _used(self, key: bytes, remembered: _Remembered, now: float, write: bool = True) -> Optional[SessionOwner]:
        owner = remembered.owner
        ended = self._usersEnded.get(owner.name) if owner.source == LOCAL else None
        if self._expired(remembered, now) or (ended is not None and remembered.created <= ended):
            self._forget(key)
            return None
        remembered.lastUsed = now
        self._remembered[key] = remembered
        if write and now - remembered.lastWritten >= self._writeEvery:
            remembered.lastWritten = now
            self._quietly(self._database.interact(_touch, key, now), "note the use of a session")
        return owner

    def end(self, token: bytes) -> "Deferred[Optional[SessionOwner]]":
        """
        End the session C{token}, on every node; fires with its owner
        (L{None} if it had ended already) once the table no longer holds it.
        If the table cannot be told, the session lives on, here as
        elsewhere: the user is told to try again.
        """
        key = self._key(token)

        def ended(owner: Optional[SessionOwner]) -> Optional[SessionOwner]:
            self._remembered.pop(key, None)
            return owner

        return self._database.interact(_delete, key).addCallback(ended)

    def endUsers(self, names: FrozenSet[str]) -> "Deferred[int]":
        """
        End every session of the appliance's own accounts C{names} started
        until now; fires with how many ended.  This node refuses them at
        once, and until the table has forgotten them (L{purge} tries again).
        """
        now = self._clock.seconds()
        for name in names:
            self._usersEnded[name] = now
        for key in [
            key
            for key, remembered in self._remembered.items()
            if remembered.owner.source == LOCAL and remembered.owner.name in names
        ]:
            del self._remembered[key]
        return self._endUsers(sorted(names), now)

    def _endUsers(self, names: List[str], startedBefore: float) -> "Deferred[int]":
        def ended(count: int) -> int:
            for name in names:
                if self._usersEnded.get(name) == startedBefore:
                    del self._usersEnded[name]
            return count

        return self._database.interact(_deleteUsers, names, startedBefore).addCallback(ended)

    def purge(self) -> "Deferred[None]":
        """
        Forget the sessions that have expired, and those of changed users
        that the table still holds.
        """
        now = self._clock.seconds()
        for key in [key for key, remembered in self._remembered.items() if self._expired(remembered, now)]:
            del self._remembered[key]
        purging = [self._database.interact(_deleteExpired, now - self._idleTimeout, now - self._lifetime)]
        purging.extend(self._endUsers([name], before) for name, before in list(self._usersEnded.items()))
        # The first failure, as itself rather than wrapped.
        return gatherResults(purging, consumeErrors=True).addCallbacks(
            lambda ignored: None, lambda failure: failure.value.subFailure
        )

    def count(self) -> "Deferred[int]":
        """
        How many sessions the table holds (expired ones not yet purged
        included).
        """
        return self._database.interact(_count)

    def _forget(self, key: bytes) -> None:
        self._remembered.pop(key, None)
        self._quietly(self._database.interact(_delete, key), "remove an expired session")

    def _quietly(self, writing: Deferred, what: str) -> None:
        # A write nobody waits for: its failure is the journal's.
        writing.addErrback(partial(ignoreUnavailable, self.log), what)

    def _expired(self, session: _Remembered, now: float) -> bool:
        return now - session.lastUsed >= self._idleTimeout or now - session.created >= self._lifetime


def _formatRoles(roles: Optional[FrozenSet[str]]) -> Optional[str]:
    return None if roles is None else ",".join(sorted(roles))


def _parseRoles(text: Optional[str]) -> Optional[FrozenSet[str]]:
    return None if text is None else frozenset(role for role in text.split(",") if role)


def _insert(statements: Statements, key: bytes, owner: SessionOwner, now: float) -> None:
    statements.execute(
        "INSERT INTO sessions (token_hash, account, created, last_used, source, roles, logout_hint)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (key, owner.name, now, now, owner.source, _formatRoles(owner.roles), owner.logoutHint),
    )


def _select(statements: Statements, key: bytes) -> Optional[tuple]:
    return statements.row(
        "SELECT account, created, last_used, source, roles, logout_hint FROM sessions WHERE token_hash = ?", (key,)
    )


def _touch(statements: Statements, key: bytes, now: float) -> None:
    # Never backwards: another node may have written a later use.
    statements.execute("UPDATE sessions SET last_used = ? WHERE token_hash = ? AND last_used < ?", (now, key, now))


def _delete(statements: Statements, key: bytes) -> Optional[SessionOwner]:
    row = statements.row("SELECT account, source, roles, logout_hint FROM sessions WHERE token_hash = ?", (key,))
    statements.execute("DELETE FROM sessions WHERE token_hash = ?", (key,))
    if row is None:
        return None
    name, source, roles, logoutHint = row
    return SessionOwner(name, source, _parseRoles(roles), logoutHint)


def _deleteUsers(statements: Statements, names: List[str], startedBefore: float) -> int:
    return sum(
        statements.execute(
            "DELETE FROM sessions WHERE account = ? AND source = ? AND created <= ?", (name, LOCAL, startedBefore)
        )
        for name in names
    )


def _count(statements: Statements) -> int:
    (count,) = statements.row("SELECT COUNT(*) FROM sessions") or (0,)
    return count


def _deleteExpired(statements: Statements, idleSince: float, createdBefore: float) -> None:
    statements.execute("DELETE FROM sessions WHERE last_used <= ? OR created <= ?", (idleSince, createdBefore))
