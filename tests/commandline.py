"""
The pacs-appliance command as the tests run it, and the shipped configuration.
"""

import os
import re
import selectors
import sys
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


COMMAND = str(VENV_BIN / "pacs-appliance")


class LineReader:
    """
    Reads a child's output line by line with a deadline, never blocking forever.
    """

    def __init__(self, process):
        self.process = process
        self.lines = []
        self.selector = selectors.DefaultSelector()
        self.selector.register(process.stdout, selectors.EVENT_READ)
        self.buffer = b""
        self.ended = False

    def waitFor(self, pattern, timeout=120.0):
        deadline = time.monotonic() + timeout
        expression = re.compile(pattern)
        while True:
            for line in self.lines:
                match = expression.search(line)
                if match:
                    return match
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.ended:
                raise AssertionError(f"no line matching {pattern!r} in:\n" + "\n".join(self.lines))
            if self.selector.select(min(remaining, 1.0)):
                chunk = os.read(self.process.stdout.fileno(), 65536)
                self.ended = not chunk
                self.buffer += chunk if chunk else b"\n"
                *complete, self.buffer = self.buffer.split(b"\n")
                self.lines.extend(line.decode("utf-8", "replace") for line in complete)


REPOSITORY = Path(__file__).resolve().parent.parent


SHIPPED = REPOSITORY / "etc" / "pacs-appliance" / "appliance.ini"
