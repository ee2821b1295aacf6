"""
Orthanc's HTTP threads held by slow readers, with the real Orthanc from
Debian behind the appliance's site: the proxy keeps to its limit of exchanges
(here two, and Orthanc has one HTTP thread more, for the supervisor), a third
request waits its turn in the appliance and is answered once a reader leaves,
and meanwhile the supervisor's health check goes on being answered: Orthanc
is never restarted under the transfers.
"""

import json
import socket
import threading
from typing import List

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher

from appliance.orthanc.probe import DicomEchoProbe, RestProbe
from appliance.orthanc.state import OrthancState
from appliance.orthanc.supervisor import OrthancSupervisor
from tests.support import realSupervisor
from tests.webclients import DICOM_JSON, VIEWER, ProxyToOrthancCase

#: The proxy's limit in this test, and Orthanc's HTTP threads: one more, the
#: fewest that leave the supervisor's health check a thread of its own.
LIMIT = 2
ORTHANC_THREADS = LIMIT + 1

#: How long a wait on the appliance may last before the test gives up.
WAIT = 30


class CountingProbe:
    """
    The supervisor's REST health check, telling the test of every answer.
    """

    def __init__(self, probe: RestProbe) -> None:
        self._probe = probe
        self.answered = 0
        self._waiting: List[tuple] = []

    def __call__(self, credentials) -> Deferred:
        return self._probe(credentials).addCallback(self._answered)

    def _answered(self, result: object) -> object:
        self.answered += 1
        for entry in [entry for entry in self._waiting if entry[0] <= self.answered]:
            self._waiting.remove(entry)
            entry[1].callback(self.answered)
        return result

    def whenAnswered(self, count: int) -> Deferred:
        """
        A Deferred that fires once C{count} checks have been answered.
        """
        waiter: Deferred = Deferred()
        if self.answered >= count:
            waiter.callback(self.answered)
        else:
            self._waiting.append((count, waiter))
        return waiter


class SlowReaderCase(ProxyToOrthancCase):
    """
    Readers that stop reading in the middle of a whole study, each holding
    one of Orthanc's threads, in front of an Orthanc with L{ORTHANC_THREADS}.
    """

    maxRequests = LIMIT
    # A health check every half second, and one that goes unanswered is
    # enough for the supervisor to restart Orthanc.
    orthancSettings = {"health_interval": "0.5s", "health_timeout": "5s", "unresponsive_after": "1"}

    def buildSupervisor(self) -> OrthancSupervisor:
        settings = self.config.orthanc
        self.probe = CountingProbe(RestProbe(reactor, settings.http_port, settings.health_timeout))
        echo = DicomEchoProbe(reactor, settings.dicom_port, settings.aet, settings.health_timeout)
        return realSupervisor(self.config, probe=self.probe, echoProbe=echo, httpThreads=ORTHANC_THREADS)

    def startReader(self, path: str):
        """
        A client that retrieves C{path} and stops reading after its first
        bytes, until told to leave: (started, leave, the thread's Deferred).
        """
        started, leave = threading.Event(), threading.Event()

        def read() -> bytes:
            raw = socket.socket()
            # A small window, so that Orthanc is soon held back.
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            raw.settimeout(WAIT)
            raw.connect(("127.0.0.1", self.port))
            with self.context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                received = self.startStudyDownload(tls, path)
                started.set()
                # Longer than any wait of the test: it ends first, and its
                # cleanup tells the reader to leave.
                self.assertTrue(leave.wait(4 * WAIT))
                return received.partition(b"\r\n")[0]

        reading = deferToThread(read)

        def leaveAtTheEnd() -> Deferred:
            # However the test ends, the reader goes.
            leave.set()
            return reading

        self.addCleanup(leaveAtTheEnd)
        return started, leave, reading


class SlowReaderTurnTests(SlowReaderCase):
    async def test_requestWaitsForItsTurnWhileHealthChecksGoOn(self):
        # Each transfer of it holds one of Orthanc's threads.
        big = await self.storeLargeStudy()
        pid = self.supervisor.pid
        events: List[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        saturated: Deferred = Deferred()

        def noteSaturation(event: dict) -> None:
            if "wait their turn" in event.get("log_format", "") and not saturated.called:
                saturated.callback(None)

        globalLogPublisher.addObserver(noteSaturation)
        self.addCleanup(globalLogPublisher.removeObserver, noteSaturation)

        path = f"/pacs/studies/{big[0].StudyInstanceUID}"
        readers = [self.startReader(path) for _ in range(LIMIT)]
        for started, _, _ in readers:
            self.assertTrue(await deferToThread(started.wait, WAIT))
        self.assertEqual(self.proxy.turns.inUse, LIMIT)

        # A small search, behind the slow readers.
        searching = self.fetch(f"/pacs/studies?PatientID={big[0].PatientID}", headers={"Accept": DICOM_JSON})
        await saturated.addTimeout(WAIT, reactor)
        self.assertEqual(self.proxy.turns.waiting, 1)

        # The supervisor's health check is answered while the search waits.
        await self.probe.whenAnswered(self.probe.answered + 2).addTimeout(WAIT, reactor)
        self.assertFalse(searching.called)
        self.assertEqual((self.supervisor.state, self.supervisor.pid), (OrthancState.READY, pid))

        # One reader leaves: the search has its turn.
        readers[0][1].set()
        status, _, body = await searching.addTimeout(WAIT, reactor)
        self.assertEqual(status, 200, body[:300])
        self.assertEqual([study["0020000D"]["Value"] for study in json.loads(body)], [[big[0].StudyInstanceUID]])
        readers[1][1].set()
        for _, _, reading in readers:
            self.assertEqual(await reading, b"HTTP/1.1 200 OK")

        self.assertEqual((self.supervisor.state, self.supervisor.pid), (OrthancState.READY, pid))
        logged = [formatEvent(event) for event in events]
        self.assertEqual([line for line in logged if "health check" in line], [])
        self.assertEqual(len([line for line in logged if "no longer wait for their turn: 1 waited" in line]), 1)


class AccountShareTests(SlowReaderCase):
    """
    One account may hold one turn of the two here: its second slow reader
    waits behind its share while turns are free, and another account's
    search is answered meanwhile (the outside review saw one viewer hold all
    96 turns until everyone else got 504).
    """

    webSettings = {"max_orthanc_requests_per_account": "1"}

    async def test_anotherUserServedWhileOneAccountHoldsItsShare(self):
        big = await self.storeLargeStudy()
        path = f"/pacs/studies/{big[0].StudyInstanceUID}"
        started, leave, first = self.startReader(path)
        self.assertTrue(await deferToThread(started.wait, WAIT))
        secondStarted, _, second = self.startReader(path)
        deadline = reactor.seconds() + WAIT
        while self.proxy.turns.waiting != 1 and reactor.seconds() < deadline:
            await deferLater(reactor, 0.05, lambda: None)
        # Turns are held per account, as the access log names it (source:name).
        account = "local:" + self.user[0]
        self.assertEqual((self.proxy.turns.inUse, self.proxy.turns.heldBy(account), self.proxy.turns.waiting), (1, 1, 1))

        # Another account's search goes through the free turn at once.
        status, _, body = await self.fetch(
            f"/pacs/studies?PatientID={big[0].PatientID}", headers={"Accept": DICOM_JSON}, user=VIEWER
        ).addTimeout(WAIT, reactor)
        self.assertEqual(status, 200, body[:300])
        self.assertFalse(secondStarted.is_set())

        # The account's first reader leaves: its second has its turn.
        leave.set()
        self.assertEqual(await first, b"HTTP/1.1 200 OK")
        self.assertTrue(await deferToThread(secondStarted.wait, WAIT))
        self.assertEqual(self.proxy.turns.heldBy(account), 1)
