"""
The daemon's log lines: for the journal and for a terminal.
"""

import io

from twisted.logger import LogLevel, formatTime
from twisted.trial.unittest import SynchronousTestCase

from twisted.python.failure import Failure

from appliance.logs import LINE_FORMAT, eventText, formatForJournal, formatForTerminal, observer, oncePerSecond


def event(text: str, when: float, level=LogLevel.info, namespace="appliance.test") -> dict:
    return {
        "log_format": "{text}",
        "text": text,
        "log_time": when,
        "log_level": level,
        "log_namespace": namespace,
    }


class TerminalTests(SynchronousTestCase):
    def test_line(self) -> None:
        when = 1_700_000_000.25
        stamp = formatTime(when, timeFormat="%Y-%m-%d %H:%M:%S%z")
        self.assertEqual(
            formatForTerminal(event("Orthanc is ready", when)),
            f"{stamp} INFO  [appliance.test] Orthanc is ready\n",
        )

    def test_eachSecondItsStamp(self) -> None:
        """
        The remembered stamp is only reused within the same second.
        """
        lines = [formatForTerminal(event("x", when)) for when in (1000.1, 1000.9, 1001.0, 1000.5)]
        stamps = [line.split(" INFO")[0] for line in lines]
        self.assertEqual(stamps[0], stamps[1])
        self.assertNotEqual(stamps[1], stamps[2])
        self.assertEqual(stamps[3], formatTime(1000, timeFormat="%Y-%m-%d %H:%M:%S%z"))

    def test_noTime(self) -> None:
        line = formatForTerminal(event("x", None))
        self.assertTrue(line.startswith("- INFO"), line)


class EventTextTests(SynchronousTestCase):
    """
    Lines relayed whole (the access log, Orthanc's output) skip the
    formatter, and come out exactly as a formatted event would.
    """

    def relayed(self, line: object, **more: object) -> dict:
        return {**event("", 1000), "log_format": LINE_FORMAT, "line": line, **more}

    def test_relayedAsIs(self) -> None:
        line = '"10.0.0.1" - - "GET /pacs/{x}?... HTTP/1.1" 200 5 "-" "curl {0} %s"'
        self.assertEqual(eventText(self.relayed(line)), line)
        self.assertTrue(formatForTerminal(self.relayed(line)).endswith(f"[appliance.test] {line}\n"))
        self.assertEqual(formatForJournal(self.relayed(line)), f"<6>[appliance.test] {line}\n")

    def test_emptyLineWritesNothing(self) -> None:
        self.assertIsNone(formatForTerminal(self.relayed("")))

    def test_failureKeepsItsTraceback(self) -> None:
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        text = eventText(self.relayed("it broke", log_failure=failure))
        self.assertTrue(text.startswith("it broke"), text)
        self.assertIn("ZeroDivisionError", text)

    def test_otherValuesFormatted(self) -> None:
        self.assertEqual(eventText(self.relayed(42)), "42")


class OncePerSecondTests(SynchronousTestCase):
    def test_formatsOnceASecond(self) -> None:
        calls = []

        def format(second: int) -> str:
            calls.append(second)
            return f"<{second}>"

        formatted = oncePerSecond(format)
        self.assertEqual([formatted(when) for when in (5.0, 5.5, 5.99, 6.0, 6.1)], ["<5>"] * 3 + ["<6>"] * 2)
        self.assertEqual(calls, [5, 6])
        # Before the epoch, a second starts at its lower bound too.
        self.assertEqual(formatted(-0.5), "<-1>")

    def test_firstTimeUnknown(self):
        formatted = oncePerSecond(lambda second: "-" if second is None else str(second))
        self.assertEqual(formatted(None), "-")


class JournalTests(SynchronousTestCase):
    def test_priorityPerLine(self) -> None:
        self.assertEqual(
            formatForJournal(event("one\ntwo", 0, LogLevel.warn)),
            "<4>[appliance.test] one\n<4>[appliance.test] two\n",
        )

    def test_factoryChatterDropped(self) -> None:
        stream = io.StringIO()
        publish = observer(stream)
        publish({**event("x", 1), "log_format": "Starting factory {factory!r}", "factory": object()})
        publish(event("kept", 1))
        self.assertEqual(stream.getvalue().count("\n"), 1)
        self.assertIn("kept", stream.getvalue())
