"""
The audit trail sent to an Audit Record Repository: each record one RFC 5424
message (facility authpriv, severity notice, MSGID C{IHE+RFC-3881}, the
audit message as its MSG) over TLS with octet counting (RFC 5425), as IHE
ATNA's Record Audit Event asks.

The trail's own files (L{appliance.audit.trail}) are the queue: the
forwarder reads them from where it left off (kept in C{.syslog-sent} beside
them, written atomically), so records made while the collector is away, or
the daemon stopped, are sent when it is back, in order; nothing is dropped.
A backlog past C{MAX_BACKLOG} is said in the journal (and again once it is
sent).  Syslog over TLS has no acknowledgement: a record written in the
moment a collector's connection breaks may not reach it (the local file
holds it all the same), and one is never sent twice.
"""

import os
import re
from pathlib import Path
from typing import List, Optional, Tuple

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate, TLSVersion, optionsForClientTLS, platformTrust, trustRootFromCertificates
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from appliance.audit.trail import recordFiles
from appliance.deferreds import shortDescription

#: authpriv (10) * 8 + notice (5): IHE ITI-20's facility and severity.
PRIORITY = 85
MSGID = "IHE+RFC-3881"
APP_NAME = "pacs-appliance"

#: Bytes of records read and sent at a time.
BATCH = 256 * 1024

#: Unsent bytes past which the journal is told that the collector lags.
MAX_BACKLOG = 64 * 1024 * 1024

CURSOR_FILE = ".syslog-sent"

_EVENT_TIME = re.compile(rb'EventDateTime="([0-9T:.Z+-]+)"')

Cursor = Tuple[str, int]


def readCursor(folder: Path) -> Cursor:
    """
    Where sending left off: a file's name and the offset in it (the start
    of the oldest file when nothing was sent yet).
    """
    try:
        name, offset = (folder / CURSOR_FILE).read_text().split()
        return name, int(offset)
    except (OSError, ValueError):
        return "", 0


def writeCursor(folder: Path, cursor: Cursor) -> None:
    temporary = folder / (CURSOR_FILE + ".new")
    temporary.write_text(f"{cursor[0]} {cursor[1]}\n")
    os.replace(temporary, folder / CURSOR_FILE)


def readBatch(folder: Path, cursor: Cursor, limit: int = BATCH) -> Tuple[List[bytes], Cursor, int]:
    """
    The whole records after C{cursor} (about C{limit} bytes, or one record
    if it is longer), the cursor after them, and the bytes still unsent
    after those.  A file is read to its end before the next one is begun.
    Blocking: call on a thread.
    """
    lines: List[bytes] = []
    size = 0
    position = cursor
    backlog = 0
    # Once a file is not read to its end, the later ones wait behind it.
    waiting = False
    for path in recordFiles(folder):
        if path.name < cursor[0]:
            continue
        start = cursor[1] if path.name == cursor[0] else 0
        length = path.stat().st_size
        if waiting or size >= limit:
            backlog += length - start
            continue
        with path.open("rb") as stream:
            stream.seek(start)
            chunk = stream.read(limit - size)
            end = chunk.rfind(b"\n") + 1
            if end == 0 and len(chunk) == limit - size:
                # A record longer than what is left of the batch: read on to
                # its end, so that it is sent whole, alone if need be.
                chunk += stream.readline()
                end = chunk.rfind(b"\n") + 1
        # Only whole lines: a record being written is sent next time.
        lines.extend(chunk[:end].splitlines())
        size += end
        position = (path.name, start + end)
        if start + end < length:
            waiting = True
            backlog += length - (start + end)
    return lines, position, backlog


def syslogMessage(record: bytes, hostname: str, procid: int) -> bytes:
    """
    C{record} (one audit message) as an RFC 5424 message, with RFC 5425's
    octet-counting frame.
    """
    found = _EVENT_TIME.search(record)
    timestamp = found.group(1).decode("ascii") if found else "-"
    message = f"<{PRIORITY}>1 {timestamp} {hostname} {APP_NAME} {procid} {MSGID} - ".encode("ascii") + record
    return b"%d " % (len(message),) + message


@implementer(IPushProducer)
class _CollectorConnection(Protocol):
    """
    One connection to the collector: sends what the forwarder hands it, as
    fast as the connection takes it.
    """

    def __init__(self, forwarder: "SyslogForwarder") -> None:
        self._forwarder = forwarder
        self.paused = False

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self._forwarder.connected(self)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._forwarder.sendMore()

    def stopProducing(self) -> None:
        self.paused = True

    def dataReceived(self, data: bytes) -> None:
        # A collector says nothing over RFC 5425.
        pass

    def connectionLost(self, reason) -> None:
        self._forwarder.disconnected(self, reason)


class SyslogForwarder(MultiService):
    """
    Sends the trail's records to C{host:port} over TLS, from where it left
    off, whenever the trail says there are more and whenever it connects.

    @param authorities: the collector's certificate authorities (L{None}:
        the system's).
    @param certificate: presented to the collector (ATNA's node
        authentication): the appliance's own.
    """

    log = Logger()

    def __init__(
        self, folder: Path, host: str, port: int, authorities, certificate: PrivateCertificate, hostname: str, reactor=None
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self._folder = folder
        self._reactor = reactor
        self._hostname = hostname
        self._where = f"{host}:{port}"
        self._connection: Optional[_CollectorConnection] = None
        self._reading = False
        self._again = False
        self._lagging = False
        self._away = False
        self.cursor: Cursor = ("", 0)
        if authorities is None:
            trust = platformTrust()
        else:
            from cryptography.hazmat.primitives.serialization import Encoding

            trust = trustRootFromCertificates([Certificate.loadPEM(each.public_bytes(Encoding.PEM)) for each in authorities])
        tls = optionsForClientTLS(
            host, trust, clientCertificate=certificate, extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2}
        )
        endpoint = wrapClientTLS(tls, HostnameEndpoint(reactor, host, port, timeout=10))
        factory = Factory.forProtocol(lambda: _CollectorConnection(self))
        ClientService(endpoint, factory, retryPolicy=backoffPolicy(maxDelay=30.0), clock=reactor).setServiceParent(self)

    def startService(self) -> None:
        self.cursor = readCursor(self._folder)
        super().startService()

    def stopService(self):
        # Nothing more is written to a connection that closes (what the
        # trail records now is sent at the next start); and a TLS connection
        # with a producer registered waits for it to go before it closes.
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.transport.unregisterProducer()
        return super().stopService()

    def connected(self, connection: _CollectorConnection) -> None:
        self._connection = connection
        if self._away:
            self._away = False
            self.log.info("The audit collector {where} is connected again", where=self._where)
        self.sendMore()

    def disconnected(self, connection: _CollectorConnection, reason) -> None:
        if self._connection is connection:
            self._connection = None
        if not self._away and self.running:
            self._away = True
            self.log.warn(
                "The audit collector {where} is away ({why}): records wait in the trail's files until it is back",
                where=self._where,
                why=shortDescription(reason.value),
            )

    def sendMore(self) -> None:
        """
        Send the records not sent yet, a batch at a time (the trail calls
        this after each record).
        """
        if self._reading:
            self._again = True
            return
        if not self.running or self._connection is None or self._connection.paused:
            return
        self._reading = True
        self._again = False
        reading = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), readBatch, self._folder, self.cursor)
        reading.addCallback(self._send)
        reading.addErrback(lambda failure: self.log.failure("Could not read the audit trail to send it", failure))
        reading.addBoth(self._read)

    def _send(self, batch: Tuple[List[bytes], Cursor, int]) -> None:
        lines, cursor, backlog = batch
        connection = self._connection
        if connection is None or not self.running:
            return
        for line in lines:
            connection.transport.write(syslogMessage(line, self._hostname, os.getpid()))
        if cursor != self.cursor:
            self.cursor = cursor
            writeCursor(self._folder, cursor)
        if lines:
            self._again = True
        if backlog > MAX_BACKLOG and not self._lagging:
            self._lagging = True
            self.log.error(
                "{size} MiB of audit records wait to be sent to {where}: the collector takes them slower than they come",
                size=backlog // (1024 * 1024),
                where=self._where,
            )
        elif backlog == 0 and self._lagging:
            self._lagging = False
            self.log.info("Every audit record has been sent to {where} again", where=self._where)

    def _read(self, ignored: object) -> None:
        self._reading = False
        if self._again:
            self.sendMore()
