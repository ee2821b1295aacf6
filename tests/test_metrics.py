"""
/metrics on the whole daemon: scraped as Prometheus does, parsed with
prometheus_client's own parser, its counters moving as requests are made.
"""

import base64
import socket
from typing import Dict

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.daemon import DaemonClient, addUser, startDaemon
from tests.support import temporaryFolder, testConfig

ADMIN = ("keeper", "metrics admin password")
SCRAPER = ("prometheus", "scraper password")
READER = ("reader", "reader password")


def basic(user) -> Dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()}


class MetricsTests(DaemonClient, TestCase):
    timeout = 300

    @inlineCallbacks
    def setUp(self):
        folder = temporaryFolder(self)
        users = folder / "users"
        addUser(users, ADMIN[0], ADMIN[1], ["admin"])
        addUser(users, SCRAPER[0], SCRAPER[1], ["viewer"])
        addUser(users, READER[0], READER[1], ["viewer"])
        self.config = testConfig(folder, auth={"users_file": users}, metrics={"scrape_users": SCRAPER[0]})
        self.output, _ = yield startDaemon(self, self.config)
        self.trustDaemon()

    def scrape(self, user=ADMIN) -> Dict[tuple, float]:
        """
        Every sample of a scrape, by (name, sorted labels).
        """
        status, body = self.request("GET", "/metrics", basic(user))
        assert status == 200, (status, body)
        samples = {}
        for family in text_string_to_metric_families(body.decode("utf-8")):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    @inlineCallbacks
    def test_scrape(self):
        """
        Every metric is pacs_appliance_...; requests are counted by route,
        method and status, timed, and their bytes counted; Orthanc's state,
        turns, the DICOM connections, the failed logins, the sessions, the
        state database and the certificate's expiry are there; a scrape is
        the admin's or a scrape account's, and nobody else's.
        """
        before = yield deferToThread(self.scrape)
        self.assertTrue(all(name.startswith("pacs_appliance_") for name, _ in before), sorted({n for n, _ in before}))
        self.assertEqual(before[("pacs_appliance_orthanc_state", (("state", "ready"),))], 1.0)
        self.assertEqual(before[("pacs_appliance_database_ready", ())], 1.0)
        self.assertGreater(before[("pacs_appliance_certificate_expiry_timestamp_seconds", ())], 1.7e9)
        self.assertEqual(before[("pacs_appliance_orthanc_starts_total", ())], 1.0)
        self.assertIn(("pacs_appliance_storage_free_bytes", ()), before)

        for attempt in range(3):
            status, _ = yield deferToThread(self.request, "GET", "/pacs/studies", basic(READER))
            self.assertEqual(status, 200)
        status, _ = yield deferToThread(self.request, "GET", "/pacs/studies", basic((READER[0], "wrong")))
        self.assertEqual(status, 401)
        yield deferToThread(self.request, "POST", "/login", {
            "Content-Type": "application/x-www-form-urlencoded", "Sec-Fetch-Site": "same-origin",
        }, f"user={READER[0]}&password={READER[1]}&next=/".encode())
        # A connection to the DICOM port that never says a word.
        with socket.create_connection(("127.0.0.1", self.config.dicom.listen.port)):
            pass
        yield self.poll(
            lambda: self.scrape().get(("pacs_appliance_dicom_associations_total", (("outcome", "closed"),)), 0) >= 1,
            "the DICOM connection counted",
        )

        after = yield deferToThread(self.scrape, SCRAPER)
        ok = ("pacs_appliance_http_requests_total", (("method", "GET"), ("route", "pacs"), ("status", "200")))
        self.assertEqual(after[ok] - before.get(ok, 0), 3)
        refused = ("pacs_appliance_http_requests_total", (("method", "GET"), ("route", "pacs"), ("status", "401")))
        self.assertEqual(after[refused], 1)
        self.assertGreaterEqual(after[("pacs_appliance_http_request_duration_seconds_count", (("route", "pacs"),))], 4)
        self.assertGreater(after[("pacs_appliance_http_sent_bytes_total", (("route", "pacs"),))], 0)
        self.assertGreater(after[("pacs_appliance_http_received_bytes_total", (("route", "login"),))], 0)
        self.assertEqual(after[("pacs_appliance_login_failures_total", ())], 1)
        self.assertEqual(after[("pacs_appliance_sessions", ())], 1)
        self.assertEqual(after[("pacs_appliance_orthanc_turns_in_use", ())], 0)
        self.assertEqual(after[("pacs_appliance_metadata_cache_hits_total", ())], 0)

        for user, expected in ((READER, 403), ((READER[0], "wrong"), 401)):
            status, _ = yield deferToThread(self.request, "GET", "/metrics", basic(user))
            self.assertEqual(status, expected)
        status, _ = yield deferToThread(self.request, "GET", "/metrics", {})
        self.assertEqual(status, 401)
