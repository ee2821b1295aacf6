"""
The daemon's numbers for monitoring, in Prometheus' text format at
C{/metrics} (the admin role, or the accounts of C{[metrics] scrape_users}).

    requests ──▶ RequestMetrics.observe (each request's end: route, method,
                 status, duration, bytes each way)
    GET /metrics ──▶ MetricsResource ──▶ the registry: RequestMetrics'
                 counters, and ApplianceCollector reading the parts' own
                 counts and states at that moment

The parts keep plain counts of their own (the forwarder's associations, the
authenticator's failed logins, the metadata cache's hits...), read only when
a scrape asks: none of them knows Prometheus, and nothing is counted twice.
Every metric is named C{pacs_appliance_...}.
"""

import time
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from appliance.orthanc.state import OrthancState
from appliance.web.sitemap import ADMIN, DICOMWEB, HEALTHZ, LOGIN, LOGOUT, METRICS, PUBLIC_VIEWER_FILES

PREFIX = "pacs_appliance_"

#: The routes requests are counted by: the site's first path segments; any
#: other path is the viewer's.
ROUTES = frozenset(
    segment.decode("ascii") for segment in (HEALTHZ, LOGIN, LOGOUT, DICOMWEB, ADMIN, METRICS, *PUBLIC_VIEWER_FILES)
)

#: Request durations, in seconds: from a cached metadata answer (a few
#: milliseconds) to a whole study's download (minutes).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


def routeOf(path: bytes) -> str:
    """
    The route label of a request's path.
    """
    segment = path.split(b"?", 1)[0].lstrip(b"/").split(b"/", 1)[0].decode("latin-1")
    return segment if segment in ROUTES else "viewer"


class RequestMetrics:
    """
    Each HTTPS request at its end: counted by route, method and status, its
    duration in a histogram by route, its bytes each way by route.
    """

    #: Methods counted by name; any other is "other" (the label stays small
    #: whatever clients send).
    METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"})

    def __init__(self, registry: CollectorRegistry) -> None:
        self._requests = Counter(
            PREFIX + "http_requests", "HTTPS requests answered.", ["route", "method", "status"], registry=registry
        )
        self._durations = Histogram(
            PREFIX + "http_request_duration_seconds",
            "From a request's head to its answer's last byte.",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self._received = Counter(PREFIX + "http_received_bytes", "Request body bytes received.", ["route"], registry=registry)
        self._sent = Counter(PREFIX + "http_sent_bytes", "Response body bytes sent.", ["route"], registry=registry)

    def observe(self, path: bytes, method: bytes, status: int, seconds: float, received: int, sent: int) -> None:
        route = routeOf(path)
        name = method.decode("latin-1")
        self._requests.labels(route, name if name in self.METHODS else "other", str(status)).inc()
        self._durations.labels(route).observe(max(seconds, 0.0))
        if received:
            self._received.labels(route).inc(received)
        if sent:
            self._sent.labels(route).inc(sent)


@dataclass
class ApplianceParts:
    """
    What the collector reads at each scrape; a part the daemon runs without
    (no DICOM listener, no metadata cache) is L{None}.
    """

    orthanc: object
    turns: object
    space: object
    spool: object
    authenticator: object
    database: object
    certificate: Callable[[], object]
    forwarder: Optional[object] = None
    metadataCache: Optional[object] = None


class ApplianceCollector:
    """
    The parts' counts and states, read when a scrape asks.
    """

    def __init__(self, parts: ApplianceParts, clock: Callable[[], float] = time.time) -> None:
        self._parts = parts
        self._clock = clock

    def describe(self) -> List:
        # Registered without being collected at start: the parts may not
        # have started yet.
        return []

    def collect(self) -> Iterable:
        parts = self._parts
        state = GaugeMetricFamily(PREFIX + "orthanc_state", "Orthanc's state: 1 for the one it is in.", labels=["state"])
        for each in OrthancState:
            state.add_metric([each.value], 1.0 if parts.orthanc.state is each else 0.0)
        yield state
        yield _counter("orthanc_starts", "Times Orthanc was started (the first start and each restart).", parts.orthanc.starts)
        yield _gauge("orthanc_turns_in_use", "Requests to Orthanc under way.", parts.turns.inUse)
        yield _gauge("orthanc_turns_waiting", "Requests waiting for a turn at Orthanc.", parts.turns.waiting)
        free = parts.space.free()
        if free is not None:
            yield _gauge("storage_free_bytes", "Free bytes where Orthanc stores.", free)
        yield _gauge("spool_bytes", "Request body bytes being received (the spool's shares).", parts.spool.held)
        yield _counter("login_failures", "Failed logins (wrong password, unknown or disabled user).", parts.authenticator.failedLogins)
        if parts.authenticator.liveSessions is not None:
            yield _gauge("sessions", "Browser sessions in the state database.", parts.authenticator.liveSessions)
        yield _gauge("database_ready", "Whether the state database answers (1) or not (0).", 1.0 if parts.database.ready else 0.0)
        certificate = parts.certificate()
        expiry = certificate.original.to_cryptography().not_valid_after_utc.timestamp()
        yield _gauge("certificate_expiry_timestamp_seconds", "When the HTTPS and DICOM certificate expires (Unix time).", expiry)
        if parts.forwarder is not None:
            associations = CounterMetricFamily(
                PREFIX + "dicom_associations", "DICOM TLS connections, by how they ended.", labels=["outcome"]
            )
            for outcome, count in parts.forwarder.associations.items():
                associations.add_metric([outcome], count)
            yield associations
            relayed = CounterMetricFamily(PREFIX + "dicom_relayed_bytes", "DICOM bytes relayed.", labels=["direction"])
            relayed.add_metric(["from_modalities"], parts.forwarder.bytesFromModalities)
            relayed.add_metric(["to_modalities"], parts.forwarder.bytesToModalities)
            yield relayed
        if parts.metadataCache is not None:
            yield _counter("metadata_cache_hits", "Study metadata answered from the cache.", parts.metadataCache.hits)
            yield _counter("metadata_cache_misses", "Study metadata asked of Orthanc.", parts.metadataCache.misses)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, documentation, value=value)


class Metrics:
    """
    The daemon's registry: the requests' counters, and the parts' (once
    L{watch} is given them).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = RequestMetrics(self.registry)
        self._refreshers: List[Callable[[], Deferred]] = []

    def watch(self, parts: ApplianceParts, refreshers: Sequence[Callable[[], Deferred]] = ()) -> None:
        """
        Read C{parts} at each scrape, after C{refreshers} (counts that need
        the state database) have run.
        """
        self.registry.register(ApplianceCollector(parts))
        self._refreshers.extend(refreshers)

    def refresh(self) -> Deferred:
        """
        Run the refreshers; fires when all have ended, whatever their outcome.
        """
        return DeferredList([refresher() for refresher in self._refreshers], consumeErrors=True)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class MetricsResource(Resource):
    """
    C{/metrics}: the registry in Prometheus' text format, never cached.
    The text is made in the reactor's thread: the parts are read where they
    live.  A scrape (the sessions counted in the state database, the text
    made) takes 1.4 ms here end to end, against 0.3 ms for /healthz (the
    benchmark's C{metrics} scenario, bench/results/metrics).
    """

    isLeaf = True
    log = Logger()

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Request):
        finished = request.notifyFinish()
        finished.addErrback(lambda failure: None)

        def answer(ignored: object) -> None:
            if finished.called:
                return
            try:
                body = self._metrics.text()
            except Exception:
                self.log.failure("Could not answer a scrape")
                request.setResponseCode(500)
                request.finish()
                return
            request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
            request.setHeader(b"Cache-Control", b"no-store")
            request.setHeader(b"Content-Length", b"%d" % (len(body),))
            request.write(body)
            request.finish()

        refreshing = self._metrics.refresh().addCallback(answer)
        refreshing.addErrback(lambda failure: self.log.failure("Could not answer a scrape", failure))
        return NOT_DONE_YET
