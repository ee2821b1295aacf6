"""
The appliance's configuration: INI files parsed once into frozen, typed objects.

The main file (``/etc/pacs-appliance/appliance.ini`` by default) is read first,
then every ``conf.d/*.ini`` beside it in name order; a later file overrides a key
an earlier one set.  Relative paths are taken relative to the folder of the file
that names them.  Every problem in every file is collected and reported at once as
``FILE: [section] key: message``; nothing below this module sees a raw string.
"""

import configparser
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

DEFAULT_CONFIG_PATH = Path("/etc/pacs-appliance/appliance.ini")


class ConfigError(Exception):
    """
    The configuration has problems; C{problems} holds one line per problem.
    """

    def __init__(self, problems: List[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


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


@dataclass(frozen=True)
class ApplianceSection:
    state_dir: Path
    runtime_dir: Path


@dataclass(frozen=True)
class OrthancSection:
    executable: Path
    plugins: Tuple[Path, ...]
    http_port: int
    dicom_port: int
    aet: str
    verbose: bool
    start_timeout: float
    stop_timeout: float
    restart_max_delay: float
    backoff_reset_after: float
    health_interval: float
    health_timeout: float
    unresponsive_after: int
    max_start_failures: int


@dataclass(frozen=True)
class Config:
    appliance: ApplianceSection
    orthanc: OrthancSection
    sources: Tuple[Path, ...] = field(default=())


# --- value parsers: each takes the stripped text and the folder of the file
# that set it, returns the typed value or raises ValueError with a sentence.


def parsePort(text: str, base: Path) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
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
    match = re.fullmatch(r"(\d+)\s*([KMG]?)(?:i?B)?", text, re.IGNORECASE)
    if match is None:
        raise ValueError(f"{text!r} is not a size (a number with an optional K, M or G suffix)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]


_DURATION_UNITS = {"ms": 0.001, "s": 1, "": 1, "m": 60, "h": 3600}


def parseDuration(text: str, base: Path) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|)", text)
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
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def parseBool(text: str, base: Path) -> bool:
    lowered = text.lower()
    if lowered in ("yes", "true", "on", "1"):
        return True
    if lowered in ("no", "false", "off", "0"):
        return False
    raise ValueError(f"{text!r} is not yes or no")


def parsePath(text: str, base: Path) -> Path:
    if not text:
        raise ValueError("a path is required")
    return Path(os.path.normpath(base / Path(text).expanduser()))


def parsePathList(text: str, base: Path) -> Tuple[Path, ...]:
    return tuple(parsePath(item, base) for item in text.split() if item)


def parseAETitle(text: str, base: Path) -> str:
    if not 1 <= len(text) <= 16:
        raise ValueError(f"{text!r} is not an AE title (1 to 16 characters)")
    if not re.fullmatch(r"[\x20-\x5b\x5d-\x7e]+", text):
        raise ValueError(
            f"{text!r} is not an AE title (printable ASCII without backslash)"
        )
    return text


@dataclass(frozen=True)
class Key:
    """
    One configuration key: how to parse it and its default as written in a file.
    """

    parse: Callable[[str, Path], object]
    default: str


#: Every section and key the appliance knows.  Defaults are what the shipped
#: appliance.ini documents; relative default paths never occur.
SCHEMA: Dict[str, Dict[str, Key]] = {
    "appliance": {
        "state_dir": Key(parsePath, "/var/lib/pacs-appliance"),
        "runtime_dir": Key(parsePath, "/run/pacs-appliance"),
    },
    "orthanc": {
        "executable": Key(parsePath, "/usr/sbin/Orthanc"),
        "plugins": Key(parsePathList, "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
        "http_port": Key(parsePort, "8042"),
        "dicom_port": Key(parsePort, "4242"),
        "aet": Key(parseAETitle, "PACS"),
        "verbose": Key(parseBool, "no"),
        "start_timeout": Key(parsePositiveDuration, "2m"),
        "stop_timeout": Key(parsePositiveDuration, "30s"),
        "restart_max_delay": Key(parsePositiveDuration, "1m"),
        "backoff_reset_after": Key(parsePositiveDuration, "1m"),
        "health_interval": Key(parsePositiveDuration, "5s"),
        "health_timeout": Key(parsePositiveDuration, "10s"),
        "unresponsive_after": Key(parseCount, "3"),
        "max_start_failures": Key(parseCount, "3"),
    },
}


@dataclass
class _Setting:
    text: str
    source: Path


def configFiles(mainPath: Path) -> List[Path]:
    """
    The files that make up the configuration, in the order they are applied.
    """
    confd = mainPath.parent / "conf.d"
    extra = sorted(confd.glob("*.ini")) if confd.is_dir() else []
    return [mainPath] + extra


def _readFile(path: Path, settings: Dict[str, Dict[str, _Setting]], problems: List[str]) -> None:
    parser = configparser.ConfigParser(
        interpolation=None,
        inline_comment_prefixes=(";", "#"),
        empty_lines_in_values=False,
        default_section="\0no default section",
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        with path.open(encoding="utf-8") as stream:
            parser.read_file(stream, source=str(path))
    except OSError as error:
        problems.append(f"{path}: cannot read the file: {error.strerror}")
        return
    except UnicodeDecodeError:
        problems.append(f"{path}: the file is not UTF-8 text")
        return
    except configparser.Error as error:
        message = " ".join(str(error).split())
        problems.append(f"{path}: {message}")
        return
    for section in parser.sections():
        known = SCHEMA.get(section)
        if known is None:
            problems.append(
                f"{path}: [{section}]: unknown section (known: {', '.join(SCHEMA)})"
            )
            continue
        for key, value in parser.items(section):
            if key not in known:
                problems.append(f"{path}: [{section}] {key}: unknown key")
                continue
            settings.setdefault(section, {})[key] = _Setting(value.strip(), path)


def _parseSection(
    name: str,
    given: Dict[str, _Setting],
    defaultSource: Path,
    problems: List[str],
) -> Dict[str, object]:
    values: Dict[str, object] = {}
    for key, spec in SCHEMA[name].items():
        setting = given.get(key, _Setting(spec.default, defaultSource))
        try:
            values[key] = spec.parse(setting.text, setting.source.parent)
        except ValueError as error:
            problems.append(f"{setting.source}: [{name}] {key}: {error}")
    return values


def _check(config: Config, settings: Dict[str, Dict[str, _Setting]], main: Path) -> List[str]:
    """
    Checks that involve more than one key or the file system.
    """
    problems = []

    def where(section: str, key: str) -> str:
        setting = settings.get(section, {}).get(key)
        return f"{setting.source if setting else main}: [{section}] {key}"

    executable = config.orthanc.executable
    if not executable.is_file() or not os.access(executable, os.X_OK):
        problems.append(
            f"{where('orthanc', 'executable')}: {executable} is not an executable file"
            " (install the orthanc package, or point this key at Orthanc)"
        )
    for plugin in config.orthanc.plugins:
        if not plugin.is_file():
            problems.append(
                f"{where('orthanc', 'plugins')}: {plugin} does not exist"
                " (install the orthanc-dicomweb package)"
            )

    # Orthanc binds both its ports on every interface, whatever our listeners say.
    listeners = [
        ("orthanc", "http_port", ListenAddress("", config.orthanc.http_port)),
        ("orthanc", "dicom_port", ListenAddress("", config.orthanc.dicom_port)),
    ]
    for index, (section, key, address) in enumerate(listeners):
        for otherSection, otherKey, other in listeners[:index]:
            if address.overlaps(other):
                problems.append(
                    f"{where(section, key)}: port {address.port} is already used by"
                    f" [{otherSection}] {otherKey}"
                )
    return problems


def loadConfig(mainPath: Path = DEFAULT_CONFIG_PATH) -> Config:
    """
    Read and check the configuration rooted at C{mainPath}.

    @raise ConfigError: with every problem found, if there is any.
    """
    mainPath = Path(os.path.abspath(mainPath))
    problems: List[str] = []
    settings: Dict[str, Dict[str, _Setting]] = {}
    files = configFiles(mainPath)
    for path in files:
        _readFile(path, settings, problems)
    if not mainPath.is_file():
        raise ConfigError(problems)

    sections = {
        name: _parseSection(name, settings.get(name, {}), mainPath, problems)
        for name in SCHEMA
    }
    if problems:
        raise ConfigError(problems)
    config = Config(
        appliance=ApplianceSection(**sections["appliance"]),  # type: ignore[arg-type]
        orthanc=OrthancSection(**sections["orthanc"]),  # type: ignore[arg-type]
        sources=tuple(files),
    )
    problems.extend(_check(config, settings, mainPath))
    if problems:
        raise ConfigError(problems)
    return config
