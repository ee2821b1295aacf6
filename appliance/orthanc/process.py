"""
The Orthanc child process as seen from the reactor: its output becomes log events,
its end is reported to whoever supervises it.
"""

import re
from collections import deque
from typing import Callable, Deque, Dict, List

from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from appliance.logs import LINE_FORMAT

#: Orthanc logs through glog: "I1123 10:40:00.123456 main.cpp:1497] message".
_GLOG_LINE = re.compile(r"^(?P<level>[IWEF])\d{4} [\d:.]+\s+(?:\d+\s+)?(?P<message>.*)$")
_GLOG_LEVELS = {
    "I": LogLevel.info,
    "W": LogLevel.warn,
    "E": LogLevel.error,
    "F": LogLevel.critical,
}

#: Orthanc's own lines go to the log under this namespace.
orthancLog = Logger(namespace="orthanc")

#: Longest line forwarded whole; a longer one is cut, never buffered unbounded.
MAX_LINE_LENGTH = 16 * 1024


class OrthancProcessProtocol(ProcessProtocol):
    """
    Forwards every line Orthanc prints to the log under the C{orthanc} namespace
    and remembers the last few, which explain a failed start.
    """

    def __init__(self, onEnded: Callable[[Failure, List[str]], None], keep: int = 20) -> None:
        self._onEnded = onEnded
        self._partial: Dict[int, bytes] = {}
        self.lastLines: Deque[str] = deque(maxlen=keep)

    def connectionMade(self) -> None:
        self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffered = self._partial.pop(childFD, b"") + data
        *lines, rest = buffered.split(b"\n")
        for line in lines:
            self._emit(line)
        if len(rest) > MAX_LINE_LENGTH:
            self._emit(rest)
            rest = b""
        if rest:
            self._partial[childFD] = rest

    def _emit(self, raw: bytes) -> None:
        line = raw[:MAX_LINE_LENGTH].decode("utf-8", "replace").rstrip("\r")
        if not line.strip():
            return
        self.lastLines.append(line)
        match = _GLOG_LINE.match(line)
        if match is None:
            orthancLog.emit(LogLevel.info, LINE_FORMAT, line=line)
        else:
            orthancLog.emit(
                _GLOG_LEVELS[match.group("level")], LINE_FORMAT, line=match.group("message")
            )

    def processEnded(self, reason: Failure) -> None:
        for childFD in list(self._partial):
            self._emit(self._partial.pop(childFD))
        self._onEnded(reason, list(self.lastLines))
