"""
The whole daemon as a child process (C{pacs-appliance run}), and its users.
"""

import subprocess
import sys
from pathlib import Path
from typing import List, Sequence, Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.protocol import ProcessProtocol

from appliance.config import Config

#: The console script of the checkout's virtual environment.
EXECUTABLE = Path(sys.executable).parent / "pacs-appliance"


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


@inlineCallbacks
def startDaemon(case, config: Config, ready: str = "Orthanc is ready"):
    """
    Run the daemon on C{config} until C{case} ends; fires with its
    L{DaemonOutput} and process once a line containing C{ready} is printed.
    """
    output = DaemonOutput()
    process = reactor.spawnProcess(
        output,
        str(EXECUTABLE),
        [str(EXECUTABLE), "run", "--config", str(config.sources[0])],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
    )

    def stop():
        if output.ended.called:
            return None
        process.signalProcess("TERM")
        return output.ended

    case.addCleanup(stop)
    yield output.waitFor(ready)
    return output, process
