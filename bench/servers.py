"""
The servers under test, each a child process of the benchmark: the appliance
daemon (with the one real Orthanc it supervises), nginx configured as the OHIF
recipe does, the discarding DICOM SCP, and the appliance's own DICOM forwarder
pointed at that SCP.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

from appliance.config import Config, loadConfig
from appliance.orthanc.settings import OrthancCredentials, orthancConfigurationPath
from appliance.state.database import interactOnce
from appliance.tls import selfSignedPaths
from appliance.web.passwords import hashPassword
from appliance.web.sharedaccounts import writeAccount
from appliance.web.users import UserEntry
from bench import nginx
from bench.dicom import BENCH_AET
from tests.daemon import addUser
from tests.support import TEST_SCRYPT, basicAuthorization, freePorts, writeConfig

CHECKOUT = Path(__file__).resolve().parent.parent
VIEWER = CHECKOUT / "var" / "ohif"

#: The account the benchmark's clients use on the appliance (HTTP Basic; the
#: appliance remembers a verified password, so scrypt is paid once).
BENCH_USER = ("bench", "benchmark password, not a secret")

#: How long a server may take to start.
START_TIMEOUT = 180


def residentBytes(pid: int) -> int:
    """
    The resident memory of process C{pid} (0 once it is gone).
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def childPids(pid: int) -> List[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(each) for each in text.split()]


def waitForPort(port: int, process: subprocess.Popen, what: str, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:g}s")


def _prepareChild() -> None:
    """
    Run in each server's process before it starts.
    """
    import ctypes
    import resource

    # 1,000 idle connections and their upstream ones need more descriptors
    # than the usual soft limit.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # A benchmark that is killed (a test's timeout, Ctrl-C twice) takes its
    # servers with it: PR_SET_PDEATHSIG.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


class ChildProcess:
    """
    A server started by the benchmark, with its output in a log file.
    """

    def __init__(self, name: str, arguments: List[str], log: Path, env=None, ready: Optional[str] = None) -> None:
        self.name = name
        self.log = log
        #: The port it listens on, for those that have one.
        self.port: Optional[int] = None
        self._ready = threading.Event()
        self._readyText = ready
        self._lines: List[str] = []
        self.process = subprocess.Popen(
            arguments,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            preexec_fn=_prepareChild,
        )
        self._reader = threading.Thread(target=self._read, name=f"{name} output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with self.log.open("ab") as stream:
            for line in self.process.stdout:
                stream.write(line)
                if self._readyText is not None and not self._ready.is_set():
                    text = line.decode("utf-8", "replace")
                    self._lines.append(text)
                    if self._readyText in text:
                        self._ready.set()
        self._ready.set()

    def waitUntilReady(self, timeout: float = START_TIMEOUT) -> None:
        if not self._ready.wait(timeout) or self.process.poll() is not None:
            tail = "".join(self._lines[-30:])
            raise RuntimeError(f"{self.name} did not print {self._readyText!r} (see {self.log}):\n{tail}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(5)


class Appliance:
    """
    The appliance daemon (C{pacs-appliance run}) on a configuration of the
    benchmark's own, its state (and so Orthanc's storage) kept in C{work};
    C{sections} add to it (a [database]: the benchmark's account is then
    written there).
    """

    def __init__(self, work: Path, ohifRoot: Path, sections: Optional[Dict[str, Dict[str, object]]] = None) -> None:
        self.work = work
        folder = work / "appliance"
        httpPort, dicomPort, httpsPort, tlsPort = freePorts(4)
        users = folder / "users"
        folder.mkdir(parents=True, exist_ok=True)
        path = writeConfig(
            folder,
            {
                "appliance": {"state_dir": work / "state", "runtime_dir": work / "run"},
                # Series are stable, and their metadata cached, soon after loading.
                "orthanc": {"http_port": httpPort, "dicom_port": dicomPort, "stable_age": "5s"},
                # No certificate installed: the appliance generates its
                # self-signed one into the state folder; nginx presents it too.
                "tls": {"certificate": folder / "tls" / "cert.pem", "private_key": folder / "tls" / "key.pem"},
                "web": {
                    "listen_https": f"127.0.0.1:{httpsPort}",
                    "listen_http": "",
                    "ohif_root": ohifRoot,
                    # 1,000 idle keep-alive connections and then some, all
                    # from the benchmark's one address.
                    "max_connections": 1200,
                    "max_connections_per_address": 1200,
                },
                "auth": {"users_file": users},
                "dicom": {"listen": f"127.0.0.1:{tlsPort}"},
                "modality:bench": {"aet": BENCH_AET, "host": "127.0.0.1"},
                **(sections or {}),
            },
        )
        addUser(users, BENCH_USER[0], BENCH_USER[1], ["admin"])
        self.config: Config = loadConfig(path)
        if self.config.database.host:
            account = UserEntry(BENCH_USER[0], hashPassword(BENCH_USER[1], TEST_SCRYPT), frozenset({"admin"}))
            interactOnce(self.config.database, writeAccount, account, 0.0)
        self.authorization = basicAuthorization(*BENCH_USER)
        self.child: Optional[ChildProcess] = None
        self.credentials: Optional[OrthancCredentials] = None

    @property
    def httpsPort(self) -> int:
        return self.config.web.listen_https.port

    @property
    def dicomPort(self) -> int:
        return self.config.dicom.listen.port

    @property
    def certificate(self):
        return selfSignedPaths(self.config.appliance.state_dir)

    def start(self) -> None:
        executable = Path(sys.executable).parent / "pacs-appliance"
        self.child = ChildProcess(
            "the appliance",
            [str(executable), "run", "--config", str(self.config.sources[0])],
            self.work / "appliance.log",
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
            ready="Orthanc is ready",
        )
        self.child.waitUntilReady()
        self.credentials = self._readCredentials()

    def _readCredentials(self) -> OrthancCredentials:
        document = json.loads(orthancConfigurationPath(self.config).read_text(encoding="utf-8"))
        [(user, password)] = document["RegisteredUsers"].items()
        return OrthancCredentials(user, password)

    def checkOrthancKept(self) -> None:
        """
        Fail if the supervisor has restarted Orthanc since the start: nginx
        and the limit would then send stale credentials, and every figure
        after that would be void.
        """
        if self._readCredentials() != self.credentials:
            raise RuntimeError(
                f"the appliance restarted Orthanc during the run (see {self.child.log}):"
                " nginx and the limit now hold stale credentials, the run is void"
            )

    @property
    def orthancAuthorization(self) -> str:
        return self.credentials.authorization().decode("ascii")

    def pids(self) -> List[int]:
        """
        The daemon's process: Orthanc, its child, is not counted.
        """
        return [self.child.pid]

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()


class Nginx:
    """
    nginx as the OHIF recipe runs it (see L{bench.nginx}), a child process
    with its own prefix under C{work}.
    """

    def __init__(self, work: Path, appliance: Appliance, ohifRoot: Path, sinkPort: int) -> None:
        self.prefix = work / "nginx"
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.httpsPort, self.dicomPort, self.sinkDicomPort = freePorts(3)
        certificate, key = appliance.certificate
        self.appConfig = self.prefix / "app-config.js"
        self.configuration = nginx.render(
            prefix=self.prefix,
            modulePath=nginx.streamModule(),
            ohifRoot=ohifRoot,
            appConfig=self.appConfig,
            certificate=certificate,
            key=key,
            httpsPort=self.httpsPort,
            orthancHttpPort=appliance.config.orthanc.http_port,
            orthancAuthorization=appliance.orthancAuthorization,
            dicomPort=self.dicomPort,
            orthancDicomPort=appliance.config.orthanc.dicom_port,
            sinkDicomPort=self.sinkDicomPort,
            sinkPort=sinkPort,
            runAsRoot=os.geteuid() == 0,
        )
        self.configPath = self.prefix / "nginx.conf"
        self.configPath.write_text(self.configuration, encoding="utf-8")
        self.child: Optional[ChildProcess] = None

    def start(self, appConfig: bytes) -> None:
        # The same app-config.js the appliance generates (the build's own
        # points at a public demo server).
        self.appConfig.write_bytes(appConfig)
        check = subprocess.run(
            ["nginx", "-t", "-p", str(self.prefix), "-c", str(self.configPath)],
            capture_output=True, text=True,
        )
        if check.returncode != 0:
            raise RuntimeError(f"nginx refuses the generated configuration {self.configPath}:\n{check.stderr}")
        self.child = ChildProcess(
            "nginx",
            ["nginx", "-p", str(self.prefix), "-c", str(self.configPath)],
            self.prefix / "nginx.out",
        )
        for port in (self.httpsPort, self.dicomPort, self.sinkDicomPort):
            waitForPort(port, self.child.process, "nginx")

    def pids(self) -> List[int]:
        """
        The master and its workers.
        """
        return [self.child.pid] + childPids(self.child.pid)

    def stop(self) -> None:
        if self.child is not None:
            # SIGQUIT: a graceful stop, workers finish and exit.
            self.child.stop(signal.SIGQUIT)


def startSink(work: Path) -> ChildProcess:
    """
    The discarding DICOM SCP (L{bench.dicom}) on a free port, in its own process.
    """
    [port] = freePorts(1)
    child = ChildProcess(
        "the discarding SCP",
        [sys.executable, "-m", "bench.dicom", "sink", str(port)],
        work / "sink.log",
        env=dict(os.environ, PYTHONPATH=str(CHECKOUT)),
    )
    waitForPort(port, child.process, "the discarding SCP")
    child.port = port
    return child


def startSinkForwarder(work: Path, appliance: Appliance, sinkPort: int) -> ChildProcess:
    """
    The appliance's DICOM forwarder service, as the daemon builds it, but on
    a configuration whose Orthanc DICOM port is the discarding SCP's.
    """
    [port] = freePorts(1)
    child = ChildProcess(
        "the forwarder to the discarding SCP",
        [sys.executable, "-m", "bench.dicom", "forwarder", str(appliance.config.sources[0]), str(sinkPort), str(port)],
        work / "sink-forwarder.log",
        env=dict(os.environ, PYTHONPATH=str(CHECKOUT)),
    )
    waitForPort(port, child.process, "the forwarder to the discarding SCP")
    child.port = port
    return child
