"""
Failed logins, and how they slow down and refuse further attempts: per user
name, per address, per IPv6 network.
"""

from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, Optional, Tuple

from twisted.logger import Logger

from appliance.connections import NETWORK_SHARE, clientKey, networkKey
from appliance.web.credentials import displayName

def backoff(attempts: int) -> float:
    """
    How long a password check for a user name waits when the name has
    C{attempts} failed (or unfinished) attempts in the window, counted from
    its last failure: nothing for the first two, then 1 s doubling up to 30 s.
    """
    return 0.0 if attempts < 2 else float(min(2 ** (attempts - 2), 30))


#: The longest user name the throttle keeps apart: longer names are counted
#: under their first characters (a name is the attacker's choice).
THROTTLED_NAME_LENGTH = 256


class FailureCounter:
    """
    Failed logins by key, within C{window} seconds, each noted with the
    other half of who failed (the name under an address, the address under a
    name), and the checks under way by key.

    The tables stay small: every failure costs a password check, and at most
    L{MAX_PENDING_CHECKS} run or wait.
    """

    def __init__(self, limit: Optional[int], window: float, clock) -> None:
        #: How many failed or unfinished attempts refuse the key; L{None}: never.
        self.limit = limit
        self._window = window
        self._clock = clock
        self._failures: Dict[object, Deque[Tuple[float, str]]] = {}
        self._checking: Dict[object, int] = {}

    def recent(self, key: object) -> Deque[Tuple[float, str]]:
        failures = self._failures.get(key)
        if failures is None:
            return deque()
        horizon = self._clock.seconds() - self._window
        while failures and failures[0][0] <= horizon:
            failures.popleft()
        if not failures:
            del self._failures[key]
        return failures

    def attempts(self, key: object) -> int:
        return len(self.recent(key)) + self._checking.get(key, 0)

    def refuses(self, key: object) -> bool:
        return self.limit is not None and self.attempts(key) >= self.limit

    def wait(self, key: object) -> float:
        """
        Seconds before C{key} is no longer refused; 0 if it is not.
        """
        if not self.refuses(key):
            return 0.0
        failures = self.recent(key)
        if len(failures) < self.limit:
            # Refused for checks still running: their outcome decides.
            return 1.0
        return max(1.0, failures[-self.limit][0] + self._window - self._clock.seconds())

    def reserve(self, key: object) -> None:
        self._checking[key] = self._checking.get(key, 0) + 1

    def release(self, key: object) -> None:
        left = self._checking.pop(key, 0) - 1
        if left > 0:
            self._checking[key] = left

    def add(self, key: object, other: str, at: float) -> bool:
        """
        Note a failure at time C{at}; whether it makes C{key} refused (not
        whether it was already: other nodes' failures keep arriving).
        """
        before = len(self.recent(key))
        # Only the last `limit` failures decide (the oldest of them, when
        # the refusal ends); a name's are kept for its back-off.
        failures = self._failures.setdefault(key, deque(maxlen=self.limit or BACKOFF_MEMORY))
        # Another node's failures arrive late: they take their place in time.
        position = len(failures)
        while position and failures[position - 1][0] > at:
            position -= 1
        if len(failures) == failures.maxlen:
            if position == 0:
                return False
            failures.popleft()
            position -= 1
        failures.insert(position, (at, other))
        return self.limit is not None and before < self.limit <= len(self.recent(key))

    def forget(self, key: object, other: Optional[str] = None) -> None:
        """
        Forget the failures of C{key}: all, or those noted with C{other}.
        """
        failures = self._failures.get(key)
        if failures is None:
            return
        kept = [failure for failure in failures if other is not None and failure[1] != other]
        if kept:
            self._failures[key] = deque(kept, maxlen=failures.maxlen)
        else:
            del self._failures[key]

    def purge(self) -> None:
        for key in list(self._failures):
            self.recent(key)


#: How many of a name's failures are kept for its back-off (which stops
#: growing long before).
BACKOFF_MEMORY = 16


@dataclass(frozen=True)
class LoginEvent:
    """
    A password check's outcome, as the throttle counts it: what other nodes
    replay into theirs (L{appliance.web.loginevents}).
    """

    at: float
    succeeded: bool
    name: str
    address: str
    #: The IPv6 network of the address, L{None} for IPv4.
    network: Optional[str]


class LoginThrottle:
    """
    Failed logins (login form and HTTP Basic):

      - a user name under attack is slowed wherever the guesses come from:
        after two failures for it, each check waits (L{backoff}), counted
        from its last failure;
      - a user name is refused (429) from an address that has failed
        C{maxFailures} times for it within C{window} seconds, until the
        oldest of those is C{window} seconds old: guesses from elsewhere slow
        the account's owner down, but cannot lock them out;
      - an address that fails C{maxAddressFailures} times within the window,
        whatever the names (password spraying), is refused for every name;
      - an IPv6 address counts with its /64 (see
        L{appliance.connections.networkKey}), which may fail
        L{NETWORK_SHARE} times as often before it is refused: an attacker
        who changes addresses within it is still counted, and one host's
        failures do not refuse its whole network;
      - a successful login forgets that user's failures from that address,
        and nothing else: logging in as oneself clears no guess at another
        account.

    Unfinished attempts count, so that a burst of parallel guesses gets no
    more checks than a slow sequence.  Outcomes on other nodes (and before a
    restart) count as well, once L{apply}'d.
    """

    log = Logger()

    def __init__(self, maxFailures: int, maxAddressFailures: int, window: float, clock) -> None:
        self._window = window
        self._byName = FailureCounter(None, window, clock)
        self._byPair = FailureCounter(maxFailures, window, clock)
        self._byAddress = FailureCounter(maxAddressFailures, window, clock)
        self._byNetwork = FailureCounter(maxAddressFailures * NETWORK_SHARE, window, clock)
        self._clock = clock

    @staticmethod
    def _keys(name: str, client) -> Tuple[str, str, Optional[str], object]:
        """
        The name, the address, its IPv6 network, and the pair (the name with
        the network the address lies in, or the address itself).
        """
        return LoginThrottle._eventKeys(name[:THROTTLED_NAME_LENGTH], clientKey(client), networkKey(client))

    @staticmethod
    def _eventKeys(name: str, address: str, network: Optional[str]) -> Tuple[str, str, Optional[str], object]:
        # Names are counted without regard to case, as a directory matches
        # them: guesses at "Alice" and "ALICE" are guesses at one account.
        name = name.casefold()
        return name, address, network, (name, network or address)

    def attempt(self, name: str, client) -> Optional[float]:
        """
        Reserve a password check for user C{name} from C{client}: L{None} if
        it must wait (see L{retryAfter}), else the seconds to wait before the
        check.  End every reserved check with L{succeeded}, L{failed} or
        L{abandoned}.
        """
        name, address, network, pair = self._keys(name, client)
        if self._byPair.refuses(pair) or self._byAddress.refuses(address):
            return None
        if network is not None and self._byNetwork.refuses(network):
            return None
        attempts = self._byName.attempts(name)
        for counter, key in self._counters(name, address, network, pair):
            counter.reserve(key)
        failures = self._byName.recent(name)
        now = self._clock.seconds()
        last = failures[-1][0] if failures else now
        return max(0.0, last + backoff(attempts) - now)

    def retryAfter(self, name: str, client) -> float:
        """
        Seconds before user C{name} may try to log in again from C{client};
        0 if now.
        """
        name, address, network, pair = self._keys(name, client)
        return max(counter.wait(key) for counter, key in self._counters(name, address, network, pair))

    def succeeded(self, name: str, client) -> LoginEvent:
        """
        End a reserved check that found the password right; returns the
        outcome, for the other nodes.
        """
        return self._ended(True, name, client)

    def failed(self, name: str, client) -> LoginEvent:
        """
        End a reserved check that found no such user or a wrong password;
        returns the outcome, for the other nodes.
        """
        return self._ended(False, name, client)

    def _ended(self, succeeded: bool, name: str, client) -> LoginEvent:
        name, address, network, pair = self._keys(name, client)
        self._release(name, address, network, pair)
        event = LoginEvent(self._clock.seconds(), succeeded, name, address, network)
        self.apply(event)
        return event

    def apply(self, event: LoginEvent) -> None:
        """
        Count an outcome: this node's, or one seen elsewhere (on another
        node, or before a restart).  A refusal it starts is logged on every
        node that counts it.
        """
        name, address, network, pair = self._eventKeys(event.name, event.address, event.network)
        if event.succeeded:
            self._byPair.forget(pair)
            self._byName.forget(name, network or address)
            self._byAddress.forget(address, name)
            if network is not None:
                self._byNetwork.forget(network, name)
            return
        self._byName.add(name, network or address, event.at)
        if self._byPair.add(pair, address, event.at):
            self.log.warn(
                "Refusing logins as {user} from {client} for {seconds:.0f}s: {count} failed logins within {window:.0f}s",
                user=displayName(name),
                client=network or address,
                seconds=self._byPair.wait(pair),
                count=self._byPair.limit,
                window=self._window,
            )
        for counter, key in ((self._byAddress, address), (self._byNetwork, network)):
            if key is not None and counter.add(key, name, event.at):
                self.log.warn(
                    "Refusing logins from {client} for {seconds:.0f}s: {count} failed logins within {window:.0f}s",
                    client=key,
                    seconds=counter.wait(key),
                    count=counter.limit,
                    window=self._window,
                )

    def abandoned(self, name: str, client) -> None:
        """
        A reserved check ended without an answer (an error): it counts for
        nothing.
        """
        self._release(*self._keys(name, client))

    def purge(self) -> None:
        """
        Forget the failures older than the window.
        """
        for counter in (self._byName, self._byPair, self._byAddress, self._byNetwork):
            counter.purge()

    def _counters(self, name: str, address: str, network: Optional[str], pair: object):
        counters = [(self._byName, name), (self._byPair, pair), (self._byAddress, address)]
        if network is not None:
            counters.append((self._byNetwork, network))
        return counters

    def _release(self, name: str, address: str, network: Optional[str], pair: object) -> None:
        for counter, key in self._counters(name, address, network, pair):
            counter.release(key)


def tooManyFailures(seconds: int) -> str:
    """
    What a client refused by the L{LoginThrottle} is told: not which of the
    user name or the address is refused.
    """
    return f"Too many failed logins for this user or from your address: try again in {seconds} seconds."
