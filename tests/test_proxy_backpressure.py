"""
Backpressure through the whole daemon: a client reading a study of more than
300 MB at a crawl pauses Orthanc's socket instead of making the daemon hold
the difference in memory.  The daemon's resident memory is sampled while the
study streams; its growth must stay under L{RSS_GROWTH_BOUND}, a small fraction
of the study's size.
"""

import base64
import http.client
import os
import socket
import time
import uuid
from io import BytesIO
from pathlib import Path
from typing import List

from pydicom.filewriter import dcmwrite
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.daemon import addUser, startDaemon
from tests.support import ctSeries, temporaryFolder, testConfig
from tests.tlsclients import clientContext

ADMIN = ("admin", "backpressure test password")
AUTHORIZATION = "Basic " + base64.b64encode(f"{ADMIN[0]}:{ADMIN[1]}".encode()).decode()

#: 160 instances of 1024x1024 16-bit pixels: 335 MB of pixel data.
INSTANCES, SIDE = 160, 1024
STUDY_BYTES = INSTANCES * SIDE * SIDE * 2

#: What the daemon may grow by while the whole study streams through it.
RSS_GROWTH_BOUND = 64 * 1024 * 1024

#: The slow client: at most this much a read, and a pause after each one,
#: which caps it near 32 MB/s, far below what Orthanc sends on loopback.
READ_SIZE, READ_PAUSE = 128 * 1024, 0.004


def residentBytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def encodedInstances(studyUID: str) -> List[bytes]:
    """
    The study's instances as DICOM files; random pixels, so that nothing on
    the way can compress them.
    """
    encoded = []
    for instance in ctSeries(INSTANCES, rows=1, columns=1, studyUID=studyUID):
        instance.Rows = instance.Columns = SIDE
        instance.PixelData = os.urandom(SIDE * SIDE * 2)
        stream = BytesIO()
        dcmwrite(stream, instance, enforce_file_format=True)
        encoded.append(stream.getvalue())
    return encoded


def stow(port: int, files: List[bytes]) -> None:
    """
    Upload C{files} with STOW-RS through the appliance, in batches.
    """
    batch = 16
    for start in range(0, len(files), batch):
        boundary = uuid.uuid4().hex
        body = b"".join(
            b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary.encode(), part)
            for part in files[start : start + batch]
        ) + b"--%s--\r\n" % (boundary.encode(),)
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=clientContext(), timeout=120)
        try:
            connection.request(
                "POST",
                "/pacs/studies",
                body=body,
                headers={
                    "Authorization": AUTHORIZATION,
                    "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                    "Accept": "application/dicom+json",
                },
            )
            response = connection.getresponse()
            answer = response.read()
            if response.status != 200:
                raise AssertionError(f"STOW-RS answered {response.status}: {answer[:500]!r}")
        finally:
            connection.close()


def readAtACrawl(port: int, studyUID: str) -> int:
    """
    Retrieve the whole study with a small receive buffer, pausing after every
    read; the number of body bytes read.
    """
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    raw.settimeout(120)
    raw.connect(("127.0.0.1", port))
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=clientContext(), timeout=120)
    connection.sock = clientContext().wrap_socket(raw, server_hostname="localhost")
    try:
        connection.request(
            "GET",
            f"/pacs/studies/{studyUID}",
            headers={"Authorization": AUTHORIZATION, "Accept": 'multipart/related; type="application/dicom"'},
        )
        response = connection.getresponse()
        if response.status != 200:
            raise AssertionError(f"WADO-RS answered {response.status}: {response.read()[:500]!r}")
        total = 0
        while True:
            chunk = response.read(READ_SIZE)
            if not chunk:
                return total
            total += len(chunk)
            # The pause is the slow client being simulated, not a wait for
            # something to happen.
            time.sleep(READ_PAUSE)
    finally:
        connection.close()


class SlowReaderTests(TestCase):
    timeout = 400

    @inlineCallbacks
    def test_memoryStaysFlatForASlowReader(self):
        folder = temporaryFolder(self)
        users = folder / "users"
        addUser(users, ADMIN[0], ADMIN[1], ["admin"])
        config = testConfig(folder, auth={"users_file": users})
        _, process = yield startDaemon(self, config)
        port = config.web.listen_https.port
        studyUID = ctSeries(1)[0].StudyInstanceUID
        files = yield deferToThread(encodedInstances, studyUID)
        yield deferToThread(stow, port, files)
        del files

        baseline = residentBytes(process.pid)
        samples: List[int] = []
        sampler = LoopingCall(lambda: samples.append(residentBytes(process.pid)))
        sampler.clock = reactor
        sampler.start(0.1)
        try:
            received = yield deferToThread(readAtACrawl, port, studyUID)
        finally:
            sampler.stop()

        self.assertGreater(received, STUDY_BYTES)
        growth = max(samples) - baseline
        # The figure the README reports (shown with pytest -s).
        print(
            f"\nslow reader: {received / 1e6:.0f} MB read, daemon RSS {baseline / 1e6:.0f} MB"
            f" before, at most {max(samples) / 1e6:.0f} MB during ({len(samples)} samples)"
        )
        self.assertLess(growth, RSS_GROWTH_BOUND, f"the daemon grew by {growth / 1e6:.0f} MB")
