"""
What the commands that go through a whole archive share (C{move-archive},
C{backup}, C{restore}): an Orthanc of their own, its REST API with bodies
streamed to and from files, the progress line, and running the work on the
reactor until it ends or is interrupted (Ctrl-C, SIGTERM).
"""

import hashlib
import json
import random
import socket
import sys
from dataclasses import replace
from io import BytesIO
from pathlib import Path
from typing import BinaryIO, Callable, Dict, List, Optional, TextIO

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone, readBody
from twisted.web.http_headers import Headers

from appliance.config import Config
from appliance.orthanc.probe import RestProbe
from appliance.orthanc.space import StorageSpace
from appliance.orthanc.state import OrthancState
from appliance.orthanc.supervisor import OrthancSupervisor
from appliance.web.pages import describeSize

#: How often the progress line is written (on a terminal it is rewritten in
#: place; otherwise, for the journal, one line at this interval).
PROGRESS_INTERVAL = 1.0
PROGRESS_LOG_INTERVAL = 10.0

#: The exit status of a command that was interrupted or failed.
UNFINISHED = 1

#: Tries of one instance before the command stops (a busy database answers
#: 503).
TRIES = 5
RETRY_DELAY = 2.0


class ArchiveCommandFailed(Exception):
    """
    The command cannot go on; the message says why and what to do.
    """


#: The lowest port L{freePorts} chooses.
FIRST_FREE_PORT = 10000


def _ephemeralPorts() -> range:
    """
    The ports the kernel gives outgoing connections (and bind to port 0).
    """
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def freePorts(count: int) -> List[int]:
    """
    C{count} different TCP ports nothing listens on right now (all held open
    together while chosen, so no two are the same), on every interface: Orthanc
    listens on all of them.  They are chosen below the kernel's range of
    ephemeral ports: a port from that range (as binding to port 0 gives) may
    be taken by an outgoing connection before the server binds it.
    """
    ephemeral = _ephemeralPorts()
    below = range(FIRST_FREE_PORT, ephemeral.start) if ephemeral.start - FIRST_FREE_PORT >= 1000 else None
    probes: List[socket.socket] = []
    try:
        while len(probes) < count:
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                probe.bind(("", random.choice(below) if below is not None else 0))
            except OSError:
                probe.close()  # in use: another
                continue
            probes.append(probe)
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def privateOrthancConfig(config: Config, name: str, ports: List[int], runtime: Path, **sections) -> Config:
    """
    C{config} for an Orthanc of a command's own: on two of C{ports}, with a
    runtime folder C{runtime/name}, named C{NODE-name} among the nodes of a
    database, without modalities, and not started again when it fails.
    C{sections} replace whole sections, or (C{appliance}, C{orthanc}) some
    of their keys.
    """
    folder = runtime / name
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return replace(
        config,
        appliance=replace(
            config.appliance,
            runtime_dir=folder,
            node_name=f"{config.appliance.node_name}-{name}",
            **sections.pop("appliance", {}),
        ),
        orthanc=replace(
            config.orthanc,
            http_port=ports[0],
            dicom_port=ports[1],
            max_start_failures=1,
            **sections.pop("orthanc", {}),
        ),
        modalities=(),
        **sections,
    )


def privateSupervisor(config: Config, reactor) -> OrthancSupervisor:
    """
    A supervisor of the Orthanc of L{privateOrthancConfig}.
    """
    probe = RestProbe(reactor, config.orthanc.http_port, config.orthanc.health_timeout)
    return OrthancSupervisor(config, reactor, probe=probe, space=StorageSpace.forOrthanc(config))


@inlineCallbacks
def startPrivate(supervisor: OrthancSupervisor, what: str):
    """
    Start the Orthanc of C{supervisor}; fails unless it comes up.
    """
    supervisor.startService()
    state = yield supervisor.whenState(OrthancState.READY, OrthancState.FAILED)
    if state is not OrthancState.READY:
        raise ArchiveCommandFailed(f"Orthanc could not be started on the {what}: {supervisor.reason}")


class _FileWriter(Protocol):
    """
    Writes a response's body to a file, hashing it (SHA-256) on the way.
    """

    def __init__(self, file: BinaryIO, done: Deferred) -> None:
        self._file = file
        self._done = done
        self.digest = hashlib.sha256()
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        self._file.write(data)
        self.digest.update(data)
        self.size += len(data)

    def connectionLost(self, reason: Failure = ResponseDone()) -> None:
        if reason.check(ResponseDone):
            self._done.callback((self.size, self.digest.hexdigest()))
        else:
            self._done.errback(reason)


class OrthancClient:
    """
    The REST API of an Orthanc on this box, with the credentials
    C{authorization} gives at the time of each request, on persistent
    connections enough for C{parallel} requests at once and one more.
    """

    def __init__(self, reactor, authorization: Callable[[], bytes], port: int, parallel: int) -> None:
        self._pool = HTTPConnectionPool(reactor)
        self._pool.maxPersistentPerHost = parallel + 1
        self._agent = Agent(reactor, pool=self._pool)
        self._authorization = authorization
        self._origin = b"http://127.0.0.1:%d" % (port,)

    def close(self) -> Deferred:
        """
        Close the connections kept open.
        """
        return self._pool.closeCachedConnections()

    def _send(self, method: bytes, path: str, body: Optional[BinaryIO] = None, contentType: bytes = b"") -> Deferred:
        headers = Headers({b"Authorization": [self._authorization()]})
        producer = None
        if body is not None:
            headers.addRawHeader(b"Content-Type", contentType)
            producer = FileBodyProducer(body)
        return self._agent.request(method, self._origin + path.encode("ascii"), headers, producer)

    @inlineCallbacks
    def request(self, method: bytes, path: str, body: Optional[bytes] = None, contentType: bytes = b"application/dicom"):
        """
        Fires with (status, body).
        """
        response = yield self._send(method, path, None if body is None else BytesIO(body), contentType)
        answer = yield readBody(response)
        return response.code, answer

    @inlineCallbacks
    def upload(self, path: str, file: BinaryIO, contentType: bytes = b"application/dicom"):
        """
        POST the rest of C{file} to C{path}, read from disk as it is sent;
        fires with (status, body).
        """
        response = yield self._send(b"POST", path, file, contentType)
        answer = yield readBody(response)
        return response.code, answer

    @inlineCallbacks
    def download(self, path: str, file: BinaryIO):
        """
        GET C{path} into C{file} as it comes; fires with (status, size,
        SHA-256 hex digest), the body left unread unless the status is 200.
        """
        response = yield self._send(b"GET", path)
        if response.code != 200:
            yield readBody(response)
            return response.code, 0, ""
        done: Deferred = Deferred()
        response.deliverBody(_FileWriter(file, done))
        size, digest = yield done
        return 200, size, digest

    @inlineCallbacks
    def json(self, path: str):
        status, body = yield self.request(b"GET", path)
        if status != 200:
            raise ArchiveCommandFailed(f"Orthanc answered {path} with {status}: {body[:200]!r}")
        return json.loads(body)


@inlineCallbacks
def storeInstance(reactor, client: OrthancClient, body: Callable[[], BinaryIO], instance: str):
    """
    Store the DICOM file C{body()} opens in the Orthanc of C{client}, tried
    again while Orthanc is busy; fails unless Orthanc names it C{instance}
    (stored, or there already).
    """
    for attempt in range(1, TRIES + 1):
        with body() as file:
            status, answer = yield client.upload("/instances", file)
        stored = json.loads(answer) if status == 200 else {}
        if stored.get("Status") in ("Success", "AlreadyStored"):
            if stored.get("ID") != instance:
                raise ArchiveCommandFailed(f"Instance {instance} was stored as {stored.get('ID')}")
            return
        if attempt < TRIES:
            yield deferLater(reactor, RETRY_DELAY, lambda: None)
    raise ArchiveCommandFailed(f"Orthanc did not store instance {instance}: {status} {answer[:300]!r}")


class Progress:
    """
    The progress line: C{done} of C{total} items, the instances and bytes
    that went through, and the rate.
    """

    def __init__(self, clock, out: TextIO, verb: str, unit: str, counting: str, total: int, done: int = 0) -> None:
        self._clock = clock
        self._out = out
        self._tty = out.isatty()
        self._verb = verb
        self._unit = unit
        self._counting = counting
        self.total = total
        self.done = done
        self.instances = 0
        self.bytes = 0
        self._started = clock.seconds()
        self._lastLogged = self._started

    def line(self) -> str:
        elapsed = max(self._clock.seconds() - self._started, 1e-6)
        return (
            f"{self._verb} {self.done} of {self.total} {self._unit} ({self.instances} {self._counting},"
            f" {describeSize(self.bytes, rounded=True)}, {describeSize(int(self.bytes / elapsed), rounded=True)}/s)"
        )

    def show(self) -> None:
        now = self._clock.seconds()
        if self._tty:
            self._out.write("\r" + self.line() + "\033[K")
            self._out.flush()
        elif now - self._lastLogged >= PROGRESS_LOG_INTERVAL:
            self._lastLogged = now
            print(self.line(), file=self._out, flush=True)

    def end(self) -> None:
        if self._tty:
            self._out.write("\r\033[K")
        print(self.line(), file=self._out, flush=True)

    def every(self, interval: float = PROGRESS_INTERVAL):
        """
        Show the line every C{interval} seconds until the returned call is
        stopped.
        """
        showing = LoopingCall(self.show)
        showing.clock = self._clock
        showing.start(interval, now=False)
        return showing


def runArchiveCommand(
    name: str,
    work: Callable[[], Deferred],
    stop: Callable[[], Deferred],
    interrupted: Callable[[], str],
    again: str,
    out: TextIO = sys.stdout,
) -> int:
    """
    Run C{work} on the global reactor to its end or its interruption, C{stop}
    called either way before the reactor stops (it stops the command's
    Orthancs); the exit status.  C{work} fires with the sentence said on
    C{out} when it is done; a failure is said on standard error with
    C{again} (what running the command again does); an interruption with
    C{interrupted()}.
    """
    from twisted.internet import reactor

    outcome: Dict[str, int] = {}
    stopping: List[bool] = []

    def interrupt() -> Deferred:
        stopping.append(True)
        return stop()

    @inlineCallbacks
    def run():
        try:
            said = yield work()
        except Exception:
            if stopping:
                return  # interrupted: what stopped short is said below
            report(Failure())
        else:
            print(said, file=out, flush=True)
            outcome["status"] = 0
        if not stopping:
            reactor.stop()

    def report(failure: Failure) -> None:
        if failure.check(ArchiveCommandFailed):
            print(f"pacs-appliance: {failure.value}", file=sys.stderr)
        else:
            print(f"pacs-appliance: the {name} failed:", file=sys.stderr)
            failure.printTraceback(sys.stderr)
        print(again, file=sys.stderr)
        outcome["status"] = UNFINISHED

    reactor.addSystemEventTrigger("before", "shutdown", interrupt)
    reactor.callWhenRunning(run)
    reactor.run()
    if "status" not in outcome:
        print(f"Interrupted: {interrupted()}", file=sys.stderr)
        return UNFINISHED
    return outcome["status"]
