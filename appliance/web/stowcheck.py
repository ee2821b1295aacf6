"""
Whether Orthanc accounted for every instance of a STOW-RS request it
answered as a success.

Orthanc's DICOMweb plugin 1.7 leaves out of its answer an instance whose
store failed with an error (Orthanc 1.10.1 answers its own C{/instances} with
503 when the index's transaction could not be serialised after its retries,
or could not reach PostgreSQL): the answer is still 200, the instance in
neither its ReferencedSOPSequence nor its FailedSOPSequence.  A client that
reads the status, as most do, would count the instance stored.

So the proxy counts the parts of a STOW-RS request as it sends them to
Orthanc (L{PartCounter}) and the items of Orthanc's answer
(L{answeredItems}); a successful answer that accounts for fewer instances
than were sent becomes a 503 with C{Retry-After}.  Sending the request again
is safe: what was stored the first time is found already stored (Orthanc
answers it as stored), and what was not is stored now.
"""

import json
import re
from typing import List, Optional
from xml.etree import ElementTree

from appliance.web.request import mediaType

#: ReferencedSOPSequence and FailedSOPSequence (PS3.18 table 10.5.3-1).
REFERENCED_SOP_SEQUENCE = "00081199"
#: Where a stored instance can be retrieved (its study and series in the URL).
RETRIEVE_URL = "00081190"
FAILED_SOP_SEQUENCE = "00081198"

#: The most of an answer held to count its items: Orthanc writes about a
#: kilobyte per instance, so this is tens of thousands of instances.
MAX_STOW_ANSWER = 64 * 1024 * 1024

_BOUNDARY = re.compile(rb';\s*boundary\s*=\s*(?:"([^"]{1,200})"|([^\s;"]{1,200}))', re.IGNORECASE)


class PartCounter:
    """
    Counts the body parts of a multipart request as its bytes go by: a part
    begins at each delimiter (C{--boundary} at the start of the body or of a
    line), and the last delimiter closes the body (RFC 2046, section 5.1.1).
    """

    def __init__(self, boundary: bytes) -> None:
        self._delimiter = b"\r\n--" + boundary
        self._delimiters = 0
        # The body's start counts as a line's: its first delimiter needs no
        # line break before it.
        self._tail = b"\r\n"

    @classmethod
    def forContentType(cls, contentType: bytes) -> Optional["PartCounter"]:
        """
        A counter for a body of C{contentType}, or L{None} if it is not
        multipart with a boundary (Orthanc refuses such a request itself).
        """
        if not mediaType(contentType).startswith(b"multipart/"):
            return None
        match = _BOUNDARY.search(contentType)
        if match is None:
            return None
        return cls(match.group(1) or match.group(2))

    def feed(self, data: bytes) -> None:
        seen = self._tail + data
        self._delimiters += seen.count(self._delimiter)
        # Kept for the next block: the start of a delimiter cut between two
        # blocks (never a whole one, counted already).
        self._tail = seen[-(len(self._delimiter) - 1) :]

    @property
    def parts(self) -> int:
        """
        The parts seen so far; the close delimiter ends the last one.
        """
        return max(self._delimiters - 1, 0)


def answeredItems(contentType: bytes, body: bytes) -> Optional[int]:
    """
    How many instances Orthanc's STOW-RS answer accounts for, stored or
    failed, in DICOM JSON or XML; L{None} if it cannot be read.
    """
    kind = mediaType(contentType)
    try:
        if kind in (b"application/dicom+json", b"application/json"):
            answer = json.loads(body)
            return sum(len(answer.get(tag, {}).get("Value", [])) for tag in (REFERENCED_SOP_SEQUENCE, FAILED_SOP_SEQUENCE))
        if kind in (b"application/dicom+xml", b"application/xml"):
            # Orthanc's own answer, on the loopback: not a stranger's XML.
            root = ElementTree.fromstring(body)
            return sum(
                len(attribute.findall("Item"))
                for attribute in root.iter("DicomAttribute")
                if attribute.get("tag") in (REFERENCED_SOP_SEQUENCE, FAILED_SOP_SEQUENCE)
            )
    except (ValueError, AttributeError, ElementTree.ParseError):
        return None
    return None


def storedStudies(contentType: bytes, body: bytes) -> List[str]:
    """
    The Study Instance UIDs a STOW-RS answer says instances were stored in
    (from their Retrieve URLs), in order; empty if it cannot be read.
    """
    kind = mediaType(contentType)
    urls: List[str] = []
    try:
        if kind in (b"application/dicom+json", b"application/json"):
            for item in json.loads(body).get(REFERENCED_SOP_SEQUENCE, {}).get("Value", []):
                urls.extend(item.get(RETRIEVE_URL, {}).get("Value", []))
        elif kind in (b"application/dicom+xml", b"application/xml"):
            for attribute in ElementTree.fromstring(body).iter("DicomAttribute"):
                if attribute.get("tag") == RETRIEVE_URL:
                    urls.extend(value.text or "" for value in attribute.findall("Value"))
    except (ValueError, AttributeError, ElementTree.ParseError):
        return []
    uids: List[str] = []
    for url in urls:
        study = url.partition("/studies/")[2].split("/", 1)[0]
        if study and study not in uids:
            uids.append(study)
    return uids
