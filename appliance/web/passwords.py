"""
Password hashes: scrypt (memory-hard) in a self-describing, colon-free
encoding, C{scrypt$ln=15$r=8$p=1$<salt>$<key>}.  The parameters travel with
each hash, so that the defaults can be raised later and older hashes still
verify, and those a stored hash may ask for are capped, so that a hostile
line cannot make the daemon allocate gigabytes.  Hashing and verifying are
slow on purpose: never in the reactor thread.
"""

import base64
import hashlib
import hmac
import re
import secrets
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

#: The most memory a stored hash's parameters may ask scrypt for.
MAX_SCRYPT_MEMORY = 256 * 1024 * 1024

class PasswordHashError(ValueError):
    """
    A stored hash is not one this module can verify.
    """


@dataclass(frozen=True)
class ScryptParameters:
    """
    scrypt's costs: N = 2**ln, block size r, parallelism p.
    """

    ln: int = 15
    r: int = 8
    p: int = 1

    @property
    def memory(self) -> int:
        """
        Bytes scrypt needs with these parameters.
        """
        return 128 * self.r * (2**self.ln)

    def check(self) -> None:
        """
        @raise PasswordHashError: for parameters outside the bounds a stored
            hash may ask for (a corrupt or hostile line must not make the
            daemon allocate gigabytes).
        """
        if not (1 <= self.ln <= 24 and 1 <= self.r <= 64 and 1 <= self.p <= 16):
            raise PasswordHashError(f"scrypt parameters out of range: ln={self.ln} r={self.r} p={self.p}")
        if self.memory > MAX_SCRYPT_MEMORY:
            raise PasswordHashError(f"scrypt parameters need more than {MAX_SCRYPT_MEMORY // 2**20} MiB")


#: N = 2**15, r = 8, p = 1: 32 MiB and about 0.13 s on this project's
#: reference machine (Go's x/crypto/scrypt recommendation).  Raising them later
#: only affects hashes written afterwards.
DEFAULT_PARAMETERS = ScryptParameters()

_SALT_SIZE = 16
_KEY_SIZE = 32
_HASH = re.compile(r"scrypt\$ln=(\d{1,2})\$r=(\d{1,2})\$p=(\d{1,2})\$([A-Za-z0-9+/]{22})\$([A-Za-z0-9+/]{43})")


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class PasswordHash:
    """
    A parsed stored hash.
    """

    parameters: ScryptParameters
    salt: bytes
    key: bytes

    @classmethod
    def parse(cls, text: str) -> "PasswordHash":
        """
        @raise PasswordHashError: if C{text} is not a hash of ours.
        """
        match = _HASH.fullmatch(text)
        if match is None:
            raise PasswordHashError("not a scrypt$ln=..$r=..$p=..$SALT$KEY hash")
        ln, r, p, salt, key = match.groups()
        parameters = ScryptParameters(int(ln), int(r), int(p))
        parameters.check()
        return cls(parameters, _b64decode(salt), _b64decode(key))

    def encode(self) -> str:
        p = self.parameters
        return f"scrypt$ln={p.ln}$r={p.r}$p={p.p}${_b64encode(self.salt)}${_b64encode(self.key)}"


def _scrypt(password: str, salt: bytes, parameters: ScryptParameters) -> bytes:
    # NFC: the same password typed on two systems may arrive composed or not.
    return hashlib.scrypt(
        unicodedata.normalize("NFC", password).encode("utf-8"),
        salt=salt,
        n=2**parameters.ln,
        r=parameters.r,
        p=parameters.p,
        # OpenSSL needs a little more than the nominal 128*r*N.
        maxmem=2 * parameters.memory,
        dklen=_KEY_SIZE,
    )


def hashPassword(password: str, parameters: ScryptParameters = DEFAULT_PARAMETERS) -> str:
    """
    The stored form of C{password}, with a new random salt.  Slow on purpose:
    never call it in the reactor thread.
    """
    salt = secrets.token_bytes(_SALT_SIZE)
    return PasswordHash(parameters, salt, _scrypt(password, salt, parameters)).encode()


def verifyPassword(password: str, stored: str) -> bool:
    """
    Does C{password} match the stored hash?  Slow on purpose (the hash's own
    parameters): never call it in the reactor thread.

    @raise PasswordHashError: if C{stored} is not a hash of ours.
    """
    parsed = PasswordHash.parse(stored)
    return hmac.compare_digest(_scrypt(password, parsed.salt, parsed.parameters), parsed.key)


def dummyHash(parameters: ScryptParameters) -> str:
    """
    A hash with C{parameters} and a key no password gives in practice: what
    an unknown user's password is checked against, so that the answer takes
    as long as for a known one.
    """
    return PasswordHash(parameters, bytes(_SALT_SIZE), bytes(_KEY_SIZE)).encode()


def commonParameters(hashes: Iterable[str]) -> ScryptParameters:
    """
    The scrypt parameters most of the stored C{hashes} use (the first seen
    of equally common ones), or the defaults when there is none.
    """
    counts = Counter(PasswordHash.parse(stored).parameters for stored in hashes)
    if not counts:
        return DEFAULT_PARAMETERS
    return counts.most_common(1)[0][0]
