"""
DICOM audit messages (PS3.15 Annex A.5; IHE ATNA's Record Audit Event), one
event each, written as one line of XML.

An event names what happened (C{EventID}, its action, its outcome, its
time), who took part (C{ActiveParticipant}: the user with their account's
source, or a remote node, and the appliance), the appliance as the audit
source, and what it was about (C{ParticipantObjectIdentification}: studies
and their patient, a query, a node).  The codes are DICOM's (DCM, PS3.16)
and RFC 3881's, as PS3.15 A.5.3 lists them for each event.
"""

import base64
import datetime
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Tuple
from xml.etree import ElementTree

Code = Tuple[str, str, str]

# The events of PS3.15 A.5.3, and their type codes.
APPLICATION_ACTIVITY: Code = ("110100", "DCM", "Application Activity")
APPLICATION_START: Code = ("110120", "DCM", "Application Start")
APPLICATION_STOP: Code = ("110121", "DCM", "Application Stop")
INSTANCES_ACCESSED: Code = ("110103", "DCM", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED: Code = ("110104", "DCM", "DICOM Instances Transferred")
STUDY_DELETED: Code = ("110105", "DCM", "DICOM Study Deleted")
QUERY: Code = ("110112", "DCM", "Query")
SECURITY_ALERT: Code = ("110113", "DCM", "Security Alert")
NODE_AUTHENTICATION: Code = ("110126", "DCM", "Node Authentication")
SOFTWARE_CONFIGURATION: Code = ("110131", "DCM", "Software Configuration")
USER_AUTHENTICATION: Code = ("110114", "DCM", "User Authentication")
LOGIN: Code = ("110122", "DCM", "Login")
LOGOUT: Code = ("110123", "DCM", "Logout")

# Roles of the participants.
APPLICATION: Code = ("110150", "DCM", "Application")
SOURCE: Code = ("110153", "DCM", "Source Role ID")
DESTINATION: Code = ("110152", "DCM", "Destination Role ID")

# How a participant object is identified.
STUDY_INSTANCE_UID: Code = ("110180", "DCM", "Study Instance UID")
PATIENT_NUMBER: Code = ("2", "RFC-3881", "Patient Number")
URI: Code = ("12", "RFC-3881", "URI")
NODE_ID: Code = ("110182", "DCM", "Node ID")
SOP_CLASS_UID: Code = ("110181", "DCM", "SOP Class UID")

#: EventOutcomeIndicator (PS3.15 Table A.5.2-1).
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = 0, 4, 8

#: NetworkAccessPointTypeCode: a machine name, an IP address.
MACHINE_NAME, IP_ADDRESS = "1", "2"


@dataclass(frozen=True)
class Participant:
    userID: str
    requestor: bool
    role: Optional[Code] = None
    userName: Optional[str] = None
    alternativeUserID: Optional[str] = None
    #: The address the participant was reached at, and its kind.
    networkAccessPoint: Optional[str] = None
    networkAccessPointType: str = IP_ADDRESS


@dataclass(frozen=True)
class ParticipantObject:
    objectID: str
    typeCode: str
    role: str
    idType: Code
    name: Optional[str] = None
    query: Optional[bytes] = None
    #: (type, value) pairs; the value is written base64, as the schema says.
    details: Tuple[Tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class AuditEvent:
    eventID: Code
    action: str
    outcome: int
    #: Seconds since the epoch.
    time: float
    participants: Tuple[Participant, ...]
    objects: Tuple[ParticipantObject, ...] = ()
    eventType: Optional[Code] = None
    outcomeDescription: Optional[str] = None


@dataclass(frozen=True)
class AuditSource:
    """
    The appliance as the audit source and as a participant: its node name
    (also its network access point), its AE title, the hospital's site.
    """

    node: str
    aet: str
    site: str = ""

    def appliance(self, role: Optional[Code] = None, requestor: bool = False) -> Participant:
        return Participant(
            "pacs-appliance", requestor, role, alternativeUserID=f"AETITLES={self.aet}",
            networkAccessPoint=self.node, networkAccessPointType=MACHINE_NAME,
        )


@dataclass(frozen=True)
class Study:
    """
    A study as an audit record names it, with its patient when known.
    """

    uid: str
    description: str = ""
    patientID: str = ""
    patientName: str = ""

    def objects(self) -> Tuple[ParticipantObject, ...]:
        # A patient's studies retrieved by patient (C-MOVE at PATIENT level)
        # name the patient alone.
        found = [ParticipantObject(self.uid, "2", "3", STUDY_INSTANCE_UID, name=self.description or "study")] if self.uid else []
        if self.patientID:
            found.append(ParticipantObject(self.patientID, "1", "1", PATIENT_NUMBER, name=self.patientName or self.patientID))
        return tuple(found)


def timestamp(seconds: float) -> str:
    """
    C{seconds} since the epoch as the messages write it (UTC, milliseconds).
    """
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _text(value: str) -> str:
    # One line a record: no control character survives, in text or attribute.
    return "".join(character if character >= " " and character != "\x7f" else " " for character in value)


def _code(parent: ElementTree.Element, tag: str, code: Code) -> None:
    ElementTree.SubElement(parent, tag, {"csd-code": code[0], "codeSystemName": code[1], "originalText": code[2]})


def render(event: AuditEvent, source: AuditSource) -> str:
    """
    C{event} as one line of XML, with its declaration.
    """
    root = ElementTree.Element("AuditMessage")
    identification = ElementTree.SubElement(
        root,
        "EventIdentification",
        {"EventActionCode": event.action, "EventDateTime": timestamp(event.time), "EventOutcomeIndicator": str(event.outcome)},
    )
    _code(identification, "EventID", event.eventID)
    if event.eventType is not None:
        _code(identification, "EventTypeCode", event.eventType)
    if event.outcomeDescription:
        ElementTree.SubElement(identification, "EventOutcomeDescription").text = _text(event.outcomeDescription)
    for participant in event.participants:
        attributes = {"UserID": _text(participant.userID) or "-"}
        if participant.alternativeUserID:
            attributes["AlternativeUserID"] = _text(participant.alternativeUserID)
        if participant.userName:
            attributes["UserName"] = _text(participant.userName)
        attributes["UserIsRequestor"] = "true" if participant.requestor else "false"
        if participant.networkAccessPoint:
            attributes["NetworkAccessPointID"] = _text(participant.networkAccessPoint)
            attributes["NetworkAccessPointTypeCode"] = participant.networkAccessPointType
        element = ElementTree.SubElement(root, "ActiveParticipant", attributes)
        if participant.role is not None:
            _code(element, "RoleIDCode", participant.role)
    sourceAttributes = {"AuditSourceID": source.node}
    if source.site:
        sourceAttributes = {"AuditEnterpriseSiteID": _text(source.site), **sourceAttributes}
    auditSource = ElementTree.SubElement(root, "AuditSourceIdentification", sourceAttributes)
    # 4: an application server process.
    ElementTree.SubElement(auditSource, "AuditSourceTypeCode", {"csd-code": "4"})
    for item in event.objects:
        element = ElementTree.SubElement(
            root,
            "ParticipantObjectIdentification",
            {"ParticipantObjectID": _text(item.objectID), "ParticipantObjectTypeCode": item.typeCode, "ParticipantObjectTypeCodeRole": item.role},
        )
        _code(element, "ParticipantObjectIDTypeCode", item.idType)
        if item.name:
            ElementTree.SubElement(element, "ParticipantObjectName").text = _text(item.name)
        if item.query is not None:
            ElementTree.SubElement(element, "ParticipantObjectQuery").text = base64.b64encode(item.query).decode("ascii")
        for kind, value in item.details:
            ElementTree.SubElement(
                element, "ParticipantObjectDetail", {"type": kind, "value": base64.b64encode(value).decode("ascii")}
            )
    return '<?xml version="1.0" encoding="UTF-8"?>' + ElementTree.tostring(root, encoding="unicode")


# --- the events ---------------------------------------------------------------


def person(label: str, name: str, address: str, role: Optional[Code] = None) -> Participant:
    """
    A user, by their account's C{label} (C{source:name}), from C{address}.
    """
    return Participant(label, True, role, userName=name, networkAccessPoint=address)


def node(aet: str, address: Optional[str], requestor: bool = True) -> Participant:
    """
    A DICOM node, by its AE title, from C{address}.
    """
    return Participant(aet, requestor, alternativeUserID=f"AETITLES={aet}", networkAccessPoint=address)


def userAuthentication(
    source: AuditSource, when: float, user: Participant, logout: bool = False, failure: Optional[str] = None
) -> AuditEvent:
    """
    A login (or, with C{failure}, a refused one), or a logout (A.5.3.12).
    """
    return AuditEvent(
        USER_AUTHENTICATION, "E", MINOR_FAILURE if failure else SUCCESS, when,
        (user, source.appliance()), (), LOGOUT if logout else LOGIN, failure,
    )


def query(source: AuditSource, when: float, user: Participant, url: str, queryString: bytes, outcome: int) -> AuditEvent:
    """
    A DICOMweb search (QIDO-RS), with its query keys (A.5.3.10).
    """
    asked = ParticipantObject(url, "2", "3", URI, query=queryString, details=(("QueryEncoding", b"UTF-8"),))
    return AuditEvent(
        QUERY, "E", outcome, when,
        (_inRole(user, SOURCE), source.appliance(DESTINATION)),
        (asked,),
    )


def dicomQuery(
    source: AuditSource, when: float, requestor: Participant, sopClass: str, identifier: bytes, transferSyntax: str
) -> AuditEvent:
    """
    A DICOM C-FIND, with its identifier as sent (A.5.3.10).
    """
    asked = ParticipantObject(
        sopClass, "2", "3", SOP_CLASS_UID, query=identifier, details=(("TransferSyntax", transferSyntax.encode("ascii")),)
    )
    return AuditEvent(QUERY, "E", SUCCESS, when, (_inRole(requestor, SOURCE), source.appliance(DESTINATION)), (asked,))


def _inRole(participant: Participant, role: Code) -> Participant:
    return replace(participant, role=role)


def instancesTransferred(
    source: AuditSource,
    when: float,
    user: Participant,
    studies: Sequence[Study],
    stored: bool,
    outcome: int = SUCCESS,
    destination: Optional[Participant] = None,
    description: Optional[str] = None,
) -> AuditEvent:
    """
    Instances of C{studies} sent to C{user} (a retrieve: action R), or, with
    C{stored}, received from them (STOW-RS, C-STORE: action C) (A.5.3.7);
    a retrieve that C{user} asked to be sent to another C{destination}
    (C-MOVE) names the three.
    """
    if stored:
        participants: Tuple[Participant, ...] = (_inRole(user, SOURCE), source.appliance(DESTINATION))
    elif destination is not None and destination != user:
        participants = (source.appliance(SOURCE), _inRole(destination, DESTINATION), user)
    else:
        participants = (source.appliance(SOURCE), _inRole(user, DESTINATION))
    objects = tuple(item for study in studies for item in study.objects())
    return AuditEvent(INSTANCES_TRANSFERRED, "C" if stored else "R", outcome, when, participants, objects, None, description)


def studiesChanged(
    source: AuditSource, when: float, user: Participant, studies: Sequence[Study], action: str, whole: bool, outcome: int
) -> AuditEvent:
    """
    C{studies} changed by C{user} under /pacs-admin/: deleted whole (a
    study or a patient: A.5.3.8, DICOM Study Deleted), or (A.5.3.6, DICOM
    Instances Accessed) some of their instances deleted (action D), their
    instances modified (U), or an anonymised copy of them created (C).
    """
    objects = tuple(item for study in studies for item in study.objects())
    event = STUDY_DELETED if action == "D" and whole else INSTANCES_ACCESSED
    return AuditEvent(event, action, outcome, when, (user, source.appliance()), objects)


def nodeAuthenticationFailure(source: AuditSource, when: float, address: str, callingAET: str, why: str) -> AuditEvent:
    """
    A remote node refused at the DICOM port (A.5.3.11, Node Authentication).
    """
    remote = Participant(callingAET or address, False, alternativeUserID=f"AETITLES={callingAET}" if callingAET else None, networkAccessPoint=address)
    subject = ParticipantObject(address, "2", "13", NODE_ID, name=callingAET or address, details=(("Alert Description", why.encode("utf-8")),))
    return AuditEvent(SECURITY_ALERT, "E", MINOR_FAILURE, when, (source.appliance(), remote), (subject,), NODE_AUTHENTICATION, why)


def configurationReloaded(source: AuditSource, when: float, path: str, outcome: str, applied: bool) -> AuditEvent:
    """
    A reload of the configuration, applied or refused (A.5.3.11, Software
    Configuration).
    """
    subject = ParticipantObject(
        "file://" + path, "2", "5", URI, name=path.rsplit("/", 1)[-1], details=(("Alert Description", outcome.encode("utf-8")),)
    )
    return AuditEvent(
        SECURITY_ALERT, "E", SUCCESS if applied else MINOR_FAILURE, when, (source.appliance(),), (subject,),
        SOFTWARE_CONFIGURATION, outcome,
    )


def applicationActivity(source: AuditSource, when: float, started: bool, version: str) -> AuditEvent:
    """
    The appliance starting or stopping (A.5.3.1).
    """
    appliance = Participant(
        "pacs-appliance", False, APPLICATION, f"pacs-appliance {version}", f"AETITLES={source.aet}", source.node, MACHINE_NAME
    )
    return AuditEvent(APPLICATION_ACTIVITY, "E", SUCCESS, when, (appliance,), (), APPLICATION_START if started else APPLICATION_STOP)
