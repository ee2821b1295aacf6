"""
The appliance's server certificate and the TLS policy of its listeners.

The certificate and key come from C{[tls]}.  When neither file exists, a
self-signed certificate is generated once into C{state_dir} and reused: an
appliance must answer on HTTPS from its first start, and hospital IT installs
the real certificate later.  The key is RSA because the DICOM TLS port shares
the certificate and older dcmtk profiles only offer ECDHE_RSA suites.

Every listener's context comes from one builder (L{serverContext}) and one
reloadable creator (L{ServerTLS}), under a L{TLSPolicy}: the HTTPS one is
Mozilla's "intermediate" (TLS 1.2 and 1.3, ECDHE key exchange with AEAD
ciphers only), the DICOM port's are its profiles (L{appliance.dicom.profiles});
none allows compression or renegotiation.
"""

import datetime
import ipaddress
import os
import socket
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet.error import VerifyError
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import PrivateCertificate
from twisted.logger import Logger
from zope.interface import implementer

from appliance.compat import setKeyExchangeGroups
from appliance.config import TlsSection

log = Logger()

#: TLS 1.2 suites of Mozilla's intermediate profile: forward secret (ECDHE, no
#: DHE), AEAD only.  TLS 1.3 suites are all of that kind and keep their default.
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

#: Key exchange groups, best first.  The hybrid post-quantum group is optional
#: ("?") so that an OpenSSL without it still takes the rest; one that does not
#: understand "?" gets the second list.
GROUP_LISTS = (b"?X25519MLKEM768:X25519:P-256:P-384", b"X25519:P-256:P-384")

#: How long a generated certificate is valid: browsers ignore validity of a
#: certificate the user chose to trust, and a short one would expire unnoticed.
SELF_SIGNED_VALIDITY = datetime.timedelta(days=3650)

RSA_KEY_SIZE = 2048


class CertificateError(Exception):
    """
    The certificate or key cannot be used; the message says why and what to do.
    """


def selfSignedPaths(stateDir: Path) -> Tuple[Path, Path]:
    """
    Where the generated certificate and its key are kept, under the
    appliance's state folder C{stateDir}.
    """
    folder = stateDir / "tls"
    return folder / "self-signed-cert.pem", folder / "self-signed-key.pem"


def loadServerCertificate(settings: TlsSection, stateDir: Path) -> PrivateCertificate:
    """
    The certificate and key every TLS listener of the appliance presents:
    the installed ones of C{settings} (C{[tls]}), else a self-signed one
    generated once into the state folder C{stateDir}.

    @raise CertificateError: if the files cannot be read or do not match.
    """
    certificatePath, keyPath = settings.certificate, settings.private_key
    if not certificatePath.exists() and not keyPath.exists():
        certificatePath, keyPath = selfSignedPaths(stateDir)
        if not certificatePath.exists() or not keyPath.exists():
            try:
                generateSelfSigned(certificatePath, keyPath, hostNames(), hostAddresses())
            except OSError as error:
                raise CertificateError(
                    f"cannot write a self-signed certificate to {error.filename}:"
                    f" {error.strerror} (check [appliance] state_dir)"
                )
        log.warn(
            "No certificate is installed: HTTPS and DICOM TLS use the self-signed"
            " certificate {path}, which browsers and modalities will not trust."
            " Install the hospital's certificate and key as {certificate} and"
            " {key} (PEM), then restart the appliance.",
            path=str(certificatePath),
            certificate=str(settings.certificate),
            key=str(settings.private_key),
        )
    return readCertificate(certificatePath, keyPath)


def readCertificate(certificatePath: Path, keyPath: Path) -> PrivateCertificate:
    """
    The certificate in C{certificatePath} with the key in C{keyPath}.

    @raise CertificateError: if the files cannot be read or do not match.
    """
    try:
        certificatePEM = certificatePath.read_bytes()
        keyPEM = keyPath.read_bytes()
    except OSError as error:
        raise CertificateError(f"cannot read {error.filename}: {error.strerror}")
    try:
        certificate = PrivateCertificate.loadPEM(certificatePEM + b"\n" + keyPEM)
    except VerifyError:
        raise CertificateError(f"{keyPath} is not the private key of {certificatePath}")
    except (SSL.Error, crypto.Error, ValueError) as error:
        raise CertificateError(
            f"{certificatePath} and {keyPath} are not a PEM certificate and its"
            f" unencrypted private key ({error.__class__.__name__})"
        )
    return certificate


def readAuthorities(path: Path) -> List[x509.Certificate]:
    """
    The certificates of authorities in the PEM file C{path}.

    @raise CertificateError: if it cannot be read or holds no certificate.
    """
    try:
        pem = path.read_bytes()
    except OSError as error:
        raise CertificateError(f"cannot read {path}: {error.strerror}")
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise CertificateError(f"{path} holds no PEM certificate")


def hostNames() -> List[str]:
    names = ["localhost", socket.gethostname(), socket.getfqdn()]
    return list(dict.fromkeys(name for name in names if name))


def hostAddresses() -> List[str]:
    """
    The loopback addresses and those the host name resolves to.
    """
    addresses = ["127.0.0.1", "::1"]
    try:
        resolved = socket.getaddrinfo(socket.gethostname(), None)
    except OSError:
        resolved = []
    for *_, sockaddr in resolved:
        try:
            # Link-local IPv6 addresses come with a zone ("fe80::1%eth0"),
            # which a certificate cannot name.
            addresses.append(str(ipaddress.ip_address(sockaddr[0])))
        except ValueError:
            pass
    return list(dict.fromkeys(addresses))


def generateSelfSigned(
    certificatePath: Path, keyPath: Path, names: Sequence[str], addresses: Sequence[str]
) -> None:
    """
    Write a new self-signed RSA certificate valid for C{names} and C{addresses}.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_SIZE)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, names[-1]),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pacs-appliance (self-signed)"),
        ]
    )
    alternativeNames: List[x509.GeneralName] = [x509.DNSName(name) for name in names]
    alternativeNames += [x509.IPAddress(ipaddress.ip_address(address)) for address in addresses]
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + SELF_SIGNED_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(alternativeNames), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_encipherment=True, content_commitment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        # The key identifiers: verifiers of the CA/Browser Forum profile (such
        # as cryptography's) refuse a server certificate without an authority
        # key identifier, even one that is its own trust anchor.
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    keyPath.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    keyPEM = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _writePrivately(keyPath, keyPEM)
    _writePrivately(certificatePath, certificate.public_bytes(serialization.Encoding.PEM))


def _writePrivately(path: Path, data: bytes) -> None:
    """
    Write C{path} readable by us only, replacing it whole.
    """
    partial = path.with_name(path.name + ".partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as stream:
        stream.write(data)
    os.replace(partial, path)


def _selectALPN(protocols: Sequence[bytes]) -> Callable[[SSL.Connection, List[bytes]], bytes]:
    def select(connection: SSL.Connection, offered: List[bytes]) -> bytes:
        for protocol in protocols:
            if protocol in offered:
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS

    return select


def _acceptVerified(connection, certificate, errorNumber, depth, ok) -> bool:
    # OpenSSL's own chain verification decides; nothing is added here.
    return bool(ok)


#: OpenSSL's SSL_OP_PRIORITIZE_CHACHA (1.1.1 and 3.x), for which pyOpenSSL has
#: no name.
OP_PRIORITIZE_CHACHA = 0x00200000


@dataclass(frozen=True)
class TLSPolicy:
    """
    What one listener's TLS accepts; the rest (no compression, no
    renegotiation, no tickets, the server's order of suites, the key exchange
    groups) is the same for every listener.

    @ivar minimumVersion: the oldest protocol version (C{SSL.TLS1_2_VERSION}).
    @ivar tls12Ciphers: the suites of TLS 1.2 and older, as an OpenSSL list;
        TLS 1.3's keep OpenSSL's default, all forward secret and AEAD.
    @ivar sessionId: names the listener's session cache (OpenSSL resumes no
        session of a server asking for client certificates without one).
    @ivar protocols: the ALPN protocols offered, best first (none: no ALPN).
    @ivar clientAuthorities: the PEM file of the authorities whose
        certificate every client must present; L{None} asks for none.
    """

    minimumVersion: int = SSL.TLS1_2_VERSION
    tls12Ciphers: str = TLS12_CIPHERS
    sessionId: bytes = b"pacs-appliance"
    protocols: Tuple[bytes, ...] = ()
    clientAuthorities: Optional[Path] = None


#: The policy of the HTTPS listener.
HTTPS_POLICY = TLSPolicy(protocols=(b"http/1.1",))


def serverContext(certificate: PrivateCertificate, policy: TLSPolicy) -> SSL.Context:
    """
    A new OpenSSL context presenting C{certificate} under C{policy}.
    """
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(policy.minimumVersion)
    # The server's order of suites (AES-GCM first), except that a client
    # preferring ChaCha20 (no AES instructions) gets it: scanners and security
    # reviews rate "no server order" as a finding, and this keeps what Mozilla's
    # advice to leave the choice to the client was for.  No session tickets:
    # their key would live as long as the process and undo forward secrecy;
    # sessions resume from the server's cache instead.
    context.set_options(
        SSL.OP_NO_COMPRESSION
        | SSL.OP_NO_RENEGOTIATION
        | SSL.OP_NO_TICKET
        | SSL.OP_CIPHER_SERVER_PREFERENCE
        | OP_PRIORITIZE_CHACHA
    )
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    context.set_cipher_list(policy.tls12Ciphers.encode("ascii"))
    restrictGroups(context)
    context.use_certificate(certificate.original.to_cryptography())
    context.use_privatekey(certificate.privateKey.original.to_cryptography_key())
    context.check_privatekey()
    context.set_session_id(policy.sessionId)
    context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    if policy.protocols:
        context.set_alpn_select_callback(_selectALPN(policy.protocols))
    if policy.clientAuthorities is not None:
        context.load_verify_locations(str(policy.clientAuthorities))
        # Tells clients which authorities are accepted.
        context.load_client_ca(bytes(policy.clientAuthorities))
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _acceptVerified)
    return context


def restrictGroups(context: SSL.Context) -> None:
    """
    Offer only the groups of L{GROUP_LISTS}: OpenSSL's default also offers
    finite-field groups in TLS 1.3, which the policy excludes.
    """
    for groups in GROUP_LISTS:
        if setKeyExchangeGroups(context, groups):
            return
    raise CertificateError("this OpenSSL supports none of X25519, P-256 and P-384")


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    Creates the server side of every TLS connection of one listener from the
    current context; L{useCertificate} swaps the context for the connections
    that follow (a reload), while established ones keep theirs.
    """

    def __init__(self, certificate: PrivateCertificate, policy: TLSPolicy) -> None:
        self._policy = policy
        #: The certificate presented now.
        self.certificate = certificate
        self._context = serverContext(certificate, policy)

    def useCertificate(self, certificate: PrivateCertificate) -> None:
        self._context = serverContext(certificate, self._policy)
        self.certificate = certificate

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self._context, None)
