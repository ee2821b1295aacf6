"""
Telling a whole answer from one cut short when only the close of its
connection ends it: multipart bodies and ZIP archives, cut at every point.
"""


from twisted.trial.unittest import SynchronousTestCase

from appliance.web.answerend import AnswerEnd, MultipartEnd, ZipEnd
from tests.webclients import BOUNDARY, archive, multipart


def watched(end: AnswerEnd, data: bytes, blockSize: int) -> AnswerEnd:
    for start in range(0, len(data), blockSize):
        end.feed(data[start : start + blockSize])
    return end


class ContentTypeTests(SynchronousTestCase):
    def test_multipartBoundary(self) -> None:
        for contentType in (
            b'multipart/related; type="application/dicom"; boundary=' + BOUNDARY,
            b'Multipart/Related; boundary="' + BOUNDARY + b'"; type="application/dicom"',
            b"multipart/related;boundary=" + BOUNDARY,
        ):
            end = AnswerEnd.forContentType(contentType)
            self.assertIsInstance(end, MultipartEnd, contentType)
            self.assertTrue(watched(end, multipart([b"x"]), 7).whole(), contentType)

    def test_zip(self) -> None:
        self.assertIsInstance(AnswerEnd.forContentType(b"application/zip"), ZipEnd)

    def test_typesThatCannotTell(self) -> None:
        for contentType in (b"application/dicom+json", b"application/octet-stream", b"multipart/related", b""):
            self.assertIsNone(AnswerEnd.forContentType(contentType), contentType)


class MultipartEndTests(SynchronousTestCase):
    def test_wholeInAnyBlocks(self) -> None:
        body = multipart([b"a" * 3000, b"--" + BOUNDARY + b" inside a part", b""])
        for blockSize in (1, 2, 5, 64, 1000, len(body)):
            self.assertTrue(watched(MultipartEnd(BOUNDARY), body, blockSize).whole(), blockSize)

    def test_cutAnywhere(self) -> None:
        """
        Cut anywhere before its close delimiter's last byte, the body is
        not whole; only the line break after the delimiter may be missing.
        """
        body = multipart([b"a" * 300, b"--" + BOUNDARY + b"-", b"b" * 100])
        for length in range(len(body) - 2):
            self.assertFalse(watched(MultipartEnd(BOUNDARY), body[:length], 16).whole(), length)
        for length in (len(body) - 2, len(body) - 1):
            self.assertTrue(watched(MultipartEnd(BOUNDARY), body[:length], 16).whole(), length)

    def test_nothing(self) -> None:
        self.assertFalse(MultipartEnd(BOUNDARY).whole())


class ZipEndTests(SynchronousTestCase):
    def test_wholeInAnyBlocks(self) -> None:
        for comment in (b"Created by Orthanc", b"", b"PK\x05\x06" * 200):
            data = archive(comment)
            for blockSize in (1, 3, 21, 22, 23, 4096, len(data)):
                self.assertTrue(watched(ZipEnd(), data, blockSize).whole(), (comment[:20], blockSize))

    def test_commentTooLongForTheWatch(self) -> None:
        self.assertFalse(watched(ZipEnd(), archive(b"x" * 2000), 4096).whole())

    def test_cutAnywhere(self) -> None:
        data = archive()
        for length in range(len(data)):
            self.assertFalse(watched(ZipEnd(), data[:length], 1000).whole(), length)
