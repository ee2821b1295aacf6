"""
The private parts of Twisted and pyOpenSSL the appliance cannot do without,
in one place, each with why and with a public name for the rest of the code.
Everything else uses public API.  tests/test_twisted_hooks.py checks what
each of these does (not that a name exists), so that a Twisted or pyOpenSSL
that changes one fails the build instead of quietly losing the check built
on it; setup.cfg bounds both to the versions those tests passed with.
"""

from typing import Tuple

from OpenSSL import SSL
from twisted.scripts import twistd
from twisted.web import http


class HTTPChannelHooks(http.HTTPChannel):
    """
    twisted.web's HTTP/1.1 channel, with public names for the steps of it
    the appliance's channel changes: twisted.web has no hook for them.
    """

    #: Whether the transport holds the channel paused, its buffer full of
    #: what the client has not taken yet: twisted.web keeps it to itself.
    writesPaused = False

    def pauseProducing(self) -> None:
        super().pauseProducing()
        self.writesPaused = True

    def resumeProducing(self) -> None:
        self.writesPaused = False
        super().resumeProducing()

    def requestLine(self) -> Tuple[bytes, bytes, bytes]:
        """
        The method, target and version of the request whose head is being
        read (from the moment its first line is parsed): twisted.web keeps
        them to itself until the body is read.
        """
        return self._command, self._path, self._version

    def headSize(self) -> int:
        """
        How many bytes of the current request's head twisted.web has counted
        against C{totalHeadersSize}: none while its first line comes in.
        """
        return self._receivedHeaderSize

    def _send100Continue(self) -> None:
        # twisted.web calls it as soon as a head says Expect: 100-continue.
        self.continueExpected()

    def continueExpected(self) -> None:
        """
        The client waits for a 100 (Continue) before it sends its body:
        twisted.web sends one at once, a subclass may decide.
        """
        self.sendContinue()

    def sendContinue(self) -> None:
        """
        Tell the client to send the body it holds back.
        """
        self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _respondToBadRequestAndDisconnect(self) -> None:
        # twisted.web's one way out of every malformation it detects.
        self.malformedRequest()

    def malformedRequest(self) -> None:
        """
        twisted.web found the request malformed (its line, a header, its
        length, a chunk): it answers a bare 400 and closes; a subclass may
        say more.
        """
        http.HTTPChannel._respondToBadRequestAndDisconnect(self)


def runTwistd(options: twistd.ServerOptions) -> None:
    """
    Run the application C{options} describe, as twistd does, but return
    when the reactor stops: twistd's public runApp ends the process with the
    signal that stopped the reactor, where the appliance's command exits 0
    on SIGTERM and SIGINT (its normal way to stop).
    """
    twistd._SomeApplicationRunner(options).run()


def setKeyExchangeGroups(context: SSL.Context, groups: bytes) -> bool:
    """
    Offer only C{groups} (an OpenSSL list such as C{b"X25519:P-256"}) for the
    key exchange of C{context}; whether this OpenSSL accepted the list.
    pyOpenSSL has no call for it (only TLS 1.2's C{set_tmp_ecdh}), so the
    binding of C{SSL_CTX_set1_groups_list} it carries is used, on the
    context's OpenSSL pointer.
    """
    from OpenSSL._util import lib

    return lib.SSL_CTX_set1_curves_list(context._context, groups) == 1
