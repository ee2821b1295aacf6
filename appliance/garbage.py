"""
Python's cyclic garbage collector, run after connections close.

A closed connection's objects (its TCP transport, TLS layer, HTTP channel,
request, and the proxy's exchange with Orthanc) refer to each other, so only
the cyclic collector frees them, and with them the bytes they hold: the data
that was still waiting for a client that left in the middle of a transfer
(about 150 KB a connection, measured).  CPython runs a full collection only
once the objects that survived the earlier ones have grown by a quarter: the
daemon kept about 45 MB for every 300 such connections, for minutes, and its
memory grew round after round in the benchmark's soak (bench/results/soak).

So a full collection runs once L{COLLECT_AFTER} connections have closed, at
most every L{MIN_INTERVAL} seconds; and what the start built (modules,
configuration) is frozen out of the collector's sight once the daemon runs
(C{gc.freeze}), so that a collection costs about a millisecond instead of
40 ms (measured on the benchmark's daemon).
"""

import gc
import time
from typing import Callable

from twisted.application.service import Service
from twisted.logger import Logger

#: How many closed connections make a collection worth its cost.
COLLECT_AFTER = 20

#: The least time between two collections, in seconds.
MIN_INTERVAL = 2.0


class CollectAfterClosing(Service):
    """
    Runs C{collect} (a full collection) after connections close; see the
    module's docstring.  L{closed} is what the listeners call.
    """

    log = Logger()

    def __init__(self, reactor, collect: Callable[[], int] = gc.collect, freeze: Callable[[], None] = gc.freeze) -> None:
        self._reactor = reactor
        self._collect = collect
        self._freeze = freeze
        self._closed = 0
        self._last = float("-inf")
        self._pending = None

    def startService(self) -> None:
        Service.startService(self)
        # The start's objects live as long as the daemon: collected once,
        # then left out of every later collection.
        self._collect()
        self._freeze()

    def stopService(self) -> None:
        Service.stopService(self)
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None

    def closed(self) -> None:
        """
        A connection has closed.
        """
        self._closed += 1
        if self._closed < COLLECT_AFTER or self._pending is not None or not self.running:
            return
        wait = max(0.0, self._last + MIN_INTERVAL - self._reactor.seconds())
        self._pending = self._reactor.callLater(wait, self._run)

    def _run(self) -> None:
        self._pending = None
        self._closed = 0
        self._last = self._reactor.seconds()
        started = time.perf_counter()
        found = self._collect()
        self.log.debug(
            "Collected {found} objects of closed connections in {ms:.1f} ms",
            found=found,
            ms=(time.perf_counter() - started) * 1000,
        )
