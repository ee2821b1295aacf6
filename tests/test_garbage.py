"""
Full garbage collections after connections close (appliance.garbage); that
they keep the daemon's memory level is shown by the benchmark's soak
(bench/run --only scale-soak).
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from appliance.garbage import COLLECT_AFTER, MIN_INTERVAL, CollectAfterClosing


class CollectAfterClosingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.calls = []
        self.collector = CollectAfterClosing(
            self.clock, collect=lambda: self.calls.append("collect") or 0, freeze=lambda: self.calls.append("freeze")
        )
        self.collector.startService()
        self.addCleanup(self.collector.stopService)

    def close(self, count: int) -> None:
        for _ in range(count):
            self.collector.closed()

    def test_theStartIsCollectedThenFrozen(self) -> None:
        self.assertEqual(self.calls, ["collect", "freeze"])

    def test_collectedOnceEnoughConnectionsClosed(self) -> None:
        del self.calls[:]
        self.close(COLLECT_AFTER - 1)
        self.clock.advance(0)
        self.assertEqual(self.calls, [])
        self.close(COLLECT_AFTER)
        self.clock.advance(0)
        self.assertEqual(self.calls, ["collect"])

    def test_atMostEveryInterval(self) -> None:
        del self.calls[:]
        self.close(COLLECT_AFTER)
        self.clock.advance(0)
        self.close(COLLECT_AFTER * 3)
        self.clock.advance(MIN_INTERVAL - 0.1)
        self.assertEqual(self.calls, ["collect"])
        self.clock.advance(0.1)
        self.assertEqual(self.calls, ["collect", "collect"])

    def test_nothingAfterStopping(self) -> None:
        del self.calls[:]
        self.close(COLLECT_AFTER)
        self.collector.stopService()
        self.clock.advance(MIN_INTERVAL)
        self.assertEqual(self.calls, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
