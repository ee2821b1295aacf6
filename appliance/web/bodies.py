"""
Reading an HTTP client's response body whole, up to a limit: the answers the
appliance asks for itself (Orthanc's REST API for the metadata cache, the
single sign-on's provider), which it parses once complete.
"""

from typing import List

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse


class AnswerTooLarge(Exception):
    """
    An answer was larger than its reader's limit.
    """


class _LimitedBody(Protocol):
    """
    Reads an answer's body whole, or fails once it is over C{limit} bytes.
    """

    def __init__(self, limit: int, source: str) -> None:
        self.finished: Deferred = Deferred()
        self._limit = limit
        self._source = source
        self._blocks: List[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._blocks = []
            self.transport.stopProducing()
            self.finished.errback(AnswerTooLarge(f"{self._source}'s answer is over {self._limit} bytes"))
            return
        self._blocks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self._blocks))
        else:
            self.finished.errback(reason)


def readLimited(response: IResponse, limit: int, source: str) -> "Deferred[bytes]":
    """
    The body of C{response}, whole; fails with L{AnswerTooLarge} (naming
    C{source}) once it is over C{limit} bytes, and stops reading it.
    """
    reader = _LimitedBody(limit, source)
    response.deliverBody(reader)
    return reader.finished
