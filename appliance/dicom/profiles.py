"""
The TLS of the DICOM port: the secure transport connection profiles of DICOM
PS3.15 Annex B, as TLS policies of the appliance's listeners.

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

from appliance.config import DicomSection, DicomTLSProfile
from appliance.tls import TLSPolicy

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

#: The oldest protocol version and the TLS 1.2 (and older) suites of each profile.
_PROFILES = {
    DicomTLSProfile.BCP195_ND: (SSL.TLS1_2_VERSION, _BCP195_ND_CIPHERS),
    DicomTLSProfile.LEGACY: (SSL.TLS1_VERSION, _LEGACY_CIPHERS),
}

#: The profiles that must be announced as weaker than PS3.15 asks for today.
WEAK_PROFILES = frozenset({DicomTLSProfile.LEGACY})


def dicomPolicy(settings: DicomSection) -> TLSPolicy:
    """
    The TLS policy of the DICOM port: the profile of [dicom], and client
    certificates from its authority under mutual TLS.
    """
    minimum, ciphers = _PROFILES[settings.tls_profile]
    return TLSPolicy(
        minimumVersion=minimum,
        tls12Ciphers=ciphers,
        # Sessions are cached per listener.
        sessionId=b"pacs-appliance-dicom",
        clientAuthorities=settings.client_ca if settings.require_client_certificate else None,
    )


def weakProfileWarning(settings: DicomSection) -> Optional[str]:
    """
    The warning to log while a profile weaker than PS3.15's current one is in
    force, or None.
    """
    if settings.tls_profile not in WEAK_PROFILES:
        return None
    return (
        f"The DICOM port accepts the {settings.tls_profile.value!r} TLS profile: TLS 1.0 and"
        " 1.1 and suites without forward secrecy are allowed. Set [dicom] tls_profile"
        f" = {DicomTLSProfile.BCP195_ND.value} once every modality can use it."
    )
