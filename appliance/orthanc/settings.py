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
from typing import Any, Dict, Mapping, Optional

from appliance.config import Config
from appliance.paths import DICOMWEB_ROOT, WADO_URI_ROOT

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


def orthancStorageDir(config: Config) -> Path:
    return config.appliance.state_dir / "orthanc"


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
    storage = orthancStorageDir(config)
    return {
        "Name": orthanc.aet,
        "StorageDirectory": str(storage / "storage"),
        "IndexDirectory": str(storage / "index"),
        "Plugins": [str(plugin) for plugin in orthanc.plugins],
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


def writeOrthancConfiguration(path: Path, document: Dict[str, Any]) -> None:
    """
    Atomically write C{document} to C{path}, readable by the owner only: it
    holds Orthanc's password.
    """
    temporary = path.with_name(path.name + ".new")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
        json.dump(document, stream, indent=2)
    os.replace(temporary, path)
