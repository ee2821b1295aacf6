"""
The table of Orthanc's routes under /pacs-admin/ (appliance.web.adminroutes):
it covers every route the installed Orthanc reports, each blocked row is
refused through the whole site without reaching the proxy, an unknown route is
refused, and [web] admin_unsafe_endpoints = yes passes them all.  The same
blocked rows against the real Orthanc, with its own log as witness, are rows
of tests/test_hostile_http.py.
"""

import json
import re
import subprocess
from typing import Set, Tuple

from twisted.trial.unittest import SynchronousTestCase

from appliance.web.adminroutes import RouteTable
from tests.support import freePorts, temporaryFolder
from tests.webclients import GatedSiteCase, Row, blockedRows

#: Why a row may be blocked, and nothing else (issue 14).
REASONS = {
    "runs code",
    "leaks secrets or patient data to the log or elsewhere",
    "writes outside the archive",
    "reaches a host the configuration does not name",
    "stops or restarts the archive",
}

#: A line Orthanc's --openapi writes for each route it cannot document.
UNDOCUMENTED = re.compile(r"Ignoring URI without API documentation: ([A-Z]+) (\S+)")


def generic(path: str) -> str:
    """
    C{path} with its placeholders unnamed, and without the rest-of-path one
    that Orthanc's description leaves out (C{/instances/{id}/content/*}).
    """
    return re.sub(r"\{[^}]*\}", "{}", path.removesuffix("/{...}"))


class TableTests(SynchronousTestCase):
    def setUp(self):
        self.table = RouteTable.load()

    def test_everyBlockedRowSaysWhyInTheIssuesWords(self):
        blocked = [route for route in self.table.routes if not route.allowed]
        self.assertEqual({route.reason for route in blocked}, REASONS)
        self.assertEqual([route for route in self.table.routes if route.allowed and route.reason], [])
        self.assertEqual(len(blocked), 19)

    def test_decisions(self):
        def decide(method, path):
            route = self.table.decide(method, tuple(path.encode().split(b"/")[1:]) if path != "/" else ())
            return None if route is None else (route.allowed, route.reason)

        self.assertEqual(decide(b"PUT", "/tools/log-level"), (False, "leaks secrets or patient data to the log or elsewhere"))
        self.assertEqual(decide(b"GET", "/tools/log-level"), (True, ""))
        self.assertEqual(decide(b"POST", "/tools/dicom-echo"), (False, "reaches a host the configuration does not name"))
        self.assertEqual(decide(b"POST", "/modalities/ct1/echo"), (True, ""))
        self.assertEqual(decide(b"HEAD", "/patients"), (True, ""))
        self.assertEqual(decide(b"GET", "/"), (True, ""))
        self.assertEqual(decide(b"GET", "/app/libs/jquery.min.js"), (True, ""))
        self.assertEqual(decide(b"GET", "/pacs/studies/1.2/series/3.4/metadata"), (True, ""))
        self.assertEqual(decide(b"PUT", "/pacs/servers/elsewhere"), (False, "reaches a host the configuration does not name"))
        # Orthanc's routes are case-sensitive, and unknown ones are no route.
        self.assertIsNone(decide(b"POST", "/tools/Shutdown"))
        self.assertIsNone(decide(b"PROPFIND", "/webdav/x"))
        self.assertIsNone(decide(b"GET", "/webdav/x"))
        self.assertIsNone(decide(b"DELETE", "/tools"))

    def test_coversEveryRouteOfTheInstalledOrthanc(self):
        """
        Orthanc's own description of its REST API (--openapi, with the routes
        it cannot document named in its log): every (method, path) is a row.
        """
        folder = temporaryFolder(self)
        httpPort, dicomPort = freePorts(2)
        configuration = folder / "orthanc.json"
        configuration.write_text(
            json.dumps(
                {
                    "StorageDirectory": str(folder / "storage"),
                    "HttpPort": httpPort,
                    "DicomPort": dicomPort,
                    "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
                    "RemoteAccessAllowed": False,
                }
            )
        )
        described = subprocess.run(
            ["/usr/sbin/Orthanc", str(configuration), f"--openapi={folder / 'openapi.json'}"],
            capture_output=True, text=True, timeout=300, cwd=folder,
        )
        self.assertEqual(described.returncode, 0, described.stderr[-2000:])
        orthanc: Set[Tuple[str, str]] = {
            (method.upper(), generic(path))
            for path, methods in json.loads((folder / "openapi.json").read_text())["paths"].items()
            for method in methods
        }
        orthanc |= {(method, generic(path)) for method, path in UNDOCUMENTED.findall(described.stderr)}
        self.assertGreater(len(orthanc), 250)
        table = {(route.method.decode(), generic(route.path)) for route in self.table.routes}
        self.assertEqual(sorted(orthanc - table), [])


class BlockedRowsThroughTheSiteTests(GatedSiteCase):
    """
    Every blocked row, as an administrator sends it: 403 with its reason,
    and nothing reaches the proxy.
    """

    def test_everyBlockedRowRefused(self):
        expected, actual = [], []
        for method, path, reason in blockedRows():
            status, _, body = self.exchange(Row("admin", method, path, 403))
            expected.append((method, path, 403, reason, []))
            actual.append((method, path, status, reason if reason in body.decode() else body.decode(), self.forwarded))
            self.forwarded = []
        self.assertEqual(actual, expected)

    def test_unknownRouteRefused(self):
        status, _, body = self.exchange(Row("admin", "GET", "/pacs-admin/webdav/uploads", 403))
        self.assertEqual(status, 403)
        self.assertIn("This is no route of Orthanc 1.10 that the appliance knows", json.loads(body)["error"])
        self.assertEqual(self.forwarded, [])


class UnsafeAllowedTests(GatedSiteCase):
    web = {"admin_unsafe_endpoints": "yes"}

    def test_everyRowPassesWhenAllowed(self):
        for method, path, _ in blockedRows() + [("GET", "/pacs-admin/webdav/uploads", "")]:
            status, _, _ = self.exchange(Row("admin", method, path, 200))
            self.assertEqual(status, 200, f"{method} {path}")
        self.assertEqual(len(self.forwarded), 20)
