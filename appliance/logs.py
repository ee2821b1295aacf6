"""
Log output on standard output, the way journald (and a terminal) wants it.

Under systemd (C{JOURNAL_STREAM} names our standard output) every line starts with
a syslog priority, C{<3>} to C{<7>}, which journald turns into the entry's level
and strips; journald adds its own timestamp.  In a terminal, lines carry a
timestamp and the level in words.
"""

import math
import os
import sys
from typing import IO, Any, Callable, List, Optional

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    PredicateResult,
    eventAsText,
    formatTime,
)

#: The format of an event that carries its whole text as C{line}.
LINE_FORMAT = "{line}"

_SYSLOG_PRIORITY = {
    LogLevel.debug: 7,
    LogLevel.info: 6,
    LogLevel.warn: 4,
    LogLevel.error: 3,
    LogLevel.critical: 2,
}


def _isJournal(stream: IO[str]) -> bool:
    """
    Is C{stream} the journal stream systemd connected us to?
    """
    journal = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in journal.split(":"))
        status = os.fstat(stream.fileno())
    except (ValueError, OSError):
        return False
    return (status.st_dev, status.st_ino) == (device, inode)


def eventText(event: dict) -> str:
    """
    The text of C{event}, without timestamp or system.

    Lines relayed whole (the access log, Orthanc's output) are taken as they
    are: C{string.Formatter} would cost as much as the rest of a small
    request's log line.
    """
    if event.get("log_format") == LINE_FORMAT and "log_failure" not in event:
        line = event.get("line")
        if isinstance(line, str):
            return line
    return eventAsText(event, includeTimestamp=False, includeSystem=False)


def formatForJournal(event: dict) -> Optional[str]:
    text = eventText(event)
    if not text:
        return None
    priority = _SYSLOG_PRIORITY.get(event.get("log_level", LogLevel.info), 6)
    namespace = event.get("log_namespace", "-")
    return "".join(f"<{priority}>[{namespace}] {line}\n" for line in text.splitlines())


def oncePerSecond(format: Callable[[int], str]) -> Callable[[Optional[float]], str]:
    """
    C{format} of a time in whole seconds, remembered for the last second asked
    for: the access log would otherwise format the same time for every request.
    """
    # Nothing asked yet: a first time of None must be formatted too.
    last: List[Any] = [object(), ""]

    def formatted(when: Optional[float]) -> str:
        second = None if when is None else math.floor(when)
        if second != last[0]:
            last[:] = [second, format(second)]
        return last[1]

    return formatted


_terminalTime = oncePerSecond(lambda second: formatTime(second, timeFormat="%Y-%m-%d %H:%M:%S%z"))


def formatForTerminal(event: dict) -> Optional[str]:
    text = eventText(event)
    if not text:
        return None
    level = event.get("log_level", LogLevel.info).name.upper()
    namespace = event.get("log_namespace", "-")
    return f"{_terminalTime(event.get('log_time'))} {level:<5} [{namespace}] {text}\n"


def dropFactoryChatter(event: dict) -> PredicateResult:
    """
    Drop the "Starting factory"/"Stopping factory" lines Twisted writes for every
    outgoing connection: the proxy and the health checks would fill the journal
    with them.
    """
    if event.get("log_format", "").startswith(("Starting factory", "Stopping factory")):
        return PredicateResult.no
    return PredicateResult.maybe


def observer(stream: Optional[IO[str]] = None) -> ILogObserver:
    """
    The daemon's log observer (twistd's C{--logger} names this factory).
    """
    stream = stream or sys.stdout
    formatter = formatForJournal if _isJournal(stream) else formatForTerminal
    return FilteringLogObserver(FileLogObserver(stream, formatter), [dropFactoryChatter])
