"""
The STOW-RS check's two counts: the parts of a request as its blocks go by,
and the instances Orthanc's answer accounts for.
"""

import json

from twisted.trial.unittest import SynchronousTestCase

from appliance.web.stowcheck import FAILED_SOP_SEQUENCE, REFERENCED_SOP_SEQUENCE, PartCounter, answeredItems
from tests.webclients import BOUNDARY, multipart

MULTIPART = b'multipart/related; type="application/dicom"; boundary=' + BOUNDARY


def stowAnswer(referenced: int, failed: int) -> bytes:
    item = {"00081155": {"vr": "UI", "Value": ["1.2.3"]}}
    answer = {"00081190": {"vr": "UR", "Value": ["https://pacs.example/pacs/studies/1.2"]}}
    for tag, count in ((REFERENCED_SOP_SEQUENCE, referenced), (FAILED_SOP_SEQUENCE, failed)):
        answer[tag] = {"vr": "SQ", "Value": [item] * count} if count else {"vr": "SQ"}
    return json.dumps(answer).encode("ascii")


class PartCounterTests(SynchronousTestCase):
    def count(self, body: bytes, blocks) -> int:
        counter = PartCounter.forContentType(MULTIPART)
        start = 0
        for end in blocks:
            counter.feed(body[start:end])
            start = end
        counter.feed(body[start:])
        return counter.parts

    def test_everyCutOfTheBodyCountsTheSame(self):
        # Parts holding the boundary's text but not at a line's start are
        # content, not delimiters.
        body = multipart([b"a" * 50, b"x--" + BOUNDARY + b"y", b"", b"c" * 7])
        for cut in range(len(body) + 1):
            self.assertEqual(self.count(body, [cut]), 4, cut)
        self.assertEqual(self.count(body, range(1, len(body))), 4)

    def test_quotedBoundaryAndOtherTypes(self):
        counter = PartCounter.forContentType(b'multipart/related; boundary="a b"; type="application/dicom"')
        counter.feed(multipart([b"1", b"2"], boundary=b"a b"))
        self.assertEqual(counter.parts, 2)
        self.assertIsNone(PartCounter.forContentType(b"application/dicom"))
        self.assertIsNone(PartCounter.forContentType(b"multipart/related"))

    def test_nothingSentIsNoPart(self):
        self.assertEqual(self.count(b"", []), 0)
        self.assertEqual(self.count(b"just bytes", []), 0)


class AnsweredItemsTests(SynchronousTestCase):
    def test_json(self):
        self.assertEqual(answeredItems(b"application/dicom+json", stowAnswer(3, 2)), 5)
        self.assertEqual(answeredItems(b"application/dicom+json; charset=utf-8", stowAnswer(0, 0)), 0)

    def test_xml(self):
        xml = (
            b'<?xml version="1.0" encoding="UTF-8"?><NativeDicomModel>'
            b'<DicomAttribute tag="00081199" vr="SQ" keyword="ReferencedSOPSequence">'
            b'<Item number="1"/><Item number="2"/></DicomAttribute>'
            b'<DicomAttribute tag="00081198" vr="SQ" keyword="FailedSOPSequence"><Item number="1"/></DicomAttribute>'
            b"</NativeDicomModel>"
        )
        self.assertEqual(answeredItems(b"application/dicom+xml", xml), 3)

    def test_unreadable(self):
        self.assertIsNone(answeredItems(b"application/dicom+json", b"{not json"))
        self.assertIsNone(answeredItems(b"application/dicom+json", b"[1, 2]"))
        self.assertIsNone(answeredItems(b"application/dicom+xml", b"<unclosed"))
        self.assertIsNone(answeredItems(b"text/plain", stowAnswer(1, 0)))
