"""
Turns at Orthanc's HTTP threads: how many exchanges with Orthanc may be
under way at a time, in all and for one account, and who goes next.
"""

from collections import OrderedDict, deque
from typing import Deque, Dict

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.orthanc.settings import ORTHANC_HTTP_THREADS, RESERVED_HTTP_THREADS

#: Exchanges with Orthanc under way at a time, at most.  Each holds one of
#: Orthanc's HTTP threads until its answer ends (a slow reader holds one for
#: its whole transfer), and so does each idle connection of the pool: opening
#: a connection only for an exchange that holds a turn, and giving the turn
#: back only once its connection is back in the pool or being closed, keeps
#: the proxy's connections to Orthanc within this number (give or take those
#: Orthanc has not yet seen close).  The rest of Orthanc's threads stay free
#: for the supervisor's health check.
MAX_ORTHANC_REQUESTS = ORTHANC_HTTP_THREADS - RESERVED_HTTP_THREADS


class OrthancTurns:
    """
    At most C{limit} exchanges with Orthanc at a time, and at most
    C{perAccount} of them for one account; the others wait for their turn.

    A turn that comes free goes to the next account in turn that has a
    request waiting and holds fewer than its share, to that account's
    oldest request: one account's many slow reads (a viewer's whole-study
    retrievals hold a turn for minutes) queue behind its own share, while
    the other accounts' requests go on.

    Waiting is logged once when requests start waiting, and once when none
    waits any more, with how many waited: not once per request.

    L{inUse}, L{waiting} and L{heldBy} are its gauges: what a status page or
    a metric reports.

    @ivar limit: how many exchanges may be under way at a time.
    @ivar perAccount: how many of them one account may hold.
    """

    log = Logger()

    def __init__(self, limit: int, perAccount: int, reactor) -> None:
        self.limit = limit
        self.perAccount = min(perAccount, limit)
        self._reactor = reactor
        self._underWay = 0
        self._held: Dict[str, int] = {}
        # The accounts with requests waiting, in the order they get turns.
        self._queues: "OrderedDict[str, Deque[Deferred]]" = OrderedDict()
        # Since requests started waiting: how many waited, how many gave up
        # their place, and the longest wait.
        self._waited = self._gaveUp = 0
        self._longest = 0.0

    @property
    def inUse(self) -> int:
        """
        How many turns are held: exchanges under way.
        """
        return self._underWay

    @property
    def waiting(self) -> int:
        """
        How many requests wait for their turn.
        """
        return sum(len(queue) for queue in self._queues.values())

    def heldBy(self, account: str) -> int:
        """
        How many turns C{account} holds.
        """
        return self._held.get(account, 0)

    def acquire(self, account: str) -> Deferred:
        """
        A Deferred that fires when it is C{account}'s request's turn (at once
        if it may start now); cancel it to give up one's place.  Whoever got
        a turn must L{release} it.
        """
        if account not in self._queues and self._mayStart(account):
            self._start(account)
            return succeed(None)

        def giveUp(turn: Deferred) -> None:
            queue = self._queues.get(account)
            if queue is not None and turn in queue:
                queue.remove(turn)
                if not queue:
                    del self._queues[account]

        turn: Deferred = Deferred(giveUp)
        self._queues.setdefault(account, deque()).append(turn)
        if not self._waited:
            if self._underWay >= self.limit:
                self.log.warn(
                    "All {limit} connections to Orthanc are in use: requests now wait their turn in the appliance",
                    limit=self.limit,
                )
            else:
                self.log.warn(
                    "The account {account} has its {share} connections to Orthanc in use: its requests now wait"
                    " their turn in the appliance ([web] max_orthanc_requests_per_account)",
                    account=account or "-",
                    share=self.perAccount,
                )
        self._waited += 1
        arrived = self._reactor.seconds()

        def waited(result: object) -> object:
            self._longest = max(self._longest, self._reactor.seconds() - arrived)
            if isinstance(result, Failure):
                self._gaveUp += 1
            if not self._queues:
                self._drained()
            return result

        return turn.addBoth(waited)

    def release(self, account: str) -> None:
        """
        End a turn of C{account}: the next waiting request whose account may
        start gets it.
        """
        self._underWay -= 1
        left = self._held.pop(account, 0) - 1
        if left > 0:
            self._held[account] = left
        started = []
        for waiting in list(self._queues):
            if self._underWay >= self.limit:
                break
            if not self._mayStart(waiting):
                continue
            queue = self._queues.pop(waiting)
            started.append(queue.popleft())
            if queue:
                # Back of the line: the other accounts come first.
                self._queues[waiting] = queue
            self._start(waiting)
        # Fired once the books are straight: an exchange that starts may end,
        # and release its turn, before its callback returns.
        for turn in started:
            turn.callback(None)

    def _mayStart(self, account: str) -> bool:
        return self._underWay < self.limit and self._held.get(account, 0) < self.perAccount

    def _start(self, account: str) -> None:
        self._underWay += 1
        self._held[account] = self._held.get(account, 0) + 1

    def _drained(self) -> None:
        self.log.info(
            "Requests to Orthanc no longer wait for their turn: {waited} waited, the longest {longest:.1f}s;"
            " {gaveUp} of them left or timed out before their turn",
            waited=self._waited,
            longest=self._longest,
            gaveUp=self._gaveUp,
        )
        self._waited = self._gaveUp = 0
        self._longest = 0.0
