"""
Who may reach what through the whole HTTPS site, in memory: the request layer
(L{ApplianceSite}), the access gate and every route of L{buildSiteResource}
with the proxy routes of L{buildProxyResources}, the real L{Authenticator}
reading a users file, and the proxy's C{forward} replaced by a recorder so
that no Orthanc is needed.

Each table row is a raw request (user, method, path as sent, headers) and
what must come of it: the status, and what reached the proxy (nothing, or the
path asked of Orthanc).
"""

import json
import socket
import sqlite3
from typing import List

from twisted.logger import capturedLogs, formatEvent

from tests.webclients import Connection, GatedSiteCase, Row

#: What a browser loading a page sends (L{appliance.web.auth.isNavigation}).
NAVIGATION = (("Accept", "text/html,application/xhtml+xml"),)

PUBLIC = [
    Row(None, "GET", "/healthz", 200),
    Row(None, "GET", "/login", 200),
    Row(None, "GET", "/favicon.ico", 200),
    Row(None, "GET", "/manifest.json", 200),
    Row(None, "HEAD", "/manifest.json", 200),
    # The viewer's configuration and pages are not public.
    Row(None, "GET", "/app-config.js", 401),
    Row(None, "GET", "/app-config.js", 302, headers=NAVIGATION),
    Row("viewer", "GET", "/app-config.js", 200),
    Row(None, "GET", "/", 401),
    Row(None, "GET", "/", 302, headers=NAVIGATION),
    # A public file's name does not open what follows it.
    Row(None, "GET", "/favicon.ico/../pacs-admin/system", 401),
    Row(None, "POST", "/favicon.ico", 401),
    Row(None, "GET", "/healthz/../pacs/studies", 200),
    Row(None, "GET", "/healthz/%2e%2e/pacs/studies", 200),
    Row(None, "GET", "/login/../pacs-admin/system", 404),
    # CORS preflights carry no credentials; the proxy answers them itself.
    Row(None, "OPTIONS", "/pacs/studies", 204),
    Row(
        None,
        "OPTIONS",
        "/pacs/studies",
        204,
        headers=(("Origin", "https://viewer.example"), ("Access-Control-Request-Method", "POST")),
    ),
    Row("admin", "OPTIONS", "/pacs/studies", 204),
]

ROLES = [
    # /pacs: viewers read, uploaders store, nobody else changes anything.
    Row(None, "GET", "/pacs/studies", 401),
    Row("intruder", "GET", "/pacs/studies", 401),
    Row("viewer", "GET", "/pacs/studies?PatientID=P1", 200, "/pacs/studies?PatientID=P1"),
    Row("viewer", "HEAD", "/pacs/studies", 200, "/pacs/studies"),
    Row("viewer", "GET", "/pacs/wado?requestType=WADO", 200, "/pacs/wado?requestType=WADO"),
    Row("viewer", "GET", "/pacs/servers", 404),
    Row(None, "POST", "/pacs/studies", 401),
    Row("viewer", "POST", "/pacs/studies", 403),
    Row("uploader", "POST", "/pacs/studies", 200, "/pacs/studies"),
    Row("uploader", "POST", "/pacs/studies/1.2.3", 200, "/pacs/studies/1.2.3"),
    Row("admin", "POST", "/pacs/studies", 200, "/pacs/studies"),
    # Outside STOW-RS, POST is no DICOMweb method: its body is not even read.
    Row("uploader", "POST", "/pacs/studies/1.2.3/series", 413),
    Row("uploader", "POST", "/pacs/wado", 413),
    Row("admin", "POST", "/pacs/instances", 413),
    Row("uploader", "DELETE", "/pacs/studies/1.2.3", 403),
    Row("admin", "DELETE", "/pacs/studies/1.2.3", 405),
    Row("admin", "PUT", "/pacs/studies", 413),
    # Methods are case-sensitive: "get" is no GET.
    Row("viewer", "get", "/pacs/studies", 403),
    Row("admin", "get", "/pacs/studies", 405),
    Row("viewer", "TRACE", "/pacs/studies", 403),
    Row("admin", "PATCH", "/pacs-admin/system", 405),
    # /pacs-admin: administrators only, however the name is spelt.
    Row(None, "GET", "/pacs-admin/system", 401),
    Row("viewer", "GET", "/pacs-admin/system", 403),
    Row("uploader", "GET", "/pacs-admin/system", 403),
    Row("admin", "GET", "/pacs-admin/system", 200, "/system"),
    Row("admin", "GET", "/pacs-admin", 301),
    Row("admin", "GET", "/pacs-admin/", 200, "/"),
    Row(None, "GET", "/%70acs-admin/system", 401),
    Row("viewer", "GET", "/%70acs-admin/system", 403),
    Row("admin", "GET", "/%70acs-admin/system", 200, "/system"),
    # Another name: the viewer's pages (which need a user), never Orthanc.
    Row(None, "GET", "/PACS-ADMIN/system", 401),
    Row("viewer", "GET", "/PACS-ADMIN/system", 200),
    Row("admin", "GET", "/PACS-ADMIN/system", 200),
]

PATHS = [
    # Only paths: the absolute form would name the route in a host part.
    Row("admin", "GET", "http://pacs.example/pacs-admin/system", 400),
    Row("viewer", "GET", "https://pacs.example/pacs/studies", 400),
    # Climbing out of /pacs into /pacs-admin, literally or encoded.
    Row(None, "GET", "/pacs/../pacs-admin/system", 401),
    Row("viewer", "GET", "/pacs/../pacs-admin/system", 400),
    Row("admin", "GET", "/pacs/../pacs-admin/system", 400),
    Row("viewer", "GET", "/pacs/%2e%2e/pacs-admin/system", 400),
    Row("admin", "GET", "/pacs/%2E%2E/pacs-admin/system", 400),
    Row("viewer", "GET", "/pacs/studies/%2e%2e/%2e%2e/pacs-admin/system", 400),
    Row("viewer", "GET", "/pacs/studies/..%2f..%2fsystem", 400),
    Row("admin", "GET", "/pacs/studies/..%2f..%2fsystem", 400),
    Row("viewer", "GET", "/pacs/studies%2f..%2f..%2fsystem", 400),
    Row("viewer", "GET", "/pacs/..%2fpacs-admin/system", 400),
    Row("viewer", "GET", "/pacs-admin/../pacs/studies", 403),
    Row("admin", "GET", "/pacs-admin/../pacs/studies", 400),
    # Empty and dot first segments are no route to Orthanc.
    Row(None, "GET", "//pacs-admin/system", 401),
    Row("viewer", "GET", "//pacs-admin/system", 400),
    Row("admin", "GET", "//pacs-admin/system", 400),
    Row("viewer", "GET", "/./pacs-admin/system", 400),
    Row("admin", "GET", "/./pacs-admin/system", 400),
    Row("viewer", "GET", "/pacs%2f..%2fpacs-admin/system", 400),
    # Inside a route, paths are resolved as Orthanc would, then re-encoded.
    Row("viewer", "GET", "/pacs/studies/../series", 200, "/pacs/series"),
    Row("viewer", "GET", "/pacs//studies/./1.2.3", 200, "/pacs/studies/1.2.3"),
    Row("viewer", "GET", "/pacs/studies%2f1.2.3", 200, "/pacs/studies/1.2.3"),
    Row("viewer", "GET", "/%70acs/studies", 200, "/pacs/studies"),
    Row("admin", "GET", "/pacs-admin/patients/%2e%2e/system", 200, "/system"),
    Row("viewer", "GET", "/pacs/studies/1.2.3%00", 400),
]

METHOD_OVERRIDES = [
    Row("viewer", "GET", "/pacs/studies?_method=DELETE", 400),
    Row("viewer", "GET", "/pacs/studies/1.2.3?a=1&%5Fmethod=DELETE", 400),
    Row("admin", "GET", "/pacs-admin/patients/1?_method=DELETE", 400),
    Row("viewer", "GET", "/pacs/studies", 400, headers=(("X-HTTP-Method-Override", "DELETE"),)),
    Row("uploader", "POST", "/pacs/studies", 400, headers=(("X-HTTP-Method-Override", "DELETE"),)),
    Row("admin", "GET", "/pacs-admin/system", 400, headers=(("x-http-method-override", "PUT"),)),
    Row("admin", "POST", "/pacs-admin/tools/find", 400, headers=(("X-HTTP-Method-Override", "DELETE"),)),
]

UNSAFE_ENDPOINTS = [
    Row("admin", "POST", "/pacs-admin/tools/execute-script", 403),
    Row("admin", "GET", "/pacs-admin/tools/execute-script", 403),
    Row("admin", "POST", "/pacs-admin/tools/Execute-Script", 403),
    Row("admin", "POST", "/pacs-admin/TOOLS/EXECUTE-SCRIPT", 403),
    Row("admin", "POST", "/pacs-admin/tools/execute-script/", 403),
    Row("admin", "POST", "/pacs-admin//tools/./execute-script", 403),
    Row("admin", "POST", "/pacs-admin/tools%2fexecute-script", 403),
    Row("admin", "POST", "/pacs-admin/tools/execute%2Dscript", 403),
    Row("admin", "POST", "/pacs-admin/%74ools/execute-script", 403),
    Row("admin", "POST", "/pacs-admin/x/../tools/execute-script", 403),
    Row("admin", "POST", "/pacs-admin/x/%2e%2e/tools/execute-script", 403),
    Row("admin", "POST", "/pacs-admin/tools/shutdown", 403),
    Row("admin", "POST", "/pacs-admin/tools/reset", 403),
    Row("admin", "PUT", "/pacs-admin/modalities/elsewhere", 403),
    Row("admin", "DELETE", "/pacs-admin/peers/elsewhere", 403),
    Row("admin", "PUT", "/pacs-admin/pacs/servers/elsewhere", 403),
    # What an administrator does every day goes through.
    Row("admin", "POST", "/pacs-admin/tools/find", 200, "/tools/find"),
    Row("admin", "GET", "/pacs-admin/modalities", 200, "/modalities"),
    Row("admin", "POST", "/pacs-admin/modalities/elsewhere/store", 200, "/modalities/elsewhere/store"),
    Row("admin", "DELETE", "/pacs-admin/studies/1", 200, "/studies/1"),
]


#: Orthanc's HTTP server (civetweb 1.15 on Debian 12) reads a backslash, even
#: percent-encoded, as a slash, and drops the dots that end a segment
#: (C{/tools/now.} is C{/tools/now}): the site must refuse such paths, or
#: check them as Orthanc will read them.
ORTHANC_READINGS = [
    Row("viewer", "GET", "/pacs/studies/x%5C..%5C..%5C..%5Csystem", 400),
    Row("viewer", "GET", "/pacs/studies/x%5c..%5c..%5c..%5cpatients", 400),
    Row("viewer", "GET", "/pacs/studies/x\\..\\..\\..\\system", 400),
    Row("uploader", "POST", "/pacs/studies/x%5C..%5C..%5C..%5Ctools%5Cshutdown", 400),
    Row("admin", "POST", "/pacs-admin/tools%5Cshutdown", (400, 403)),
    Row("admin", "POST", "/pacs-admin/tools\\execute-script", (400, 403)),
    Row("admin", "POST", "/pacs-admin/tools/shutdown.", (400, 403)),
    Row("admin", "POST", "/pacs-admin/tools./reset", (400, 403)),
    Row("admin", "POST", "/pacs-admin/tools/execute-script..", (400, 403)),
    Row("admin", "PUT", "/pacs-admin/modalities./elsewhere", (400, 403)),
]


#: Orthanc's web server reads 16 KiB of request head and about 64 header
#: lines (L{appliance.web.routes.ORTHANC_MAX_HEAD}): the routes refuse what it
#: could not read, though the request layer accepts heads up to 64 KiB.
ORTHANC_LIMITS = [
    Row("viewer", "GET", "/pacs/studies?PatientID=" + "A" * (20 * 1024), 414),
    Row("admin", "GET", "/pacs-admin/instances/" + "1" * (20 * 1024), 414),
    Row("viewer", "GET", "/pacs/studies", 431, headers=(("X-Long", "v" * (20 * 1024)),)),
    Row("admin", "GET", "/pacs-admin/system", 431, headers=tuple((f"X-{n}", "v") for n in range(60))),
    Row(
        "viewer", "GET", "/pacs/studies?PatientID=" + "A" * (12 * 1024), 200,
        "/pacs/studies?PatientID=" + "A" * (12 * 1024),
    ),
    Row("admin", "GET", "/pacs-admin/system", 200, "/system", headers=tuple((f"X-{n}", "v") for n in range(45))),
]


class HealthTests(GatedSiteCase):
    def test_healthzNamesTheNodeAndFollowsTheStateDatabase(self) -> None:
        """
        A node whose state database does not answer is taken out by the load
        balancer: /healthz says 503 and why, without a user.
        """
        status, headers, body = self.exchange(Row(None, "GET", "/healthz", 200))
        self.assertEqual(status, 200)
        self.assertEqual((json.loads(body)["node"], json.loads(body)["database"]), (socket.gethostname(), "ready"))
        self.database._pool.broken = sqlite3.OperationalError("disk I/O error")
        self.database.interact(lambda statements: None).addErrback(lambda failure: None)
        status, headers, body = self.exchange(Row(None, "GET", "/healthz", 503))
        self.assertEqual(status, 503)
        self.assertEqual(
            {key: json.loads(body)[key] for key in ("status", "orthanc", "database")},
            {"status": "unavailable", "orthanc": "ready", "database": "unavailable"},
        )


class AccessTests(GatedSiteCase):
    def test_whatMayStore(self) -> None:
        """
        The requests the proxy refuses while Orthanc's storage is full: any
        write on /pacs-admin but those that only read or send elsewhere, and
        STOW-RS on /pacs; never a read or a delete (which frees space).
        """
        storing = {
            ("POST", "/pacs/studies"): True,
            ("POST", "/pacs-admin/instances"): True,
            ("POST", "/pacs-admin/pacs/studies"): True,
            ("POST", "/pacs-admin/tools/create-dicom"): True,
            ("POST", "/pacs-admin/studies/abc/modify"): True,
            ("POST", "/pacs-admin/studies/abc/anonymize"): True,
            ("POST", "/pacs-admin/modalities/ct1/move"): True,
            ("PUT", "/pacs-admin/instances/abc/attachments/9999"): True,
            ("POST", "/pacs-admin/tools/find"): False,
            ("POST", "/pacs-admin/modalities/ct1/query"): False,
            ("POST", "/pacs-admin/modalities/ct1/store"): False,
            ("POST", "/pacs-admin/peers/other/store"): False,
            ("DELETE", "/pacs-admin/studies/abc"): False,
            ("GET", "/pacs-admin/instances"): False,
            ("GET", "/pacs/studies"): False,
        }
        answers = []
        for method, path in storing:
            answers.append(self.exchange(Row("admin", method, path, 200))[0])
        self.assertEqual(answers, [200] * len(storing))
        self.assertEqual(dict(zip(storing, self.stores)), storing)
        # Whose answer must account for every instance sent: STOW-RS, on
        # either route.
        stows = {request for request, stow in zip(storing, self.stows) if stow}
        self.assertEqual(stows, {("POST", "/pacs/studies"), ("POST", "/pacs-admin/pacs/studies")})


    def assertTable(self, rows: List[Row]) -> None:
        """
        Each row's request gets its status, and reaches the proxy as the row
        says; every mismatch is reported at once.
        """
        expected, actual = [], []
        for row in rows:
            status, _, _ = self.exchange(row)
            if isinstance(row.status, tuple) and status in row.status:
                status = row.status
            forwarded, self.forwarded = self.forwarded, []
            reached = [] if row.forwarded is None else [(row.method, row.forwarded, row.body)]
            described = " ".join([row.user or "anonymous", row.method, row.path] + [": ".join(h) for h in row.headers])
            expected.append((described, row.status, reached))
            actual.append((described, status, forwarded))
        self.assertEqual(actual, expected)

    def test_publicRoutes(self) -> None:
        self.assertTable(PUBLIC)

    def test_roles(self) -> None:
        self.assertTable(ROLES)

    def test_paths(self) -> None:
        self.assertTable(PATHS)

    def test_methodOverrides(self) -> None:
        self.assertTable(METHOD_OVERRIDES)

    def test_unsafeEndpoints(self) -> None:
        self.assertTable(UNSAFE_ENDPOINTS)

    def test_pathsOrthancReadsDifferently(self) -> None:
        self.assertTable(ORTHANC_READINGS)

    def test_headsOrthancCannotRead(self) -> None:
        self.assertTable(ORTHANC_LIMITS)

    def test_challenges(self) -> None:
        """
        An API client without credentials is challenged for HTTP Basic; a
        browser loading a page goes to the login page and comes back.
        """
        status, headers, _ = self.exchange(Row(None, "GET", "/pacs/studies", 401))
        self.assertEqual(status, 401)
        self.assertEqual(headers["www-authenticate"], ['Basic realm="PACS", charset="UTF-8"'])
        status, headers, _ = self.exchange(Row(None, "GET", "/viewer?StudyInstanceUIDs=1.2", 302, headers=NAVIGATION))
        self.assertEqual((status, headers["location"]), (302, ["/login?next=/viewer%3FStudyInstanceUIDs%3D1.2"]))


class BeforeTheBodyTests(GatedSiteCase):
    """
    A request is judged on its head and its account: one the account may not
    make is answered before a byte of its body is read, and its connection
    closed (an outside review held a viewer's 64 MiB in the spool for a 403).
    """

    def assertRefusedUnread(self, connection: Connection, status: int) -> bytes:
        raw = connection.transport.value()
        [(answered, headers, body)] = connection.responses()
        self.assertEqual(answered, status, raw[:300])
        self.assertNotIn(b"100 Continue", raw)
        self.assertEqual(headers["connection"], ["close"])
        self.assertTrue(connection.transport.disconnecting)
        request = connection.protocol.requests[0] if connection.protocol.requests else None
        self.assertTrue(request is None or request.content.closed)
        self.assertEqual(self.forwarded, [])
        return body

    def test_forbiddenBeforeTheBody(self) -> None:
        for expect in ((), (("Expect", "100-continue"),)):
            connection = self.connect()
            connection.send(self.head("viewer", "POST", "/pacs-admin/system", 64 * 1024 * 1024, *expect))
            body = self.assertRefusedUnread(connection, 403)
            self.assertIn(b"needs the admin role", body)
            # What the client sends anyway is not read.
            connection.send(b"x" * 65536)
            self.assertEqual(self.forwarded, [])

    def test_anonymousBeforeTheBody(self) -> None:
        connection = self.connect()
        connection.send(b"POST /pacs/studies HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n")
        self.assertRefusedUnread(connection, 401)

    def test_crossSiteBeforeTheBody(self) -> None:
        connection = self.connect()
        connection.send(self.head("uploader", "POST", "/pacs/studies", 10, ("Origin", "https://evil.example")))
        self.assertRefusedUnread(connection, 403)

    def test_noBodyWhereNoneIsRead(self) -> None:
        """
        A route that reads no body gets none read, whatever the account may
        do there: the review's viewer otherwise filled its share of the spool
        with bodies sent to the viewer's pages.
        """
        for user, method, path in (
            ("viewer", "POST", "/index.html"),
            ("viewer", "POST", "/healthz"),
            ("viewer", "GET", "/pacs/studies"),
            ("viewer", "OPTIONS", "/pacs/studies"),
            ("admin", "DELETE", "/pacs-admin/studies/1"),
        ):
            connection = self.connect()
            connection.send(self.head(user, method, path, 3 * 1024 * 1024))
            body = self.assertRefusedUnread(connection, 413)
            self.assertIn(b"This request takes no body", body, (method, path))
        self.assertEqual(self.site.spoolQuota.held, 0)

    def test_allowedGetsTheContinue(self) -> None:
        connection = self.connect()
        connection.send(self.head("uploader", "POST", "/pacs/studies", 5, ("Expect", "100-continue")))
        self.assertTrue(connection.transport.value().startswith(b"HTTP/1.1 100 Continue\r\n\r\n"))
        connection.send(b"hello")
        self.assertEqual(self.forwarded, [("POST", "/pacs/studies", b"hello")])


class SpoolShareTests(GatedSiteCase):
    """
    Bodies being received count against the account's share and the total:
    an account past its share waits (429) while another account still
    uploads; past the total, everyone waits (507); both before the body, with
    one log line.
    """

    web = {"max_upload_size": "1M", "max_spool_per_account": "1M", "max_spool": "1536K"}

    def upload(self, user: str, size: int) -> Connection:
        connection = self.connect()
        connection.send(self.head(user, "POST", "/pacs/studies", size * 1024) + b"x" * (size * 1024))
        return connection

    def assertRefused(self, connection: Connection, status: int, sentence: bytes) -> None:
        [(answered, headers, body)] = connection.responses()
        self.assertEqual((answered, headers["retry-after"]), (status, ["30"]))
        self.assertIn(sentence, body)
        self.assertTrue(connection.transport.disconnecting)

    def test_sharesPerAccountAndInAll(self) -> None:
        # The proxy keeps each upload it gets in progress, as a slow Orthanc would.
        self.holding = True
        self.upload("uploader", 1000)
        with capturedLogs() as events:
            refused = self.upload("admin", 600)
        self.assertRefused(refused, 507, b"The appliance is receiving as many uploads as it takes at once (1536 KiB)")
        [line] = [formatEvent(event) for event in events if "Refused" in event["log_format"]]
        self.assertIn("with 507", line)
        # Within the total, another account still uploads.
        self.upload("admin", 500)
        self.assertEqual(len(self.held), 2)
        # One account past its share waits for its own uploads.
        self.assertRefused(
            self.upload("uploader", 30),
            429,
            b"The account local:modality has 1000 KiB of uploads in progress and may have 1 MiB at once",
        )
        # Its upload ends: its share comes back.
        self.held.pop(0).finish()
        self.upload("uploader", 30)
        self.assertEqual([len(request.content.getvalue()) for request in self.held[1:]], [30 * 1024])

    def test_aSlowBodyHoldsOnlyWhatArrived(self) -> None:
        """
        A body is counted as it arrives: one declared large and sent at a
        crawl does not keep the others out.
        """
        slow = self.connect()
        slow.send(self.head("uploader", "POST", "/pacs/studies", 1000 * 1024) + b"x" * (10 * 1024))
        self.assertEqual(self.site.spoolQuota.held, 10 * 1024)
        self.holding = True
        self.upload("admin", 1000)
        self.assertEqual(len(self.held), 1)
        slow.lose()
        self.assertEqual(self.site.spoolQuota.held, 1000 * 1024)
