"""
Orthanc's own JSON configuration, rendered from ours.

Orthanc is never configured by hand on the appliance: everything it must do (and,
as much, everything it must not) follows from the appliance's configuration here,
so that an upgrade of the Debian package's defaults cannot open a door.
"""

import base64
import json
import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from psycopg.conninfo import make_conninfo

from appliance.config import Config, OrthancStorage
from appliance.paths import DICOMWEB_ROOT, WADO_URI_ROOT
from appliance.state.database import databasePassword, libpqKeywords

#: The only account Orthanc's REST API knows.  Its password changes at every
#: start of Orthanc and is known to nobody but this process.
ORTHANC_USER = "pacs-appliance"


#: The AE title of the appliance's own C-ECHO readiness check: Orthanc knows it
#: as a modality on the loopback interface that may only C-ECHO.
PROBE_AET = "APPLIANCE-PROBE"

#: Orthanc's HTTP worker threads (C{HttpThreadsCount}, CivetWeb's
#: C{num_threads}).  A thread serves one connection from its first request to
#: its close, so a connection held by a slow reader holds a thread for the
#: whole transfer, and a connection beyond the count waits in CivetWeb's queue,
#: health checks included.  Set here rather than left to Orthanc's default (50)
#: because the proxy's limit is derived from it.  100 covers some sixteen
#: browsers each retrieving over the six connections HTTP/1.1 allows them; a
#: thread costs little more than its stack (reserved, resident only as far as
#: it is used), and more threads would not make Orthanc's index or disk faster:
#: beyond that, requests wait their turn in the appliance.
ORTHANC_HTTP_THREADS = 100

#: Orthanc's HTTP threads the proxy leaves free: for the supervisor's health
#: check (one connection at a time), and for connections the proxy has just
#: closed and Orthanc has not yet let go of.  See
#: L{appliance.web.turns.MAX_ORTHANC_REQUESTS}.
RESERVED_HTTP_THREADS = 4

#: How much longer than the web listener's C{idle_timeout} Orthanc waits on a
#: blocked send (see L{orthancSendTimeout}).
SEND_TIMEOUT_MARGIN = 30


def orthancSendTimeout(config: Config) -> int:
    """
    Orthanc's C{HttpRequestTimeout}: how long, in seconds, one of its sends
    (or reads) may block before it gives up on the connection.

    The proxy stops reading Orthanc while its client has not taken what is
    buffered for it, so this must outlast the longest such wait the
    appliance allows (the web listener's C{idle_timeout}, after which it
    closes the client's connection); with Orthanc's default (30 s), a viewer
    whose tab paused for half a minute had its study cut short.
    """
    return math.ceil(config.web.idle_timeout) + SEND_TIMEOUT_MARGIN


@dataclass(frozen=True)
class OrthancCredentials:
    username: str
    password: str

    def __repr__(self) -> str:
        # Never let the password reach a log line through a repr.
        return f"OrthancCredentials(username={self.username!r}, password=<hidden>)"

    def authorization(self) -> bytes:
        """
        The value of an HTTP C{Authorization} header for these credentials.
        """
        token = base64.b64encode(f"{self.username}:{self.password}".encode("utf-8"))
        return b"Basic " + token


def newCredentials() -> OrthancCredentials:
    return OrthancCredentials(ORTHANC_USER, secrets.token_urlsafe(32))


#: Debian's orthanc-postgresql plugins: Orthanc's index, and its files, in
#: PostgreSQL.
POSTGRESQL_INDEX_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so")
POSTGRESQL_STORAGE_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPostgreSQLStorage.so")

#: Connections from one Orthanc to PostgreSQL for its index.  Plugin 4.0
#: runs every transaction SERIALIZABLE and each stored instance updates the
#: same counters, so parallel writes collide and are retried whatever the
#: count: more connections than this buy parallel reads only, and a cluster
#: shares the server's max_connections (100 by default) among its nodes.
POSTGRESQL_INDEX_CONNECTIONS = 4

#: How often plugin 4.0 tries a transaction that collided with another
#: node's (100 ms more each time: about 5 s in all) before Orthanc gives up
#: with 503 (REST) or 0xA700 (C-STORE; its STOW-RS says 200, which the proxy
#: catches: see appliance.web.stowcheck), and how often it tries to connect at
#: start, ConnectionRetryInterval seconds apart (20 s in all, within
#: [orthanc] start_timeout).
POSTGRESQL_RETRIES = 10
POSTGRESQL_RETRY_INTERVAL = 2


def orthancHome(config: Config) -> Path:
    """
    Orthanc's own folder under state_dir: its working directory, its home,
    and its index when the index is not in PostgreSQL.
    """
    return config.appliance.state_dir / "orthanc"


def orthancStorageFolder(config: Config) -> Path:
    """
    The folder of Orthanc's DICOM files (when they are not in PostgreSQL).
    """
    return config.orthanc.storage_dir or orthancHome(config) / "storage"


def postgresqlPlugins(config: Config) -> Tuple[Path, ...]:
    """
    The orthanc-postgresql plugins C{config} needs: the index's when
    [database] names a server, and the storage's for [orthanc] storage =
    postgresql.
    """
    if not config.database.host:
        return ()
    if config.orthanc.storage is OrthancStorage.POSTGRESQL:
        return (POSTGRESQL_INDEX_PLUGIN, POSTGRESQL_STORAGE_PLUGIN)
    return (POSTGRESQL_INDEX_PLUGIN,)


def postgresqlPasswordPath(config: Config) -> Path:
    """
    The libpq password file through which Orthanc's plugins find the
    database's password, kept out of Orthanc's configuration (and so out of
    anything that shows it).
    """
    return config.appliance.runtime_dir / "orthanc.pgpass"


def renderPostgreSQL(config: Config) -> Dict[str, Any]:
    """
    Orthanc's C{PostgreSQL} section for [database] (orthanc-postgresql 4.0).

    The connection is a libpq connection string (C{ConnectionUri}, which
    the plugin hands to libpq unchanged): the plugin's own keys cannot ask
    for the server's certificate to be verified.
    """
    keywords = libpqKeywords(config.database, f"orthanc {config.appliance.node_name}")
    keywords["passfile"] = str(postgresqlPasswordPath(config))
    return {
        "EnableIndex": True,
        "EnableStorage": config.orthanc.storage is OrthancStorage.POSTGRESQL,
        "ConnectionUri": make_conninfo(**keywords),
        # Several nodes' Orthancs share the database: the lock would let
        # only the first one start.
        "Lock": False,
        "IndexConnectionsCount": POSTGRESQL_INDEX_CONNECTIONS,
        "MaximumConnectionRetries": POSTGRESQL_RETRIES,
        "ConnectionRetryInterval": POSTGRESQL_RETRY_INTERVAL,
    }


def postgresqlPasswordLine(config: Config, password: str) -> str:
    """
    The line of L{postgresqlPasswordPath} for [database] and C{password}
    (libpq's format: five fields, colons and backslashes escaped).
    """
    database = config.database
    fields = (database.host, str(database.port), database.name, database.user, password)
    return ":".join(field.replace("\\", "\\\\").replace(":", "\\:") for field in fields) + "\n"


def orthancConfigurationPath(config: Config) -> Path:
    return config.appliance.runtime_dir / "orthanc.json"


def renderDicomModalities(
    config: Config, relayPorts: Mapping[str, int]
) -> Dict[str, Dict[str, Any]]:
    """
    Orthanc's C{DicomModalities}: every modality on 127.0.0.1, because every
    association reaches Orthanc through the forwarder; the port is that of
    the modality's loopback relay (see L{appliance.dicom.destinations}).
    """
    modalities: Dict[str, Dict[str, Any]] = {
        modality.name: {
            "AET": modality.aet,
            "Host": "127.0.0.1",
            # Without a relay (no [modality:NAME] port, or Orthanc run without
            # the forwarder's services), a C-MOVE to this modality goes to
            # Orthanc itself, which refuses its own AE title as a caller.
            "Port": relayPorts.get(modality.name, config.orthanc.dicom_port),
        }
        for modality in config.modalities
    }
    modalities["appliance-probe"] = {
        "AET": PROBE_AET,
        "Host": "127.0.0.1",
        "Port": config.orthanc.dicom_port,
        "AllowEcho": True,
        "AllowFind": False,
        "AllowFindWorklist": False,
        "AllowGet": False,
        "AllowMove": False,
        "AllowStore": False,
        "AllowStorageCommitment": False,
    }
    return modalities


def renderOrthancConfiguration(
    config: Config,
    credentials: OrthancCredentials,
    relayPorts: Optional[Mapping[str, int]] = None,
    httpThreads: int = ORTHANC_HTTP_THREADS,
) -> Dict[str, Any]:
    """
    The complete Orthanc configuration document for C{config}; C{relayPorts}
    are the loopback ports through which Orthanc reaches each modality, and
    C{httpThreads} its HTTP worker threads (fewer in tests that fill them).
    """
    orthanc = config.orthanc
    document = {
        "Name": orthanc.aet,
        "StorageDirectory": str(orthancStorageFolder(config)),
        "IndexDirectory": str(orthancHome(config) / "index"),
        # Names this node among those that share the index (jobs, and
        # what plugins keep per server, are kept under it).
        "DatabaseServerIdentifier": config.appliance.node_name,
        "Plugins": [str(plugin) for plugin in config.orthanc.plugins + postgresqlPlugins(config)],
        # HTTP: loopback only, one account, reached through the appliance alone.
        "HttpServerEnabled": True,
        "HttpPort": orthanc.http_port,
        "HttpThreadsCount": httpThreads,
        "HttpRequestTimeout": orthancSendTimeout(config),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {credentials.username: credentials.password},
        "SslEnabled": False,
        "HttpDescribeErrors": True,
        # The appliance compresses for clients that accept it; Orthanc compressing
        # too would only make the proxy decompress.
        "HttpCompressionEnabled": False,
        "KeepAlive": True,
        "TcpNoDelay": True,
        "OrthancExplorerEnabled": True,
        # How long a series, study or patient receives nothing before Orthanc
        # calls it stable: the metadata cache builds a series' answer then.
        "StableAge": max(1, round(orthanc.stable_age)),
        "WebDavEnabled": False,
        # Nothing that runs code or writes outside the storage.
        "LuaScripts": [],
        "ExecuteLuaEnabled": False,
        "RestApiWriteToFileSystemEnabled": False,
        # DICOM.
        "DicomServerEnabled": True,
        "DicomAet": orthanc.aet,
        "DicomPort": orthanc.dicom_port,
        # Only associations from 127.0.0.1 (the forwarder) are accepted: see
        # appliance.dicom.destinations for why this is what keeps other hosts out.
        "DicomCheckCalledAet": True,
        "StrictAetComparison": True,
        "DicomCheckModalityHost": True,
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowFindWorklist": False,
        "DicomAlwaysAllowGet": False,
        "DicomAlwaysAllowMove": False,
        "DicomAlwaysAllowStore": False,
        "DicomModalities": renderDicomModalities(config, relayPorts or {}),
        "DicomModalitiesInDatabase": False,
        "OrthancPeers": {},
        "OrthancPeersInDatabase": False,
        # Patient data stays out of the logs.
        "DeidentifyLogs": True,
        # An instance sent again is not stored again: with several nodes,
        # each Orthanc's caches can then never hold an old copy of one.
        "OverwriteInstances": False,
        "DicomWeb": {
            "Enable": True,
            # Orthanc serves DICOMweb under the site's public prefix, so that
            # every URL it writes into a response (RetrieveURL, BulkDataURI)
            # is already the public one: no response body is ever rewritten.
            "Root": DICOMWEB_ROOT,
            "EnableWado": True,
            "WadoRoot": WADO_URI_ROOT,
            # No "Host" and no "Ssl": the plugin then builds every URL from the
            # request's Forwarded header, which the proxy sets.
        },
    }
    if config.database.host:
        document["PostgreSQL"] = renderPostgreSQL(config)
    return document


def _writePrivate(path: Path, text: str) -> None:
    """
    Atomically write C{text} to C{path}, readable by the owner only.
    """
    temporary = path.with_name(path.name + ".new")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
        stream.write(text)
    os.replace(temporary, path)


def writeOrthancConfiguration(config: Config, document: Dict[str, Any]) -> None:
    """
    Write Orthanc's configuration C{document}, which holds Orthanc's
    password, and with [database] the password file of its PostgreSQL
    plugins (read again from [database] password_file at every start of
    Orthanc, so that a new password is taken at the next one).

    @raise OSError: if a file cannot be read or written.
    """
    _writePrivate(orthancConfigurationPath(config), json.dumps(document, indent=2))
    if config.database.host:
        _writePrivate(
            postgresqlPasswordPath(config), postgresqlPasswordLine(config, databasePassword(config.database))
        )
