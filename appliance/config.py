"""
The appliance's configuration: INI files parsed once into frozen, typed objects.

The main file (``/etc/pacs-appliance/appliance.ini`` by default) is read first,
then every ``conf.d/*.ini`` beside it in name order; a later file overrides a key
an earlier one set.  Relative paths are taken relative to the folder of the file
that names them (each kind of value is parsed by L{appliance.configvalues}).
Every problem in every file is collected and reported at once as
``FILE: [section] key: message``; nothing below this module sees a raw string.

Loading reads the configuration files and nothing else: what the settings name
on disk (Orthanc, the certificate) is checked by L{appliance.preflight}, which
start-up, C{check-config} and reload share.
"""

import configparser
import os
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from cryptography import x509

from appliance.configvalues import (
    DirectoryServer,
    IPNetwork,
    ListenAddress,
    ServerAddress,
    isLoopback,
    parseAETitle,
    parseBool,
    parseCertificateSubject,
    parseContentSecurityPolicy,
    parseCount,
    parseDirectoryServers,
    parseDNList,
    parseDuration,
    parseEnum,
    parseHostOrNetwork,
    parseIdentifier,
    parseLDAPFilter,
    parseListen,
    parseNodeName,
    parseOptionalDN,
    parseOptionalHost,
    parseOptionalHTTPSURL,
    parseOptionalListen,
    parseOptionalPath,
    parseOptionalPort,
    parseOptionalServer,
    parseOrigins,
    parsePath,
    parsePathList,
    parsePort,
    parsePositiveDuration,
    parseSize,
    parseText,
    parseValueList,
    parseWords,
)

DEFAULT_CONFIG_PATH = Path("/etc/pacs-appliance/appliance.ini")


class ConfigError(Exception):
    """
    The configuration has problems; C{problems} holds one line per problem.
    """

    def __init__(self, problems: List[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ApplianceSection:
    state_dir: Path
    runtime_dir: Path
    node_name: str


class OrthancStorage(str, Enum):
    """
    Where Orthanc keeps its DICOM files ([orthanc] storage).
    """

    #: In a folder: storage_dir, which all nodes of a cluster share.
    FILESYSTEM = "filesystem"
    #: In the PostgreSQL database of [database] (Orthanc's storage plugin).
    POSTGRESQL = "postgresql"


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
    min_free_space: int
    firewall: bool
    storage: OrthancStorage
    #: L{None}: state_dir/orthanc/storage.
    storage_dir: Optional[Path]
    stable_age: float


@dataclass(frozen=True)
class TlsSection:
    certificate: Path
    private_key: Path


@dataclass(frozen=True)
class WebSection:
    listen_https: ListenAddress
    listen_http: Optional[ListenAddress]
    ohif_root: Path
    site_name: str
    investigational_use: bool
    content_security_policy: str
    cross_origin_isolation: bool
    hsts_max_age: float
    idle_timeout: float
    header_timeout: float
    handshake_timeout: float
    max_connections: int
    max_connections_per_address: int
    max_request_head: int
    max_upload_size: int
    max_spool_per_account: int
    max_spool: int
    min_body_rate: int
    proxy_connect_timeout: float
    proxy_response_timeout: float
    proxy_idle_timeout: float
    max_orthanc_requests_per_account: int
    cors_allowed_origins: Tuple[str, ...]
    admin_unsafe_endpoints: bool
    #: 0: no metadata cache.
    metadata_cache_size: int


@dataclass(frozen=True)
class AuthSection:
    users_file: Path
    session_idle_timeout: float
    session_lifetime: float
    max_login_failures: int
    max_address_failures: int
    login_failure_window: float


@dataclass(frozen=True)
class LdapSection:
    """
    The hospital's directory (LDAP, Active Directory): no C{url}, no
    directory logins.
    """

    url: Tuple[DirectoryServer, ...]
    ca_file: Optional[Path]
    bind_dn: str
    bind_password_file: Optional[Path]
    user_base: str
    user_filter: str
    #: Empty: the domain of user_base (its DC= part).
    group_base: str
    viewer_groups: Tuple[str, ...]
    uploader_groups: Tuple[str, ...]
    admin_groups: Tuple[str, ...]
    recheck_interval: float
    timeout: float


@dataclass(frozen=True)
class OidcSection:
    """
    The hospital's single sign-on (OpenID Connect): no C{issuer}, none.
    """

    issuer: str
    client_id: str
    client_secret_file: Optional[Path]
    ca_file: Optional[Path]
    display_name: str
    scopes: Tuple[str, ...]
    user_claim: str
    roles_claim: str
    viewer_values: Tuple[str, ...]
    uploader_values: Tuple[str, ...]
    admin_values: Tuple[str, ...]
    #: Empty: the client id.
    audience: str
    timeout: float


@dataclass(frozen=True)
class AuditSection:
    #: Empty: state_dir/audit.
    folder: Optional[Path]
    #: The Audit Record Repository (syslog over TLS), or None.
    syslog: Optional[ServerAddress]
    ca_file: Optional[Path]
    #: The hospital's name in the records (AuditEnterpriseSiteID).
    site: str


@dataclass(frozen=True)
class MetricsSection:
    #: Accounts of the appliance's own (users file or database) that may
    #: read /metrics besides administrators.
    scrape_users: Tuple[str, ...]


class DatabaseTLSMode(str, Enum):
    """
    How the connection to PostgreSQL is protected ([database] ssl_mode, as
    libpq's sslmode names it).
    """

    #: Encrypted, and the server's certificate checked against ca_file and
    #: its name against host.
    VERIFY_FULL = "verify-full"
    #: Encrypted, the server not checked.
    REQUIRE = "require"
    #: In the clear: for a server on this machine only.
    DISABLE = "disable"


@dataclass(frozen=True)
class DatabaseSection:
    #: Empty: no PostgreSQL (the state is kept in a SQLite file).
    host: str
    port: int
    name: str
    user: str
    password_file: Optional[Path]
    ssl_mode: DatabaseTLSMode
    ca_file: Optional[Path]


class DicomTLSProfile(str, Enum):
    """
    The TLS profiles of the DICOM port, by their names in [dicom]
    tls_profile (see L{appliance.dicom.profiles}).
    """

    BCP195_ND = "bcp195-nd"
    LEGACY = "legacy"


@dataclass(frozen=True)
class DicomSection:
    listen: Optional[ListenAddress]
    tls_profile: DicomTLSProfile
    require_client_certificate: bool
    client_ca: Optional[Path]
    handshake_timeout: float
    idle_timeout: float
    max_connections: int
    max_connections_per_address: int
    max_first_pdu: int




@dataclass(frozen=True)
class ModalitySection:
    """
    One remote DICOM node, from a C{[modality:NAME]} section.
    """

    name: str
    aet: str
    host: IPNetwork
    port: Optional[int]
    certificate_subject: Optional[x509.Name]


@dataclass(frozen=True)
class Config:
    appliance: ApplianceSection
    orthanc: OrthancSection
    tls: TlsSection
    web: WebSection
    auth: AuthSection
    database: DatabaseSection
    dicom: DicomSection
    ldap: LdapSection
    oidc: OidcSection
    metrics: MetricsSection
    audit: AuditSection
    modalities: Tuple[ModalitySection, ...]
    sources: Tuple[Path, ...] = field(default=())
    #: The file that set each key given, by (section, key): where a problem
    #: with it is reported.
    keySources: Mapping[Tuple[str, str], Path] = field(default_factory=dict, compare=False, repr=False)

    def where(self, section: str, key: str) -> str:
        """
        C{FILE: [section] key}, the start of a problem with that key: the file
        that set it, else the main file.
        """
        source = self.keySources.get((section, key), self.sources[0] if self.sources else DEFAULT_CONFIG_PATH)
        return f"{source}: [{section}] {key}"


@dataclass(frozen=True)
class Key:
    """
    One configuration key: how to parse it and its default as written in a file.
    """

    parse: Callable[[str, Path], object]
    default: str


#: What the OHIF viewer needs and no more: its own scripts (the inline ones in
#: index.html are allowed by their hashes, added by the web site), WebAssembly
#: codecs, blob: workers, React's inline styles, and data: images and fonts.
DEFAULT_CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; worker-src 'self' blob:;"
    " style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:;"
    " font-src 'self' data:; connect-src 'self' data: blob:; object-src 'none';"
    " base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)

#: Every section and key the appliance knows.  Defaults are what the shipped
#: appliance.ini documents; relative default paths never occur.
SCHEMA: Dict[str, Dict[str, Key]] = {
    "appliance": {
        "state_dir": Key(parsePath, "/var/lib/pacs-appliance"),
        "runtime_dir": Key(parsePath, "/run/pacs-appliance"),
        "node_name": Key(parseNodeName, ""),
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
        "min_free_space": Key(parseSize, "1G"),
        "firewall": Key(parseBool, "yes"),
        "storage": Key(parseEnum(OrthancStorage), OrthancStorage.FILESYSTEM.value),
        "storage_dir": Key(parseOptionalPath, ""),
        "stable_age": Key(parsePositiveDuration, "60s"),
    },
    "tls": {
        "certificate": Key(parsePath, "/etc/pacs-appliance/tls/cert.pem"),
        "private_key": Key(parsePath, "/etc/pacs-appliance/tls/key.pem"),
    },
    "web": {
        "listen_https": Key(parseListen, "443"),
        "listen_http": Key(parseOptionalListen, "80"),
        "ohif_root": Key(parsePath, "/usr/share/pacs-appliance/ohif"),
        "site_name": Key(parseText, "PACS"),
        "investigational_use": Key(parseBool, "no"),
        "content_security_policy": Key(parseContentSecurityPolicy, DEFAULT_CONTENT_SECURITY_POLICY),
        "cross_origin_isolation": Key(parseBool, "yes"),
        "hsts_max_age": Key(parseDuration, "8760h"),
        "idle_timeout": Key(parsePositiveDuration, "2m"),
        "header_timeout": Key(parsePositiveDuration, "30s"),
        "handshake_timeout": Key(parsePositiveDuration, "10s"),
        "max_connections": Key(parseCount, "1000"),
        "max_connections_per_address": Key(parseCount, "256"),
        "max_request_head": Key(parseSize, "64K"),
        "max_upload_size": Key(parseSize, "4G"),
        "max_spool_per_account": Key(parseSize, "4G"),
        "max_spool": Key(parseSize, "16G"),
        "min_body_rate": Key(parseSize, "1K"),
        "proxy_connect_timeout": Key(parsePositiveDuration, "5s"),
        "proxy_response_timeout": Key(parsePositiveDuration, "5m"),
        "proxy_idle_timeout": Key(parsePositiveDuration, "2m"),
        "max_orthanc_requests_per_account": Key(parseCount, "32"),
        "cors_allowed_origins": Key(parseOrigins, ""),
        "admin_unsafe_endpoints": Key(parseBool, "no"),
        "metadata_cache_size": Key(parseSize, "4G"),
    },
    "auth": {
        "users_file": Key(parsePath, "/etc/pacs-appliance/users"),
        "session_idle_timeout": Key(parsePositiveDuration, "30m"),
        "session_lifetime": Key(parsePositiveDuration, "12h"),
        "max_login_failures": Key(parseCount, "10"),
        "max_address_failures": Key(parseCount, "50"),
        "login_failure_window": Key(parsePositiveDuration, "15m"),
    },
    "database": {
        "host": Key(parseOptionalHost, ""),
        "port": Key(parsePort, "5432"),
        "name": Key(parseIdentifier, "pacs_appliance"),
        "user": Key(parseIdentifier, "pacs_appliance"),
        "password_file": Key(parseOptionalPath, ""),
        "ssl_mode": Key(parseEnum(DatabaseTLSMode), DatabaseTLSMode.VERIFY_FULL.value),
        "ca_file": Key(parseOptionalPath, ""),
    },
    "dicom": {
        "listen": Key(parseOptionalListen, "11112"),
        "tls_profile": Key(parseEnum(DicomTLSProfile), DicomTLSProfile.BCP195_ND.value),
        "require_client_certificate": Key(parseBool, "no"),
        "client_ca": Key(parseOptionalPath, ""),
        "handshake_timeout": Key(parsePositiveDuration, "10s"),
        "idle_timeout": Key(parsePositiveDuration, "5m"),
        "max_connections": Key(parseCount, "100"),
        "max_connections_per_address": Key(parseCount, "50"),
        "max_first_pdu": Key(parseSize, "64K"),
    },
    "ldap": {
        "url": Key(parseDirectoryServers, ""),
        "ca_file": Key(parseOptionalPath, ""),
        "bind_dn": Key(parseOptionalDN, ""),
        "bind_password_file": Key(parseOptionalPath, ""),
        "user_base": Key(parseOptionalDN, ""),
        "user_filter": Key(parseLDAPFilter, "(&(objectClass=user)(sAMAccountName={user}))"),
        "group_base": Key(parseOptionalDN, ""),
        "viewer_groups": Key(parseDNList, ""),
        "uploader_groups": Key(parseDNList, ""),
        "admin_groups": Key(parseDNList, ""),
        "recheck_interval": Key(parsePositiveDuration, "5m"),
        "timeout": Key(parsePositiveDuration, "10s"),
    },
    "oidc": {
        "issuer": Key(parseOptionalHTTPSURL, ""),
        "client_id": Key(parseText, ""),
        "client_secret_file": Key(parseOptionalPath, ""),
        "ca_file": Key(parseOptionalPath, ""),
        "display_name": Key(parseText, "single sign-on"),
        "scopes": Key(parseWords, "openid profile email"),
        "user_claim": Key(parseText, "preferred_username"),
        "roles_claim": Key(parseText, "groups"),
        "viewer_values": Key(parseValueList, ""),
        "uploader_values": Key(parseValueList, ""),
        "admin_values": Key(parseValueList, ""),
        "audience": Key(parseText, ""),
        "timeout": Key(parsePositiveDuration, "10s"),
    },
    "metrics": {
        "scrape_users": Key(parseWords, ""),
    },
    "audit": {
        "folder": Key(parseOptionalPath, ""),
        "syslog": Key(parseOptionalServer, ""),
        "ca_file": Key(parseOptionalPath, ""),
        "site": Key(parseText, ""),
    },
}

#: The sections named C{[modality:NAME]}, one a remote DICOM node.
MODALITY_PREFIX = "modality:"
MODALITY_SCHEMA: Dict[str, Key] = {
    "aet": Key(parseAETitle, ""),
    "host": Key(parseHostOrNetwork, ""),
    "port": Key(parseOptionalPort, ""),
    "certificate_subject": Key(parseCertificateSubject, ""),
}


def _schemaOf(section: str) -> Optional[Dict[str, Key]]:
    if section.startswith(MODALITY_PREFIX):
        return MODALITY_SCHEMA
    return SCHEMA.get(section)


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


def _shown(name: str) -> str:
    """
    A section or key name from the file as a problem line may show it: with
    escapes for anything but printable ASCII, so that no name can forge lines
    or colour a terminal.
    """
    return name if name.isascii() and name.isprintable() else ascii(name)[1:-1]


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
        known = _schemaOf(section)
        if known is None:
            problems.append(
                f"{path}: [{_shown(section)}]: unknown section (known: {', '.join(SCHEMA)},"
                f" {MODALITY_PREFIX}NAME)"
            )
            continue
        if known is MODALITY_SCHEMA and not re.fullmatch(
            r"[A-Za-z0-9_-]{1,64}", section[len(MODALITY_PREFIX) :]
        ):
            problems.append(
                f"{path}: [{_shown(section)}]: a modality name is 1 to 64 letters, digits, - or _"
            )
            continue
        # An empty [modality:NAME] must still be reported for its missing keys.
        settings.setdefault(section, {})
        for key, value in parser.items(section):
            if key not in known:
                problems.append(f"{path}: [{_shown(section)}] {_shown(key)}: unknown key")
                continue
            settings.setdefault(section, {})[key] = _Setting(value.strip(), path)


def _parseSection(
    name: str,
    given: Dict[str, _Setting],
    defaultSource: Path,
    problems: List[str],
    schema: Optional[Dict[str, Key]] = None,
) -> Dict[str, object]:
    values: Dict[str, object] = {}
    for key, spec in (schema or SCHEMA[name]).items():
        setting = given.get(key, _Setting(spec.default, defaultSource))
        try:
            values[key] = spec.parse(setting.text, setting.source.parent)
        except ValueError as error:
            problems.append(f"{setting.source}: [{name}] {key}: {error}")
    return values


def _check(config: Config) -> List[str]:
    """
    The checks that involve more than one key.
    """
    problems = []
    where = config.where

    # Orthanc binds both its ports on every interface, whatever our listeners say.
    listeners = [
        ("orthanc", "http_port", ListenAddress("", config.orthanc.http_port)),
        ("orthanc", "dicom_port", ListenAddress("", config.orthanc.dicom_port)),
        ("web", "listen_https", config.web.listen_https),
    ]
    if config.web.listen_http is not None:
        listeners.append(("web", "listen_http", config.web.listen_http))
    if config.dicom.listen is not None:
        listeners.append(("dicom", "listen", config.dicom.listen))
    problems.extend(_checkDicom(config))
    problems.extend(_checkDatabase(config))
    problems.extend(_checkIdentity(config))
    if config.auth.max_address_failures < config.auth.max_login_failures:
        problems.append(
            f"{where('auth', 'max_address_failures')}: it is lower than max_login_failures: one user's"
            " mistyped password would lock out everyone behind the same address"
        )
    web = config.web
    if web.max_upload_size > web.max_spool_per_account:
        problems.append(
            f"{where('web', 'max_spool_per_account')}: it is smaller than max_upload_size, so the largest"
            " uploads could never be received (raise it, or lower max_upload_size)"
        )
    if web.max_spool_per_account > web.max_spool:
        problems.append(
            f"{where('web', 'max_spool')}: it is smaller than max_spool_per_account: one account could hold"
            " all of it"
        )

    for index, (section, key, address) in enumerate(listeners):
        for otherSection, otherKey, other in listeners[:index]:
            if address.overlaps(other):
                problems.append(
                    f"{where(section, key)}: port {address.port} is already used by"
                    f" [{otherSection}] {otherKey}"
                )
    return problems


def _checkDatabase(config: Config) -> List[str]:
    database = config.database
    where = config.where
    if not database.host:
        if config.orthanc.storage is OrthancStorage.POSTGRESQL:
            return [f"{where('orthanc', 'storage')}: postgresql needs the PostgreSQL server of [database] (set its host)"]
        return []
    problems = []
    if database.password_file is None:
        problems.append(f"{where('database', 'password_file')}: PostgreSQL needs the file that holds the password")
    if database.ssl_mode is DatabaseTLSMode.VERIFY_FULL and database.ca_file is None:
        problems.append(
            f"{where('database', 'ca_file')}: verify-full needs the certificate authority that signs the"
            " PostgreSQL server's certificate (set ca_file to its PEM file)"
        )
    if database.ssl_mode is DatabaseTLSMode.DISABLE and not isLoopback(database.host):
        problems.append(
            f"{where('database', 'ssl_mode')}: disable sends passwords and patient data in the clear:"
            f" only for a server on this machine, and {database.host} is not (use verify-full)"
        )
    return problems


def _checkIdentity(config: Config) -> List[str]:
    problems = []
    where = config.where
    ldap = config.ldap
    if ldap.url:
        for key in ("bind_dn", "bind_password_file", "user_base"):
            if not getattr(ldap, key):
                problems.append(f"{where('ldap', key)}: directory logins need it (or remove [ldap] url)")
        if not (ldap.viewer_groups or ldap.uploader_groups or ldap.admin_groups):
            problems.append(
                f"{where('ldap', 'viewer_groups')}: no directory group gives a role, so no directory user"
                " could log in (name the groups of viewer_groups, uploader_groups or admin_groups)"
            )
        if not ldap.group_base and "dc=" not in ldap.user_base.lower():
            problems.append(
                f"{where('ldap', 'group_base')}: user_base has no DC= part to search groups under: set group_base"
            )
    oidc = config.oidc
    if oidc.issuer:
        for key in ("client_id", "client_secret_file"):
            if not getattr(oidc, key):
                problems.append(f"{where('oidc', key)}: single sign-on needs it (or remove [oidc] issuer)")
        if "openid" not in oidc.scopes:
            problems.append(f"{where('oidc', 'scopes')}: OpenID Connect needs the scope openid")
        if not (oidc.viewer_values or oidc.uploader_values or oidc.admin_values):
            problems.append(
                f"{where('oidc', 'viewer_values')}: no value of {oidc.roles_claim} gives a role, so no one could"
                " sign in (name the values of viewer_values, uploader_values or admin_values)"
            )
    return problems


def _checkDicom(config: Config) -> List[str]:
    problems = []
    where = config.where
    dicom = config.dicom
    if dicom.require_client_certificate and dicom.client_ca is None:
        problems.append(
            f"{where('dicom', 'client_ca')}: mutual TLS needs the certificate authority"
            " that signs the modalities' certificates (set client_ca to its PEM file)"
        )
    # Orthanc compares AE titles without regard to case: so must the uniqueness.
    seen: Dict[str, str] = {}
    for modality in config.modalities:
        section = MODALITY_PREFIX + modality.name
        other = seen.setdefault(modality.aet.upper(), modality.name)
        if other != modality.name:
            problems.append(
                f"{where(section, 'aet')}: {modality.aet!r} is already the AE title of"
                f" [{MODALITY_PREFIX}{other}] (each modality needs its own)"
            )
        if modality.aet.upper() == config.orthanc.aet.upper():
            problems.append(
                f"{where(section, 'aet')}: {modality.aet!r} is the archive's own AE title"
                " ([orthanc] aet)"
            )
        if modality.port is not None and modality.host.num_addresses != 1:
            problems.append(
                f"{where(section, 'host')}: a C-MOVE destination (a modality with a port)"
                f" needs one address, not the network {modality.host}"
            )
        if modality.certificate_subject is not None and not dicom.require_client_certificate:
            problems.append(
                f"{where(section, 'certificate_subject')}: a certificate subject is only"
                " checked under mutual TLS (set [dicom] require_client_certificate = yes)"
            )
    return problems


def loadConfig(mainPath: Path = DEFAULT_CONFIG_PATH, checks: Sequence[Callable[[Config], List[str]]] = ()) -> Config:
    """
    Read and check the configuration rooted at C{mainPath}.

    @param checks: more checks of a configuration that parsed, their
        problems reported with the others (L{appliance.preflight}'s).
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
    modalities = {
        section: _parseSection(section, given, mainPath, problems, MODALITY_SCHEMA)
        for section, given in sorted(settings.items())
        if section.startswith(MODALITY_PREFIX)
    }
    if problems:
        raise ConfigError(problems)
    config = Config(
        appliance=ApplianceSection(**sections["appliance"]),  # type: ignore[arg-type]
        orthanc=OrthancSection(**sections["orthanc"]),  # type: ignore[arg-type]
        tls=TlsSection(**sections["tls"]),  # type: ignore[arg-type]
        web=WebSection(**sections["web"]),  # type: ignore[arg-type]
        auth=AuthSection(**sections["auth"]),  # type: ignore[arg-type]
        database=DatabaseSection(**sections["database"]),  # type: ignore[arg-type]
        dicom=DicomSection(**sections["dicom"]),  # type: ignore[arg-type]
        ldap=LdapSection(**sections["ldap"]),  # type: ignore[arg-type]
        oidc=OidcSection(**sections["oidc"]),  # type: ignore[arg-type]
        metrics=MetricsSection(**sections["metrics"]),  # type: ignore[arg-type]
        audit=AuditSection(**sections["audit"]),  # type: ignore[arg-type]
        modalities=tuple(
            ModalitySection(name=section[len(MODALITY_PREFIX) :], **values)  # type: ignore[arg-type]
            for section, values in modalities.items()
        ),
        sources=tuple(files),
        keySources={(section, key): setting.source for section, keys in settings.items() for key, setting in keys.items()},
    )
    problems.extend(_check(config))
    for check in checks:
        problems.extend(check(config))
    if problems:
        raise ConfigError(problems)
    return config
