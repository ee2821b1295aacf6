"""
The audit trail on the whole daemon: a scripted session (a login, a search,
an upload, a study retrieved as the viewer retrieves it, a refused DICOM
association, the study deleted by an administrator) recorded in the trail's files and received by a real syslog
collector over TLS (rsyslog, tests/syslogcollector.py), each record valid
against the DICOM audit message schema; then the collector stopped and
started again, and every record delivered once.
"""

import base64
import json
import os
import ssl
import stat
from typing import Dict, List
from urllib.parse import urlencode

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from appliance.audit.trail import recordFiles
from tests.auditschema import validateAuditMessage
from tests.daemon import DaemonClient, addUser, startDaemon
from tests.support import ctSeries, temporaryFolder, testConfig
from tests.syslogcollector import requireSyslogCollector
from tests.webclients import stowBody

READER = ("reader", "audit reader password")
UPLOADER = ("uploader", "audit uploader password")
ADMIN = ("keeper", "audit admin password")


def basic(user) -> Dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()}


def auditMessage(syslogLine: str) -> str:
    """
    The audit message of a received RFC 5424 line (after its header).
    """
    header, separator, message = syslogLine.partition(" IHE+RFC-3881 - ")
    assert separator and header.startswith("<85>1 "), syslogLine[:200]
    return message


class AuditTrailTests(DaemonClient, TestCase):
    timeout = 300

    @inlineCallbacks
    def setUp(self):
        self.collector = requireSyslogCollector(self.skipTest)
        self.seen = len(self.collector.messages())
        self.folder = temporaryFolder(self)
        users = self.folder / "users"
        addUser(users, READER[0], READER[1], ["viewer"])
        addUser(users, UPLOADER[0], UPLOADER[1], ["uploader"])
        addUser(users, ADMIN[0], ADMIN[1], ["admin"])
        self.config = testConfig(
            self.folder,
            auth={"users_file": users},
            audit={"syslog": self.collector.address, "ca_file": self.collector.caFile, "site": "Test Hospital"},
        )
        self.output, _ = yield startDaemon(self, self.config)
        self.trustDaemon()

    def localRecords(self) -> List[str]:
        folder = self.config.appliance.state_dir / "audit"
        return [line for path in recordFiles(folder) for line in path.read_text("utf-8").splitlines()]

    def received(self) -> List[str]:
        return [auditMessage(line) for line in self.collector.messages()[self.seen:] if " pacs-appliance " in line]

    def session(self) -> None:
        """
        What a reader and an uploader do, and a stranger at the DICOM port.
        """
        status, _ = self.request(
            "POST", "/login",
            {"Content-Type": "application/x-www-form-urlencoded", "Sec-Fetch-Site": "same-origin"},
            urlencode({"user": READER[0], "password": READER[1], "next": "/"}).encode(),
        )
        assert status == 303, status
        status, _ = self.request("POST", "/login", {
            "Content-Type": "application/x-www-form-urlencoded", "Sec-Fetch-Site": "same-origin",
        }, urlencode({"user": READER[0], "password": "wrong", "next": "/"}).encode())
        assert status == 401, status
        instance = ctSeries(1, rows=64, columns=64)[0]
        contentType, body = stowBody(instance)
        status, _ = self.request(
            "POST", "/pacs/studies", {**basic(UPLOADER), "Content-Type": contentType, "Accept": "application/dicom+json"}, body
        )
        assert status == 200, status
        status, _ = self.request("GET", f"/pacs/studies?PatientID={instance.PatientID}&includefield=all", basic(READER))
        assert status == 200, status
        # As the viewer opens a study: its metadata, then its frames; one record.
        study = instance.StudyInstanceUID
        for path in (f"/pacs/studies/{study}/metadata", f"/pacs/studies/{study}/series/{instance.SeriesInstanceUID}/metadata"):
            status, _ = self.request("GET", path, basic(READER))
            assert status == 200, (path, status)
        self.instance = instance
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        from pynetdicom import AE
        from pynetdicom.sop_class import CTImageStorage

        stranger = AE(ae_title="STRANGER")
        stranger.add_requested_context(CTImageStorage)
        association = stranger.associate("127.0.0.1", self.config.dicom.listen.port, ae_title="PACS", tls_args=(context, None))
        assert not association.is_established, "a stranger's association was accepted"
        # An administrator looks at the study in Orthanc's own API (one
        # record for a page and a download), modifies it, anonymises it,
        # and deletes it.
        status, body = self.request("GET", "/pacs-admin/studies", basic(ADMIN))
        assert status == 200, status
        (orthancID,) = json.loads(body)
        status, body = self.request("GET", f"/pacs-admin/studies/{orthancID}/instances", basic(ADMIN))
        assert status == 200, status
        status, _ = self.request("GET", f"/pacs-admin/instances/{json.loads(body)[0]['ID']}/file", basic(ADMIN))
        assert status == 200, status
        change = {"Content-Type": "application/json", **basic(ADMIN)}
        status, _ = self.request(
            "POST", f"/pacs-admin/studies/{orthancID}/modify", change, json.dumps({"Replace": {"StudyDescription": "Audited"}}).encode()
        )
        assert status == 200, status
        status, _ = self.request("POST", f"/pacs-admin/studies/{orthancID}/anonymize", change, b"{}")
        assert status == 200, status
        status, _ = self.request("DELETE", f"/pacs-admin/studies/{orthancID}", basic(ADMIN))
        assert status == 200, status

    @inlineCallbacks
    def test_aSessionRecordedAndSent(self):
        yield deferToThread(self.session)
        wanted = ('csd-code="110120"', 'csd-code="110122"', 'EventOutcomeIndicator="4"', 'csd-code="110112"',
                  'EventActionCode="C"', 'EventActionCode="R"', 'csd-code="110126"', 'csd-code="110105"', 'EventActionCode="U"')
        yield self.poll(
            lambda: all(any(code in line for line in self.received()) for code in wanted)
            and sum('UserID="local:keeper"' in line for line in self.received()) >= 4,
            "every kind of record received",
        )
        received = self.received()
        for message in received:
            self.assertEqual(validateAuditMessage(message.encode("utf-8")), [], message)
        instance = self.instance
        retrieves = [line for line in received if 'EventActionCode="R"' in line and 'UserID="local:reader"' in line]
        self.assertEqual(len(retrieves), 1, "a study's retrieves are one record")
        for line in retrieves + [line for line in received if 'EventActionCode="C"' in line and "local:uploader" in line]:
            self.assertIn(f'ParticipantObjectID="{instance.StudyInstanceUID}"', line)
            self.assertIn(f'ParticipantObjectID="{instance.PatientID}"', line)
        self.assertTrue(any('UserID="local:uploader"' in line and 'EventActionCode="C"' in line for line in received))
        self.assertTrue(any('UserID="local:reader"' in line and 'EventActionCode="R"' in line for line in received))
        query = next(line for line in received if 'csd-code="110112"' in line)
        asked = base64.b64encode(f"PatientID={instance.PatientID}&includefield=all".encode()).decode()
        self.assertIn(f"<ParticipantObjectQuery>{asked}</ParticipantObjectQuery>", query)
        byAdmin = [line for line in received if 'UserID="local:keeper"' in line]
        for action, code in (("R", "110104"), ("U", "110103"), ("C", "110103")):
            (record,) = [line for line in byAdmin if f'EventActionCode="{action}"' in line]
            self.assertIn(f'csd-code="{code}"', record, action)
            self.assertIn(f'ParticipantObjectID="{instance.StudyInstanceUID}"', record, action)
            self.assertIn(f'ParticipantObjectID="{instance.PatientID}"', record, action)
        deletion = next(line for line in received if 'csd-code="110105"' in line)
        for expected in ('EventActionCode="D"', 'UserID="local:keeper"', f'ParticipantObjectID="{instance.StudyInstanceUID}"',
                         f'ParticipantObjectID="{instance.PatientID}"'):
            self.assertIn(expected, deletion)
        refused = next(line for line in received if 'csd-code="110126"' in line)
        self.assertIn('UserID="STRANGER"', refused)
        # The access log still leaves patient data out; the trail holds it,
        # in files only the daemon's user reads.
        self.assertFalse([line for line in self.output.lines if instance.PatientID in line and "appliance.web.access" in line])
        folder = self.config.appliance.state_dir / "audit"
        self.assertEqual(stat.S_IMODE(os.stat(folder).st_mode), 0o700)
        for path in recordFiles(folder):
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(sorted(self.localRecords()), sorted(received))

    @inlineCallbacks
    def test_everyRecordDeliveredOnceAcrossAnOutage(self):
        yield self.poll(lambda: len(self.received()) >= 1, "the start's record")
        self.collector.stop()
        self.addCleanup(self.collector.start)
        for attempt in range(5):
            status, _ = yield deferToThread(self.request, "GET", f"/pacs/studies?PatientID=OUTAGE{attempt}", basic(READER))
            self.assertEqual(status, 200)
        yield self.output.waitFor("The audit collector")
        self.collector.start()
        yield self.poll(lambda: len(self.received()) >= len(self.localRecords()), "the records kept during the outage")
        received, local = self.received(), self.localRecords()
        self.assertEqual(sorted(received), sorted(local), "each record once, none missing")
        asked = [base64.b64decode(line.split("<ParticipantObjectQuery>")[1].split("<")[0]) for line in received if "<ParticipantObjectQuery>" in line]
        self.assertEqual(sorted(query for query in asked if query.startswith(b"PatientID=OUTAGE")), [b"PatientID=OUTAGE%d" % n for n in range(5)])
        yield self.output.waitFor("is connected again")
