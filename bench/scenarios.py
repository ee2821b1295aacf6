"""
The scenarios: each measures one thing against three targets, the appliance,
nginx as the OHIF recipe runs it, and the limit (Orthanc directly over HTTP on
loopback, the file system, or the discarding SCP directly), with the same
client and the same requests.

Each C{measure(target)} returns the scenario's metrics for one run; the runner
(L{bench.__main__}) calls it for every target in turn, in an order that
rotates at every repetition.
"""

import asyncio
import json
import os
import sqlite3
import ssl
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from bench import clients
from bench.data import Dataset, OrthancRest
from appliance.state.database import SQLITE_FILE
from bench.servers import CHECKOUT, residentBytes
from tests.browser import CANVAS_PIXELS

APPLIANCE, NGINX, LIMIT = "appliance", "nginx", "limit"
TARGETS = (APPLIANCE, NGINX, LIMIT)

DICOM_JSON = {"Accept": "application/dicom+json"}
WHOLE_STUDY = {"Accept": 'multipart/related; type="application/dicom"'}
FRAMES = {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}


@dataclass
class Target:
    """
    Where and how a client reaches one of the three.
    """

    name: str
    #: The HTTP base URL (https for the appliance and nginx, Orthanc's http for the limit).
    base: str
    #: The Authorization header the HTTP clients send.
    authorization: str
    #: DICOM ports: to Orthanc, and to the discarding SCP; TLS or not.
    dicomToOrthanc: int
    dicomToSink: int
    dicomTLS: bool
    #: The processes whose memory the scale scenarios sample.
    pids: Callable[[], List[int]] = field(default=lambda: [])
    #: The appliance's forwarder to the discarding SCP runs in a process of its own.
    forwarderPid: Optional[int] = None

    def profiledPid(self, scenario: "Scenario") -> int:
        """
        The process that serves C{scenario}'s requests here.
        """
        if scenario.throughSinkForwarder and self.forwarderPid is not None:
            return self.forwarderPid
        return self.pids()[0]

    def headers(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        return dict({"Authorization": self.authorization}, **(extra or {}))


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    #: "higher" or "lower": which is better.
    better: str
    #: Multiplies the measured value (in base units: bytes, seconds) into C{unit}.
    scale: float = 1.0


@dataclass
class Settings:
    """
    What a run is allowed: durations and counts (smaller in smoke mode).
    """

    seconds: float
    smoke: bool
    work: Path
    ohifRoot: Path
    #: The servers' certificate, which the browser is told to trust.
    certificate: Path


class Scenario:
    """
    One row group of the table.
    """

    name = ""
    description = ""
    client = ""
    metrics: List[Metric] = []
    #: Scale scenarios have no limit to compare with.
    hasLimit = True
    #: What only the appliance has (its metrics page) has no nginx either.
    applianceOnly = False
    #: The appliance's side is its forwarder to the discarding SCP, not the daemon.
    throughSinkForwarder = False
    #: Fewer repetitions than the run's, for a scenario that is long by itself.
    repetitionsAtMost: Optional[int] = None

    def __init__(self, dataset: Dataset, settings: Settings, orthanc: OrthancRest) -> None:
        self.dataset = dataset
        self.settings = settings
        self.orthanc = orthanc

    def measure(self, target: Target) -> Dict[str, float]:
        raise NotImplementedError

    def after(self) -> None:
        """
        Run after every measurement (outside of it).
        """


MB = 1e-6
MS = 1e3


def largestBundle(root: Path) -> Path:
    return max(root.glob("*.js"), key=lambda path: path.stat().st_size)


def smallBundle(root: Path) -> Path:
    """
    The smallest content-hashed script of the build of at least 2 KB.
    """
    return min(
        (path for path in root.glob("*.bundle.*.js") if path.stat().st_size >= 2048),
        key=lambda path: path.stat().st_size,
    )


class StaticLarge(Scenario):
    name = "static-large"
    client = "wrk -t1 -c1 (keep-alive, no Accept-Encoding); limit: read() of the file from the page cache"
    metrics = [Metric("bytes_per_second", "largest bundle", "MB/s", "higher", MB)]

    def __init__(self, *arguments) -> None:
        super().__init__(*arguments)
        self.file = largestBundle(self.settings.ohifRoot)
        self.description = f"GET /{self.file.name} ({self.file.stat().st_size / 1e6:.1f} MB) in a loop over one connection"

    def measure(self, target: Target) -> Dict[str, float]:
        if target.name == LIMIT:
            return clients.readFile(self.file, self.settings.seconds)
        return clients.wrk(
            f"{target.base}/{self.file.name}", seconds=self.settings.seconds, connections=1, headers=target.headers()
        )


class StaticSmall(Scenario):
    name = "static-small"
    client = "wrk -t1 -c16 (keep-alive); limit: open/read/close of the file"
    metrics = [
        Metric("requests_per_second", "small file", "req/s", "higher"),
        Metric("p50", "small file p50", "ms", "lower", MS),
        Metric("p99", "small file p99", "ms", "lower", MS),
    ]

    def __init__(self, *arguments) -> None:
        super().__init__(*arguments)
        self.file = smallBundle(self.settings.ohifRoot)
        self.description = f"GET /{self.file.name} ({self.file.stat().st_size} bytes), 16 connections"

    def measure(self, target: Target) -> Dict[str, float]:
        if target.name == LIMIT:
            return clients.openReadClose(self.file, self.settings.seconds)
        return clients.wrk(
            f"{target.base}/{self.file.name}", seconds=self.settings.seconds, connections=16, headers=target.headers()
        )


class Qido(Scenario):
    name = "qido"
    client = "wrk -t1 -c4 (keep-alive)"
    metrics = [
        Metric("requests_per_second", "QIDO study search", "req/s", "higher"),
        Metric("p99", "QIDO p99", "ms", "lower", MS),
    ]
    description = "GET /pacs/studies?PatientID=BENCH*&includefield=all, 4 connections"

    def measure(self, target: Target) -> Dict[str, float]:
        return clients.wrk(
            f"{target.base}/pacs/studies?PatientID=BENCH*&includefield=all",
            seconds=self.settings.seconds,
            connections=4,
            headers=target.headers(DICOM_JSON),
        )


class Metadata(Scenario):
    """
    What OHIF asks for to open a study, once the appliance has cached it
    (the cache is filled before the first measurement: asked once, then
    waited for in the state database).
    """

    name = "metadata"
    client = "curl, 5 requests over one connection, median"
    metrics = [Metric("seconds", "study metadata", "ms", "lower", MS)]

    def __init__(self, *arguments) -> None:
        super().__init__(*arguments)
        series = self.dataset.regular[0]
        self.path = f"/pacs/studies/{series.studyUID}/metadata"
        self.resource = series.studyUID
        self.description = f"GET /pacs/studies/UID/metadata of a {len(series.files)}-instance study, cached"
        self.cached = False

    def measure(self, target: Target) -> Dict[str, float]:
        if target.name == APPLIANCE and not self.cached:
            self.fillCache(target)
        answers = clients.curl([target.base + self.path] * 5, headers=target.headers(DICOM_JSON))
        return {"seconds": statistics.median(answer["seconds"] for answer in answers)}

    def fillCache(self, target: Target) -> None:
        waitUntilCached(self.settings, target, [self.path], [self.resource])
        self.cached = True


class SeriesMetadata(Metadata):
    name = "metadata-series"
    metrics = [Metric("seconds", "series metadata", "ms", "lower", MS)]

    def __init__(self, *arguments) -> None:
        super().__init__(*arguments)
        large = self.dataset.large
        self.path = f"/pacs/studies/{large.studyUID}/series/{large.seriesUID}/metadata"
        self.resource = f"{large.studyUID}/{large.seriesUID}"
        self.description = f"GET /pacs/studies/UID/series/UID/metadata of a {len(large.files)}-instance series, cached"


#: How long the metadata scenarios wait for the appliance to cache their
#: answer: the series must first be stable ([orthanc] stable_age).
CACHE_TIMEOUT = 300.0


def waitUntilCached(settings: Settings, target: Target, paths: List[str], resources: List[str]) -> None:
    """
    Ask the appliance for the metadata at C{paths} (which has it build what
    is stable and missing), then wait until its cache holds C{resources}.
    """
    clients.curl([target.base + path for path in paths], headers=target.headers(DICOM_JSON))
    database = settings.work / "state" / SQLITE_FILE
    deadline = time.monotonic() + CACHE_TIMEOUT
    while not all(cachedEntry(database, resource) for resource in resources):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the appliance did not cache {', '.join(paths)} within {CACHE_TIMEOUT:.0f}s")
        time.sleep(0.2)


def cachedEntry(database: Path, resource: str) -> bool:
    """
    Whether the appliance's state database (read-only) holds the metadata
    cache's entry of C{resource}.
    """
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        return connection.execute("SELECT 1 FROM metadata_cache WHERE resource = ?", (resource,)).fetchone() is not None
    finally:
        connection.close()


class WadoStudy(Scenario):
    name = "wado-study"
    client = "curl, transfers one after the other over one connection"
    metrics = [Metric("bytes_per_second", "whole-study WADO-RS", "MB/s", "higher", MB)]

    def __init__(self, *arguments) -> None:
        super().__init__(*arguments)
        large = self.dataset.large
        self.path = f"/pacs/studies/{large.studyUID}"
        self.transfers = 1 if self.settings.smoke else 4
        self.description = (
            f"GET /pacs/studies/UID, multipart/related, {len(large.files)} instances, {large.bytes / 1e6:.0f} MB;"
            f" {self.transfers} transfers in a row over one connection"
        )

    def measure(self, target: Target) -> Dict[str, float]:
        # One transfer takes well under a second here: a few in a row, over
        # one connection, make a measurement that noise does not dominate.
        answers = clients.curl([target.base + self.path] * self.transfers, headers=target.headers(WHOLE_STUDY))
        return {"bytes_per_second": sum(a["bytes"] for a in answers) / sum(a["seconds"] for a in answers)}


class Frames(Scenario):
    name = "frames"
    client = "wrk -t1 -c16 with a Lua script cycling through the frame URLs"
    metrics = [Metric("requests_per_second", "frames, 16 clients", "frames/s", "higher")]

    def __init__(self, *arguments) -> None:
        super().__init__(*arguments)
        paths = [path for series in self.dataset.regular for path in series.framePaths()]
        self.script = clients.frameScript(self.settings.work / "wrk", paths)
        self.description = (
            f"GET .../frames/1 of {len(paths)} instances ({self.dataset.regular[0].files[0].stat().st_size // 1024} KB"
            " each) in turn, 16 connections"
        )

    def measure(self, target: Target) -> Dict[str, float]:
        return clients.wrk(
            target.base + "/",
            seconds=self.settings.seconds,
            connections=16,
            headers=target.headers(FRAMES),
            script=self.script,
        )


class Stow(Scenario):
    name = "stow"
    client = "curl --data-binary of a prepared multipart body"
    metrics = [Metric("bytes_per_second", "STOW-RS upload", "MB/s", "higher", MB)]

    def __init__(self, *arguments) -> None:
        super().__init__(*arguments)
        upload = self.dataset.upload
        self.description = (
            f"POST /pacs/studies, {len(upload.files)} instances, {self.dataset.stowBody.stat().st_size / 1e6:.0f} MB;"
            " the study is deleted after each run, so each stores new instances"
        )

    def measure(self, target: Target) -> Dict[str, float]:
        [answer] = clients.curl(
            [target.base + "/pacs/studies"],
            headers=target.headers(
                {
                    "Content-Type": f'multipart/related; type="application/dicom"; boundary={self.dataset.stowBoundary}',
                    "Accept": "application/dicom+json",
                }
            ),
            upload=self.dataset.stowBody,
        )
        return {"bytes_per_second": answer["bytes"] / answer["seconds"]}

    def after(self) -> None:
        self.orthanc.deleteStudy(self.dataset.upload.studyUID)


def runDicomClient(*arguments: str, timeout: float = 600) -> Dict[str, float]:
    """
    Run the pynetdicom client of L{bench.dicom} in its own process.
    """
    result = subprocess.run(
        [sys.executable, "-m", "bench.dicom", *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=CHECKOUT,
        env=dict(os.environ, PYTHONPATH=str(CHECKOUT)),
    )
    if result.returncode != 0:
        raise clients.ClientError(f"the DICOM client failed: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


class DicomStore(Scenario):
    """
    C-STORE of the upload series over one association, through each
    forwarder into the discarding SCP (or, as a second row, into Orthanc).
    """

    name = "dicom-store-sink"
    client = "pynetdicom store SCU (own process), one association; limit: plain DICOM straight to the SCP"
    metrics = [
        Metric("bytes_per_second", "C-STORE into a discarding SCP", "MB/s", "higher", MB),
        Metric("instances_per_second", "C-STORE into a discarding SCP", "instances/s", "higher"),
    ]
    intoOrthanc = False
    throughSinkForwarder = True

    def __init__(self, *arguments) -> None:
        super().__init__(*arguments)
        upload = self.dataset.upload
        where = "Orthanc (the study is deleted after each run)" if self.intoOrthanc else "the discarding SCP"
        self.description = f"C-STORE of {len(upload.files)} instances ({upload.bytes / 1e6:.0f} MB) over DICOM TLS into {where}"

    def measure(self, target: Target) -> Dict[str, float]:
        port = target.dicomToOrthanc if self.intoOrthanc else target.dicomToSink
        result = runDicomClient("store", str(port), "tls" if target.dicomTLS else "plain", *map(str, self.dataset.upload.files))
        if result["failures"]:
            raise clients.ClientError(f"{result['failures']} C-STOREs failed through {target.name}")
        return {
            "bytes_per_second": result["bytes"] / result["seconds"],
            "instances_per_second": result["instances"] / result["seconds"],
        }

    def after(self) -> None:
        if self.intoOrthanc:
            self.orthanc.deleteStudy(self.dataset.upload.studyUID)


class DicomStoreOrthanc(DicomStore):
    name = "dicom-store-orthanc"
    client = "pynetdicom store SCU (own process), one association; limit: plain DICOM straight to Orthanc"
    metrics = [
        Metric("bytes_per_second", "C-STORE into Orthanc", "MB/s", "higher", MB),
        Metric("instances_per_second", "C-STORE into Orthanc", "instances/s", "higher"),
    ]
    intoOrthanc = True
    throughSinkForwarder = False


class DicomAssociations(Scenario):
    name = "dicom-associations"
    client = "pynetdicom SCU (own process): associate + release in a loop; limit: plain DICOM straight to the SCP"
    metrics = [Metric("associations_per_second", "association set-up", "assoc/s", "higher")]
    description = "A-ASSOCIATE + A-RELEASE in a loop, one at a time (TLS handshake each), into the discarding SCP"
    throughSinkForwarder = True

    def measure(self, target: Target) -> Dict[str, float]:
        result = runDicomClient("associate", str(target.dicomToSink), "tls" if target.dicomTLS else "plain", str(self.settings.seconds))
        return {"associations_per_second": result["associations"] / result["seconds"]}


def _tlsContext() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class MemorySampler:
    """
    Samples the summed resident memory of some processes in a thread until stopped.
    """

    def __init__(self, pids: Callable[[], List[int]], interval: float = 0.1) -> None:
        self._pids = pids
        self._interval = interval
        self._stop = threading.Event()
        self.samples: List[int] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        return sum(residentBytes(pid) for pid in self._pids())

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.samples.append(self.now())

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exception) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(self.now())


class IdleConnections(Scenario):
    name = "scale-idle"
    hasLimit = False
    client = "asyncio TLS clients in the benchmark process: one GET each, then idle"

    def __init__(self, *arguments) -> None:
        super().__init__(*arguments)
        self.count = 20 if self.settings.smoke else 1000
        self.file = smallBundle(self.settings.ohifRoot)
        self.description = (
            f"{self.count} keep-alive HTTPS connections, each after one GET /{self.file.name}, held idle;"
            " RSS of the daemon (appliance) or of nginx's master and workers"
        )
        self.metrics = [
            Metric("before", "RSS before the idle connections", "MB", "lower", MB),
            Metric("rss", f"RSS with {self.count} idle connections", "MB", "lower", MB),
        ]

    def measure(self, target: Target) -> Dict[str, float]:
        return asyncio.run(self._hold(target))

    async def _hold(self, target: Target) -> Dict[str, float]:
        host, port = target.base.split("://")[1].split(":")
        request = (
            f"GET /{self.file.name} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: {target.authorization}\r\n\r\n"
        ).encode()
        sampler = MemorySampler(target.pids)
        before = sampler.now()
        context = _tlsContext()
        opened = []
        try:
            # A few at a time: the point is holding them, not a connection storm.
            limit = asyncio.Semaphore(32)

            async def openOne():
                async with limit:
                    reader, writer = await asyncio.open_connection(host, int(port), ssl=context)
                    writer.write(request)
                    await writer.drain()
                    head = await reader.readuntil(b"\r\n\r\n")
                    if not head.startswith(b"HTTP/1.1 200"):
                        raise clients.ClientError(f"{target.name} answered {head[:40]!r}")
                    length = int(next(
                        line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
                    ))
                    await reader.readexactly(length)
                    opened.append(writer)

            await asyncio.gather(*(openOne() for _ in range(self.count)))
            with sampler:
                await asyncio.sleep(min(3.0, self.settings.seconds))
            return {"before": before, "rss": max(sampler.samples)}
        finally:
            for writer in opened:
                writer.transport.abort()


class SlowReaders(Scenario):
    name = "scale-slow-readers"
    hasLimit = False
    client = "asyncio TLS clients in the benchmark process, each rate-limited"

    def __init__(self, *arguments) -> None:
        super().__init__(*arguments)
        self.count = 10 if self.settings.smoke else 100
        self.rate = 256 * 1024
        # Orthanc serves 100 requests at a time (its HttpThreadsCount): through
        # nginx, 100 readers hold all of its threads, the appliance's health
        # check included (the appliance keeps 4 free and queues the rest).
        # Three failed checks in a row (about 30 s) make the supervisor restart
        # Orthanc, so the readers must be done well within that.
        self.duration = 2.0 if self.settings.smoke else 8.0
        large = self.dataset.large
        self.path = f"/pacs/studies/{large.studyUID}"
        self.description = (
            f"{self.count} clients each reading the {large.bytes / 1e6:.0f} MB study (whole-study WADO-RS) at"
            f" {self.rate // 1024} KB/s for {self.duration:g}s, then leaving; peak RSS during"
        )
        self.metrics = [
            Metric("before", "RSS before the slow readers", "MB", "lower", MB),
            Metric("rss", f"peak RSS, {self.count} slow readers", "MB", "lower", MB),
        ]

    def measure(self, target: Target) -> Dict[str, float]:
        return asyncio.run(self._read(target))

    async def _read(self, target: Target) -> Dict[str, float]:
        host, port = target.base.split("://")[1].split(":")
        request = (
            f"GET {self.path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: {target.authorization}\r\n"
            # The server closes when the study is all sent: an end the reader sees.
            f"Accept: {WHOLE_STUDY['Accept']}\r\nConnection: close\r\n\r\n"
        ).encode()
        context = _tlsContext()
        sampler = MemorySampler(target.pids)
        before = sampler.now()
        received: List[int] = []

        async def readSlowly():
            reader, writer = await asyncio.open_connection(host, int(port), ssl=context, limit=64 * 1024)
            try:
                writer.write(request)
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise clients.ClientError(f"{target.name} answered {head[:40]!r}")
                total, started = 0, time.monotonic()
                while time.monotonic() - started < self.duration:
                    chunk = await reader.read(16 * 1024)
                    if not chunk:
                        break
                    total += len(chunk)
                    # Pace the reads to the rate: this is the slow client.
                    ahead = total / self.rate - (time.monotonic() - started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                received.append(total)
            finally:
                writer.transport.abort()

        with sampler:
            # Readers beyond the threads Orthanc has free wait for a turn:
            # allow two rounds and more.
            await asyncio.wait_for(
                asyncio.gather(*(readSlowly() for _ in range(self.count))), 3 * self.duration + 60
            )
        if sum(received) == 0:
            raise clients.ClientError(f"no slow reader received anything from {target.name}")
        return {"before": before, "rss": max(sampler.samples)}


class SlowReadersSoak(SlowReaders):
    """
    Rounds of slow readers leaving mid-transfer, one after the other: does
    the memory they leave behind level off?  Measured once per target (a
    run is long), the resident memory sampled after every round.
    """

    name = "scale-soak"
    repetitionsAtMost = 1

    def __init__(self, *arguments) -> None:
        super().__init__(*arguments)
        self.rounds = 2 if self.settings.smoke else 30
        self.description = (
            f"{self.rounds} rounds, one after the other, of: " + self.description.replace("; peak RSS during", "")
            + "; RSS after each round"
        )
        self.metrics = [
            Metric("first", "RSS after the first round", "MB", "lower", MB),
            Metric("tenth", "RSS after round 10 (or the last)", "MB", "lower", MB),
            Metric("last", f"RSS after round {self.rounds}", "MB", "lower", MB),
            Metric("highest", "highest RSS after a round", "MB", "lower", MB),
        ]

    def measure(self, target: Target) -> Dict[str, float]:
        sampler = MemorySampler(target.pids)
        after: List[int] = []
        for _ in range(self.rounds):
            asyncio.run(self._read(target))
            # What stays, once the server has seen the readers go.
            time.sleep(1.0)
            after.append(sampler.now())
        return {"first": after[0], "tenth": after[min(9, len(after) - 1)], "last": after[-1], "highest": max(after)}


#: Run in the page before anything else: OHIF loads more files than the
#: browser's default resource-timing buffer (250 entries) holds.
_BIGGER_TIMING_BUFFER = "performance.setResourceTimingBufferSize(10000);"

#: The end of the last transfer the page made, and how many it made.
_NETWORK_STATE = """
const navigation = performance.getEntriesByType('navigation')[0];
const resources = performance.getEntriesByType('resource');
let end = navigation ? Math.max(navigation.responseEnd, navigation.loadEventEnd) : 0;
for (const entry of resources) end = Math.max(end, entry.responseEnd);
return {end: end, count: resources.length, ready: document.readyState};
"""


class PageLoad(Scenario):
    name = "page-load"
    hasLimit = False
    client = "headless Chromium (selenium), a new profile each time: cold cache"
    metrics = [Metric("seconds", "OHIF page load to network idle", "ms", "lower", MS)]

    def __init__(self, *arguments) -> None:
        super().__init__(*arguments)
        self.description = (
            "Open / (the OHIF study list, with its QIDO search) in a fresh browser; the time from"
            f" navigation start to the end of the last transfer, once none has ended for {QUIET:g}s"
            " (after one light page of the same origin, and the appliance's login, unmeasured)"
        )

    def measure(self, target: Target) -> Dict[str, float]:
        with freshChromium(self.settings, target) as browser:
            browser.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": True})
            browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": _BIGGER_TIMING_BUFFER})
            browser.get(target.base + "/")
            return {"seconds": waitForIdle(browser) / 1000}


#: The network is idle once no transfer has ended for this long.
QUIET = 1.0

#: A light page of the build, public on the appliance.
WARM_UP = "/manifest.json"


@contextmanager
def freshChromium(settings: Settings, target: Target):
    """
    Headless Chromium on a new profile (an empty cache), started on one
    light page of C{target} (L{openPage}) with its network events on;
    closed, and its profile removed, on the way out.
    """
    import shutil
    import tempfile

    from tests.viewerbuild import startChromium

    profile = tempfile.mkdtemp(prefix="chromium-", dir=settings.work)
    browser = startChromium(settings.certificate, profile)
    try:
        openPage(browser, target)
        browser.execute_cdp_cmd("Network.enable", {})
        yield browser
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


def openPage(browser, target: Target) -> None:
    """
    Start with one light page of C{target}'s origin (the appliance's is the
    login, which then goes to the same light page): the browser is started
    and has a TLS session, and OHIF has not been loaded yet, by either.
    """
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from bench.servers import BENCH_USER

    if target.name != APPLIANCE:
        browser.get(target.base + WARM_UP)
        return
    browser.get(f"{target.base}/login?next={WARM_UP}")
    browser.find_element(By.CSS_SELECTOR, "input[name=user]").send_keys(BENCH_USER[0])
    browser.find_element(By.CSS_SELECTOR, "input[name=password]").send_keys(BENCH_USER[1])
    browser.find_element(By.CSS_SELECTOR, "form [type=submit]").click()
    WebDriverWait(browser, 30, poll_frequency=0.05).until(lambda b: b.current_url.endswith(WARM_UP))


def waitForIdle(browser, timeout: float = 120) -> float:
    """
    Milliseconds from the page's navigation to the end of its last transfer,
    once none has ended for L{QUIET} seconds.
    """
    deadline = time.monotonic() + timeout
    last, quietSince = None, time.monotonic()
    while time.monotonic() < deadline:
        state = browser.execute_script(_NETWORK_STATE)
        seen = (state["end"], state["count"])
        if seen != last or state["ready"] != "complete":
            last, quietSince = seen, time.monotonic()
        elif time.monotonic() - quietSince >= QUIET and state["count"] >= 10:
            # Fewer requests than OHIF makes: it has not started yet (a
            # cold file cache can hold its scripts back), so wait on.
            return state["end"]
        time.sleep(0.05)
    if last is not None and last[1] < 10:
        raise clients.ClientError(f"the page made only {last[1]} requests in {timeout:g}s: OHIF did not load")
    raise clients.ClientError(f"the network was never idle for {QUIET:g}s within {timeout:g}s")


#: Injected into the viewer's page before it loads: notes when an image is
#: first on a canvas (its pixels read every 20 ms, see
#: L{tests.browser.CANVAS_PIXELS}), in the page's own clock.
_FIRST_IMAGE_WATCH = """
window.__firstImage = null;
(function watch() {
  const canvases = (() => { %s })();
  if (canvases.some(c => c.levels > 20 && c.litFraction > 0.2)) {
    window.__firstImage = performance.now();
    return;
  }
  setTimeout(watch, 20);
})();
"""

#: The first image's time, and the frames received so far by series: how
#: many, and when the last of them ended (the page's clock).
_VIEWER_STATE = """
const frames = {};
for (const entry of performance.getEntriesByType('resource')) {
  const match = entry.name.match(/\\/series\\/([^/]+)\\/instances\\/([^/]+)\\/frames\\//);
  if (!match || !entry.responseEnd) continue;
  const series = frames[match[1]] || (frames[match[1]] = {instances: new Set(), end: 0});
  series.instances.add(match[2]);
  series.end = Math.max(series.end, entry.responseEnd);
}
const loaded = {};
for (const [uid, series] of Object.entries(frames)) loaded[uid] = {count: series.instances.size, end: series.end};
return {firstImage: window.__firstImage, frames: loaded};
"""

#: A reading room at home over a VPN (issue 17): 20 Mbit/s each way, 40 ms
#: of round trip.
WAN = {"offline": False, "latency": 40, "downloadThroughput": 20e6 / 8, "uploadThroughput": 20e6 / 8}


class ViewerScenario(Scenario):
    """
    Headless Chromium opening the viewer's study (3 series of the large
    study's size) in OHIF, with a new profile each time: OHIF's page is
    loaded first (the study list, not measured unless C{measurePageLoad}),
    then the study is opened; the time until its first image is on a canvas
    (pixels read back) and, with C{wholeSeries}, until every frame of the
    series on screen has been received.

    On the appliance the study's metadata is cached before the first
    measurement (as L{Metadata} does).
    """

    hasLimit = False
    client = "headless Chromium (selenium), a new profile each time"
    #: The network conditions (Chromium's emulation), if any.
    network: Optional[Dict[str, object]] = None
    #: Drop the file system's cache before the study is opened.
    cold = False
    wholeSeries = True
    measurePageLoad = False

    def __init__(self, *arguments) -> None:
        super().__init__(*arguments)
        self.series = self.dataset.viewer
        self.studyUID = self.series[0].studyUID
        self.instances = len(self.series[0].files)
        self.cached = False

    def measure(self, target: Target) -> Dict[str, float]:
        if target.name == APPLIANCE and not self.cached:
            self.fillCache(target)
        with freshChromium(self.settings, target) as browser:
            if self.network is not None:
                browser.execute_cdp_cmd("Network.emulateNetworkConditions", self.network)
            browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": _BIGGER_TIMING_BUFFER})
            browser.get(target.base + "/")
            measured: Dict[str, float] = {}
            pageLoad = waitForIdle(browser)
            if self.measurePageLoad:
                measured["page_load"] = pageLoad / 1000
            if self.cold:
                dropFileSystemCache()
            watch = _FIRST_IMAGE_WATCH % (CANVAS_PIXELS,)
            browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": watch})
            browser.get(f"{target.base}/viewer?StudyInstanceUIDs={self.studyUID}")
            measured.update(self._waitForStudy(browser))
            return measured

    def _waitForStudy(self, browser, timeout: float = 300) -> Dict[str, float]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = browser.execute_script(_VIEWER_STATE)
            if state["firstImage"] is not None:
                measured = {"first_image": state["firstImage"] / 1000}
                if not self.wholeSeries:
                    return measured
                whole = [series["end"] for series in state["frames"].values() if series["count"] >= self.instances]
                if whole:
                    measured["whole_series"] = min(whole) / 1000
                    return measured
            time.sleep(0.1)
        raise clients.ClientError(f"the study was not shown (and its series not loaded) within {timeout:g}s")

    def fillCache(self, target: Target) -> None:
        paths = [f"/pacs/studies/{self.studyUID}/metadata"] + [
            f"/pacs/studies/{self.studyUID}/series/{series.seriesUID}/metadata" for series in self.series
        ]
        resources = [self.studyUID] + [f"{self.studyUID}/{series.seriesUID}" for series in self.series]
        waitUntilCached(self.settings, target, paths, resources)
        self.cached = True


class StudyOpen(ViewerScenario):
    name = "study-open"
    metrics = [
        Metric("first_image", "study open: first image", "ms", "lower", MS),
        Metric("whole_series", "whole series loaded", "ms", "lower", MS),
    ]

    def __init__(self, *arguments) -> None:
        super().__init__(*arguments)
        self.description = (
            f"Open a study of {len(self.series)} series of {self.instances} instances in OHIF (its page loaded"
            " before, unmeasured): time to the first image on a canvas, and to every frame of the series shown"
        )


class StudyOpenCold(StudyOpen):
    name = "study-open-cold"
    cold = True
    metrics = [
        Metric("first_image", "study open, file cache dropped: first image", "ms", "lower", MS),
        Metric("whole_series", "whole series loaded, file cache dropped", "ms", "lower", MS),
    ]

    def __init__(self, *arguments) -> None:
        super().__init__(*arguments)
        self.description += "; the file system's cache dropped just before"


class WanStudyOpen(ViewerScenario):
    name = "wan"
    network = WAN
    wholeSeries = False
    measurePageLoad = True
    metrics = [
        Metric("page_load", "OHIF page load over the WAN", "ms", "lower", MS),
        Metric("first_image", "study open over the WAN: first image", "ms", "lower", MS),
    ]

    def __init__(self, *arguments) -> None:
        super().__init__(*arguments)
        self.description = (
            "Chromium's network emulation at 20 Mbit/s each way and 40 ms of round trip: OHIF's page load to"
            f" network idle, then the study of {len(self.series)} series opened, to its first image"
        )


def dropFileSystemCache() -> None:
    """
    Drop the kernel's page cache (as root), so that Orthanc reads its files
    from the disk.
    """
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as error:
        raise clients.ClientError(f"cannot drop the file system's cache here: {error.strerror}")


class MetricsScrape(Scenario):
    """
    What Prometheus' scrapes cost the daemon: /metrics (the whole text,
    made in the reactor's thread) beside /healthz (the cheapest page) on
    the same appliance, one connection each, as a scraper makes them.
    nginx has no such page.
    """

    name = "metrics"
    client = "wrk -t1 -c1 (keep-alive), /metrics then /healthz"
    hasLimit = False
    applianceOnly = True
    metrics = [
        Metric("requests_per_second", "/metrics scrapes", "req/s", "higher"),
        Metric("p50", "/metrics p50", "ms", "lower", MS),
        Metric("healthz_requests_per_second", "/healthz beside it", "req/s", "higher"),
    ]
    description = "GET /metrics as an administrator, then GET /healthz, one connection"

    def measure(self, target: Target) -> Dict[str, float]:
        scrapes = clients.wrk(f"{target.base}/metrics", seconds=self.settings.seconds, connections=1, headers=target.headers())
        health = clients.wrk(f"{target.base}/healthz", seconds=self.settings.seconds, connections=1)
        return dict(scrapes, healthz_requests_per_second=health["requests_per_second"])


ALL = [
    StaticLarge,
    StaticSmall,
    Qido,
    Metadata,
    SeriesMetadata,
    WadoStudy,
    Frames,
    Stow,
    DicomStore,
    DicomStoreOrthanc,
    DicomAssociations,
    IdleConnections,
    SlowReaders,
    SlowReadersSoak,
    PageLoad,
    StudyOpen,
    StudyOpenCold,
    WanStudyOpen,
    MetricsScrape,
]
