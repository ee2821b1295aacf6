"""
The streaming reverse proxy to Orthanc's loopback HTTP port.

    client ──▶ OrthancProxy.forward ──Agent, persistent pool──▶ 127.0.0.1:[orthanc] http_port
           ◀── headers filtered, body streamed: a slow client pauses Orthanc's socket

Built on L{twisted.web.client.Agent}, not L{twisted.web.proxy.ReverseProxyResource}
(which opens a connection per request and, with no flow control, holds in
memory whatever a slow client has not taken).  Each forwarded request is one
L{_Exchange}:

  - the request's headers lose what is hop-by-hop, the client's credentials and
    the appliance's session cookie, and gain Orthanc's credentials and the
    C{Forwarded} header from which Orthanc's DICOMweb plugin writes public URLs;
  - its body (C{request.content}, spooled by the request layer) is streamed to
    Orthanc with its length;
  - the answer's headers lose what is hop-by-hop and anything of Orthanc's
    authentication; its body is written as it comes, with the upstream
    transport registered as the request's producer, and DICOMweb JSON is
    gzip-compressed for clients that accept it;
  - timeouts: connecting ([web] proxy_connect_timeout), Orthanc reading the
    request body and sending the answer's body (proxy_idle_timeout between
    chunks; not counted while the client holds us back), and the answer's
    headers once the request is sent (proxy_response_timeout);
  - failures before the answer's headers become a one-sentence JSON answer:
    503 while the supervisor says Orthanc is not ready, 504 on a timeout, 502
    otherwise; after the headers, the client's connection is closed;
  - an upload is answered 507 without reaching Orthanc while its storage has
    less free space than [orthanc] min_free_space (see L{appliance.orthanc.space});
  - a STOW-RS answer is held whole and passed on only if it accounts for
    every instance sent, else it becomes a 503 (see L{appliance.web.stowcheck});
    Orthanc's own 503s gain a C{Retry-After};
  - at most L{MAX_ORTHANC_REQUESTS} exchanges are under way at a time, so that
    Orthanc always has an HTTP thread free for the supervisor's health check,
    and at most [web] max_orthanc_requests_per_account of them for one
    account: the others wait their turn here, each account's in arrival
    order and the accounts in turn (L{OrthancTurns}); the wait counts as
    waiting for the answer (proxy_response_timeout), and a client that
    leaves gives up its place without reaching Orthanc.
"""

from enum import Enum
from typing import Callable, List, Optional, Union

from twisted.application.service import Service
from twisted.internet import error as internetError
from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.client import FileBodyProducer, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from twisted.web.server import NOT_DONE_YET, GzipEncoderFactory, Request
from zope.interface import implementer

from appliance.config import Config
from appliance.orthanc.space import StorageSpace
from appliance.orthanc.state import IOrthanc, OrthancState
from appliance.web.answerend import AnswerEnd
from appliance.web.channel import cancelPending
from appliance.web.pages import jsonError
from appliance.web.proxyheaders import (
    HeaderRewriter,
    addVary,
    copyAnswerHeaders,
    describeStatus,
    publicHost,
    upstreamHeaders,
)
from appliance.web.request import mediaType
from appliance.web.stowcheck import MAX_STOW_ANSWER, PartCounter, answeredItems, storedStudies
from appliance.web.streaming import registerStreamingProducer
from appliance.web.turns import MAX_ORTHANC_REQUESTS, OrthancTurns
from appliance.web.upstream import orthancAgent

#: The Content-Security-Policy of every proxied answer but the pages a route
#: allows: nothing it holds may run, load anything, or act as this site's
#: page (Orthanc echoes a request's text into its error pages).
SANDBOXED = b"default-src 'none'; sandbox"

#: Media types a browser renders as a page of the site's origin.
PAGE_TYPES = frozenset({b"text/html", b"application/xhtml+xml"})

#: The types of Orthanc's error answers that are passed on as they are.
JSON_TYPES = frozenset({b"application/json", b"application/dicom+json"})

#: What is compressed on the fly: DICOMweb metadata shrinks about tenfold;
#: pixel data and images are not worth the processor time.
COMPRESSIBLE_TYPES = JSON_TYPES
GZIP_LEVEL = 6

#: Statuses whose answer has no body, or a body of which gzip would break
#: the meaning (a range of the uncompressed representation).
_NOT_COMPRESSED_STATUSES = frozenset({http.NO_CONTENT, http.PARTIAL_CONTENT, http.NOT_MODIFIED})

#: Seconds a client is told to wait while Orthanc (re)starts, and while it has
#: failed (an administrator must act first).
RETRY_AFTER = 5
RETRY_AFTER_FAILED = 60

#: What an upload is told when Orthanc's answer to it could not be checked
#: (with 502).
UNCHECKED_UPLOAD = (
    "The archive's answer to this upload could not be checked, so whether every instance was stored is not"
    " known: send it again (instances already stored are recognised), and tell an administrator if it persists."
)

#: What an upload is told while Orthanc's storage is full (with 507).
STORAGE_FULL = "The archive's storage is full: nothing was stored; ask an administrator to free space, then send it again."

_unavailable = {
    OrthancState.STARTING: "Orthanc is starting; try again in a few seconds.",
    OrthancState.RESTARTING: "Orthanc is restarting; try again in a few seconds.",
    OrthancState.STOPPED: "Orthanc is stopped; try again when the appliance has started it.",
    OrthancState.FAILED: "Orthanc could not be started; an administrator must look at the appliance's log.",
}


def _contentType(response: IResponse) -> bytes:
    return (response.headers.getRawHeaders(b"Content-Type") or [b""])[0]


def _describe(failure: Failure) -> str:
    """
    What went wrong, in a few words: the Agent wraps network errors in
    exceptions that hold the real reasons.
    """
    reasons = getattr(failure.value, "reasons", None)
    if reasons:
        return "; ".join(_describe(reason) for reason in reasons)
    return failure.getErrorMessage() or failure.type.__name__


class OrthancProxy(Service):
    """
    Forwards requests to Orthanc; one instance per site, shared by the routes.
    As a service, it closes its idle connections to Orthanc when stopped.

    @param orthanc: Orthanc's state and credentials.
    @param space: the free space of Orthanc's storage.
    @param maxRequests: how many exchanges with Orthanc may be under way at a
        time (see L{MAX_ORTHANC_REQUESTS}; fewer in tests that fill them).
    """

    def __init__(
        self,
        config: Config,
        orthanc: IOrthanc,
        space: StorageSpace,
        reactor=None,
        maxRequests: int = MAX_ORTHANC_REQUESTS,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        web = config.web
        self.orthanc = orthanc
        self.space = space
        self.reactor = reactor
        self.connectTimeout = web.proxy_connect_timeout
        self.responseTimeout = web.proxy_response_timeout
        self.idleTimeout = web.proxy_idle_timeout
        self.origin = b"http://127.0.0.1:%d" % (config.orthanc.http_port,)
        self.agent, self._pool = orthancAgent(reactor, config.orthanc.http_port, self.connectTimeout)
        # Request bodies are read a block at a time by tasks of the injected
        # reactor, not of the global one.
        self.cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))
        self.gzip = GzipEncoderFactory()
        self.gzip.compressLevel = GZIP_LEVEL
        self.turns = OrthancTurns(maxRequests, web.max_orthanc_requests_per_account, reactor)

    def stopService(self) -> Deferred:
        Service.stopService(self)
        self.cooperator.stop()
        return self._pool.closeCachedConnections()

    def forward(
        self,
        request: Request,
        target: bytes,
        rewrite: Optional[HeaderRewriter] = None,
        stores: bool = False,
        pagePolicy: Optional[bytes] = None,
        stow: bool = False,
    ) -> int:
        """
        Answer C{request} with Orthanc's answer to the same method, headers and
        body at C{target} (a path and query, already checked by the route).

        Every answer carries a Content-Security-Policy: L{SANDBOXED}, or
        C{pagePolicy} for a page the route lets through.  A page Orthanc
        answers anywhere else (its error pages) is not passed: the client gets
        the appliance's JSON sentence instead, with Orthanc's status.

        @param rewrite: the route's changes to Orthanc's answer headers.
        @param stores: whether the request uploads instances into the archive.
        @param pagePolicy: the policy of the pages of Orthanc's own web
            application at C{target}, if it is one; L{None} lets no page through.
        @param stow: whether the request is a STOW-RS upload, whose successful
            answer must account for every instance sent (see
            L{appliance.web.stowcheck}).
        @return: L{NOT_DONE_YET}, for C{render}.
        """
        state, credentials = self.orthanc.state, self.orthanc.credentials
        if state is not OrthancState.READY or credentials is None:
            answerUnavailable(request, state)
            return NOT_DONE_YET
        if stores and self.space.full():
            answer(request, http.INSUFFICIENT_STORAGE_SPACE, STORAGE_FULL)
            return NOT_DONE_YET
        host = publicHost(request)
        if host is None:
            answer(request, http.BAD_REQUEST, "The request needs one valid Host header.")
            return NOT_DONE_YET
        headers = upstreamHeaders(request, credentials.authorization(), host)
        parts = PartCounter.forContentType(request.getHeader(b"Content-Type") or b"") if stow else None
        _Exchange(self, request, self.origin + target, headers, rewrite, pagePolicy, parts).start()
        return NOT_DONE_YET


def answer(request: Request, code: int, message: str, retryAfter: Optional[int] = None) -> None:
    """
    Answer and finish C{request} with a L{jsonError}.
    """
    request.write(jsonError(request, code, message, retryAfter))
    request.finish()


def answerUnavailable(request: Request, state: OrthancState) -> None:
    """
    Answer 503 for Orthanc in C{state}, with the time to wait before trying again.
    """
    message = _unavailable.get(state, _unavailable[OrthancState.STARTING])
    retry = RETRY_AFTER_FAILED if state is OrthancState.FAILED else RETRY_AFTER
    answer(request, http.SERVICE_UNAVAILABLE, message, retry)


@implementer(IBodyProducer)
class _WatchedBody:
    """
    The request body, read from its file by a L{FileBodyProducer}, telling the
    exchange of every block Orthanc takes (an empty one when Orthanc starts
    taking them) and of the end.
    """

    def __init__(
        self, producer: FileBodyProducer, onBlock: Callable[[bytes], None], onEnd: Callable[[], None]
    ) -> None:
        self._producer = producer
        self._onBlock = onBlock
        self._onEnd = onEnd
        self._consumer = None
        self.length = producer.length

    def startProducing(self, consumer) -> Deferred:
        self._consumer = consumer
        self._onBlock(b"")
        return self._producer.startProducing(self).addCallback(self._ended)

    def _ended(self, result: object) -> object:
        self._onEnd()
        return result

    def write(self, data: bytes) -> None:
        self._onBlock(data)
        self._consumer.write(data)

    def pauseProducing(self) -> None:
        self._producer.pauseProducing()

    def resumeProducing(self) -> None:
        self._producer.resumeProducing()

    def stopProducing(self) -> None:
        self._producer.stopProducing()


class _Phase(Enum):
    """
    The phases of an exchange.
    """

    #: Waiting for its turn.
    WAITING = "waiting"
    #: Sending the request and waiting for the answer's headers.
    REQUEST = "request"
    #: Streaming the answer's body.
    ANSWER = "answer"
    #: Answered, or the client left.
    OVER = "over"


class _Exchange:
    """
    One request forwarded to Orthanc and its answer streamed back.

    It waits for its turn first (see L{OrthancTurns}), and gives it back
    when it ends, however it ends (see L{_end}).

    One timer at a time: the response timeout from the start, the wait for a
    turn included; while the body is sent, the idle timeout between blocks,
    then the response timeout again until the answer's headers; then the idle
    timeout between blocks of the answer, stopped while the client pauses us.
    """

    log = Logger()

    def __init__(
        self,
        proxy: OrthancProxy,
        request: Request,
        url: bytes,
        headers: Headers,
        rewrite,
        pagePolicy: Optional[bytes],
        parts: Optional[PartCounter] = None,
    ) -> None:
        self._proxy = proxy
        self._request = request
        account = getattr(request, "account", None)
        #: Whose turn this exchange takes (see L{OrthancTurns}).
        self._account = account.label if account is not None else ""
        self._url = url
        self._headers = headers
        self._rewrite = rewrite
        self._pagePolicy = pagePolicy
        #: The parts of a STOW-RS request, counted as they are sent.
        self._parts = parts
        self._phase = _Phase.WAITING
        self._holdsTurn = False
        self._pending: Optional[Deferred] = None
        self._streamer: Optional[Union["_AnswerStreamer", "_AnswerCollector"]] = None
        self._timer = None
        self._timedOut: Optional[str] = None

    # --- the request

    def start(self) -> None:
        self._request.notifyFinish().addErrback(self._clientGone)
        # The answer's clock starts now, the wait for a turn included; with a
        # body, the upload's timers take over once it starts.
        self._arm(self._proxy.responseTimeout, "response")
        # Cancelling this chain gives up the place in the queue, or the
        # request to Orthanc once under way.
        self._pending = self._proxy.turns.acquire(self._account)
        self._pending.addCallback(self._send)
        self._pending.addCallbacks(self._answered, self._failed)
        self._pending.addErrback(self._bug)

    def _send(self, _: object) -> Deferred:
        self._phase = _Phase.REQUEST
        self._holdsTurn = True
        request = self._request
        body: Optional[_WatchedBody] = None
        producer = FileBodyProducer(request.content, self._proxy.cooperator)
        if producer.length:
            body = _WatchedBody(producer, self._bodyBlockSent, self._bodySent)
        # Orthanc answers HEAD with 404 whatever the path: ask with GET, and
        # stop at the answer's headers.
        method = b"GET" if request.method == b"HEAD" else request.method
        return maybeDeferred(self._proxy.agent.request, method, self._url, self._headers, body)

    def _bodyBlockSent(self, data: bytes) -> None:
        if self._parts is not None:
            self._parts.feed(data)
        if self._phase is _Phase.REQUEST:
            self._arm(self._proxy.idleTimeout, "upload")

    def _bodySent(self) -> None:
        if self._phase is _Phase.REQUEST:
            self._arm(self._proxy.responseTimeout, "response")

    def _failed(self, failure: Failure) -> None:
        if self._phase is _Phase.OVER:
            return
        self._end()
        proxy, request = self._proxy, self._request
        code = http.GATEWAY_TIMEOUT
        if self._timedOut == "turn":
            # Not logged one by one: OrthancTurns sums the waits up.
            answer(
                request,
                code,
                f"The archive is busy: this request waited {proxy.responseTimeout:g}s for its turn"
                " without reaching Orthanc; try again in a moment.",
            )
            return
        if self._timedOut == "upload":
            message = f"Orthanc stopped reading the request for {proxy.idleTimeout:g}s."
        elif self._timedOut == "response":
            message = f"Orthanc did not answer within {proxy.responseTimeout:g}s."
        elif failure.check(TimeoutError, internetError.TimeoutError):
            message = f"Orthanc did not accept a connection within {proxy.connectTimeout:g}s."
        elif proxy.orthanc.state is not OrthancState.READY:
            # Orthanc went away under this request, and the supervisor knows.
            self._logFailure("Orthanc stopped while answering {method} {path}: {error}", failure)
            answerUnavailable(request, proxy.orthanc.state)
            return
        else:
            code, message = (
                http.BAD_GATEWAY,
                "Orthanc failed to answer; try again, and tell an administrator if it persists.",
            )
        self._logFailure("Orthanc did not answer {method} {path}: {error}", failure)
        answer(request, code, message)

    def _bug(self, failure: Failure) -> None:
        self.log.failure("Error while forwarding {method} {path}", failure, **self._where())
        if self._phase is not _Phase.OVER:
            self._end()
            self._request.loseConnection()

    def _where(self) -> dict:
        # The path without its query: QIDO queries carry patient names.
        return {
            "method": self._request.method.decode("latin-1"),
            "path": self._request.path.decode("latin-1"),
        }

    def _logFailure(self, format: str, failure: Failure) -> None:
        self.log.error(format, error=_describe(failure), **self._where())

    # --- the answer

    def _answered(self, response: IResponse) -> None:
        if self._phase is _Phase.OVER:
            response.deliverBody(_Discard())
            return
        self.disarm()
        request = self._request
        if response.code == http.UNAUTHORIZED:
            # Orthanc restarted with new credentials after this request took
            # the old ones; its login prompt is nobody's business.
            self._end()
            response.deliverBody(_Discard())
            self.log.warn(
                "Orthanc refused the appliance's credentials for {method} {path}: it has restarted",
                **self._where(),
            )
            answerUnavailable(request, OrthancState.RESTARTING)
            return
        contentType = mediaType(_contentType(response))
        isPage = contentType in PAGE_TYPES
        if response.code >= 400 and contentType not in JSON_TYPES or (
            isPage and self._pagePolicy is None and not 300 <= response.code < 400
        ):
            # Orthanc's error answers echo the request's text, some with no
            # type at all (which twisted.web would send as text/html): on
            # this origin, that would be the request's script running as the
            # site's.  Its pages are the web applications' only.
            self._end()
            response.deliverBody(_Discard())
            self.log.info(
                "Orthanc answered {method} {path} with a page ({status}): answered with a sentence instead",
                status=response.code,
                **self._where(),
            )
            if response.code >= 400:
                answer(request, response.code, f"The archive refused this request ({response.code} {describeStatus(response)}).")
            else:
                answer(request, http.BAD_GATEWAY, "The archive answered with a web page, which the appliance does not pass on.")
            return
        self._phase = _Phase.ANSWER
        if self._parts is not None and 200 <= response.code < 300:
            # Held whole: whether it is passed on depends on what it says.
            self._streamer = _AnswerCollector(self, response)
            response.deliverBody(self._streamer)
            return
        encoder = self._passHead(response)
        if request.method == b"HEAD":
            self._end()
            response.deliverBody(_Discard())
            request.finish()
            return
        ending = None
        if response.length is UNKNOWN_LENGTH:
            # No Content-Length: chunks, whose cut the Agent reports itself,
            # or an end at Orthanc's close, which only the body can tell.
            ending = AnswerEnd.forContentType(_contentType(response))
        self._streamer = _AnswerStreamer(self, request, encoder, ending)
        response.deliverBody(self._streamer)

    def _passHead(self, response: IResponse):
        """
        Give the client Orthanc's status and headers, as far as the policy
        lets them through; the encoder of the body, if it is to be compressed.
        """
        request = self._request
        contentType = mediaType(_contentType(response))
        request.setResponseCode(response.code)
        copyAnswerHeaders(response, request, self._rewrite)
        if not contentType and response.code not in (http.NO_CONTENT, http.NOT_MODIFIED):
            # Orthanc's untyped answers (empty ones, mostly) are text: not the
            # text/html twisted.web would say, nor the XML that jQuery parses
            # an untyped answer as in Orthanc Explorer.
            request.setHeader(b"Content-Type", b"text/plain")
        # A page where the route allows one gets its policy; everything else
        # (a redirect's page too) is sandboxed.
        isPage = contentType in PAGE_TYPES
        policy = self._pagePolicy if isPage and self._pagePolicy is not None else SANDBOXED
        request.setHeader(b"Content-Security-Policy", policy)
        if response.code == http.SERVICE_UNAVAILABLE and not request.responseHeaders.hasHeader(b"Retry-After"):
            # Orthanc's own 503: a write its index could not serialise
            # against another node's, or PostgreSQL away.  Both pass.
            request.setHeader(b"Retry-After", b"%d" % (RETRY_AFTER,))
        # The Agent keeps Content-Length to itself.
        if isinstance(response.length, int) and response.code not in http.NO_BODY_CODES:
            request.setHeader(b"Content-Length", b"%d" % (response.length,))
        return self._encoderFor(response)

    def answerCollected(self, response: IResponse, reason: Failure, body: Optional[bytes]) -> None:
        """
        Orthanc's whole answer to a STOW-RS request (L{None} if it was larger
        than L{MAX_STOW_ANSWER}): passed on if it accounts for every instance
        sent, else a 503 (see L{appliance.web.stowcheck}).
        """
        if self._phase is _Phase.OVER:
            return
        self._end()
        request = self._request
        if body is not None and not reason.check(ResponseDone, PotentialDataLoss):
            self._logFailure("Orthanc broke off its answer to {method} {path}: {error}", reason)
            answer(request, http.BAD_GATEWAY, UNCHECKED_UPLOAD)
            return
        sent = self._parts.parts
        accounted = None if body is None else answeredItems(_contentType(response), body)
        if accounted is None:
            self.log.error(
                "Orthanc's answer to {method} {path} could not be read to check it (status {status}, {size} bytes)",
                status=response.code,
                size=f"over {MAX_STOW_ANSWER}" if body is None else len(body),
                **self._where(),
            )
            answer(request, http.BAD_GATEWAY, UNCHECKED_UPLOAD)
            return
        if accounted < sent:
            self.log.warn(
                "Orthanc answered {method} {path} with {status} but accounted for {accounted} of the {sent}"
                " instances sent (the others failed without being listed: its database was busy or away);"
                " answered 503",
                status=response.code,
                accounted=accounted,
                sent=sent,
                **self._where(),
            )
            answer(
                request,
                http.SERVICE_UNAVAILABLE,
                f"The archive could not store {sent - accounted} of the {sent} instances sent (its database was"
                " busy or unreachable). Send the request again: the instances already stored are recognised.",
                RETRY_AFTER,
            )
            return
        # The audit trail names the studies stored (appliance.audit.events).
        request.storedStudies = storedStudies(_contentType(response), body)
        encoder = self._passHead(response)
        if encoder is not None:
            body = encoder.encode(body) + encoder.finish()
        request.write(body)
        request.finish()

    def _encoderFor(self, response: IResponse):
        """
        A gzip encoder if the answer is DICOMweb JSON that Orthanc did not
        encode, for a client that accepts gzip; None otherwise.
        """
        request = self._request
        if mediaType(_contentType(response)) not in COMPRESSIBLE_TYPES:
            return None
        if response.code in _NOT_COMPRESSED_STATUSES or response.headers.hasHeader(b"Content-Encoding"):
            return None
        addVary(request, b"Accept-Encoding")
        encoder = self._proxy.gzip.encoderForRequest(request)
        if encoder is not None:
            # The length changes, and so does the representation a strong
            # validator names.
            request.responseHeaders.removeHeader(b"Content-Length")
            etag = request.responseHeaders.getRawHeaders(b"ETag")
            if etag and not etag[0].startswith(b"W/"):
                request.responseHeaders.setRawHeaders(b"ETag", [b"W/" + etag[0]])
        return encoder

    def streamEnded(self, reason: Failure, encoder) -> None:
        """
        Orthanc's answer body ended, completely or not.
        """
        if self._phase is _Phase.OVER:
            return
        self._end()
        request = self._request
        request.unregisterProducer()
        if reason.check(ResponseDone, PotentialDataLoss):
            if encoder is not None:
                tail = encoder.finish()
                if tail:
                    request.write(tail)
            request.finish()
            return
        self._logFailure("Orthanc broke off its answer to {method} {path}: {error}", reason)
        request.loseConnection()

    # --- timers and the client

    def armIdle(self) -> None:
        if self._phase is _Phase.ANSWER:
            self._arm(self._proxy.idleTimeout, "idle")

    def _arm(self, seconds: float, what: str) -> None:
        timer = self._timer
        if timer is not None and timer.active() and timer.args == (what,):
            # Every block of the answer re-arms the idle timer: moving it is
            # much cheaper than cancelling it and scheduling another.
            timer.reset(seconds)
            return
        self.disarm()
        self._timer = self._proxy.reactor.callLater(seconds, self._timeout, what)

    def disarm(self) -> None:
        cancelPending(self._timer)
        self._timer = None

    def _end(self) -> None:
        """
        The exchange is over: stop its timer, and give its turn to the next
        request.  Every way an exchange ends comes here, some twice.
        """
        self._phase = _Phase.OVER
        self.disarm()
        if self._holdsTurn:
            self._holdsTurn = False
            self._proxy.turns.release(self._account)

    def _timeout(self, what: str) -> None:
        self._timer = None
        self._timedOut = "turn" if self._phase is _Phase.WAITING else what
        if self._phase in (_Phase.WAITING, _Phase.REQUEST):
            # Before the answer's headers: _failed answers 504.
            self._pending.cancel()
            return
        self._end()
        self.log.error(
            "Orthanc sent nothing for {timeout}s in the middle of its answer to {method} {path};"
            " closed the client's connection",
            timeout=self._proxy.idleTimeout,
            **self._where(),
        )
        self._streamer.stopUpstream()
        self._request.unregisterProducer()
        self._request.loseConnection()

    def _clientGone(self, reason: Failure) -> None:
        phase = self._phase
        self._end()
        if phase in (_Phase.WAITING, _Phase.REQUEST):
            self._pending.cancel()
        elif phase is _Phase.ANSWER:
            self._streamer.stopUpstream()


@implementer(IPushProducer)
class _AnswerStreamer(Protocol):
    """
    Receives Orthanc's answer body and writes it to the client; as the
    request's producer, passes the client's pauses on to Orthanc's socket.
    """

    def __init__(self, exchange: _Exchange, request: Request, encoder, ending: Optional[AnswerEnd]) -> None:
        self._exchange = exchange
        self._request = request
        self._encoder = encoder
        self._ending = ending
        self._paused = False

    def connectionMade(self) -> None:
        # Armed first: pausing (a client that is not reading) disarms it.
        self._exchange.armIdle()
        registerStreamingProducer(self._request, self)

    def dataReceived(self, data: bytes) -> None:
        if self._paused:
            # The Response resumes its transport once after delivering what it
            # had buffered, whatever we asked before: ask again.
            self.transport.pauseProducing()
        else:
            self._exchange.armIdle()
        if self._ending is not None:
            self._ending.feed(data)
        if self._encoder is not None:
            data = self._encoder.encode(data)
        if data:
            self._request.write(data)

    def connectionLost(self, reason: Failure = None) -> None:
        ending = self._ending
        if ending is not None and reason.check(PotentialDataLoss) and not ending.whole():
            # Orthanc closed its connection in the middle of its answer.
            reason = Failure(ending.cutShort())
        self._exchange.streamEnded(reason, self._encoder)

    def stopUpstream(self) -> None:
        self.transport.stopProducing()

    # IPushProducer, for the client's side.

    def pauseProducing(self) -> None:
        self._paused = True
        # Orthanc is not idle while the client holds it back.
        self._exchange.disarm()
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        self._exchange.armIdle()
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.stopUpstream()


class _AnswerCollector(Protocol):
    """
    Receives an answer that must be read whole before any of it is passed on
    (a STOW-RS answer: see L{appliance.web.stowcheck}), at most
    L{MAX_STOW_ANSWER} bytes of it.
    """

    def __init__(self, exchange: _Exchange, response: IResponse) -> None:
        self._exchange = exchange
        self._response = response
        self._blocks: List[bytes] = []
        self._size = 0

    def connectionMade(self) -> None:
        self._exchange.armIdle()

    def dataReceived(self, data: bytes) -> None:
        self._exchange.armIdle()
        self._size += len(data)
        if self._size > MAX_STOW_ANSWER:
            self._blocks = []
            self.transport.stopProducing()
            return
        self._blocks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:
        whole = None if self._size > MAX_STOW_ANSWER else b"".join(self._blocks)
        self._exchange.answerCollected(self._response, reason, whole)

    def stopUpstream(self) -> None:
        self.transport.stopProducing()


class _Discard(Protocol):
    """
    Takes an answer nobody will read, and closes its connection at once.
    """

    def connectionMade(self) -> None:
        self.transport.stopProducing()

    def connectionLost(self, reason: Failure = None) -> None:
        pass
