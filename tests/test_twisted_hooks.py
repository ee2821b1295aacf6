"""
What the private parts of Twisted and pyOpenSSL that appliance/compat.py
wraps do, as the appliance relies on them: a 100 (Continue) held until the
request layer allows the body, twisted.web's malformations answered by the
appliance, the request line and head size known before the body, twistd
returning when a signal stops it, and the key exchange groups of a TLS
context restricted.

setup.cfg asks for the Twisted and pyOpenSSL releases these tests passed
with, and sets no upper bound: a later release that changes one of these
parts fails these tests, and so the build, instead of the appliance quietly
losing the check built on it.
"""

import configparser
import subprocess
import sys
import textwrap
from importlib.metadata import version
from pathlib import Path
from typing import List, Optional, Tuple

from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import Request

from appliance.compat import HTTPChannelHooks, setKeyExchangeGroups
from appliance.tls import generateSelfSigned, readCertificate
from tests.support import temporaryFolder

SETUP_CFG = Path(__file__).parent.parent / "setup.cfg"


class RecordingChannel(HTTPChannelHooks):
    """
    A channel that records what the hooks tell it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.continues = 0
        self.malformed = 0
        self.heads: List[Tuple[Tuple[bytes, bytes, bytes], int]] = []
        self.headSizes: List[int] = []

    def lineReceived(self, line: bytes) -> None:
        self.headSizes.append(self.headSize())
        super().lineReceived(line)

    def allHeadersReceived(self) -> None:
        self.heads.append((self.requestLine(), self.headSize()))
        super().allHeadersReceived()

    def continueExpected(self) -> None:
        self.continues += 1

    def malformedRequest(self) -> None:
        self.malformed += 1
        super().malformedRequest()


class SilentRequest(Request):
    """
    A request that answers nothing: the tests read what the channel wrote.
    """

    def process(self) -> None:
        pass


def connected(channel: HTTPChannelHooks) -> StringTransport:
    channel.requestFactory = SilentRequest
    transport = StringTransport()
    channel.makeConnection(transport)
    return transport


class ChannelHooksTests(SynchronousTestCase):
    def test_requestLineAndHeadSizeBeforeTheBody(self) -> None:
        channel = RecordingChannel()
        connected(channel)
        lines = [b"POST /pacs/studies?x=1 HTTP/1.1", b"Host: a", b"Content-Length: 3"]
        channel.dataReceived(b"".join(line + b"\r\n" for line in lines) + b"\r\n")
        size = sum(len(line) for line in lines)
        self.assertEqual(channel.heads, [((b"POST", b"/pacs/studies?x=1", b"HTTP/1.1"), size)])
        # Nothing counted while the first line comes in, then the lines before
        # (without their CRLF).
        self.assertEqual(channel.headSizes, [0, 31, 38, size])

    def test_continueIsTheRequestLayersToSend(self) -> None:
        channel = RecordingChannel()
        transport = connected(channel)
        channel.dataReceived(b"PUT /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
        self.assertEqual((channel.continues, transport.value()), (1, b""))
        channel.sendContinue()
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")

    def test_continueSentAtOnceByDefault(self) -> None:
        channel = HTTPChannelHooks()
        transport = connected(channel)
        channel.dataReceived(b"PUT /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")

    def test_everyMalformationReachesTheHook(self) -> None:
        for head in (
            b"GET /x\r\n",
            b"GET /x HTTP/1.1\r\nNo colon here\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: ten\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ):
            channel = RecordingChannel()
            transport = connected(channel)
            channel.dataReceived(head)
            self.assertEqual(channel.malformed, 1, head)
            # The default is twisted.web's: a bare 400, and the connection closed.
            self.assertEqual(transport.value(), b"HTTP/1.1 400 Bad Request\r\n\r\n", head)
            self.assertTrue(transport.disconnecting, head)


class RunTwistdTests(SynchronousTestCase):
    def test_returnsWhenASignalStopsTheReactor(self) -> None:
        """
        runTwistd returns once SIGTERM stops the reactor, where twistd's
        runApp would end the process with the signal.
        """
        program = textwrap.dedent(
            """
            import os, signal
            from twisted.application.service import IServiceMaker, Service
            from twisted.python import usage
            from twisted.scripts import twistd
            from zope.interface import implementer
            from appliance.compat import runTwistd

            @implementer(IServiceMaker)
            class Maker:
                tapname = "signalled"
                description = "sends itself SIGTERM once running"
                options = usage.Options

                def makeService(self, options):
                    from twisted.internet import reactor
                    reactor.callWhenRunning(os.kill, os.getpid(), signal.SIGTERM)
                    return Service()

            class Options(twistd.ServerOptions):
                subCommands = [("signalled", None, usage.Options, "")]
                loadedPlugins = {"signalled": Maker()}

            options = Options()
            options.parseOptions(["--nodaemon", "--pidfile=", "signalled"])
            runTwistd(options)
            os.write(1, b"returned\\n")  # twistd replaced sys.stdout
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, cwd=temporaryFolder(self)
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("returned", result.stdout.splitlines())


def serverContext(folder: Path) -> SSL.Context:
    generateSelfSigned(folder / "cert.pem", folder / "key.pem", ["localhost"], ["127.0.0.1"])
    certificate = readCertificate(folder / "cert.pem", folder / "key.pem")
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    # Only ECDHE: a suite without it would not need a group at all.
    context.set_cipher_list(b"ECDHE-RSA-AES128-GCM-SHA256")
    context.use_certificate(certificate.original.to_cryptography())
    context.use_privatekey(certificate.privateKey.original.to_cryptography_key())
    return context


def handshake(server: SSL.Context, curve: ec.EllipticCurve) -> Optional[str]:
    """
    A TLS 1.2 handshake in memory from a client offering only C{curve}:
    the version agreed, or None if the server refused.
    """
    client = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client.set_max_proto_version(SSL.TLS1_2_VERSION)
    client.set_tmp_ecdh(curve)
    ends = [SSL.Connection(client, None), SSL.Connection(server, None)]
    ends[0].set_connect_state()
    ends[1].set_accept_state()
    for _ in range(10):
        done = 0
        for end, other in (ends, ends[::-1]):
            try:
                end.do_handshake()
                done += 1
            except SSL.WantReadError:
                pass
            except SSL.Error:
                return None
            try:
                other.bio_write(end.bio_read(65536))
            except SSL.WantReadError:
                pass
        if done == 2:
            return ends[1].get_protocol_version_name()
    raise AssertionError("the handshake went on and on")


class KeyExchangeGroupsTests(SynchronousTestCase):
    def test_onlyTheGroupsSetAreOffered(self) -> None:
        server = serverContext(temporaryFolder(self))
        self.assertEqual(handshake(server, ec.SECP256R1()), "TLSv1.2")
        self.assertTrue(setKeyExchangeGroups(server, b"P-384"))
        self.assertEqual(
            [handshake(server, curve) for curve in (ec.SECP256R1(), ec.SECP384R1())], [None, "TLSv1.2"]
        )

    def test_anUnknownGroupIsRefused(self) -> None:
        self.assertFalse(setKeyExchangeGroups(SSL.Context(SSL.TLS_SERVER_METHOD), b"NoSuchGroup"))


class VersionBoundTests(SynchronousTestCase):
    def test_installedReleasesMeetSetupCfg(self) -> None:
        """
        The Twisted and pyOpenSSL these tests run against are at least the
        releases setup.cfg asks for.
        """
        parser = configparser.ConfigParser()
        parser.read(SETUP_CFG, encoding="utf-8")
        wanted = {}
        for line in parser["options"]["install_requires"].splitlines():
            name, _, bound = line.partition(">=")
            wanted[name.split("[")[0].strip().lower()] = bound.strip()

        def parts(text: str) -> Tuple[int, ...]:
            return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())

        for package in ("twisted", "pyopenssl"):
            self.assertTrue(wanted.get(package), f"setup.cfg sets no lower bound on {package}")
            self.assertGreaterEqual(parts(version(package)), parts(wanted[package]), package)
