"""
The DIMSE follower of the forwarder's audit (appliance.dicom.dimse) on
hand-made P-DATA-TF streams: the same messages whatever the chunks, a data
set kept to its first bytes only, and a stream that is not DIMSE ending the
following without an exception (the relaying goes on regardless).
"""

import random
import struct
from typing import List

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian
from twisted.trial.unittest import SynchronousTestCase

from appliance.dicom.dimse import DATA_PREFIX, Message, MessageFollower, decodeDataSetStart

CONTEXT = 3


def encode(dataset: Dataset, implicit: bool) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = implicit, True
    write_dataset(buffer, dataset)
    return buffer.getvalue()


def pdata(*fragments) -> bytes:
    """
    One P-DATA-TF PDU of (flags, bytes) fragments.
    """
    items = b"".join(struct.pack(">LBB", len(data) + 2, CONTEXT, flags) + data for flags, data in fragments)
    return struct.pack(">BBL", 4, 0, len(items)) + items


def storeRequest(messageID: int = 7) -> bytes:
    command = Dataset()
    command.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    command.CommandField = 0x0001
    command.MessageID = messageID
    command.CommandDataSetType = 0x0000
    command.AffectedSOPInstanceUID = "1.2.3.4"
    return encode(command, implicit=True)


def instance(pixels: int) -> bytes:
    dataset = Dataset()
    dataset.StudyDescription = "Head"
    dataset.PatientName = "Doe^Jane"
    dataset.PatientID = "P-1"
    dataset.StudyInstanceUID = "1.2.3"
    dataset.SeriesInstanceUID = "1.2.3.1"
    dataset.PixelData = b"\0" * pixels
    dataset["PixelData"].VR = "OW"
    return encode(dataset, implicit=False)


class MessageFollowerTests(SynchronousTestCase):
    def follow(self, stream: bytes, chunk: int) -> List[Message]:
        messages: List[Message] = []
        follower = MessageFollower(messages.append, lambda message: True)
        for start in range(0, len(stream), chunk):
            follower.feed(stream[start : start + chunk])
        self.assertIsNone(follower.ended)
        return messages

    def test_sameMessagesWhateverTheChunks(self):
        data = instance(4000)
        stream = (
            struct.pack(">BBL", 1, 0, 3) + b"abc"  # another PDU: skipped
            + pdata((0x03, storeRequest()))
            + pdata((0x00, data[:100]), (0x00, data[100:2000]))
            + pdata((0x02, data[2000:]))
        )
        for chunk in (1, 5, 7, 1000, len(stream)):
            (message,) = self.follow(stream, chunk)
            self.assertEqual((message.context, message.field), (CONTEXT, 0x0001))
            self.assertEqual(message.data, data)
            start = decodeDataSetStart(message.data, ExplicitVRLittleEndian)
            self.assertEqual((start.StudyInstanceUID, start.PatientID, start.StudyDescription), ("1.2.3", "P-1", "Head"))

    def test_onlyTheStartOfALargeDataSetIsKept(self):
        data = instance(3 * DATA_PREFIX)
        (message,) = self.follow(pdata((0x03, storeRequest())) + pdata((0x02, data)), 8192)
        self.assertEqual(message.data, data[:DATA_PREFIX])
        self.assertEqual(decodeDataSetStart(message.data, ExplicitVRLittleEndian).PatientID, "P-1")

    def test_aStreamThatIsNotDimseEndsTheFollowing(self):
        messages: List[Message] = []
        follower = MessageFollower(messages.append, lambda message: True)
        broken = struct.pack(">BBL", 4, 0, 10) + struct.pack(">LBB", 500, CONTEXT, 3) + b"\0" * 4
        follower.feed(broken)
        self.assertIn("longer than its PDU", follower.ended)
        follower.feed(pdata((0x03, storeRequest())))
        self.assertEqual(messages, [])
        garbage = MessageFollower(messages.append, lambda message: True)
        garbage.feed(pdata((0x03, b"\xff" * 40)))
        self.assertIn("command", garbage.ended)


class Recorded:
    """
    Where an L{AssociationAudit} puts its records, kept.
    """

    def __init__(self) -> None:
        self.calls: List[tuple] = []

    def __getattr__(self, name):
        return lambda *arguments: self.calls.append((name, arguments))


class MutatedStreamTests(SynchronousTestCase):
    def test_mutatedStreamsNeverRaise(self):
        """
        Streams with bytes flipped, cut or repeated, in random chunks: the
        audit of the association never raises into the relaying.
        """
        from appliance.audit.associations import AssociationAudit
        from appliance.audit.messages import node

        data = instance(2000)
        stream = pdata((0x03, storeRequest())) + pdata((0x00, data[:500])) + pdata((0x02, data[500:]))
        generator = random.Random(19)
        for attempt in range(300):
            mutated = bytearray(stream)
            for _ in range(generator.randint(1, 8)):
                position = generator.randrange(len(mutated))
                mutated[position] = generator.randrange(256)
            audit = AssociationAudit(Recorded(), node("CT1", "127.0.0.1"), lambda aet: node(aet, None))
            position = 0
            while position < len(mutated):
                size = generator.randint(1, 300)
                audit.requests.feed(bytes(mutated[position : position + size]))
                audit.responses.feed(bytes(mutated[position : position + size]))
                position += size
            audit.ended()
