"""
Each kind of audit record the appliance writes, checked against the DICOM
audit message schema (PS3.15 A.5.1, tests/auditschema.py).
"""

import pytest

from appliance.audit import messages
from tests.auditschema import validateAuditMessage

SOURCE = messages.AuditSource("pacs.example.org", "PACS", "Example Hospital")
USER = messages.person("ldap:jdoe", "jdoe", "192.0.2.10")
STUDY = messages.Study("1.2.3.4", "CT CHEST", "PAT001", "Doe^Jane <\"x\"> \n")
WHEN = 1796400000.25

EVENTS = {
    "login": messages.userAuthentication(SOURCE, WHEN, USER),
    "failed login": messages.userAuthentication(SOURCE, WHEN, USER, failure="wrong password"),
    "logout": messages.userAuthentication(SOURCE, WHEN, USER, logout=True),
    "query": messages.query(SOURCE, WHEN, USER, "https://pacs/pacs/studies", b"PatientID=PAT*&limit=25", 0),
    "retrieve": messages.instancesTransferred(SOURCE, WHEN, USER, [STUDY], stored=False),
    "store": messages.instancesTransferred(SOURCE, WHEN, USER, [STUDY, messages.Study("5.6.7")], stored=True),
    "study deleted": messages.studiesChanged(SOURCE, WHEN, USER, [STUDY], "D", whole=True, outcome=0),
    "instances deleted": messages.studiesChanged(SOURCE, WHEN, USER, [STUDY], "D", whole=False, outcome=4),
    "study modified": messages.studiesChanged(SOURCE, WHEN, USER, [STUDY], "U", whole=True, outcome=0),
    "study anonymised": messages.studiesChanged(SOURCE, WHEN, USER, [STUDY], "C", whole=True, outcome=0),
    "refused node": messages.nodeAuthenticationFailure(SOURCE, WHEN, "198.51.100.23", "STRANGER", "calling AE title not recognised"),
    "reload": messages.configurationReloaded(SOURCE, WHEN, "/etc/pacs-appliance/appliance.ini", "Reloaded", True),
    "start": messages.applicationActivity(SOURCE, WHEN, True, "1.0.0"),
    "stop": messages.applicationActivity(SOURCE, WHEN, False, "1.0.0"),
}


@pytest.mark.parametrize("name", sorted(EVENTS))
def test_validAgainstTheSchema(name):
    line = messages.render(EVENTS[name], SOURCE)
    assert "\n" not in line
    assert validateAuditMessage(line.encode("utf-8")) == []


def test_theRecordNamesWhatHappenedAndWho():
    line = messages.render(EVENTS["retrieve"], SOURCE)
    assert 'csd-code="110104"' in line and 'EventActionCode="R"' in line
    assert 'UserID="ldap:jdoe"' in line and 'NetworkAccessPointID="192.0.2.10"' in line
    assert 'ParticipantObjectID="1.2.3.4"' in line and 'ParticipantObjectID="PAT001"' in line
    assert 'EventDateTime="2026-12-04T' in line


def test_aBrokenRecordIsRefused():
    # The validator can fail: an event without its participants is no record.
    broken = messages.AuditEvent(messages.QUERY, "E", 0, WHEN, ())
    assert validateAuditMessage(messages.render(broken, SOURCE).encode()) != []


def test_oneStudyAskedOfOrthancOnceForRecordsMadeTogether():
    """
    The records of one study made while its patient is being asked of
    Orthanc (a viewer's first requests) share one question.
    """
    from twisted.internet.defer import Deferred

    from appliance.audit.events import OrthancStudies

    class Orthanc:
        def __init__(self):
            self.asked = []

        def json(self, path, account, body=None):
            answer = Deferred()
            self.asked.append(answer)
            return answer

    orthanc = Orthanc()
    studies = OrthancStudies(orthanc)
    found = []
    for _ in range(3):
        studies.study("1.2.3").addCallback(found.append)
    assert len(orthanc.asked) == 1
    orthanc.asked[0].callback([{"MainDicomTags": {"StudyDescription": "Head"}, "PatientMainDicomTags": {"PatientID": "P-1"}}])
    assert [study.patientID for study in found] == ["P-1"] * 3
    studies.study("1.2.3").addCallback(found.append)
    assert len(orthanc.asked) == 1 and found[-1].description == "Head"
