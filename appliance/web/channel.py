"""
The HTTP/1.1 connection under the site's requests (twisted.web's channel):
what it accepts of a request head, how it refuses, and how long a client may
take over each part of an exchange.
"""

from typing import Optional, Sequence, Tuple

from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IPushProducer, ISSLTransport
from twisted.logger import Logger
from twisted.web import http
from twisted.web.http_headers import Headers
from twisted.web.server import Request
from zope.interface import implementer

from appliance.compat import HTTPChannelHooks
from appliance.web.pages import REASONS, describeSize

#: What every answer says in its Server header: no version, for scanners.
SERVER = b"pacs-appliance"

#: Header names and values, in order: the site's standard headers, those of
#: a refusal.
HeaderPairs = Sequence[Tuple[bytes, bytes]]


def cancelPending(call: Optional[IDelayedCall]) -> None:
    """
    Cancel C{call}, if there is one and it has neither run nor been cancelled.
    """
    if call is not None and call.active():
        call.cancel()


@implementer(IHandshakeListener)
class DeadlineHTTPChannel(HTTPChannelHooks):
    """
    An HTTP/1.1 channel that:

      - aborts a connection whose client has not sent a whole request head
        within C{headerTimeout}: from the connection (so the TLS handshake
        counts) and from the end of each response.  twisted.web's own
        timeout is an idle timer that every byte resets, which a client
        sending its headers a byte at a time never trips;
      - aborts a TLS connection whose handshake has not ended within
        C{handshakeTimeout}, shorter: a bare TCP connection holds a slot of
        the listener's cap, and costs nothing to open;
      - accepts request heads up to C{totalHeadersSize} bytes (also the
        longest line, C{MAX_LENGTH}), and answers 414 or 431 beyond;
      - answers malformed requests, and requests it refuses for what their
        head says, with a status and a sentence and closes the connection
        (L{refuse}); twisted.web writes a bare 400, or closes silently;
      - aborts a connection whose request body arrives slower than
        C{minBodyRate} bytes a second on average, after C{headerTimeout} of
        grace, or stops arriving for C{headerTimeout} whatever its average
        (not counting the time the body is held): the idle timer alone would
        let a byte every C{idleTimeout} hold a connection for days, and an
        average alone one byte an idle period after a fast start;
      - holds a request's body unread while the request layer decides
        whether to read it (L{holdBody}), and sends 100 (Continue) only when
        it does;
      - aborts a connection whose transport stays paused for
        C{stallTimeout}: the transport pauses the channel when its buffer is
        full, and resumes it once the client has taken all of it (a block or
        two, up to about 200 KiB), so only a client reading slower than that
        in C{stallTimeout} (about 1.5 KiB/s at 2 minutes) is cut off.
        twisted.web stops its idle timer while a request is answered, and a
        client that stops reading would otherwise hold its answer's
        resources, and Orthanc's thread behind a proxied one, for ever.
    """

    headerTimeout: float
    handshakeTimeout: Optional[float] = None
    minBodyRate: int
    stallTimeout: float
    _handshakeDeadline = None
    _stallDeadline = None
    _bodyDeadline = None
    _bodyHeldSince: Optional[float] = None
    _bodyStarted = 0.0
    _bodyReceived = 0
    _bodyLastProgress = 0.0
    _headerDeadline = None
    _refusalDeadline = None
    _refused = False
    _host = None
    log = Logger()

    def connectionMade(self) -> None:
        super().connectionMade()
        # What the client sends, as a producer: paused to hold a body unread.
        self._clientBytes = IPushProducer(self.transport)
        self._startHeaderDeadline()
        if self.handshakeTimeout is not None and ISSLTransport.providedBy(self.transport):
            self._handshakeDeadline = self.callLater(self.handshakeTimeout, self._handshakeTooSlow)

    def handshakeCompleted(self) -> None:
        """
        The TLS handshake has ended (L{IHandshakeListener}).
        """
        cancelPending(self._handshakeDeadline)
        self._handshakeDeadline = None

    def _handshakeTooSlow(self) -> None:
        self._handshakeDeadline = None
        self._abort("no TLS handshake within {timeout}s", timeout=self.handshakeTimeout)

    def getHost(self):
        # twisted.web asks for it with every request, a system call each
        # time; it cannot change while the connection lasts.
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def dataReceived(self, data: bytes) -> None:
        # After a refusal, nothing more the client sends is looked at.
        if not self._refused:
            super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self.headSize() + len(line) > self.totalHeadersSize:
            self._refuseLongHead()
        elif line[:1] in (b" ", b"\t"):
            # twisted.web joins folded lines; a folded Transfer-Encoding is a
            # classic smuggling disguise, and RFC 9112 allows refusing them.
            self.refuse(400, "Header values folded over several lines are not accepted.")
        else:
            super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuseLongHead()

    def _refuseLongHead(self) -> None:
        limit = describeSize(self.totalHeadersSize)
        # Nothing of the head has been counted yet while its first line comes in.
        if self.headSize() == 0:
            self.refuse(414, f"The request's URL is longer than the {limit} the appliance accepts.")
        else:
            self.refuse(431, f"The request's headers are larger than the {limit} the appliance accepts.")

    def allHeadersReceived(self) -> None:
        self._cancelHeaderDeadline()
        problem = self._headProblem(self.requests[-1].requestHeaders)
        if problem is not None:
            self.refuse(400, problem)
            return
        command, path, _ = self.requestLine()
        self.requests[-1].headReceived(command, path)
        # Zero: no body follows; None: a chunked one.
        if self.length != 0:
            self._startBodyDeadline()
        super().allHeadersReceived()

    def _headProblem(self, headers: Headers) -> Optional[str]:
        """
        What twisted.web lets through and this site does not, in a sentence.
        """
        command, target, version = self.requestLine()
        if not (target.startswith(b"/") or (target == b"*" and command == b"OPTIONS")):
            return "The request's target must be a path (starting with /)."
        if max(target) > 0x7E:
            return "The request's URL must be ASCII: percent-encode other characters."
        hosts = headers.getRawHeaders(b"Host", [])
        if len(hosts) > 1 or (version == b"HTTP/1.1" and not hosts):
            return "The request must have one Host header."
        # twisted.web takes "identity" as no coding at all (the length is
        # then Content-Length's, or none); RFC 9112 knows only chunked.
        if headers.hasHeader(b"Transfer-Encoding") and self.length is not None:
            return "The only Transfer-Encoding accepted is chunked."
        return None

    def allContentReceived(self) -> None:
        self._cancelBodyDeadline()
        # A decoder may finish a body it had buffered after a refusal.
        if not self._refused:
            super().allContentReceived()

    def continueExpected(self) -> None:
        # The request layer decides, since it may refuse the body instead.
        self.requests[-1].expectContinue()

    def holdBody(self) -> None:
        """
        Stop reading what the client sends (its body) until L{releaseBody}.
        """
        # LineReceiver hands nothing more to the body decoder while paused,
        # not even what is already buffered; the transport stops reading.
        self.paused = True
        self._clientBytes.pauseProducing()
        if self._bodyDeadline is not None:
            self._cancelBodyDeadline()
            self._bodyHeldSince = self._now()

    def releaseBody(self) -> None:
        """
        Read the body L{holdBody} held, from what is buffered on.
        """
        self.paused = False
        if self._bodyHeldSince is not None:
            # The body was not read while held: that time is not the client's.
            now = self._now()
            self._bodyStarted += now - self._bodyHeldSince
            self._bodyLastProgress = now
            self._bodyHeldSince = None
            self._checkBodyRate()
        if not self.writesPaused:
            self._clientBytes.resumeProducing()
        self.dataReceived(b"")

    def pauseProducing(self) -> None:
        alreadyPaused = self.writesPaused
        super().pauseProducing()
        if alreadyPaused:
            return
        # The transport's buffer is full: the client has that long to take it.
        deadline = self._stallDeadline
        if deadline is not None and deadline.active():
            # A transfer fills the buffer at nearly every block: moving the
            # deadline costs less than a new one each time.
            deadline.reset(self.stallTimeout)
        else:
            self._stallDeadline = self.callLater(self.stallTimeout, self._clientStalled)

    def resumeProducing(self) -> None:
        # The deadline stays scheduled, and only counts once paused again.
        super().resumeProducing()
        # The transport may drain an earlier response while a body is held:
        # that must not restart reading the body.
        if self.paused:
            self._clientBytes.pauseProducing()

    def refuse(self, status: int, sentence: str, headers: HeaderPairs = ()) -> None:
        """
        Answer C{status} with C{sentence} (and C{headers}), ignore anything
        more from the client, and close the connection once that is written.
        """
        if self._refused:
            return
        # The refusal has its own way of ending the connection.
        self._cancelBodyDeadline()
        self._refused = True
        self.persistent = False
        self.paused = True
        self.clearLineBuffer()
        site = self.site
        body = sentence.encode("utf-8") + b"\n"
        response = Headers()
        for name, value in [
            (b"Server", SERVER),
            (b"Date", http.datetimeToString(site.reactor.seconds())),
            *site.standardHeaders,
            (b"Content-Type", b"text/plain; charset=utf-8"),
            (b"Content-Length", b"%d" % (len(body),)),
            (b"Cache-Control", b"no-store"),
            (b"Connection", b"close"),
            *headers,
        ]:
            response.addRawHeader(name, value)
        self.writeHeaders(b"HTTP/1.1", b"%d" % (status,), REASONS[status], response)
        self.write(body)
        self.log.info(
            "Refused a request from {client} with {status}: {sentence}",
            client=getattr(self.transport.getPeer(), "host", "-"),
            status=status,
            sentence=sentence,
        )
        # Closing a socket with unread data resets the connection, which can
        # destroy the answer before the client reads it; TLS instead waits for
        # the client's close_notify and reads (here: discards) what it still
        # sends, a body held or not.  abortTimeout bounds that wait, whatever
        # the idle timer was doing.
        self.setTimeout(None)
        self._refusalDeadline = self.callLater(self.abortTimeout, self.transport.abortConnection)
        self._clientBytes.resumeProducing()
        self.loseConnection()

    def malformedRequest(self) -> None:
        # Every malformation twisted.web detects: the request line, a header,
        # the length (both Content-Length and Transfer-Encoding, duplicates,
        # not a number), a chunk.
        self.refuse(400, "The request is malformed.")

    def requestDone(self, request: Request) -> None:
        # Started first: the next request's head may already be buffered, and
        # is parsed inside requestDone.
        if self.persistent:
            self._startHeaderDeadline()
        super().requestDone(request)

    def connectionLost(self, reason) -> None:
        cancelPending(self._handshakeDeadline)
        cancelPending(self._refusalDeadline)
        self._cancelHeaderDeadline()
        self._cancelBodyDeadline()
        self._cancelStallDeadline()
        super().connectionLost(reason)

    def _startHeaderDeadline(self) -> None:
        self._cancelHeaderDeadline()
        self._headerDeadline = self.callLater(self.headerTimeout, self._headersTooSlow)

    def _cancelHeaderDeadline(self) -> None:
        cancelPending(self._headerDeadline)
        self._headerDeadline = None

    def bodyProgress(self, count: int) -> None:
        """
        C{count} more bytes of the request's body arrived.
        """
        self._bodyReceived += count
        self._bodyLastProgress = self._now()

    def _now(self) -> float:
        return self.site.reactor.seconds()

    def _startBodyDeadline(self) -> None:
        self._bodyStarted = self._bodyLastProgress = self._now()
        self._bodyReceived = 0
        self._bodyHeldSince = None
        self._checkBodyRate()

    def _checkBodyRate(self) -> None:
        """
        Abort if the body is behind the pace C{minBodyRate} allows, or has
        not moved for C{headerTimeout}, else look again when it next could
        be (each byte moves the second deadline: it is read only here).
        """
        self._bodyDeadline = None
        paced = self._bodyStarted + self.headerTimeout + self._bodyReceived / self.minBodyRate
        moving = self._bodyLastProgress + self.headerTimeout
        now = self._now()
        if now < min(paced, moving):
            self._bodyDeadline = self.callLater(min(paced, moving) - now, self._checkBodyRate)
        elif now >= moving:
            self._abort("its request body stopped arriving for {timeout}s", timeout=self.headerTimeout)
        else:
            self._abort("its request body came slower than {rate} bytes a second", rate=self.minBodyRate)

    def _cancelBodyDeadline(self) -> None:
        cancelPending(self._bodyDeadline)
        self._bodyDeadline = None

    def _clientStalled(self) -> None:
        self._stallDeadline = None
        if self.writesPaused:
            self._abort("it did not take what was sent to it within {timeout}s", timeout=self.stallTimeout)

    def _cancelStallDeadline(self) -> None:
        cancelPending(self._stallDeadline)
        self._stallDeadline = None

    def _headersTooSlow(self) -> None:
        self._headerDeadline = None
        self._abort("no complete request within {timeout}s", timeout=self.headerTimeout)

    def _abort(self, why: str, **fields: object) -> None:
        """
        Abort the connection, and log C{why} (a log format taking C{fields}).
        """
        self.log.info("Closed the connection of {client}: " + why, client=str(self.transport.getPeer()), **fields)
        self.transport.abortConnection()
