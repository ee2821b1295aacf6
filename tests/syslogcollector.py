"""
A private syslog collector for the tests of the audit trail: Debian's rsyslog
(packages rsyslog and rsyslog-openssl), in a temporary folder, listening on a
free port of 127.0.0.1 with TLS from a test authority, as an IHE ATNA Audit
Record Repository does: RFC 5424 messages over RFC 5425 (TLS, octet-counting
framing "LEN SP MSG"; rsyslog's imtcp also takes LF-terminated messages).
Every message received is written, whole and as received (%rawmsg%: PRI,
header, structured data and MSG), one a line, to a file the tests read
(L{SyslogCollector.messages}).  One collector serves the whole test run
(started at its first use, removed when the run ends); the file only grows,
so a test counts from what was there when it began.

The package's own instance (/etc/rsyslog.conf, started by its service) is
neither used nor needed: rsyslogd reads a configuration file of its own (-f),
keeps its pid file (-i) and work directory in the folder, loads no system
input (imuxsock, imklog, imjournal) and sends its own messages to a file in
the folder, not to the machine's journal (processInternalMessages).  It runs
as whoever runs the tests, root in CI, and needs no privilege.

The OpenSSL driver negotiates TLS 1.3 (and 1.2); rsyslog's GnuTLS driver
(rsyslog-gnutls) offers only TLS 1.2 unless given a priority string.

rsyslog replaces control characters in what it receives by #ooo (a tab
arrives as "#011"): a message can never span two lines of the file.  A
message longer than L{MAX_MESSAGE_SIZE} bytes is cut to that length, the rest
of its frame dropped (rsyslogd.log says so); a frame counted longer than
imtcp's limit (200000 bytes) is a framing error, after which rsyslog reads
that connection as LF-terminated messages.  A client that closes without a
TLS close_notify loses nothing, but rsyslogd.log has errors for it.
"""

import glob
import os
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from tests.support import SharedServer, TestAuthority, freePort

#: How long rsyslogd may take to accept TLS connections after it starts.
START_TIMEOUT = 30.0

#: What rsyslogd writes where it cannot listen, and goes on all the same.
NO_LISTENER = "Could not create tcp listener"

RSYSLOGD = Path("/usr/sbin/rsyslogd")
#: The OpenSSL network stream driver, in a package of its own
#: (rsyslog-openssl), under the machine's multiarch folder.
STREAM_DRIVER = "/usr/lib/*/rsyslog/lmnsd_ossl.so"

#: The longest message kept whole (rsyslog's default is 8 KiB).
MAX_MESSAGE_SIZE = 64 * 1024

def installed() -> bool:
    return RSYSLOGD.exists() and bool(glob.glob(STREAM_DRIVER))


def requireSyslogCollector(skip) -> "SyslogCollector":
    """
    The shared collector, started if need be; calls C{skip} (a test case's
    C{skipTest}, or C{pytest.skip}) with the reason where rsyslog or its TLS
    driver is not installed (CI installs them: packaging/apt-packages-test.txt).
    """
    if not installed():
        skip("Debian's rsyslog and rsyslog-openssl packages are not installed")
    return SyslogCollector.shared()


class SyslogCollector(SharedServer):
    """
    The collector, and what a test needs to reach it: C{host} ("localhost",
    which its certificate names, as does 127.0.0.1, where it listens),
    C{port}, C{address} ("localhost:PORT"), C{caFile}; and where it keeps
    everything, C{folder}.
    """

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="pacs-appliance-syslog-"))
        self.host = "localhost"
        self.ip = "127.0.0.1"
        self.port = freePort()
        self.address = f"{self.host}:{self.port}"
        self.maxMessageSize = MAX_MESSAGE_SIZE
        self.authority = TestAuthority(self.folder / "tls")
        self.caFile = self.authority.path
        certificate, key = self.authority.issue("syslog", "localhost", server=True)
        key.chmod(0o600)
        self.received = self.folder / "messages.log"
        #: rsyslog's own messages (errors, start and stop).
        self.log = self.folder / "rsyslogd.log"
        #: What rsyslogd writes to its standard output and error: its
        #: configuration errors, before it has a log.
        self.output = self.folder / "rsyslogd.out"
        self.pidFile = self.folder / "rsyslogd.pid"
        work = self.folder / "work"
        work.mkdir()
        self.config = self.folder / "rsyslog.conf"
        self.config.write_text(self._configuration(certificate, key, work))
        self.process: Optional[subprocess.Popen] = None
        try:
            self.start()
        except BaseException:
            # No atexit yet to remove it; the error carries rsyslog's output.
            self.remove()
            raise

    def _configuration(self, certificate: Path, key: Path, work: Path) -> str:
        return f"""\
# global() first: the message size must be set before an input is loaded.
global(
    maxMessageSize="{MAX_MESSAGE_SIZE}"
    workDirectory="{work}"
    # rsyslog's own messages go through its own rules (to rsyslogd.log),
    # not to the machine's syslog socket or journal.
    processInternalMessages="on"
    # imtcp's thread sometimes misses the wake-up at shutdown and is
    # cancelled only after this long (1 s by default): stop() in 0.1 s at
    # most.  It has handed on everything it read by then.
    inputs.timeout.shutdown="100"
    # No reverse lookup of each client's address.
    net.enableDNS="off"
    defaultNetstreamDriverCAFile="{self.caFile}"
    defaultNetstreamDriverCertFile="{certificate}"
    defaultNetstreamDriverKeyFile="{key}"
)

# Mode 1 is TLS only; clients are not asked for a certificate (anon), and
# check the collector's against the test authority.
module(
    load="imtcp"
    streamDriver.name="ossl"
    streamDriver.mode="1"
    streamDriver.authMode="anon"
    # The rest of a message longer than maxMessageSize is dropped, not
    # taken for a message of its own.
    discardTruncatedMsg="on"
)

template(name="whole" type="string" string="%rawmsg%\\n")

ruleset(name="received") {{
    # Each batch of messages written at once, in one write when it fits in
    # the buffer: a test polling the file sees whole lines.
    action(
        type="omfile"
        file="{self.received}"
        template="whole"
        ioBufferSize="{2 * MAX_MESSAGE_SIZE}"
        flushOnTXEnd="on"
        asyncWriting="off"
    )
}}

input(type="imtcp" address="127.0.0.1" port="{self.port}" ruleset="received")

# The default ruleset has only rsyslog's own messages.
action(type="omfile" file="{self.log}")
"""

    def start(self) -> None:
        """
        Start the collector (again, on the same port); returns once it
        completes TLS handshakes.  Nothing to do if it runs: a test that
        stops it starts it again in its cleanup, and perhaps before.
        """
        if self.process is not None and self.process.poll() is None:
            return
        self.process = None
        # A pid file left by an rsyslogd that was killed would stop the next
        # one from starting if its pid had been reused.
        self.pidFile.unlink(missing_ok=True)
        environment = {
            name: value
            for name, value in os.environ.items()
            # Under a systemd service, rsyslogd would tell the service
            # manager it is ready, and take sockets passed to the tests.
            if name not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
        }
        # Where this start's output begins, to show only what it said.
        since = {path: path.stat().st_size if path.exists() else 0 for path in (self.output, self.log)}
        with self.output.open("ab") as output:
            # -n keeps rsyslogd in the foreground, a child to wait for.
            self.process = subprocess.Popen(
                [str(RSYSLOGD), "-n", "-f", str(self.config), "-i", str(self.pidFile)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=environment,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._handshakes():
            said = self.diagnostics(since)
            # rsyslogd goes on without a listener it cannot open (the port
            # taken, a key it cannot read): no use waiting.
            if self.process.poll() is not None or time.monotonic() > deadline or NO_LISTENER in said:
                self.stop()
                raise RuntimeError("rsyslogd did not start:\n" + self.diagnostics(since))
            time.sleep(0.02)

    def _handshakes(self) -> bool:
        """
        Whether the collector completes a TLS handshake, its certificate
        checked against the authority for C{host}.
        """
        context = ssl.create_default_context(cafile=str(self.caFile))
        try:
            with socket.create_connection((self.ip, self.port), timeout=0.5) as connection:
                with context.wrap_socket(connection, server_hostname=self.host) as tls:
                    try:
                        # A TLS close, not a connection that breaks off:
                        # rsyslog logs that as an error.
                        tls.unwrap()
                    except (OSError, ssl.SSLError):
                        pass
        except (OSError, ssl.SSLError):
            return False
        return True

    def diagnostics(self, since: Optional[Dict[Path, int]] = None) -> str:
        """
        What rsyslogd said: its output, and its own log; from the offsets in
        C{since} on, if given.
        """
        parts = []
        for path in (self.output, self.log):
            if path.exists():
                with path.open("rb") as file:
                    file.seek((since or {}).get(path, 0))
                    text = file.read().decode("utf-8", "replace")
                if text:
                    parts.append(f"--- {path.name}\n{text}")
        return "\n".join(parts) or "(rsyslogd said nothing)"

    def messages(self) -> List[str]:
        """
        The messages received so far, oldest first, each as received
        (without framing), decoded as UTF-8; a line rsyslog is still writing
        is left out.
        """
        try:
            data = self.received.read_bytes()
        except FileNotFoundError:
            return []
        *lines, _unfinished = data.split(b"\n")
        return [line.decode("utf-8", "replace") for line in lines]
