"""
The whole daemon as a child process (C{pacs-appliance run}), and its users.
"""

import http.client
import re
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from appliance.config import Config
from appliance.tls import selfSignedPaths

#: The console script of the checkout's virtual environment.
EXECUTABLE = Path(sys.executable).parent / "pacs-appliance"

#: How long the daemon may take to be ready again after a fault, and how
#: often a condition is checked while waiting for it.
RECOVERY_TIMEOUT = 60
POLL_INTERVAL = 0.1


class DaemonOutput(ProcessProtocol):
    """
    Collects the daemon's output lines; C{waitFor(text)} fires with the first
    line containing C{text}, C{ended} with the exit (ProcessDone/Terminated).
    """

    def __init__(self) -> None:
        self.lines: List[str] = []
        self._partial = b""
        self._waiting: List[Tuple[str, Deferred]] = []
        self.ended: Deferred = Deferred()

    def waitFor(self, text: str) -> Deferred:
        for line in self.lines:
            if text in line:
                return succeed(line)
        waiter: Deferred = Deferred()
        self._waiting.append((text, waiter))
        return waiter

    def outReceived(self, data: bytes) -> None:
        self._partial += data
        *complete, self._partial = self._partial.split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            for entry in list(self._waiting):
                if entry[0] in line:
                    self._waiting.remove(entry)
                    entry[1].callback(line)

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        for text, waiter in self._waiting:
            waiter.errback(AssertionError(f"the daemon ended before printing {text!r}:\n" + "\n".join(self.lines)))
        self._waiting = []
        self.ended.callback(reason.value)


def addUser(usersFile: Path, name: str, password: str, roles: Sequence[str]) -> None:
    """
    Add or change a user with C{pacs-appliance passwd}, as an operator does.
    """
    subprocess.run(
        [str(EXECUTABLE), "passwd", "--users", str(usersFile), name, "--roles", ",".join(roles), "--password-stdin"],
        input=password + "\n",
        text=True,
        check=True,
        capture_output=True,
        timeout=60,
    )


def orthancPid(output: DaemonOutput, process) -> int:
    """
    The pid of the Orthanc the daemon started last, checked to be the
    daemon's child running Orthanc before anyone signals it.
    """
    pids = [int(m.group(1)) for line in output.lines for m in [re.search(r"Orthanc is starting: started as pid (\d+)", line)] if m]
    if not pids:
        raise AssertionError("the daemon never said which pid Orthanc has:\n" + "\n".join(output.lines))
    pid = pids[-1]
    stat = Path(f"/proc/{pid}/stat").read_text()
    parent = int(stat.rsplit(")", 1)[1].split()[1])
    if parent != process.pid:
        raise AssertionError(f"pid {pid} is not the daemon's child")
    if b"Orthanc" not in Path(f"/proc/{pid}/cmdline").read_bytes():
        raise AssertionError(f"pid {pid} is not Orthanc")
    return pid


@inlineCallbacks
def startDaemon(case, config: Config, ready: str = "Orthanc is ready", prefix: Sequence[str] = ()):
    """
    Run the daemon on C{config} until C{case} ends; fires with its
    L{DaemonOutput} and process once a line containing C{ready} is printed.

    @param prefix: a command line the daemon's runs under (C{setpriv ...}).
    """
    output = DaemonOutput()
    argv = [*prefix, str(EXECUTABLE), "run", "--config", str(config.sources[0])]
    process = reactor.spawnProcess(
        output, argv[0], argv, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    )

    def stop():
        if output.ended.called:
            return None
        try:
            process.signalProcess("TERM")
        except ProcessExitedAlready:
            pass  # it has ended; its end is on its way to output
        return output.ended

    case.addCleanup(stop)
    yield output.waitFor(ready)
    return output, process


class DaemonClient:
    """
    For test cases that run the daemon of C{self.config} with
    L{startDaemon} (its output in C{self.output}): HTTPS requests to it,
    trusting its generated certificate, and waiting on it (the requests
    block: run them in threads).
    """

    def trustDaemon(self) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        # The generated certificate names this machine, not 127.0.0.1.
        self.context.check_hostname = False
        self.context.load_verify_locations(str(selfSignedPaths(self.config.appliance.state_dir)[0]))

    def request(self, method: str, path: str, headers: Dict[str, str], body: Optional[bytes] = None) -> Tuple[int, bytes]:
        connection = http.client.HTTPSConnection(
            "127.0.0.1", self.config.web.listen_https.port, context=self.context, timeout=30
        )
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def healthy(self) -> bool:
        try:
            return self.request("GET", "/healthz", {})[0] == 200
        except (OSError, http.client.HTTPException):
            return False

    @inlineCallbacks
    def poll(self, condition: Callable[[], bool], what: str, timeout: float = RECOVERY_TIMEOUT, blocking: bool = True):
        """
        Wait until C{condition()} holds, asked every L{POLL_INTERVAL} (in a
        thread if C{blocking}); fail after C{timeout} seconds.
        """
        deadline = reactor.seconds() + timeout
        while not ((yield deferToThread(condition)) if blocking else condition()):
            if reactor.seconds() > deadline:
                raise AssertionError(f"gave up after {timeout}s waiting for {what}:\n" + "\n".join(self.output.lines[-40:]))
            yield deferLater(reactor, POLL_INTERVAL, lambda: None)

    def linesSince(self, seen: int, text: str) -> List[str]:
        return [line for line in self.output.lines[seen:] if text in line]
