"""
Browser sessions: the server's half of the session cookie.
"""

import hashlib
import secrets
from dataclasses import dataclass
from typing import Dict, FrozenSet, Optional

@dataclass
class _Session:
    name: str
    created: float
    lastUsed: float


class SessionStore:
    """
    Browser sessions, in memory: a random 256-bit token each, ended after
    C{idleTimeout} seconds without use, C{lifetime} seconds after the login,
    at logout, or when the user's line in the users file changes.

    Sessions are kept under a hash of their token, so that the table itself
    holds nothing a client could present.  A restart ends every session.
    """

    def __init__(self, idleTimeout: float, lifetime: float, clock) -> None:
        self._idleTimeout = idleTimeout
        self._lifetime = lifetime
        self._clock = clock
        self._sessions: Dict[bytes, _Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    @staticmethod
    def _key(token: bytes) -> bytes:
        return hashlib.sha256(token).digest()

    def create(self, name: str) -> bytes:
        """
        Start a session for user C{name}; returns its token (the cookie value).
        """
        token = secrets.token_urlsafe(32).encode("ascii")
        now = self._clock.seconds()
        self._sessions[self._key(token)] = _Session(name, now, now)
        return token

    def lookup(self, token: bytes) -> Optional[str]:
        """
        The user of the live session C{token}, which counts as a use; L{None}
        if there is no such session (any more).
        """
        key = self._key(token)
        session = self._sessions.get(key)
        if session is None:
            return None
        now = self._clock.seconds()
        if self._expired(session, now):
            del self._sessions[key]
            return None
        session.lastUsed = now
        return session.name

    def end(self, token: bytes) -> None:
        self._sessions.pop(self._key(token), None)

    def endUsers(self, names: FrozenSet[str]) -> int:
        """
        End every session of the users C{names}; returns how many ended.
        """
        ended = [key for key, session in self._sessions.items() if session.name in names]
        for key in ended:
            del self._sessions[key]
        return len(ended)

    def purge(self) -> None:
        """
        Forget the sessions that have expired.
        """
        now = self._clock.seconds()
        for key in [key for key, session in self._sessions.items() if self._expired(session, now)]:
            del self._sessions[key]

    def _expired(self, session: _Session, now: float) -> bool:
        return now - session.lastUsed >= self._idleTimeout or now - session.created >= self._lifetime
