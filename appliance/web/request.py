"""
The HTTP request layer under the site's resources: request heads up to the
configured size, refusals with a status and a sentence for what twisted.web
would answer with a bare 400 (or a silent close), the request's identity
known before any resource runs, and bodies capped, never compressed, read
only once the request is known to be allowed, counted against the spool's
shares, and spooled to disk when large.

    head complete ─ checks (400) ─ 413 / 415 ─ identify() ─┬─ no body: on
                                                          └─ a body: held unread until identified, then
                                                             the gate's verdict on the head (401, 403,
                                                             429, 503...), the spool's shares (429, 507),
                                                             or read (100-continue)
    body complete ─ wait for identify() ─ request.account set ─ resources

A refusal before the body is answered instead of the 100 (Continue), and
closes the connection: the body is never read.
"""

import errno
import re
from io import BytesIO
from typing import Optional, Sequence, Tuple
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, ISSLTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http_headers import Headers
from twisted.web.server import Request
from zope.interface import implementer

from appliance.web.checkers import BUSY_MESSAGE, BUSY_RETRY_AFTER, PasswordChecksBusy
from appliance.web.gate import basicChallenge, cookieChallenge
from appliance.web.origins import isBrowser
from appliance.web.pages import REASONS, describeSize
from appliance.web.spool import SPOOL_RETRY_AFTER, SpoolQuota

#: What every answer says in its Server header: no version, for scanners.
SERVER = b"pacs-appliance"

#: The largest body read from a request without an account: enough for the
#: login form, whose POST is anonymous.
ANONYMOUS_BODY_LIMIT = 16 * 1024

#: Bodies up to this size stay in memory; larger ones move to a file in the
#: site's spool folder.
MEMORY_BODY_LIMIT = 1024 * 1024

#: Header names and values, in order: the site's standard headers, those of
#: a refusal.
HeaderPairs = Sequence[Tuple[bytes, bytes]]

#: A host name or IPv4 address as a browser writes it in the Host header.
HOST_NAME = re.compile(rb"[A-Za-z0-9.-]{1,253}")


def mediaType(contentType: Optional[bytes]) -> bytes:
    """
    The media type of a Content-Type value, lower-case and without its
    parameters (C{b""} when there is none).
    """
    return (contentType or b"").split(b";", 1)[0].strip().lower()


class ApplianceRequest(Request):
    """
    A request that knows who sent it before any resource runs
    (C{account}, from the site's authenticator), whose body is capped,
    uncompressed, and in memory or in an anonymous file of the spool folder
    (C{content}, at position 0, C{contentLength} bytes), and whose response
    carries the site's standard headers.
    """

    #: Who sent the request (an L{appliance.web.accounts.IAccount}), or L{None}.
    account = None
    #: Whether the request's credentials could not be checked, for too many
    #: password checks waiting (L{appliance.web.checkers.PasswordChecksBusy}):
    #: C{account} is then L{None}, and the access gate answers 503.
    credentialsUnchecked = False
    #: The length of the body in C{content}.
    contentLength = 0

    log = Logger()

    _identified = False
    _bodyComing = False
    _bodyAccepted = False
    _continueWanted = False
    _held = False
    _refused = False
    _received = 0
    #: Bytes of the body counted against the spool's shares, and for whom.
    _reserved = 0
    _spoolAccount: Optional[str] = None
    _length: Optional[int] = 0
    _waiting: Optional[Tuple[bytes, bytes, bytes]] = None
    _identity: Optional[Deferred] = None

    def headReceived(self, command: bytes, path: bytes) -> None:
        """
        The request line is known: set C{method}, C{uri}, C{path} and
        C{postpath} now, as twisted.web would once the body is read, so that
        the gate can judge the request before its body.
        """
        self.method, self.uri = command, path
        self.path = path.split(b"?", 1)[0]
        self.prepath = []
        # As twisted.web.server.Request.process will.
        self.postpath = [unquote_to_bytes(segment) for segment in self.path[1:].split(b"/")]

    def write(self, data: bytes) -> None:
        # Before the head goes out, so that the answers twisted.web gives
        # without a resource (OPTIONS *, a resource that raised) carry them
        # too; a resource's own value of a standard header stays.
        if not self.startedWriting:
            # Replaces Twisted's own Server header, which names its version.
            self.setHeader(b"Server", SERVER)
            for name, value in self.site.standardHeaders:
                if not self.responseHeaders.hasHeader(name):
                    self.setHeader(name, value)
        super().write(data)

    def gotLength(self, length: Optional[int]) -> None:
        """
        The head is complete (C{length} is that of the body, L{None} when
        chunked): refuse bodies too large or compressed, start identifying
        the sender, and hold the body until the request is known to be
        allowed (at once when the identity is).
        """
        site = self.channel.site
        self.content = BytesIO()
        if length is not None and length > site.maxUploadSize:
            self._refuse(413, self._tooLarge())
            return
        if length != 0 and self.requestHeaders.hasHeader(b"Content-Encoding"):
            # Orthanc must never decompress what a client sends (DESIGN.md).
            self._refuse(
                415,
                "Compressed request bodies are not accepted: send it without a Content-Encoding.",
                [(b"Accept-Encoding", b"identity")],
            )
            return
        self._bodyComing = length != 0
        self._length = length
        identity = self._identity = maybeDeferred(site.authenticator.identify, self.requestHeaders, self.client)
        identity.addCallbacks(self._identifiedAs, self._notIdentified)
        identity.addErrback(
            lambda failure: self.log.failure(
                "Could not carry on with the request of {client}", failure, client=self._peer()
            )
        )
        if self._bodyComing and not (self._bodyAccepted or self._refused):
            self._held = True
            self.channel.holdBody()

    def expectContinue(self) -> None:
        """
        The client waits for a 100 (Continue) before it sends the body: it
        gets one once the body may be read, never when it is refused.
        """
        if self._bodyAccepted:
            self.channel.sendContinue()
        elif not self._refused:
            self._continueWanted = True

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused or self._disconnected:
            return
        self._received += len(data)
        self.channel.bodyProgress(len(data))
        if self._received > self.channel.site.maxUploadSize:
            self._refuse(413, self._tooLarge())
            return
        if self._received > self._reserved and not self._reserve(self._received - self._reserved):
            return
        try:
            if self._received > MEMORY_BODY_LIMIT and isinstance(self.content, BytesIO):
                self._spool()
            self.content.write(data)
        except OSError as error:
            self._storageFailed(error)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """
        The body is complete: the resources run once the sender is known.
        """
        try:
            self.content.flush()
        except OSError as error:
            self._storageFailed(error)
            return
        self.contentLength = self.content.tell()
        if self._identified:
            super().requestReceived(command, path, version)
        else:
            self._waiting = (command, path, version)

    def connectionLost(self, reason: Failure) -> None:
        # The authenticator skips a password check still waiting for a thread.
        if self._identity is not None:
            self._identity.cancel()
        self._releaseSpool()
        super().connectionLost(reason)

    def finish(self) -> None:
        self._releaseSpool()
        super().finish()

    def _notIdentified(self, failure: Failure) -> None:
        if failure.check(CancelledError):
            # The client left (connectionLost).
            return
        if not failure.check(PasswordChecksBusy):
            self.log.failure("Could not identify the sender of a request from {client}", failure, client=self._peer())
            self._identifiedAs(None)
            return
        if self._disconnected or self._refused:
            return
        if self._bodyComing:
            self._refuse(503, BUSY_MESSAGE, [(b"Retry-After", b"%d" % (BUSY_RETRY_AFTER,))])
            return
        self.credentialsUnchecked = True
        self._identifiedAs(None)

    def _identifiedAs(self, account) -> None:
        if self._disconnected or self._refused:
            return
        self.account = account
        self._identified = True
        if self._bodyComing and not self._mayReadBody():
            return
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            super().requestReceived(*waiting)

    def _mayReadBody(self) -> bool:
        """
        Judge the head (the gate's verdict, the anonymous limit, the spool's
        shares): read the body, or refuse it unread.
        """
        site = self.channel.site
        if site.gate is not None:
            refusal = site.gate.refusalBeforeBody(self)
            if refusal is not None:
                self._refuse(refusal.code, refusal.message, refusal.headers)
                return False
        account = self.account
        if account is None:
            if self._length is None or self._length > ANONYMOUS_BODY_LIMIT:
                self._refuse(
                    401,
                    f"Log in first: a request with a body larger than {describeSize(ANONYMOUS_BODY_LIMIT)}"
                    " is only read from a known user.",
                    [(b"WWW-Authenticate", self._challenge())],
                )
                return False
        else:
            self._spoolAccount = account.name
            # A body that could never fit is refused now; what one holds is
            # counted as it arrives, so that a slow one holds only its bytes.
            refusal = site.spoolQuota.check(account.name, self._length or 0)
            if refusal is not None:
                self._refuse(refusal.status, refusal.sentence, [(b"Retry-After", b"%d" % (SPOOL_RETRY_AFTER,))])
                return False
        self._acceptBody()
        return True

    def _reserve(self, size: int) -> bool:
        """
        Count C{size} more bytes of the body, just arrived, against the
        spool's shares (an account's only: the login form's little body is
        not counted), or refuse the request; whether it may go on.
        """
        if self._spoolAccount is None:
            return True
        quota: SpoolQuota = self.channel.site.spoolQuota
        refusal = quota.reserve(self._spoolAccount, size)
        if refusal is not None:
            self._refuse(refusal.status, refusal.sentence, [(b"Retry-After", b"%d" % (SPOOL_RETRY_AFTER,))])
            return False
        self._reserved += size
        return True

    def _releaseSpool(self) -> None:
        if self._reserved:
            self.channel.site.spoolQuota.release(self._spoolAccount, self._reserved)
            self._reserved = 0

    def _challenge(self) -> bytes:
        siteName = self.channel.site.siteName
        # As the access gate does: a browser shown a Basic challenge pops up
        # its own password prompt (see appliance.web.gate.AccessGate).  And
        # plain HTTP never invites credentials sent in clear.
        if isBrowser(self) or not self.isSecure():
            return cookieChallenge(siteName)
        return basicChallenge(siteName)

    def _acceptBody(self) -> None:
        self._bodyAccepted = True
        # The 100 goes out before any of the body is read, and so before a
        # response that reading it may produce at once.
        if self._continueWanted:
            self._continueWanted = False
            self.channel.sendContinue()
        if self._held:
            self._held = False
            self.channel.releaseBody()

    def _spool(self) -> None:
        """
        Move the body received so far from memory to a file of the spool folder.
        """
        spool = self.channel.site.openSpoolFile()
        try:
            spool.write(self.content.getvalue())
        except OSError:
            spool.close()
            raise
        self.content = spool

    def _storageFailed(self, error: OSError) -> None:
        folder = str(self.channel.site.spoolFolder)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            self.log.error(
                "No space left in {folder} for the upload of {client}: refused with 507",
                folder=folder,
                client=self._peer(),
            )
            self._refuse(
                507, "The appliance has no disk space left for this upload: ask its administrator to free some."
            )
        else:
            self.log.error(
                "Could not store the upload of {client} in {folder}: {error}",
                folder=folder,
                client=self._peer(),
                error=str(error),
            )
            self._refuse(500, "The appliance could not store this upload: its log says why.")

    def _tooLarge(self) -> str:
        limit = describeSize(self.channel.site.maxUploadSize)
        return f"The request body is larger than the {limit} the appliance accepts."

    def _refuse(self, status: int, sentence: str, headers: HeaderPairs = ()) -> None:
        self._refused = True
        # Closing the spool file is what frees its disk space.
        self.content.close()
        self._releaseSpool()
        self.channel.refuse(status, sentence, headers)

    def _peer(self) -> str:
        return getattr(self.client, "host", str(self.client))


def cancelPending(call: Optional[IDelayedCall]) -> None:
    """
    Cancel C{call}, if there is one and it has neither run nor been cancelled.
    """
    if call is not None and call.active():
        call.cancel()


@implementer(IHandshakeListener)
class DeadlineHTTPChannel(http.HTTPChannel):
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
    _transportFull = False
    _bodyDeadline = None
    _bodyHeldSince: Optional[float] = None
    _bodyStarted = 0.0
    _bodyReceived = 0
    _bodyLastProgress = 0.0
    _headerDeadline = None
    _refused = False
    _host = None
    log = Logger()

    def connectionMade(self) -> None:
        super().connectionMade()
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
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
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
        if self._receivedHeaderSize == 0:
            self.refuse(414, f"The request's URL is longer than the {limit} the appliance accepts.")
        else:
            self.refuse(431, f"The request's headers are larger than the {limit} the appliance accepts.")

    def allHeadersReceived(self) -> None:
        self._cancelHeaderDeadline()
        problem = self._headProblem(self.requests[-1].requestHeaders)
        if problem is not None:
            self.refuse(400, problem)
            return
        self.requests[-1].headReceived(self._command, self._path)
        # Zero: no body follows; None: a chunked one.
        if self.length != 0:
            self._startBodyDeadline()
        super().allHeadersReceived()

    def _headProblem(self, headers: Headers) -> Optional[str]:
        """
        What twisted.web lets through and this site does not, in a sentence.
        """
        target = self._path
        if not (target.startswith(b"/") or (target == b"*" and self._command == b"OPTIONS")):
            return "The request's target must be a path (starting with /)."
        if max(target) > 0x7E:
            return "The request's URL must be ASCII: percent-encode other characters."
        hosts = headers.getRawHeaders(b"Host", [])
        if len(hosts) > 1 or (self._version == b"HTTP/1.1" and not hosts):
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

    def _send100Continue(self) -> None:
        # twisted.web sends it as soon as the head is in; the request layer
        # decides, since it may refuse the body instead.
        self.requests[-1].expectContinue()

    def sendContinue(self) -> None:
        """
        Tell the client to send the body it holds back (Expect: 100-continue).
        """
        super()._send100Continue()

    def holdBody(self) -> None:
        """
        Stop reading what the client sends (its body) until L{releaseBody}.
        """
        # LineReceiver hands nothing more to the body decoder while paused,
        # not even what is already buffered; the transport stops reading.
        self.paused = True
        self._networkProducer.pauseProducing()
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
        if not self._waitingForTransport:
            self._networkProducer.resumeProducing()
        self.dataReceived(b"")

    def pauseProducing(self) -> None:
        super().pauseProducing()
        if self._transportFull:
            return
        # The transport's buffer is full: the client has that long to take it.
        self._transportFull = True
        deadline = self._stallDeadline
        if deadline is not None and deadline.active():
            # A transfer fills the buffer at nearly every block: moving the
            # deadline costs less than a new one each time.
            deadline.reset(self.stallTimeout)
        else:
            self._stallDeadline = self.callLater(self.stallTimeout, self._clientStalled)

    def resumeProducing(self) -> None:
        # The deadline stays scheduled, and only counts once paused again.
        self._transportFull = False
        super().resumeProducing()
        # The transport may drain an earlier response while a body is held:
        # that must not restart reading the body.
        if self.paused:
            self._networkProducer.pauseProducing()

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
        if self._abortingCall is None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)
        self._networkProducer.resumeProducing()
        self.loseConnection()

    def _respondToBadRequestAndDisconnect(self) -> None:
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
        if self._transportFull:
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
