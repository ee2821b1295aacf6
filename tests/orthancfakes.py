"""
Stand-ins for Orthanc's process and probe, and a look at real processes.
"""

import os

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure


def processExists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): look at its state.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


class FakeProcess:
    def __init__(self, protocol, pid):
        self.protocol = protocol
        self.pid = pid
        self.signals = []

    def signalProcess(self, name):
        self.signals.append(name)

    def closeStdin(self):
        pass

    def end(self, exitCode=0, signal=None):
        reason = ProcessDone(0) if exitCode == 0 and signal is None else ProcessTerminated(exitCode, signal)
        self.protocol.processEnded(Failure(reason))


class ProcessReactor(MemoryReactorClock):
    """
    A clock that records spawned processes instead of starting them.
    """

    def __init__(self):
        super().__init__()
        self.processes = []

    def spawnProcess(self, protocol, executable, args, env=None, path=None, childFDs=None, **kw):
        process = FakeProcess(protocol, 1000 + len(self.processes))
        process.executable, process.args, process.env, process.path = executable, args, env, path
        self.processes.append(process)
        protocol.makeConnection(process)
        return process


class ScriptedProbe:
    """
    A readiness probe whose answers the test decides: each call returns a
    Deferred the test fires.
    """

    def __init__(self):
        self.calls = []

    def __call__(self, credentials):
        pending = Deferred()
        self.calls.append((credentials, pending))
        return pending

    def answer(self, ok=True):
        credentials, pending = self.calls.pop(0)
        if ok:
            pending.callback(b"{}")
        else:
            pending.errback(ConnectionRefusedError("refused"))
