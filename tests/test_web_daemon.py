"""
The whole daemon, as operators run it (C{pacs-appliance run}), with the real
Orthanc and the real OHIF build: HTTPS serves the viewer, /healthz follows
Orthanc's state, HTTP redirects, SIGTERM stops everything, and a browser's
session outlives a restart.
"""

import base64
import json
import stat

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.daemon import addUser, startDaemon
from tests.support import temporaryFolder, testConfig
from tests.tlsclients import get, logIn
from tests.viewerbuild import VIEWER, requireViewer


class DaemonTests(TestCase):
    timeout = 180

    @inlineCallbacks
    def test_runServesViewerAndHealth(self):
        requireViewer(self)
        folder = temporaryFolder(self)
        users = folder / "users"
        addUser(users, "reader", "correct horse battery", ["viewer"])
        config = testConfig(folder, web={"ohif_root": VIEWER}, auth={"users_file": users})
        output, process = yield startDaemon(self, config)
        port = config.web.listen_https.port

        status, headers, body = yield deferToThread(get, port, "/healthz")
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body)["orthanc"], "ready")

        # Nothing but /healthz without a user.
        status, headers, body = yield deferToThread(get, port, "/app-config.js")
        self.assertEqual(status, 401)
        reader = {"Authorization": "Basic " + base64.b64encode(b"reader:correct horse battery").decode()}

        status, headers, body = yield deferToThread(get, port, "/viewer?StudyInstanceUIDs=1.2.3", reader)
        self.assertEqual((status, body), (200, (VIEWER / "index.html").read_bytes()))
        self.assertEqual(headers["Strict-Transport-Security"], "max-age=31536000")

        status, headers, body = yield deferToThread(get, port, "/app-config.js", reader)
        self.assertIn(b'"qidoRoot": "/pacs"', body)

        line = yield output.waitFor('"GET /app-config.js HTTP/1.1" 200')
        self.assertIn("[appliance.web.access]", line)

        process.signalProcess("TERM")
        ended = yield output.ended
        self.assertEqual(ended.exitCode, 0, "\n".join(output.lines))

    @inlineCallbacks
    def test_sessionsOutliveARestart(self):
        """
        A browser logged in before C{systemctl restart} is still logged in
        after it: sessions are kept in the state database (a private file).
        """
        folder = temporaryFolder(self)
        users = folder / "users"
        addUser(users, "reader", "correct horse battery", ["viewer"])
        config = testConfig(folder, auth={"users_file": users})
        output, process = yield startDaemon(self, config)
        port = config.web.listen_https.port
        cookie = yield deferToThread(logIn, port, "reader", "correct horse battery")
        status, headers, body = yield deferToThread(get, port, "/app-config.js", {"Cookie": cookie})
        self.assertEqual(status, 200)

        process.signalProcess("TERM")
        ended = yield output.ended
        self.assertEqual(ended.exitCode, 0, "\n".join(output.lines))
        database = config.appliance.state_dir / "appliance.sqlite3"
        self.assertEqual(stat.S_IMODE(database.stat().st_mode), 0o600)
        self.assertNotIn(cookie.split("=", 1)[1].encode("ascii"), database.read_bytes(), "only a hash of the token")

        yield startDaemon(self, config)
        status, headers, body = yield deferToThread(get, port, "/app-config.js", {"Cookie": cookie})
        self.assertEqual(status, 200, "the session lives on")
        status, headers, body = yield deferToThread(get, port, "/app-config.js", {"Cookie": "__Host-pacs-session=forged"})
        self.assertEqual(status, 401, "and a made-up one does not")

