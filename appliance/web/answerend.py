"""
Whether an answer that ends when its connection closes came whole.

Orthanc sends some answers with neither a Content-Length nor chunks, ending
them by closing its connection: whole-object WADO-RS retrievals (multipart)
and ZIP archives.  A close is then all the proxy sees, whether Orthanc
finished or broke off (killed, out of memory, a send that timed out), and
twisted.web reports both the same way (C{PotentialDataLoss}).  Passed on as
a clean end, a cut study would reach the viewer as a whole one, its last
images missing.  Both types end with a mark of their own, which tells.
"""

import re
from abc import ABC, abstractmethod
from typing import Optional

from appliance.web.request import mediaType

_BOUNDARY = re.compile(rb';\s*boundary\s*=\s*(?:"([^"]{1,200})"|([^\s;"]{1,200}))', re.IGNORECASE)

#: Bytes allowed after a multipart body's close delimiter: a line break
#: (RFC 2046 lets an epilogue follow; Orthanc's is at most CRLF).
_MULTIPART_EPILOGUE = 8

#: A ZIP archive's end of central directory record: its signature, 16
#: bytes, a 2-byte comment length, then the comment (Orthanc's: "Created by
#: Orthanc").
_ZIP_END_SIGNATURE = b"PK\x05\x06"
_ZIP_END_SIZE = 22

#: The longest archive comment recognised: an archive with a longer one
#: would be taken for a cut one.
_ZIP_COMMENT_LIMIT = 1024


class AnswerCutShort(Exception):
    """
    The connection of an answer closed before the answer's end.
    """


class AnswerEnd(ABC):
    """
    Watches the last bytes of an answer for the mark its type ends with.

    Only the tail is kept (at most about a kilobyte), so that watching
    costs next to nothing per megabyte.
    """

    def __init__(self, kind: str, keep: int) -> None:
        self.kind = kind
        self._keep = keep
        self._tail = b""

    @classmethod
    def forContentType(cls, contentType: bytes) -> Optional["AnswerEnd"]:
        """
        The watcher for an answer of C{contentType}, or L{None} for a type
        whose end cannot be told from its bytes.
        """
        kind = mediaType(contentType)
        if kind.startswith(b"multipart/"):
            found = _BOUNDARY.search(contentType)
            if found is None:
                return None
            return MultipartEnd(found.group(1) or found.group(2))
        if kind in (b"application/zip", b"application/x-zip-compressed"):
            return ZipEnd()
        return None

    def feed(self, data: bytes) -> None:
        """
        The next bytes of the answer.
        """
        if len(data) >= self._keep:
            self._tail = data[-self._keep :]
        else:
            self._tail = (self._tail + data)[-self._keep :]

    @abstractmethod
    def whole(self) -> bool:
        """
        Does what came so far end as a whole answer of this type does?
        """

    def cutShort(self) -> AnswerCutShort:
        """
        The error of an answer that ended without its mark.
        """
        return AnswerCutShort(f"the connection closed before the end of its {self.kind}")


class MultipartEnd(AnswerEnd):
    """
    A multipart body is whole once its close delimiter (C{--boundary--},
    RFC 2046) has come last.
    """

    def __init__(self, boundary: bytes) -> None:
        self._delimiter = b"--" + boundary + b"--"
        super().__init__("multipart body", len(self._delimiter) + _MULTIPART_EPILOGUE)

    def whole(self) -> bool:
        return self._tail.rstrip(b"\r\n").endswith(self._delimiter)


class ZipEnd(AnswerEnd):
    """
    A ZIP archive is whole once its end of central directory record, and
    the comment whose length it gives, have come last.
    """

    def __init__(self) -> None:
        super().__init__("ZIP archive", _ZIP_END_SIZE + _ZIP_COMMENT_LIMIT)

    def whole(self) -> bool:
        tail = self._tail
        start = tail.rfind(_ZIP_END_SIGNATURE)
        while start >= 0:
            commentLength = int.from_bytes(tail[start + 20 : start + 22], "little")
            if start + _ZIP_END_SIZE + commentLength == len(tail):
                return True
            start = tail.rfind(_ZIP_END_SIGNATURE, 0, start)
        return False
