"""
The DICOM audit message schema (PS3.15 A.5.1), for the tests of the audit
records the appliance writes.

The schema is the RELAX NG of the standard, converted once to the XML syntax
(tests/audit/README.md says from where and how), so that lxml reads it without
Java.  Loaded on first use and then kept: one schema for the whole test run.
"""

import re
from pathlib import Path
from typing import List, Optional

from lxml import etree

SCHEMA = Path(__file__).parent / "audit" / "audit-message.rng"

_schema: Optional[etree.RelaxNG] = None

# The end of an xsd:dateTime that carries its time zone.
_ZONED = re.compile(r"(Z|[+-][0-9]{2}:[0-9]{2})$")


def auditSchema() -> etree.RelaxNG:
    """
    The compiled schema, read from L{SCHEMA} the first time it is asked for.
    """
    global _schema
    if _schema is None:
        _schema = etree.RelaxNG(etree.parse(str(SCHEMA)))
    return _schema


def _parser() -> etree.XMLParser:
    # An audit record is our own output, but it quotes what clients sent:
    # nothing in it is fetched or expanded.
    return etree.XMLParser(
        resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False
    )


def _conventionProblems(root: etree._Element) -> List[str]:
    """
    The two rules of PS3.15 A.5.2 that the schema does not express:
    "Audit Messages shall not contain empty elements and shall not contain
    attributes with a value of the empty string" (its token and text values
    accept ""), and "The EventDateTime shall include the time zone
    information" (A.5.2.5; xsd:dateTime makes the zone optional).  An element
    counts as empty when it has no children, no attributes and no text.
    """
    problems = []
    tree = root.getroottree()
    for element in root.iter(etree.Element):
        path = tree.getpath(element)
        for name, value in element.attrib.items():
            if value == "":
                problems.append(
                    f"line {element.sourceline}: {path}/@{name} is empty (PS3.15 A.5.2)"
                )
        if (
            len(element) == 0
            and not element.attrib
            and not (element.text or "").strip()
        ):
            problems.append(
                f"line {element.sourceline}: {path} is empty (PS3.15 A.5.2)"
            )
    for event in root.iterfind("EventIdentification"):
        when = event.get("EventDateTime", "").strip()
        if when and not _ZONED.search(when):
            problems.append(
                f"line {event.sourceline}: EventDateTime {when!r} has no time zone"
                " (PS3.15 A.5.2.5)"
            )
    return problems


def validateAuditMessage(xml: bytes) -> List[str]:
    """
    What is wrong with the audit message C{xml} (one AuditMessage document, as
    bytes): its RELAX NG validation errors against the DICOM audit message
    schema, then any break of the two rules of PS3.15 A.5.2 that the schema
    cannot say (no empty element or attribute; an EventDateTime with its time
    zone), each as "line N: message".  Empty when the message is valid.
    """
    try:
        document = etree.fromstring(xml, _parser())
    except etree.XMLSyntaxError as e:
        return [f"not well-formed XML: {e}"]
    schema = auditSchema()
    problems = []
    if not schema.validate(document):
        problems.extend(f"line {error.line}: {error.message}" for error in schema.error_log)
    problems.extend(_conventionProblems(document))
    return problems
