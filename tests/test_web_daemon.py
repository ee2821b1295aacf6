"""
The whole daemon, as operators run it (C{pacs-appliance run}), with the real
Orthanc and the real OHIF build: HTTPS serves the viewer, /healthz follows
Orthanc's state, HTTP redirects, and SIGTERM stops everything.
"""

import json
import sys
from pathlib import Path
from typing import List, Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support import temporaryFolder, testConfig
from tests.test_tls import get
from tests.test_web_viewer import VIEWER, requireViewer


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


class DaemonTests(TestCase):
    timeout = 180

    @inlineCallbacks
    def test_runServesViewerAndHealth(self):
        requireViewer(self)
        folder = temporaryFolder(self)
        config = testConfig(folder, web={"ohif_root": VIEWER})
        output = DaemonOutput()
        executable = Path(sys.executable).parent / "pacs-appliance"
        process = reactor.spawnProcess(
            output,
            str(executable),
            [str(executable), "run", "--config", str(config.sources[0])],
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
        )

        def stop():
            if output.ended.called:
                return None
            process.signalProcess("TERM")
            return output.ended

        self.addCleanup(stop)
        yield output.waitFor("Orthanc is ready")
        port = config.web.listen_https.port

        status, headers, body = yield deferToThread(get, port, "/healthz")
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body)["orthanc"], "ready")

        status, headers, body = yield deferToThread(get, port, "/viewer?StudyInstanceUIDs=1.2.3")
        self.assertEqual((status, body), (200, (VIEWER / "index.html").read_bytes()))
        self.assertEqual(headers["Strict-Transport-Security"], "max-age=31536000")

        status, headers, body = yield deferToThread(get, port, "/app-config.js")
        self.assertIn(b'"qidoRoot": "/pacs"', body)

        line = yield output.waitFor('"GET /app-config.js HTTP/1.1" 200')
        self.assertIn("[appliance.web.access]", line)

        process.signalProcess("TERM")
        ended = yield output.ended
        self.assertEqual(ended.exitCode, 0, "\n".join(output.lines))
