"""
Small things done with Deferreds in several places.
"""

from typing import List, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure


def fire(deferred: Deferred, result: object) -> Deferred:
    """
    Fire C{deferred} with C{result}, a value or a L{Failure}; returns it.
    """
    if isinstance(result, Failure):
        deferred.errback(result)
    else:
        deferred.callback(result)
    return deferred


class SharedOutcome:
    """
    The outcome of one Deferred for several callers, each with a Deferred of
    its own (L{follow}).  A caller that cancels its Deferred leaves; the
    shared one is cancelled when the last caller has left.
    """

    def __init__(self, shared: Deferred) -> None:
        self._shared = shared
        self._followers: List[Deferred] = []
        self._outcome: Optional[Tuple[object]] = None
        shared.addBoth(self._fired)

    def follow(self) -> Deferred:
        if self._outcome is not None:
            return fire(Deferred(), self._outcome[0])
        follower: Deferred = Deferred(self._left)
        self._followers.append(follower)
        return follower

    def _left(self, follower: Deferred) -> None:
        self._followers.remove(follower)
        if not self._followers:
            self._shared.cancel()

    def _fired(self, result: object) -> None:
        self._outcome = (result,)
        followers, self._followers = self._followers, []
        for follower in followers:
            fire(follower, result)


def shortDescription(error: BaseException) -> str:
    """
    C{error} in at most a few hundred characters, for one line of the
    journal (some libraries put whole certificates in their messages).
    """
    text = str(error) or error.__class__.__name__
    return text if len(text) <= 300 else text[:300] + "…"
