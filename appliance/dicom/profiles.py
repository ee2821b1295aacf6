"""
The TLS of the DICOM port: the secure transport connection profiles of DICOM
PS3.15 Annex B, as OpenSSL contexts.

C{bcp195-nd} (the default) is the non-downgrading BCP 195 profile, which PS3.15
B.12 ("BCP 195 RFC 8996, 9325") carries on: TLS 1.2 at least, TLS 1.3 preferred,
and under TLS 1.2 only ephemeral ECDH key exchange with AES-GCM.  dcmtk's C{+py}
(non-downgrading) and C{+px} (BCP 195) profiles negotiate it.  No finite-field
DHE: RFC 9325 discourages it and OpenSSL cannot bound the peer's group size.

C{legacy} also accepts TLS 1.0 and 1.1 and the CBC and static-RSA suites of the
retired AES profile (dcmtk's C{+pa}), for modalities that cannot do better.  It
is weak by design: choosing it is logged as a warning at every start.

The profile applies to the whole listener: it is negotiated in the handshake,
before anything says which modality is calling (the source address alone could
be spoofed into the weaker profile), so it cannot be widened per modality soundly.
"""

from typing import Optional

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import PrivateCertificate
from zope.interface import implementer

from appliance.config import DicomSection
from appliance.tls import restrictGroups

_BCP195_ND_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384"
)

# Security level 0 is what lets OpenSSL 3 speak TLS 1.0 and 1.1 at all.
_LEGACY_CIPHERS = (
    _BCP195_ND_CIPHERS + ":ECDHE-RSA-AES128-SHA256:ECDHE-RSA-AES256-SHA384:"
    "ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA:AES128-GCM-SHA256:AES256-GCM-SHA384:"
    "AES128-SHA256:AES128-SHA:AES256-SHA:@SECLEVEL=0"
)

PROFILES = {
    "bcp195-nd": (SSL.TLS1_2_VERSION, _BCP195_ND_CIPHERS),
    "legacy": (SSL.TLS1_VERSION, _LEGACY_CIPHERS),
}

#: The profiles that must be announced as weaker than PS3.15 asks for today.
WEAK_PROFILES = frozenset({"legacy"})


def _acceptVerified(connection, certificate, errorNumber, depth, ok) -> bool:
    # OpenSSL's own chain verification decides; nothing is added here.
    return bool(ok)


@implementer(IOpenSSLServerConnectionCreator)
class DicomTLSContext:
    """
    Server connections for the DICOM port, all from one OpenSSL context built
    from the [dicom] section and the appliance's certificate.
    """

    def __init__(self, settings: DicomSection, certificate: PrivateCertificate) -> None:
        self._settings = settings
        self.useCertificate(certificate)

    def useCertificate(self, certificate: PrivateCertificate) -> None:
        """
        Build the context again around C{certificate} (a reload): the
        handshakes that follow present it, associations already open keep
        theirs.
        """
        settings = self._settings
        minimum, ciphers = PROFILES[settings.tls_profile]
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(minimum)
        context.set_cipher_list(ciphers.encode("ascii"))
        context.set_options(
            SSL.OP_NO_COMPRESSION
            | SSL.OP_CIPHER_SERVER_PREFERENCE
            | SSL.OP_NO_RENEGOTIATION
            | SSL.OP_SINGLE_ECDH_USE
            # As on HTTPS: a ticket key living as long as the process would
            # undo forward secrecy.
            | SSL.OP_NO_TICKET
        )
        restrictGroups(context)
        context.use_certificate(certificate.original.to_cryptography())
        context.use_privatekey(certificate.privateKey.original.to_cryptography_key())
        context.check_privatekey()
        # Sessions are cached per listener; OpenSSL refuses to resume a session
        # of a verifying server without an id context.
        context.set_session_id(b"pacs-appliance-dicom")
        if settings.require_client_certificate:
            assert settings.client_ca is not None  # the configuration checks it
            context.load_verify_locations(str(settings.client_ca))
            # Tells clients which authorities are accepted.
            context.load_client_ca(bytes(settings.client_ca))
            context.set_verify(
                SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _acceptVerified
            )
        self._context = context

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return SSL.Connection(self._context, None)


def weakProfileWarning(settings: DicomSection) -> Optional[str]:
    """
    The warning to log while a profile weaker than PS3.15's current one is in
    force, or None.
    """
    if settings.tls_profile not in WEAK_PROFILES:
        return None
    return (
        f"The DICOM port accepts the {settings.tls_profile!r} TLS profile: TLS 1.0 and"
        " 1.1 and suites without forward secrecy are allowed. Set [dicom] tls_profile"
        " = bcp195-nd once every modality can use it."
    )
