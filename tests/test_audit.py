"""
The audit trail on the whole daemon: a scripted session (a login, a search,
an upload, a study retrieved as the viewer retrieves it, a refused DICOM
association, the study looked at, modified, anonymised and deleted by an administrator)
recorded in the trail's files and received by a real syslog collector over
TLS (rsyslog, tests/syslogcollector.py), each record valid against the
DICOM audit message schema; a modality's C-STORE, C-FIND, C-GET and C-MOVE
over the TLS port (pynetdicom), each recorded with the studies and the
nodes involved; then the collector stopped and started again, and every
record delivered once.
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
from appliance.tls import selfSignedPaths
from tests.auditschema import validateAuditMessage
from tests.daemon import DaemonClient, addUser, startDaemon
from tests.support import ctSeries, freePort, temporaryFolder, testConfig
from tests.browser import logIn, viewStudy
from tests.syslogcollector import requireSyslogCollector
from tests.viewerbuild import VIEWER, requireViewer, startChromium
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
        requireViewer(self)
        self.collector = requireSyslogCollector(self.skipTest)
        self.seen = len(self.collector.messages())
        self.folder = temporaryFolder(self)
        users = self.folder / "users"
        addUser(users, READER[0], READER[1], ["viewer"])
        addUser(users, UPLOADER[0], UPLOADER[1], ["uploader"])
        addUser(users, ADMIN[0], ADMIN[1], ["admin"])
        self.movePort = freePort()
        self.config = testConfig(
            self.folder,
            auth={"users_file": users},
            web={"ohif_root": VIEWER},
            audit={"syslog": self.collector.address, "ca_file": self.collector.caFile, "site": "Test Hospital"},
            **{
                "modality:ct": {"aet": "CT1", "host": "127.0.0.1"},
                "modality:workstation": {"aet": "MOVESCP", "host": "127.0.0.1", "port": self.movePort},
            },
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
            "POST", "/pacs-admin/tools/find", change,
            json.dumps({"Level": "Study", "Query": {"PatientID": instance.PatientID}}).encode(),
        )
        assert status == 200, status
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
            and sum('UserID="local:keeper"' in line for line in self.received()) >= 6,
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
        listed = [line for line in byAdmin if 'csd-code="110112"' in line]
        self.assertTrue(any('ParticipantObjectID="/pacs-admin/studies"' in line for line in listed), byAdmin)
        (found,) = [line for line in listed if 'ParticipantObjectID="/pacs-admin/tools/find"' in line]
        self.assertIn(instance.PatientID.encode(), base64.b64decode(found.split("<ParticipantObjectQuery>")[1].split("<")[0]))
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

    def modalityTraffic(self) -> List[str]:
        """
        What a modality does over the TLS port: store a study, search for
        it, get it, and move it to a workstation; the study's instances.
        """
        from pydicom.dataset import Dataset
        from pydicom.uid import ExplicitVRLittleEndian
        from pynetdicom import AE, build_role, evt
        from pynetdicom.sop_class import (
            CTImageStorage,
            StudyRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelGet,
            StudyRootQueryRetrieveInformationModelMove,
        )

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        series = ctSeries(2, rows=64, columns=64, patientID="DICOM-AUDIT")
        received: List[str] = []
        workstation = AE(ae_title="MOVESCP")
        workstation.add_supported_context(CTImageStorage)
        server = workstation.start_server(
            ("127.0.0.1", self.movePort), block=False,
            evt_handlers=[(evt.EVT_C_STORE, lambda event: received.append(event.dataset.SOPInstanceUID) or 0)],
        )
        try:
            sender = AE(ae_title="CT1")
            sender.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
            association = sender.associate("127.0.0.1", self.config.dicom.listen.port, ae_title="PACS", tls_args=(context, None))
            assert association.is_established
            try:
                statuses = [association.send_c_store(instance).Status for instance in series]
            finally:
                association.release()
            assert statuses == [0, 0], statuses
            modality = AE(ae_title="CT1")
            for model in (StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelGet,
                          StudyRootQueryRetrieveInformationModelMove):
                modality.add_requested_context(model)
            modality.add_requested_context(CTImageStorage)
            association = modality.associate(
                "127.0.0.1", self.config.dicom.listen.port, ae_title="PACS", tls_args=(context, None),
                ext_neg=[build_role(CTImageStorage, scp_role=True)],
                evt_handlers=[(evt.EVT_C_STORE, lambda event: 0)],
            )
            assert association.is_established
            try:
                query = Dataset()
                query.QueryRetrieveLevel = "STUDY"
                query.PatientID = "DICOM-AUDIT"
                query.StudyInstanceUID = ""
                found = [identifier for status, identifier in association.send_c_find(query, StudyRootQueryRetrieveInformationModelFind) if identifier]
                assert len(found) == 1, found
                retrieve = Dataset()
                retrieve.QueryRetrieveLevel = "STUDY"
                retrieve.StudyInstanceUID = series[0].StudyInstanceUID
                statuses = [status.Status for status, _ in association.send_c_get(retrieve, StudyRootQueryRetrieveInformationModelGet) if status]
                assert statuses[-1] == 0, statuses
                statuses = [status.Status for status, _ in association.send_c_move(retrieve, "MOVESCP", StudyRootQueryRetrieveInformationModelMove) if status]
                assert statuses[-1] == 0, statuses
            finally:
                association.release()
        finally:
            server.shutdown()
        assert sorted(received) == sorted(instance.SOPInstanceUID for instance in series), received
        self.series = series
        return [instance.SOPInstanceUID for instance in series]

    @inlineCallbacks
    def test_modalityTrafficRecorded(self):
        yield deferToThread(self.modalityTraffic)
        study, patient = self.series[0].StudyInstanceUID, "DICOM-AUDIT"

        def byCT1() -> List[str]:
            return [line for line in self.localRecords() if 'UserID="CT1"' in line]

        yield self.poll(lambda: len(byCT1()) >= 4, "the modality's four records")
        records = byCT1()
        for record in records:
            self.assertEqual(validateAuditMessage(record.encode("utf-8")), [], record)
        stored, = [line for line in records if 'EventActionCode="C"' in line]
        self.assertIn('csd-code="110104"', stored)
        self.assertIn('AETITLES=CT1', stored)
        queried, = [line for line in records if 'csd-code="110112"' in line]
        self.assertIn('ParticipantObjectID="1.2.840.10008.5.1.4.1.2.2.1"', queried)
        asked = base64.b64decode(queried.split("<ParticipantObjectQuery>")[1].split("<")[0])
        self.assertIn(b"DICOM-AUDIT", asked)
        retrieved = [line for line in records if 'EventActionCode="R"' in line]
        self.assertEqual(len(retrieved), 2, retrieved)
        moved, = [line for line in retrieved if 'UserID="MOVESCP"' in line]
        self.assertIn('UserIsRequestor="false"', moved.split('UserID="MOVESCP"')[1].split(">")[0])
        for record in [stored, *retrieved]:
            self.assertIn(f'ParticipantObjectID="{study}"', record)
            self.assertIn(f'ParticipantObjectID="{patient}"', record)
            self.assertIn('EventOutcomeIndicator="0"', record)

    @inlineCallbacks
    def test_studyViewedInTheViewerRecorded(self):
        """
        A reader opens a study in OHIF (headless Chromium): one record of
        the study retrieved, naming the reader, the study and its patient.
        """
        instance = ctSeries(1, rows=64, columns=64, patientID="VIEWED-1")[0]
        contentType, body = stowBody(instance)
        status, _ = yield deferToThread(
            self.request, "POST", "/pacs/studies",
            {**basic(UPLOADER), "Content-Type": contentType, "Accept": "application/dicom+json"}, body,
        )
        self.assertEqual(status, 200)

        def view():
            browser = startChromium(selfSignedPaths(self.config.appliance.state_dir)[0], str(self.folder / "chromium"))
            try:
                base = f"https://localhost:{self.config.web.listen_https.port}"
                logIn(browser, base, READER)
                return viewStudy(browser, base, instance.StudyInstanceUID)
            finally:
                browser.quit()

        self.assertTrue((yield deferToThread(view)))

        def viewed() -> List[str]:
            return [
                line for line in self.received()
                if 'EventActionCode="R"' in line and 'UserID="local:reader"' in line
                and f'ParticipantObjectID="{instance.StudyInstanceUID}"' in line
            ]

        yield self.poll(lambda: bool(viewed()), "the record of the study viewed")
        (record,) = viewed()
        self.assertEqual(validateAuditMessage(record.encode("utf-8")), [])
        self.assertIn('ParticipantObjectID="VIEWED-1"', record)

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
