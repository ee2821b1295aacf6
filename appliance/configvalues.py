"""
The values of the configuration file: how each kind of value is written,
parsed and checked.  Each parser takes the stripped text and the folder of
the file that set it (relative paths are relative to it), and returns the
typed value or raises ValueError with a sentence.  Pure: nothing here reads
the file system.
"""

import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable, Optional, Tuple, Type, Union

from cryptography import x509

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


@dataclass(frozen=True)
class ListenAddress:
    """
    Where a listener binds: C{host} is empty for every interface.
    """

    host: str
    port: int

    def endpointDescription(self) -> str:
        """
        The address as a Twisted server endpoint string (C{tcp:...} or
        C{tcp6:...}), to be completed with the protocol-specific options.
        """
        if not self.host:
            return f"tcp:{self.port}"
        escaped = self.host.replace(":", r"\:")
        kind = "tcp6" if ":" in self.host else "tcp"
        return f"{kind}:{self.port}:interface={escaped}"

    def overlaps(self, other: "ListenAddress") -> bool:
        return self.port == other.port and (
            not self.host or not other.host or self.host == other.host
        )

    def __str__(self) -> str:
        if not self.host:
            return str(self.port)
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def _isNumber(text: str) -> bool:
    # str.isdigit also takes superscripts and other scripts' digits.
    return re.fullmatch(r"[0-9]{1,10}", text) is not None


def parsePort(text: str, base: Path) -> int:
    if not _isNumber(text) or not 1 <= int(text) <= 65535:
        raise ValueError(f"{text!r} is not a port number (1-65535)")
    return int(text)


def parseListen(text: str, base: Path) -> ListenAddress:
    match = re.fullmatch(r"(?:\[(?P<v6>[^\]]+)\]:|(?P<host>[^:\[\]]+):)?(?P<port>[^:]+)", text)
    if match is None:
        raise ValueError(
            f"{text!r} is not [HOST:]PORT (write IPv6 addresses in brackets: [::1]:443)"
        )
    host = match.group("v6") or match.group("host") or ""
    if host:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IP address (give an address, not a name)")
        if match.group("v6") and address.version != 6:
            raise ValueError(f"{host!r} in brackets must be an IPv6 address")
        if match.group("host") and address.version != 4:
            raise ValueError(f"write the IPv6 address {host!r} in brackets: [{host}]:PORT")
        host = str(address)
    return ListenAddress(host, parsePort(match.group("port"), base))


def parseOptionalListen(text: str, base: Path) -> Optional[ListenAddress]:
    return parseListen(text, base) if text else None


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def parseSize(text: str, base: Path) -> int:
    match = re.fullmatch(r"([0-9]{1,12})\s*([KMG]?)(?:i?B)?", text, re.IGNORECASE)
    if match is None:
        raise ValueError(f"{text!r} is not a size (a number with an optional K, M or G suffix)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]


_DURATION_UNITS = {"ms": 0.001, "s": 1, "": 1, "m": 60, "h": 3600}


def parseDuration(text: str, base: Path) -> float:
    match = re.fullmatch(r"([0-9]{1,9}(?:\.[0-9]{1,9})?)\s*(ms|s|m|h|)", text)
    if match is None:
        raise ValueError(
            f"{text!r} is not a duration (a number with a unit: 500ms, 30s, 5m, 1h)"
        )
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parsePositiveDuration(text: str, base: Path) -> float:
    value = parseDuration(text, base)
    if value <= 0:
        raise ValueError(f"{text!r} must be longer than zero")
    return value


def parseCount(text: str, base: Path) -> int:
    if not _isNumber(text) or int(text) < 1:
        raise ValueError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def parseBool(text: str, base: Path) -> bool:
    lowered = text.lower()
    if lowered in ("yes", "true", "on", "1"):
        return True
    if lowered in ("no", "false", "off", "0"):
        return False
    raise ValueError(f"{text!r} is not yes or no")


def parseOptionalPort(text: str, base: Path) -> Optional[int]:
    return parsePort(text, base) if text else None


def parseChoice(*choices: str) -> Callable[[str, Path], str]:
    def parse(text: str, base: Path) -> str:
        if text not in choices:
            raise ValueError(f"{text!r} is not one of: {', '.join(choices)}")
        return text

    return parse


def parseEnum(kind: Type[Enum]) -> Callable[[str, Path], Enum]:
    choose = parseChoice(*(member.value for member in kind))

    def parse(text: str, base: Path) -> Enum:
        return kind(choose(text, base))

    return parse


def parseHostOrNetwork(text: str, base: Path) -> IPNetwork:
    if not text:
        raise ValueError("an IP address or network (CIDR, like 10.1.2.0/24) is required")
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(
            f"{text!r} is not an IP address or network (give an address or a CIDR"
            " like 10.1.2.0/24, not a name)"
        )


def parseCertificateSubject(text: str, base: Path) -> Optional[x509.Name]:
    if not text:
        return None
    try:
        return x509.Name.from_rfc4514_string(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a certificate subject (write it as in RFC 4514,"
            " like CN=ct1.example.org,O=Hospital)"
        )


def parsePath(text: str, base: Path) -> Path:
    if not text:
        raise ValueError("a path is required")
    try:
        path = Path(os.path.normpath(base / Path(text).expanduser()))
    except RuntimeError:
        raise ValueError(f"{text!r} names the home folder of a user that does not exist")
    if len(os.fsencode(path)) > 4095 or any(len(os.fsencode(part)) > 255 for part in path.parts):
        raise ValueError(f"{text!r} is longer than a path can be")
    return path


def parseOptionalPath(text: str, base: Path) -> Optional[Path]:
    return parsePath(text, base) if text else None


def parsePathList(text: str, base: Path) -> Tuple[Path, ...]:
    return tuple(parsePath(item, base) for item in text.split() if item)


def parseNodeName(text: str, base: Path) -> str:
    """
    A node's name in a cluster: what it writes beside its rows in the shared
    database, and what /healthz shows.  Empty: this machine's host name.
    """
    name = text or socket.gethostname()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        raise ValueError(
            f"{name!r} is not a node name (1 to 64 letters, digits, '.', '-' or '_', starting with a letter or digit)"
        )
    return name


def parseOptionalHost(text: str, base: Path) -> str:
    """
    A host name or IP address to connect to; empty for none.
    """
    if text and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}|\[?[0-9A-Fa-f:.]+\]?", text):
        raise ValueError(f"{text!r} is not a host name or IP address")
    return text.strip("[]")


def isLoopback(host: str) -> bool:
    """
    Does C{host} name this machine's loopback interface?  By its spelling:
    the configuration does not look names up.
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parseIdentifier(text: str, base: Path) -> str:
    """
    A PostgreSQL database or user name, as the appliance lets one be written:
    letters, digits and _, at most 63 (PostgreSQL's limit).
    """
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", text):
        raise ValueError(f"{text!r} is not a name (letters, digits and _, at most 63, not starting with a digit)")
    return text


def parseText(text: str, base: Path) -> str:
    if not text.isprintable():
        raise ValueError(f"{text!r} contains control characters")
    return text


def parseContentSecurityPolicy(text: str, base: Path) -> str:
    # The policy goes into a header verbatim: nothing may end the header early.
    if not re.fullmatch(r"[\x20-\x7e]+", text):
        raise ValueError("a policy is printable ASCII on one line (or leave the default)")
    return text


_ORIGIN = re.compile(r"(https?)://([a-z0-9.-]+|\[[0-9a-f:.]+\])(?::(\d{1,5}))?")
_DEFAULT_PORTS = {"https": 443, "http": 80}


def normalOrigin(origin: str) -> Optional[str]:
    """
    C{origin} as browsers write it in an C{Origin} header (lower case, no
    default port), so that equal origins compare equal; L{None} if it is not
    an http or https origin.
    """
    match = _ORIGIN.fullmatch(origin.strip().lower())
    if match is None:
        return None
    scheme, host, port = match.groups()
    if port is None or int(port) == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{int(port)}"


def parseOrigins(text: str, base: Path) -> Tuple[str, ...]:
    origins = []
    for origin in text.split():
        normal = normalOrigin(origin)
        if normal is None:
            raise ValueError(
                f"{origin!r} is not an origin (scheme, host and optional port, like"
                " https://viewer.example.org or https://10.1.2.3:8443, with no path)"
            )
        origins.append(normal)
    return tuple(origins)


def parseAETitle(text: str, base: Path) -> str:
    if not 1 <= len(text) <= 16:
        raise ValueError(f"{text!r} is not an AE title (1 to 16 characters)")
    if not re.fullmatch(r"[\x20-\x5b\x5d-\x7e]+", text):
        raise ValueError(
            f"{text!r} is not an AE title (printable ASCII without backslash)"
        )
    return text


@dataclass(frozen=True)
class DirectoryServer:
    """
    One server of [ldap] url: C{startTLS} for C{ldap://} (StartTLS before
    anything else is sent), otherwise LDAPS.
    """

    url: str
    host: str
    port: int
    startTLS: bool


_LDAP_URL = re.compile(r"(ldaps?)://([A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]+\])(?::([0-9]{1,5}))?/?")


def parseDirectoryServers(text: str, base: Path) -> Tuple[DirectoryServer, ...]:
    """
    Directory servers, tried in the order given: C{ldaps://HOST[:PORT]}, or
    C{ldap://HOST[:PORT]} for StartTLS; empty for none.
    """
    servers = []
    for url in text.split():
        match = _LDAP_URL.fullmatch(url)
        if match is None:
            raise ValueError(
                f"{url!r} is not a directory server (ldaps://HOST[:PORT], or ldap://HOST[:PORT] for StartTLS;"
                " nothing is ever sent to a directory in the clear)"
            )
        scheme, host, port = match.groups()
        startTLS = scheme == "ldap"
        number = int(port) if port else (389 if startTLS else 636)
        if not 1 <= number <= 65535:
            raise ValueError(f"{url!r}: the port must be between 1 and 65535")
        servers.append(DirectoryServer(url, host.strip("[]"), number, startTLS))
    return tuple(servers)


def _parseDN(text: str) -> str:
    from ldap3.core.exceptions import LDAPInvalidDnError
    from ldap3.utils.dn import parse_dn

    try:
        parse_dn(text)
    except LDAPInvalidDnError:
        raise ValueError(f"{text!r} is not a distinguished name (like CN=PACS-Viewers,OU=Groups,DC=hospital,DC=example)")
    return text


def parseOptionalDN(text: str, base: Path) -> str:
    """
    A distinguished name, as written; empty for none.
    """
    return _parseDN(text) if text else ""


def parseDNList(text: str, base: Path) -> Tuple[str, ...]:
    """
    Distinguished names with C{;} between them (a DN holds commas).
    """
    return tuple(_parseDN(item.strip()) for item in text.split(";") if item.strip())


def parseLDAPFilter(text: str, base: Path) -> str:
    """
    An LDAP search filter in which C{{user}} stands for the name a user
    logs in with.
    """
    if "{user}" not in text:
        raise ValueError("the filter must contain {user}, where the name the user logs in with goes")
    if not (text.startswith("(") and text.endswith(")")) or text.count("(") != text.count(")"):
        raise ValueError(f"{text!r} is not an LDAP filter (in parentheses, like (&(objectClass=user)(sAMAccountName={{user}})))")
    return text


def parseValueList(text: str, base: Path) -> Tuple[str, ...]:
    """
    Values with C{;} between them (a value may hold spaces or commas).
    """
    return tuple(item.strip() for item in text.split(";") if item.strip())


def parseWords(text: str, base: Path) -> Tuple[str, ...]:
    """
    Words with white space between them.
    """
    if not text.isprintable():
        raise ValueError(f"{text!r} contains control characters")
    return tuple(text.split())


_HTTPS_URL = re.compile(r"https://[A-Za-z0-9.-]{1,253}(?::[0-9]{1,5})?(?:/[\x21-\x7e]*)?")


def parseOptionalHTTPSURL(text: str, base: Path) -> str:
    """
    An https URL without a query, as written (OpenID Connect compares an
    issuer exactly, trailing slash included); empty for none.
    """
    if not text:
        return ""
    if not _HTTPS_URL.fullmatch(text) or "?" in text or "#" in text:
        raise ValueError(f"{text!r} is not an https URL without query (like https://sso.hospital.example/realms/hospital)")
    return text


@dataclass(frozen=True)
class ServerAddress:
    """
    A server to connect to: a host name (as its certificate names it) or
    an address, and a port.
    """

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parseOptionalServer(text: str, base: Path) -> Optional[ServerAddress]:
    """
    C{HOST:PORT} (an IPv6 address in brackets); empty for none.
    """
    if not text:
        return None
    match = re.fullmatch(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9][A-Za-z0-9.-]{0,252})):(?P<port>[0-9]{1,5})", text)
    if match is None:
        raise ValueError(f"{text!r} is not HOST:PORT (a name or an address; IPv6 in brackets)")
    return ServerAddress(match.group("v6") or match.group("host"), parsePort(match.group("port"), base))
