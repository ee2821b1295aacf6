"""
HTTP clients of the site, in memory and over the network, what they send and
read, and the test cases that put the site in memory (GatedSiteCase) or in
front of a real Orthanc (ProxyToOrthancCase).
"""

import http.client
import io
import json
import os
import re
import ssl
import urllib.parse
import uuid
import zipfile
from io import BytesIO
from typing import Dict, List, NamedTuple, Optional, Sequence, Set, Tuple, Union

from pydicom.dataset import Dataset
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import NOT_DONE_YET, Request

from appliance.orthanc.space import StorageSpace
from appliance.orthanc.state import OrthancState
from appliance.orthanc.supervisor import OrthancSupervisor
from appliance.paths import DICOMWEB_ROOT, WADO_URI_ROOT
from appliance.state.database import sqliteDatabase
from appliance.tls import selfSignedPaths
from appliance.web.adminroutes import RouteTable
from appliance.web.authenticator import Authenticator
from appliance.web.checkers import PasswordChecks
from appliance.web.proxy import OrthancProxy
from appliance.web.routes import buildProxyResources, metadataCache, proxyResources
from appliance.web.site import ApplianceSite, buildSiteResource, buildWebService
from appliance.web.turns import MAX_ORTHANC_REQUESTS
from appliance.web.users import UsersFile
from tests.support import (
    ConnectionTracker,
    FakeOrthanc,
    TLSStringTransport,
    basicAuthorization,
    ctSeries,
    httpExchange,
    inlineStateDatabase,
    realSupervisor,
    storeInstances,
    temporaryFolder,
    testConfig,
    webTLS,
    writeUser,
)


def concretePath(path: str) -> str:
    """
    A path the route C{path} of the table matches, under /pacs-admin/.
    """
    path = path.replace("{dicomweb}", DICOMWEB_ROOT.rstrip("/")).replace("{wado}", WADO_URI_ROOT)
    path = path.replace("{...}", "some/file.js")
    return "/pacs-admin" + re.sub(r"\{[^}/]+\}", "1a2b3c", path)


def blockedRows() -> List[Tuple[str, str, str]]:
    """
    (method, concrete path, reason) of every blocked row.
    """
    return [
        (route.method.decode("ascii"), concretePath(route.path), route.reason)
        for route in RouteTable.load().routes
        if not route.allowed
    ]


BOUNDARY = b"32264d65-c52a-4318-b22a-a8f1122661c2-dfd810f3"


def multipart(parts, boundary: bytes = BOUNDARY) -> bytes:
    """
    A multipart/related body as Orthanc writes it.
    """
    body = b""
    for part in parts:
        body += b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n"
    return body + b"--" + boundary + b"--\r\n"


def archive(comment: bytes = b"Created by Orthanc") -> bytes:
    """
    A ZIP archive with the comment Orthanc gives its archives.
    """
    written = io.BytesIO()
    with zipfile.ZipFile(written, "w") as zip:
        zip.writestr("PATIENT/STUDY/SERIES/IM0001.dcm", b"DICM" * 5000)
        zip.writestr("PATIENT/STUDY/SERIES/IM0002.dcm", bytes(range(256)) * 40)
        zip.comment = comment
    return written.getvalue()


DICOM_JSON = "application/dicom+json"


REFERENCED_SOP_SEQUENCE = "00081199"


FAILED_SOP_SEQUENCE = "00081198"


REFERENCED_SOP_INSTANCE_UID = "00081155"


def stowBody(instance) -> Tuple[str, bytes]:
    """
    The content type and body of a STOW-RS request storing C{instance} alone.
    """
    boundary = uuid.uuid4().hex
    encoded = BytesIO()
    instance.save_as(encoded, enforce_file_format=True)
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
        + encoded.getvalue()
        + f"\r\n--{boundary}--\r\n".encode("ascii")
    )
    return f'multipart/related; type="application/dicom"; boundary={boundary}', body


def sequenceUIDs(answer: dict, tag: str) -> Set[str]:
    """
    The Referenced SOP Instance UIDs of the items of the sequence C{tag} in a
    STOW-RS answer.
    """
    items = answer.get(tag, {}).get("Value", [])
    return {uid for item in items for uid in item.get(REFERENCED_SOP_INSTANCE_UID, {}).get("Value", [])}


def stowOutcome(status: int, body: bytes, uid: str) -> Optional[str]:
    """
    None if a STOW-RS answer acknowledges C{uid} as stored, else how it
    reported the failure.
    """
    if status != 200:
        return f"HTTP {status}"
    try:
        answer = json.loads(body)
    except ValueError:
        return "HTTP 200 without a JSON answer"
    if uid in sequenceUIDs(answer, FAILED_SOP_SEQUENCE):
        return "HTTP 200 listing it as failed"
    if uid not in sequenceUIDs(answer, REFERENCED_SOP_SEQUENCE):
        return "HTTP 200 without a reference to it"
    return None




#: Generous: the machines are shared, and Orthanc creates its database first.
READY_TIMEOUT = 120


MULTIPART_DICOM = 'multipart/related; type="application/dicom"'


#: The users of the users file: (name, password, roles).
VIEWER = ("reader", "viewer test password", ("viewer",))


UPLOADER = ("modality", "uploader test password", ("uploader",))


ADMIN = ("hospital-it", "admin test password", ("admin",))


User = Tuple[str, str, Sequence[str]]


class ProxyToOrthancCase(TestCase):
    """
    The daemon's HTTPS site, wired as L{appliance.service.buildService}
    wires it, in front of a supervised Orthanc.

    @cvar user: whom the requests of L{fetch} come from by default.
    @cvar orthancSettings: keys of the [orthanc] section to change.
    @cvar webSettings: keys of the [web] section to change.
    @cvar maxRequests: the proxy's limit of exchanges with Orthanc at a time.
    """

    timeout = 300
    user: User = UPLOADER
    orthancSettings: Dict[str, str] = {}
    webSettings: Dict[str, str] = {}
    maxRequests = MAX_ORTHANC_REQUESTS

    def setUp(self):
        folder = temporaryFolder(self)
        usersFile = folder / "users"
        self.config = testConfig(
            folder,
            auth={"users_file": usersFile},
            # Only the HTTPS listener: its redirects are tested elsewhere.
            web={"listen_http": "", **self.webSettings},
            orthanc=self.orthancSettings,
            # Orthanc takes C-STORE only from the modalities it knows.
            **{"modality:test": {"aet": "TESTSCU", "host": "127.0.0.1"}},
        )
        for name, password, roles in (VIEWER, UPLOADER, ADMIN):
            writeUser(usersFile, name, password, roles)
        self.supervisor = self.buildSupervisor()
        self.supervisor.startService()
        self.addCleanup(self.stopSupervisor)
        services = MultiService()
        users = UsersFile(self.config.auth.users_file, reactor)
        users.setServiceParent(services)
        checks = PasswordChecks(reactor)
        checks.setServiceParent(services)
        database = sqliteDatabase(self.config.appliance.state_dir, reactor)
        database.setServiceParent(services)
        authenticator = Authenticator.forAccountStore(users, checks, self.config.auth, database, "node1", reactor)
        authenticator.setServiceParent(services)
        self.proxy = OrthancProxy(
            self.config, self.supervisor, StorageSpace.forOrthanc(self.config), reactor, maxRequests=self.maxRequests
        )
        self.proxy.setServiceParent(services)
        self.database = database
        self.metadata = metadataCache(self.config, self.proxy, database, reactor)
        if self.metadata is not None:
            self.metadata.setServiceParent(services)
        proxyRoutes = proxyResources(self.config, self.proxy, self.metadata)
        site = buildSiteResource(self.config, self.supervisor, database, authenticator, proxyRoutes)
        web = buildWebService(self.config, site, authenticator, webTLS(self.config), reactor)
        web.setServiceParent(services)
        # Clients close their end before the reactor sees it: the test ends
        # once the site has seen every connection close.
        https = web.getServiceNamed("https")
        connections = https.factory = ConnectionTracker(https.factory)
        services.startService()
        self.addCleanup(lambda: connections.whenClosed().addTimeout(30, reactor))
        self.addCleanup(services.stopService)
        self.port = self.config.web.listen_https.port
        self.origin = f"https://127.0.0.1:{self.port}"
        self.caFile = str(selfSignedPaths(self.config.appliance.state_dir)[0])
        self.context = ssl.create_default_context(cafile=self.caFile)
        return self.waitFor(OrthancState.READY)

    def buildSupervisor(self) -> OrthancSupervisor:
        """
        The supervisor of the test's Orthanc, as the daemon builds it.
        """
        return realSupervisor(self.config)

    def stopSupervisor(self):
        if self.supervisor.running:
            return self.supervisor.stopService()

    async def storeLargeStudy(self) -> List[Dataset]:
        """
        Store a study far larger than the socket buffers between Orthanc and
        a client (4 instances of 8 MiB), so that a transfer of it holds one of
        Orthanc's threads for as long as the client does not read; its
        instances.
        """
        big = ctSeries(4, rows=8, columns=8)
        for ds in big:
            ds.Rows = ds.Columns = 2048
            ds.PixelData = os.urandom(2048 * 2048 * 2)
        self.assertEqual(await storeInstances(self.config.orthanc.dicom_port, big), [0] * 4)
        return big

    def startStudyDownload(self, tls, path: str) -> bytes:
        """
        Ask for the whole study at C{path} on the TLS socket C{tls} (blocking)
        and read until its head and 256 KiB have come; what came.
        """
        tls.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nAccept: {MULTIPART_DICOM}\r\n"
            f"Authorization: {basicAuthorization(*self.user[:2])}\r\n"
            "Connection: close\r\n\r\n".encode("ascii")
        )
        received = b""
        while b"\r\n\r\n" not in received or len(received) < 256 * 1024:
            received += tls.recv(65536)
        return received

    def waitFor(self, state: OrthancState) -> Deferred:
        return self.supervisor.whenState(state).addTimeout(READY_TIMEOUT, reactor)

    def fetch(
        self,
        target: str,
        method: str = "GET",
        headers: Optional[Dict[str, str]] = None,
        body: Optional[bytes] = None,
        user: Optional[User] = None,
        anonymous: bool = False,
    ):
        """
        One request through the site, in a thread: a Deferred firing with
        C{(status, headers, body)}.  C{target} is a path or a URL of the site.
        The request carries HTTP Basic credentials of C{user} (default:
        L{user}), or none if C{anonymous}.
        """
        url = urllib.parse.urlsplit(target)
        if url.scheme:
            self.assertEqual(f"{url.scheme}://{url.netloc}", self.origin, target)
        path = url.path + (f"?{url.query}" if url.query else "")
        headers = dict(headers or {})
        if not anonymous:
            name, password, _ = user or self.user
            headers["Authorization"] = basicAuthorization(name, password)

        def request():
            connection = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context, timeout=60)
            try:
                connection.request(method, path, body=body, headers=headers)
                response = connection.getresponse()
                return response.status, response.headers, response.read()
            finally:
                connection.close()

        return deferToThread(request)

    async def fetchJSON(self, target: str, **headers: str):
        status, answerHeaders, body = await self.fetch(target, headers={"Accept": DICOM_JSON, **headers})
        self.assertEqual(status, 200, (target, body[:300]))
        return json.loads(body)


#: The users file's accounts by role, as (name, password); "intruder" is
#: the viewer's name with a wrong password.
CREDENTIALS = {
    "viewer": ("reader", "viewer password"),
    "uploader": ("modality", "uploader password"),
    "admin": ("hospital-it", "admin password"),
    "intruder": ("reader", "not the viewer password"),
}


#: The body sent with every POST and PUT.
BODY = b"--a small body--"


Headers = Tuple[Tuple[str, str], ...]


class Row(NamedTuple):
    """
    A request and what must come of it.

    @ivar user: a key of L{CREDENTIALS} (sent as HTTP Basic), or L{None}.
    @ivar status: the status, or the statuses any of which will do.
    @ivar forwarded: the path and query the proxy is asked to get from
        Orthanc, or L{None} if the request must not reach the proxy.
    """

    user: Optional[str]
    method: str
    path: str
    status: Union[int, Tuple[int, ...]]
    forwarded: Optional[str] = None
    headers: Headers = ()

    @property
    def body(self) -> bytes:
        return BODY if self.method in ("POST", "PUT") else b""


class GatedSiteCase(SynchronousTestCase):
    """
    The whole HTTPS site in memory, with C{web} added to its configuration.
    """

    maxDiff = None
    web: Dict[str, object] = {}

    def setUp(self) -> None:
        folder = temporaryFolder(self)
        usersFile = folder / "users"
        config = testConfig(folder, auth={"users_file": usersFile}, web=dict(self.web))
        for role in ("viewer", "uploader", "admin"):
            writeUser(usersFile, *CREDENTIALS[role], [role])
        for name in ("favicon.ico", "manifest.json"):
            (config.web.ohif_root / name).write_bytes(b"{}")
        clock = MemoryReactorClock()
        # Password checks in the test's thread: a thread pool would answer
        # through the real reactor, and the test's hashes are cheap.
        self.database = inlineStateDatabase(clock)
        authenticator = Authenticator.forAccountStore(
            UsersFile(usersFile, clock),
            PasswordChecks(clock, runInThread=maybeDeferred),
            config.auth,
            self.database,
            "node1",
            clock,
        )
        orthanc = FakeOrthanc()
        proxy, proxyRoutes = buildProxyResources(config, orthanc, StorageSpace.forOrthanc(config), clock)
        self.patch(proxy, "forward", self.recordForward)
        self.forwarded: List[Tuple[str, str, bytes]] = []
        self.stores: List[bool] = []
        self.stows: List[bool] = []
        self.held: List[Request] = []
        self.site = ApplianceSite.fromConfig(
            config, buildSiteResource(config, orthanc, self.database, authenticator, proxyRoutes), clock, authenticator, True
        )
        self.site.startFactory()
        self.addCleanup(self.site.stopFactory)

    def recordForward(self, request, target: bytes, rewrite=None, stores=False, pagePolicy=None, stow=False):
        """
        In place of L{OrthancProxy.forward}: note what reached the proxy and
        answer 200, at once, or when the test calls C{answer} with
        C{self.holding} set.
        """
        self.forwarded.append((request.method.decode("ascii"), target.decode("ascii"), request.content.read()))
        self.stores.append(stores)
        self.stows.append(stow)
        request.setHeader(b"Content-Length", b"0")
        if self.holding:
            self.held.append(request)
        else:
            request.finish()
        return NOT_DONE_YET

    #: Whether the proxy keeps the requests it gets (in C{held}) unanswered.
    holding = False

    def connect(self) -> "Connection":
        connection = Connection(self.site)
        self.addCleanup(connection.lose)
        return connection

    def head(self, user: str, method: str, path: str, length: int, *headers: Tuple[str, str]) -> bytes:
        """
        A request head announcing a body of C{length} bytes, from C{user}.
        """
        lines = [
            f"{method} {path} HTTP/1.1",
            "Host: pacs.example",
            "Authorization: " + basicAuthorization(*CREDENTIALS[user]),
            f"Content-Length: {length}",
            *(f"{name}: {value}" for name, value in headers),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")

    def exchange(self, row: Row):
        """
        Send C{row}'s request on a new connection; C{(status, headers,
        body)} of the answer.
        """
        lines = [f"{row.method} {row.path} HTTP/1.1", "Host: pacs.example"]
        if row.user is not None:
            lines.append("Authorization: " + basicAuthorization(*CREDENTIALS[row.user]))
        lines += [f"{name}: {value}" for name, value in row.headers]
        if row.body:
            lines.append(f"Content-Length: {len(row.body)}")
        return httpExchange(self.site, ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + row.body, secure=True)


def parseHead(head: bytes) -> Tuple[bytes, Dict[str, List[str]]]:
    first, *lines = head.split(b"\r\n")
    headers: Dict[str, List[str]] = {}
    for line in lines:
        name, _, value = line.decode("latin-1").partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return first, headers


def dechunk(body: bytes) -> Tuple[bytes, bool]:
    """
    The data of a chunked body, and whether its last chunk came.
    """
    data = b""
    while body:
        size, _, rest = body.partition(b"\r\n")
        length = int(size, 16)
        if length == 0:
            return data, True
        data += rest[:length]
        body = rest[length + 2 :]
    return data, False


class Answer:
    """
    What the client received.
    """

    def __init__(self, raw: bytes) -> None:
        head, _, body = raw.partition(b"\r\n\r\n")
        statusLine, self.headers = parseHead(head)
        self.status = int(statusLine.split()[1]) if statusLine else None
        self.complete = True
        if self.header("Transfer-Encoding") == "chunked":
            body, self.complete = dechunk(body)
        self.body = body

    def header(self, name: str) -> Optional[str]:
        values = self.headers.get(name.lower())
        return ", ".join(values) if values else None

    def json(self) -> dict:
        return json.loads(self.body)


def head(status: str = "200 OK", headers=(), length: Optional[int] = None) -> bytes:
    lines = [f"HTTP/1.1 {status}"] + [f"{name}: {value}" for name, value in headers]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


Response = Tuple[int, Dict[str, List[str]], bytes]


def parseResponses(data: bytes) -> List[Response]:
    """
    The responses in C{data}, headers as lower-case names to lists of values.
    """
    responses = []
    while data:
        head, separator, rest = data.partition(b"\r\n\r\n")
        if not separator:
            raise AssertionError(f"an incomplete response: {data[:200]!r}")
        statusLine, *lines = head.split(b"\r\n")
        headers: Dict[str, List[str]] = {}
        for line in lines:
            name, _, value = line.decode("latin-1").partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        length = int(headers.get("content-length", ["0"])[0])
        responses.append((int(statusLine.split()[1]), headers, rest[:length]))
        data = rest[length:]
    return responses


class Connection:
    """
    One client connection to C{site} over an in-memory transport, which
    passes for TLS unless C{secure} is false.
    """

    def __init__(self, site: ApplianceSite, secure: bool = True) -> None:
        self.transport = (TLSStringTransport if secure else StringTransport)(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 443),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 50000),
        )
        self.protocol = site.buildProtocol(self.transport.getPeer())
        self.protocol.makeConnection(self.transport)
        self.lost = False

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def responses(self) -> List[Response]:
        return parseResponses(self.transport.value())

    def lose(self, reason=ConnectionDone) -> None:
        if not self.lost:
            self.lost = True
            self.protocol.connectionLost(Failure(reason()))
