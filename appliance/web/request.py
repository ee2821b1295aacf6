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
from typing import Optional, Tuple
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from appliance.web.channel import SERVER, HeaderPairs
from appliance.web.checkers import CredentialsUnchecked
from appliance.web.gate import basicChallenge, cookieChallenge
from appliance.web.origins import isBrowser
from appliance.web.pages import describeSize
from appliance.web.spool import SPOOL_RETRY_AFTER, SpoolQuota

#: The largest body read from a request without an account: enough for the
#: login form, whose POST is anonymous.
ANONYMOUS_BODY_LIMIT = 16 * 1024

#: Bodies up to this size stay in memory; larger ones move to a file in the
#: site's spool folder.
MEMORY_BODY_LIMIT = 1024 * 1024

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
    (C{content}, at position 0), and whose response
    carries the site's standard headers.
    """

    #: Who sent the request (an L{appliance.web.accounts.IAccount}), or L{None}.
    account = None
    #: Why the request's credentials could not be checked (too many password
    #: checks waiting, the directory unreachable: an
    #: L{appliance.web.checkers.CredentialsUnchecked}), or L{None}: with one,
    #: C{account} is L{None}, and the access gate answers 503.
    credentialsUnchecked: Optional[CredentialsUnchecked] = None

    log = Logger()

    #: When the request's head arrived (the site's clock).
    startedAt = 0.0

    _identified = False
    _clientGone = False
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
        self.startedAt = self.channel.site.reactor.seconds()
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
            # Orthanc must never decompress what a client sends: the size
            # limit and the spool shares count the bytes sent, and a small
            # compressed body can expand to any size (a decompression bomb).
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
        if self._refused or self._clientGone:
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
        if self._identified:
            super().requestReceived(command, path, version)
        else:
            self._waiting = (command, path, version)

    def connectionLost(self, reason: Failure) -> None:
        self._clientGone = True
        # The authenticator skips a password check still waiting for a thread.
        if self._identity is not None:
            self._identity.cancel()
        self._releaseSpool()
        super().connectionLost(reason)

    @property
    def receivedLength(self) -> int:
        """
        The body bytes received so far.
        """
        return self._received

    def finish(self) -> None:
        self._releaseSpool()
        super().finish()

    def _notIdentified(self, failure: Failure) -> None:
        if failure.check(CancelledError):
            # The client left (connectionLost).
            return
        if not failure.check(CredentialsUnchecked):
            self.log.failure("Could not identify the sender of a request from {client}", failure, client=self._peer())
            self._identifiedAs(None)
            return
        if self._clientGone or self._refused:
            return
        unchecked = failure.value
        if self._bodyComing:
            self._refuse(503, unchecked.message, [(b"Retry-After", b"%d" % (unchecked.retryAfter,))])
            return
        self.credentialsUnchecked = unchecked
        self._identifiedAs(None)

    def _identifiedAs(self, account) -> None:
        if self._clientGone or self._refused:
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
            self._spoolAccount = account.label
            # A body that could never fit is refused now; what one holds is
            # counted as it arrives, so that a slow one holds only its bytes.
            refusal = site.spoolQuota.check(account.label, self._length or 0)
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
