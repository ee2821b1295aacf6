"""
The login throttle's memory beyond one process: every password check's
outcome is written to the state database, and every node replays the
others' into its own throttle, so that failed logins count across a cluster
and across a restart.

    Authenticator ──LoginEvent──▶ record ──▶ login_events ◀── poll (every second)
                                                               │ the other nodes' events
                                              LoginThrottle ◀──┘ (all of the window's, at start)
"""

from functools import partial
from typing import Dict, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from appliance.state.database import StateDatabase, Statements, ignoreUnavailable
from appliance.web.throttle import LoginEvent, LoginThrottle

#: How often a node reads the others' events: how late a failure elsewhere
#: may count here.
POLL_INTERVAL = 1.0

#: How long after the database recorded an event it is still looked for:
#: PostgreSQL numbers rows when they are written, not when they are
#: committed, so a poll may see a row before an earlier one commits.
SETTLE_TIME = 5.0


class LoginEventFeed:
    """
    Writes the outcomes of this node's password checks (L{record}), and
    applies the other nodes' to C{throttle}: at L{start}, every outcome of
    the last C{window} seconds, this node's too (it has just started); then
    the others' as they come.

    @param node: this node's name, as written beside its events.
    """

    log = Logger()

    def __init__(self, database: StateDatabase, throttle: LoginThrottle, node: str, window: float, clock) -> None:
        self._database = database
        self._throttle = throttle
        self._node = node
        self._window = window
        self._clock = clock
        #: The database's clock at the last poll; L{None} until the window
        #: has been replayed.
        self._cursor: Optional[float] = None
        #: The events seen that a poll may still return, by id.
        self._seen: Dict[int, float] = {}
        self._polling = LoopingCall(self._poll)
        self._polling.clock = clock

    def start(self) -> None:
        self._polling.start(POLL_INTERVAL, now=True).addErrback(
            lambda failure: self.log.failure("Stopped reading other nodes' logins", failure)
        )

    def stop(self) -> None:
        if self._polling.running:
            self._polling.stop()

    def record(self, event: LoginEvent) -> None:
        """
        Write an outcome of this node's, for the others (nobody waits for it:
        a failure is logged).
        """
        # Meanwhile this node counts its own failures only.
        self._database.interact(_insert, self._node, event).addErrback(
            partial(ignoreUnavailable, self.log), "share a login with the other nodes"
        )

    def purge(self) -> Deferred:
        """
        Forget the events older than the window, on every node.
        """
        return self._database.interact(_deleteBefore, self._clock.seconds() - self._window)

    def _poll(self) -> Optional[Deferred]:
        if not self._database.ready:
            return None
        if self._cursor is None:
            reading = self._database.interact(_since, self._clock.seconds() - self._window)
        else:
            reading = self._database.interact(_othersSince, self._node, self._cursor - SETTLE_TIME)
        # A failed poll is logged and the next one tries again.
        return reading.addCallbacks(
            self._apply, partial(ignoreUnavailable, self.log), errbackArgs=("read the other nodes' logins",)
        )

    def _apply(self, polled: Tuple[float, list]) -> None:
        self._cursor, rows = polled
        for eventId, recorded, at, succeeded, name, address, network in rows:
            if eventId not in self._seen:
                self._seen[eventId] = recorded
                self._throttle.apply(LoginEvent(at, bool(succeeded), name, address, network))
        horizon = self._cursor - SETTLE_TIME
        for eventId in [eventId for eventId, recorded in self._seen.items() if recorded < horizon]:
            del self._seen[eventId]


_COLUMNS = "id, recorded, at, succeeded, name, address, network"


def _insert(statements: Statements, node: str, event: LoginEvent) -> None:
    statements.execute(
        "INSERT INTO login_events (recorded, at, node, succeeded, name, address, network)"
        f" VALUES ({statements.dialect.now}, ?, ?, ?, ?, ?, ?)",
        (event.at, node, event.succeeded, event.name, event.address, event.network),
    )


def _now(statements: Statements) -> float:
    return statements.row(f"SELECT {statements.dialect.now}")[0]  # type: ignore[index]


def _since(statements: Statements, at: float) -> Tuple[float, list]:
    """
    The database's clock, and every event (of every node) since C{at}.
    """
    return _now(statements), statements.rows(f"SELECT {_COLUMNS} FROM login_events WHERE at > ? ORDER BY recorded, id", (at,))


def _othersSince(statements: Statements, node: str, recorded: float) -> Tuple[float, list]:
    """
    The database's clock, and the events of other nodes recorded since C{recorded}.
    """
    return _now(statements), statements.rows(
        f"SELECT {_COLUMNS} FROM login_events WHERE recorded > ? AND node <> ? ORDER BY recorded, id",
        (recorded, node),
    )


def _deleteBefore(statements: Statements, at: float) -> None:
    statements.execute("DELETE FROM login_events WHERE at < ?", (at,))
