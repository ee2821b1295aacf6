"""
The HTTPS and HTTP listeners on real sockets, with Python's ssl module as the
client: protocol versions, cipher suites, groups, ALPN, the generated
certificate and its names, certificate replacement, and whole responses.
"""

import http.client
import ipaddress
import socket
import ssl
import threading
import warnings
from typing import List

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.verification import PolicyBuilder, Store
from service_identity import VerificationError
from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from appliance.config import ConfigError
from appliance.tls import (
    generateSelfSigned,
    hostNames,
    loadServerCertificate,
    readCertificate,
    selfSignedPaths,
)
from appliance.web.site import NoCredentials, buildWebRoot, buildWebService
from tests.support import FakeOrthanc, temporaryFolder, testConfig, webTLS
from tests.tlsclients import clientContext, get
from tests.viewerbuild import BIG_BUNDLE, makeBuild


def handshake(port: int, context: ssl.SSLContext, serverName: str = "localhost") -> dict:
    """
    Connect, complete the handshake, and say what was negotiated (blocking).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        with context.wrap_socket(raw, server_hostname=serverName) as tls:
            return {
                "version": tls.version(),
                "cipher": tls.cipher()[0],
                "alpn": tls.selected_alpn_protocol(),
                "compression": tls.compression(),
                "certificate": tls.getpeercert(binary_form=True),
            }


class ListenerCase(TestCase):
    """
    The web service of a test configuration, listening on loopback.
    """

    def setUp(self):
        self.folder = temporaryFolder(self)
        self.root = makeBuild(self.folder / "ohif")
        self.config = testConfig(self.folder, web={"ohif_root": self.root, "max_connections": 3})
        self.tls = webTLS(self.config)
        service = buildWebService(
            self.config, buildWebRoot(self.config, FakeOrthanc()), NoCredentials(), self.tls, reactor
        )
        service.startService()
        self.addCleanup(service.stopService)
        self.port = self.config.web.listen_https.port
        self.certificatePath = selfSignedPaths(self.config.appliance.state_dir)[0]


class ProtocolVersionTests(ListenerCase):
    def test_tls10And11Refused(self):
        legacy = clientContext(ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1, ciphers="ALL:@SECLEVEL=0")

        def attempt():
            # First prove this client can speak TLS 1.0/1.1 at all, to a
            # server that allows it; otherwise its refusal would prove nothing.
            legacyServer = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                legacyServer.minimum_version = ssl.TLSVersion.TLSv1
            legacyServer.set_ciphers("ALL:@SECLEVEL=0")
            legacyServer.load_cert_chain(self.certificatePath, selfSignedPaths(self.config.appliance.state_dir)[1])
            with socket.create_server(("127.0.0.1", 0)) as listener:

                def serve():
                    connection, _ = listener.accept()
                    try:
                        legacyServer.wrap_socket(connection, server_side=True).close()
                    except (ssl.SSLError, OSError):
                        connection.close()

                server = threading.Thread(target=serve)
                server.start()
                try:
                    control = handshake(listener.getsockname()[1], legacy)
                except (ssl.SSLError, OSError) as error:
                    control = error
                server.join()
            try:
                return control, handshake(self.port, legacy)
            except (ssl.SSLError, OSError) as error:
                return control, error

        def check(outcome):
            control, result = outcome
            if isinstance(control, Exception):
                self.skipTest(f"this machine's OpenSSL cannot speak TLS 1.0/1.1 at all: {control}")
            self.assertIn(control["version"], ("TLSv1", "TLSv1.1"))
            self.assertIsInstance(result, ssl.SSLError)
            self.assertEqual(result.reason, "TLSV1_ALERT_PROTOCOL_VERSION")

        return deferToThread(attempt).addCallback(check)

    def test_tls12(self):
        d = deferToThread(handshake, self.port, clientContext(maximum=ssl.TLSVersion.TLSv1_2))

        def check(result):
            self.assertEqual(result["version"], "TLSv1.2")
            self.assertIsNone(result["compression"])

        return d.addCallback(check)

    def test_tls13WithALPN(self):
        d = deferToThread(handshake, self.port, clientContext(alpn=["h2", "http/1.1"]))

        def check(result):
            self.assertEqual(result["version"], "TLSv1.3")
            self.assertIn(result["cipher"], ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"))
            self.assertEqual(result["alpn"], "http/1.1")
            self.assertIsNone(result["compression"])

        return d.addCallback(check)


#: What a TLS 1.2 client offering only that suite gets: True when accepted.
TLS12_SUITES = {
    "ECDHE-RSA-AES128-GCM-SHA256": True,
    "ECDHE-RSA-AES256-GCM-SHA384": True,
    "ECDHE-RSA-CHACHA20-POLY1305": True,
    # CBC modes, static RSA key exchange, DHE: all out.
    "ECDHE-RSA-AES128-SHA256": False,
    "ECDHE-RSA-AES256-SHA": False,
    "AES128-GCM-SHA256": False,
    "AES256-SHA256": False,
    "DHE-RSA-AES128-GCM-SHA256": False,
    "DHE-RSA-CHACHA20-POLY1305": False,
}


class CipherTests(ListenerCase):
    def test_tls12Suites(self):
        def attempt():
            outcome = {}
            for suite in TLS12_SUITES:
                context = clientContext(maximum=ssl.TLSVersion.TLSv1_2, ciphers=suite + ":@SECLEVEL=0")
                try:
                    outcome[suite] = handshake(self.port, context)["cipher"]
                except ssl.SSLError:
                    outcome[suite] = None
            return outcome

        def check(outcome):
            for suite, accepted in TLS12_SUITES.items():
                self.assertEqual(outcome[suite], suite if accepted else None, suite)

        return deferToThread(attempt).addCallback(check)

    def test_groups(self):
        def attempt():
            outcome = {}
            for curve in ("prime256v1", "secp384r1", "secp521r1"):
                context = clientContext(maximum=ssl.TLSVersion.TLSv1_2, curve=curve)
                try:
                    outcome[curve] = handshake(self.port, context)["version"]
                except ssl.SSLError:
                    outcome[curve] = None
            return outcome

        def check(outcome):
            self.assertEqual(
                outcome, {"prime256v1": "TLSv1.2", "secp384r1": "TLSv1.2", "secp521r1": None}
            )

        return deferToThread(attempt).addCallback(check)


class CertificateTests(ListenerCase):
    def test_generatedCertificateNames(self):
        certificate = x509.load_pem_x509_certificate(self.certificatePath.read_bytes())
        self.assertIsInstance(certificate.public_key(), rsa.RSAPublicKey)
        for name in hostNames():
            verify_certificate_hostname(certificate, name)
        for address in ("127.0.0.1", "::1"):
            verify_certificate_ip_address(certificate, address)
        self.assertRaises(VerificationError, verify_certificate_hostname, certificate, "other.example")
        self.assertRaises(VerificationError, verify_certificate_ip_address, certificate, "192.0.2.1")

    def test_verifiedHandshake(self):
        trusting = clientContext(cafile=self.certificatePath)

        def attempt():
            verified = handshake(self.port, trusting, "localhost")
            try:
                handshake(self.port, trusting, "other.example")
            except ssl.SSLCertVerificationError as error:
                return verified, error
            return verified, None

        def check(outcome):
            verified, wrongName = outcome
            self.assertEqual(verified["version"], "TLSv1.3")
            self.assertIsNotNone(wrongName)

        return deferToThread(attempt).addCallback(check)

    def test_strictVerification(self):
        """
        A client in OpenSSL's strict X.509 mode (on by default from Python
        3.13, in its default context and urllib3 2's) that trusts the
        generated certificate accepts it as its own trust anchor.
        """
        strict = clientContext(cafile=self.certificatePath)
        strict.verify_flags |= ssl.VERIFY_X509_STRICT

        def check(result):
            self.assertEqual(result["version"], "TLSv1.3")

        return deferToThread(handshake, self.port, strict, "localhost").addCallback(check)

    def test_profileVerification(self):
        """
        cryptography's verifier, which holds server certificates to RFC 5280
        and the CA/Browser Forum's profile, accepts the generated certificate
        as its own trust anchor for "localhost" and the loopback address.
        """
        certificate = x509.load_pem_x509_certificate(self.certificatePath.read_bytes())
        policy = PolicyBuilder().store(Store([certificate]))
        for name in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
            chain = policy.build_server_verifier(name).verify(certificate, [])
            self.assertEqual(chain, [certificate])

    def test_generatedOnceAndKept(self):
        first = self.certificatePath.read_bytes()
        loadServerCertificate(self.config.tls, self.config.appliance.state_dir)
        self.assertEqual(self.certificatePath.read_bytes(), first)
        self.assertEqual(selfSignedPaths(self.config.appliance.state_dir)[1].stat().st_mode & 0o777, 0o600)

    def test_replacedCertificateServesNewConnectionsOnly(self):
        """
        After useCertificate, a connection opened before keeps working and a
        new one gets the new certificate.
        """
        newCertificate, newKey = self.folder / "new-cert.pem", self.folder / "new-key.pem"
        generateSelfSigned(newCertificate, newKey, ["replacement.example"], ["127.0.0.1"])
        old = http.client.HTTPSConnection("127.0.0.1", self.port, context=clientContext(), timeout=30)
        self.addCleanup(old.close)

        def before():
            old.request("GET", "/healthz")
            response = old.getresponse()
            response.read()
            return old.sock.getpeercert(binary_form=True)

        def after(oldCertificate):
            old.request("GET", "/app.bundle.css")
            response = old.getresponse()
            return oldCertificate, response.status, response.read(), handshake(self.port, clientContext())

        def check(outcome):
            oldCertificate, status, body, fresh = outcome
            self.assertEqual((status, body), (200, b"body { color: black }\n"))
            self.assertNotEqual(fresh["certificate"], oldCertificate)
            names = x509.load_der_x509_certificate(fresh["certificate"]).extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value.get_values_for_type(x509.DNSName)
            self.assertEqual(names, ["replacement.example"])

        d = deferToThread(before)

        def swap(oldCertificate):
            self.tls.useCertificate(readCertificate(newCertificate, newKey))
            return deferToThread(after, oldCertificate)

        return d.addCallback(swap).addCallback(check)


class ServingTests(ListenerCase):
    def test_largeFileWholeAndInRanges(self):
        path = "/big.bundle.fedcba9876543210.js"

        def fetch():
            return get(self.port, path), get(self.port, path, {"Range": "bytes=300000-499999"})

        def check(outcome):
            (status, headers, body), (rangeStatus, rangeHeaders, part) = outcome
            self.assertEqual(status, 200)
            self.assertEqual(body, BIG_BUNDLE)
            self.assertEqual(headers["Strict-Transport-Security"], "max-age=31536000")
            self.assertEqual((rangeStatus, part), (206, BIG_BUNDLE[300000:500000]))
            self.assertEqual(rangeHeaders["Content-Range"], f"bytes 300000-499999/{len(BIG_BUNDLE)}")

        return deferToThread(fetch).addCallback(check)

    def test_httpRedirects(self):
        port = self.config.web.listen_http.port

        def fetch():
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                connection.request("GET", "/viewer?StudyInstanceUIDs=1.2.3")
                response = connection.getresponse()
                return response.status, response.headers, response.read()
            finally:
                connection.close()

        def check(outcome):
            status, headers, body = outcome
            self.assertEqual((status, body), (301, b""))
            self.assertEqual(
                headers["Location"], f"https://127.0.0.1:{self.port}/viewer?StudyInstanceUIDs=1.2.3"
            )

        return deferToThread(fetch).addCallback(check)

    def test_connectionCap(self):
        """
        With max_connections = 3 open, a fourth connection is closed at once;
        once one closes, connections are accepted again.
        """

        def attempt():
            held: List[ssl.SSLSocket] = []
            try:
                for _ in range(3):
                    raw = socket.create_connection(("127.0.0.1", self.port), timeout=20)
                    held.append(clientContext().wrap_socket(raw, server_hostname="localhost"))
                try:
                    handshake(self.port, clientContext())
                    refused = None
                except (ssl.SSLError, OSError) as error:
                    refused = error
                held.pop().close()
                # The server notices the close asynchronously: retry briefly.
                for _ in range(50):
                    try:
                        return refused, handshake(self.port, clientContext())
                    except (ssl.SSLError, OSError):
                        threading.Event().wait(0.05)
                return refused, None
            finally:
                for connection in held:
                    connection.close()

        def check(outcome):
            refused, accepted = outcome
            self.assertIsNotNone(refused)
            self.assertIsNotNone(accepted)

        return deferToThread(attempt).addCallback(check)


class CertificateConfigTests(SynchronousTestCase):
    def test_oneWithoutTheOtherIsAConfigError(self):
        folder = temporaryFolder(self)
        certificate, key = folder / "cert.pem", folder / "key.pem"
        generateSelfSigned(certificate, key, ["localhost"], ["127.0.0.1"])
        key.unlink()
        error = self.assertRaises(
            ConfigError,
            testConfig,
            folder,
            tls={"certificate": certificate, "private_key": key},
        )
        [problem] = error.problems
        self.assertIn("[tls] private_key", problem)
        self.assertIn("does not exist but [tls] certificate does", problem)

    def test_keyOfAnotherCertificateIsAConfigError(self):
        folder = temporaryFolder(self)
        generateSelfSigned(folder / "a.pem", folder / "a-key.pem", ["localhost"], ["127.0.0.1"])
        generateSelfSigned(folder / "b.pem", folder / "b-key.pem", ["localhost"], ["127.0.0.1"])
        error = self.assertRaises(
            ConfigError,
            testConfig,
            folder,
            tls={"certificate": folder / "a.pem", "private_key": folder / "b-key.pem"},
        )
        [problem] = error.problems
        self.assertIn("[tls] certificate", problem)
        self.assertIn("b-key.pem is not the private key of", problem)

    def test_installedCertificateIsUsed(self):
        folder = temporaryFolder(self)
        generateSelfSigned(folder / "cert.pem", folder / "key.pem", ["pacs.hospital.example"], ["127.0.0.1"])
        config = testConfig(folder, tls={"certificate": folder / "cert.pem", "private_key": folder / "key.pem"})
        certificate = loadServerCertificate(config.tls, config.appliance.state_dir)
        names = certificate.original.to_cryptography().subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        self.assertEqual([name.value for name in names], ["pacs.hospital.example"])
        self.assertFalse(selfSignedPaths(config.appliance.state_dir)[0].exists())

    def test_webPortsMayNotCollide(self):
        folder = temporaryFolder(self)
        error = self.assertRaises(
            ConfigError, testConfig, folder, web={"listen_https": "8443", "listen_http": "127.0.0.1:8443"}
        )
        self.assertTrue(any("[web] listen_http: port 8443 is already used by [web] listen_https" in p for p in error.problems))

    def test_httpListenerMayBeDisabled(self):
        config = testConfig(temporaryFolder(self), web={"listen_http": ""})
        self.assertIsNone(config.web.listen_http)
