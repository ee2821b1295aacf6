"""
Helpers shared by the test suites: configuration files, free ports, DICOM data.
"""

import atexit
import base64
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from array import array
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from pydicom.dataset import FileMetaDataset, Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.protocols.policies import WrappingFactory
from zope.interface import implementer

from appliance.config import Config
from appliance.orthanc.archive import freePorts  # one helper: the commands' Orthancs, and the tests' servers
from appliance.orthanc.state import IOrthanc, OrthancState
from appliance.orthanc.probe import orthancProbes
from appliance.orthanc.space import StorageSpace
from appliance.orthanc.supervisor import OrthancSupervisor
from appliance.preflight import loadChecked
from appliance.state.database import SQLITE, StateDatabase
from appliance.tls import HTTPS_POLICY, ServerTLS, loadServerCertificate
from appliance.web.passwords import ScryptParameters, hashPassword
from appliance.web.users import UserEntry, setUser


def captureLogs(case) -> List[dict]:
    """
    Every log event until the test C{case} ends.
    """
    manager = capturedLogs()
    events = manager.__enter__()
    case.addCleanup(manager.__exit__, None, None, None)
    return events


def logText(events: List[dict]) -> str:
    """
    All of C{events}, formatted and raw, to search for what must not be there.
    """
    return "\n".join(f"{formatEvent(event)} {event!r}" for event in events)


class InlineConnectionPool:
    """
    adbapi's connection pool, run in the caller's thread on one real SQLite
    connection: the in-memory tests see an interaction's outcome at once,
    without a reactor.  With C{broken} set, interactions fail with it.
    """

    def __init__(self, path: str = ":memory:") -> None:
        self.connection = sqlite3.connect(path, isolation_level=None)
        self.broken: Optional[Exception] = None
        self.interactions = 0

    def runInteraction(self, interaction, *arguments) -> Deferred:
        self.interactions += 1
        if self.broken is not None:
            return fail(self.broken)
        cursor = self.connection.cursor()
        try:
            result = interaction(cursor, *arguments)
        except Exception:
            failed = fail()
            if self.connection.in_transaction:
                self.connection.rollback()
            return failed
        if self.connection.in_transaction:
            self.connection.commit()
        return succeed(result)

    def close(self) -> None:
        self.connection.close()


def inlineStateDatabase(clock, path: str = ":memory:") -> StateDatabase:
    """
    A started state database on an L{InlineConnectionPool}.
    """
    database = StateDatabase(InlineConnectionPool(path), SQLITE, path, clock)
    database.startService()
    return database


@implementer(IOrthanc)
class FakeOrthanc:
    """
    A supervised Orthanc as the web site and the notifications see it, in
    the C{state} the test sets (with C{credentials} to reach it).
    """

    def __init__(self, state: OrthancState = OrthancState.READY, credentials=None) -> None:
        self.state = state
        self.reason = state.value
        self.credentials = credentials
        self.dicomStatus = "not checked yet"

    def subscribe(self, observer) -> None:
        pass

    def whenState(self, *states: OrthancState) -> Deferred:
        return succeed(self.state) if self.state in states else Deferred()


def realSupervisor(config: Config, reactor=None, **keywords) -> OrthancSupervisor:
    """
    The supervisor of the Orthanc of C{config}, as the daemon builds it: its
    REST and C-ECHO probes, the free space of its storage.
    """
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    probe, echoProbe = orthancProbes(config, reactor)
    keywords.setdefault("probe", probe)
    keywords.setdefault("echoProbe", echoProbe)
    keywords.setdefault("space", StorageSpace.forOrthanc(config))
    return OrthancSupervisor(config, reactor, **keywords)


def serverCertificate(config: Config) -> PrivateCertificate:
    """
    The certificate of C{config} (generated on first use), as the daemon
    loads it.
    """
    return loadServerCertificate(config.tls, config.appliance.state_dir)


def webTLS(config: Config) -> ServerTLS:
    """
    The HTTPS connection creator of C{config}'s certificate, as the daemon
    builds it.
    """
    return ServerTLS(serverCertificate(config), HTTPS_POLICY)


def freePort() -> int:
    """
    A TCP port nothing listens on right now, on every interface (see
    L{freePorts}).
    """
    (port,) = freePorts(1)
    return port


class ConnectionTracker(WrappingFactory):
    """
    Knows when the last connection it wraps has closed (L{whenClosed}), so
    that a test ends only when the server has seen every client's connection
    close.
    """

    def __init__(self, wrappedFactory) -> None:
        super().__init__(wrappedFactory)
        self._waiting: List[Deferred] = []

    def whenClosed(self) -> Deferred:
        if not self.protocols:
            return succeed(None)
        waiting: Deferred = Deferred()
        self._waiting.append(waiting)
        return waiting

    def unregisterProtocol(self, protocol) -> None:
        super().unregisterProtocol(protocol)
        if not self.protocols:
            waiting, self._waiting = self._waiting, []
            for each in waiting:
                each.callback(None)


#: The systemd unit the package installs.
UNIT = Path(__file__).resolve().parent.parent / "systemd" / "pacs-appliance.service"


def unitSettings(path: Path = UNIT) -> dict:
    """
    The [Service] settings of a unit file, the last value of each key.
    """
    settings = {}
    section = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key] = value
    return settings


def ip(*arguments: str) -> None:
    subprocess.run(["ip", *arguments], check=True, capture_output=True, text=True)


class OtherHost:
    """
    Another host, for the test C{case}: a network namespace of its own joined
    to this one by a veth pair, removed when the test ends.  This host is
    C{applianceAddress} on the link, the other host C{address}.  Needs root.
    """

    def __init__(self, case) -> None:
        import random

        tag = random.randrange(10_000, 100_000)
        subnet = random.randrange(1, 255)
        self.namespace = f"pacs-other-{tag}"
        hostSide, otherSide = f"pah{tag}", f"pao{tag}"
        self.applianceAddress = f"10.213.{subnet}.1"
        self.address = f"10.213.{subnet}.2"
        ip("netns", "add", self.namespace)
        # Deleting the namespace deletes the veth end in it, and so the pair.
        case.addCleanup(ip, "netns", "del", self.namespace)
        ip("link", "add", hostSide, "type", "veth", "peer", "name", otherSide)
        ip("link", "set", otherSide, "netns", self.namespace)
        ip("addr", "add", f"{self.applianceAddress}/30", "dev", hostSide)
        ip("link", "set", hostSide, "up")
        inside = ("netns", "exec", self.namespace, "ip")
        ip(*inside, "addr", "add", f"{self.address}/30", "dev", otherSide)
        ip(*inside, "link", "set", otherSide, "up")
        ip(*inside, "link", "set", "lo", "up")

    def run(self, program: str, *arguments: str):
        """
        Run C{program} (a path) on the other host; a Deferred firing with its
        C{(out, err, code)}.
        """
        from twisted.internet.utils import getProcessOutputAndValue

        return getProcessOutputAndValue(
            "/usr/sbin/ip",
            ["netns", "exec", self.namespace, program, *arguments],
            env={"PATH": "/usr/bin:/bin"},
        )

    def connect(self, port: int, timeout: float = 5.0) -> Optional[socket.socket]:
        """
        A TCP connection from the other host to this one's C{port}, left idle
        (the caller closes it), or L{None} if it was refused or timed out
        (blocking: call it in a thread).
        """
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        there = os.open(f"/run/netns/{self.namespace}", os.O_RDONLY)
        try:
            # Only this thread enters the namespace, for as long as the socket
            # is made: a socket stays in the namespace it was made in.
            if libc.setns(there, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            try:
                connection = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            finally:
                libc.setns(here, CLONE_NEWNET)
        finally:
            os.close(here)
            os.close(there)
        connection.settimeout(timeout)
        try:
            connection.connect((self.applianceAddress, port))
        except OSError:
            connection.close()
            return None
        return connection


#: setns(2)'s flag for a network namespace.
CLONE_NEWNET = 0x40000000


class SharedServer:
    """
    A private server of the tests, one of which serves the whole run:
    started at its first use (L{shared}), removed (L{remove}) when the run
    ends.  Its process is C{process} (L{None} when stopped), its files in
    C{folder}.
    """

    process: Optional[subprocess.Popen] = None
    folder: Path

    @classmethod
    def shared(cls):
        server = cls.__dict__.get("_sharedServer")
        if server is None:
            server = cls()
            cls._sharedServer = server
            atexit.register(server.remove)
        return server

    def stop(self) -> None:
        """
        Stop the server at once (L{stopProcess}): connections are dropped,
        as when the server goes away.
        """
        if self.process is not None:
            stopProcess(self.process)
        self.process = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def stopProcess(process, timeout: float = 30.0) -> None:
    """
    Stop a test server's C{process} with SIGTERM (every server here stops
    at once on it), killing it if it has not ended within C{timeout}.
    """
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def temporaryFolder(case) -> Path:
    """
    A new folder outside the checkout, removed when the test C{case} ends.
    """
    path = Path(tempfile.mkdtemp(prefix="pacs-appliance-test-"))
    case.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


def tinyTmpfs(case, size: str) -> Optional[Path]:
    """
    A tmpfs of C{size} mounted for the test C{case} (unmounted when it ends),
    or L{None} where this process may not mount one.
    """
    folder = temporaryFolder(case) / "tmpfs"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        return None
    case.addCleanup(subprocess.run, ["umount", str(folder)], check=True)
    return folder


class FakeFileSystem:
    """
    What C{os.statvfs} says of Orthanc's storage: C{free} bytes available.
    """

    def __init__(self, free: int) -> None:
        self.free = free

    def __call__(self, folder) -> os.statvfs_result:
        blocks = self.free // 4096
        return os.statvfs_result((4096, 4096, 1 << 20, blocks, blocks, 1 << 16, 1 << 15, 1 << 15, 0, 255))


def writeConfig(folder: Path, sections: Dict[str, Dict[str, object]], name: str = "appliance.ini") -> Path:
    """
    Write an INI file from C{sections} into C{folder} and return its path.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lines: List[str] = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {value}" for key, value in keys.items())
        lines.append("")
    path = folder / name
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def stubViewer(folder: Path) -> Path:
    """
    A stand-in for the OHIF build: just enough of one (an index.html) for the
    configuration to accept C{folder} as [web] ohif_root.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.html").write_text(
        '<!doctype html><html><head><script src="/app-config.js"></script>'
        "</head><body>stub viewer</body></html>",
        encoding="utf-8",
    )
    return folder


def testConfig(folder: Path, **sections: Dict[str, object]) -> Config:
    """
    The configuration L{writeTestConfig} writes, loaded.
    """
    return loadChecked(writeTestConfig(folder, **sections))


def writeTestConfig(folder: Path, **sections: Dict[str, object]) -> Path:
    """
    A configuration file with its state under C{folder}, Orthanc and the web
    and DICOM listeners on free loopback ports, a stub viewer and a certificate that
    will be generated into C{folder}; C{sections} override or add keys.
    """
    httpPort, dicomPort, httpsPort, redirectPort, tlsPort = freePorts(5)
    base: Dict[str, Dict[str, object]] = {
        "appliance": {"state_dir": folder / "state", "runtime_dir": folder / "run"},
        "orthanc": {"http_port": httpPort, "dicom_port": dicomPort},
        "tls": {"certificate": folder / "tls" / "cert.pem", "private_key": folder / "tls" / "key.pem"},
        "web": {"listen_https": f"127.0.0.1:{httpsPort}", "listen_http": f"127.0.0.1:{redirectPort}"},
        "dicom": {"listen": f"127.0.0.1:{tlsPort}"},
    }
    for section, keys in sections.items():
        base.setdefault(section, {}).update(keys)
    if "ohif_root" not in base["web"]:
        base["web"]["ohif_root"] = stubViewer(folder / "ohif")
    return writeConfig(folder, base)


testConfig.__test__ = False  # helpers, not tests
writeTestConfig.__test__ = False


#: The scrypt cost of the passwords tests write: the hash carries its own
#: parameters, so the daemon checks these cheaply, and the tests that use them
#: are about what an account may do, not about the cost of a check.
TEST_SCRYPT = ScryptParameters(ln=4)


def writeUser(usersFile: Path, name: str, password: str, roles: Sequence[str]) -> None:
    """
    Add or change a user in C{usersFile} in-process, with the users module's
    own writer and hashing (as C{pacs-appliance passwd} does) at the cost of
    L{TEST_SCRYPT}.
    """
    setUser(usersFile, UserEntry(name, hashPassword(password, TEST_SCRYPT), frozenset(roles)))


def basicAuthorization(name: str, password: str) -> str:
    """
    The value of an HTTP Basic C{Authorization} header.
    """
    return "Basic " + base64.b64encode(f"{name}:{password}".encode("utf-8")).decode("ascii")


def ctSeries(
    count: int,
    rows: int = 64,
    columns: int = 64,
    studyUID: Optional[str] = None,
    patientID: str = "TEST-0001",
) -> List[Dataset]:
    """
    C{count} instances of one synthetic CT series (16-bit, little endian), each
    with a different pixel pattern, ready to C{save_as} or send with C-STORE.
    """
    studyUID = studyUID or generate_uid()
    seriesUID = generate_uid()
    frameOfReferenceUID = generate_uid()
    instances = []
    for number in range(1, count + 1):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = studyUID
        ds.SeriesInstanceUID = seriesUID
        ds.PatientName = "Test^Patient"
        ds.PatientID = patientID
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyDate = "20260101"
        ds.StudyTime = "120000"
        ds.StudyID = "1"
        ds.AccessionNumber = "ACC0001"
        ds.StudyDescription = "Synthetic CT"
        ds.SeriesDescription = "Synthetic axial"
        ds.Modality = "CT"
        ds.SeriesNumber = 1
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [0.0, 0.0, float(number)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 1.0
        ds.FrameOfReferenceUID = frameOfReferenceUID
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        pixels = array(
            "h",
            (((x + y + number * 7) % 256) * 8 + 900 for y in range(rows) for x in range(columns)),
        )
        if sys.byteorder == "big":
            pixels.byteswap()
        ds.PixelData = pixels.tobytes()
        instances.append(ds)
    return instances


def httpGet(url: str, headers: Optional[Dict[str, str]] = None, timeout: float = 30):
    """
    GET C{url} with the standard library in a thread; a Deferred firing with
    C{(status, headers, body)} for any status, so tests can check refusals.
    """
    from twisted.internet.threads import deferToThread

    def get():
        request = urllib.request.Request(url, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers, error.read()

    return deferToThread(get)


def storeInstances(port: int, instances: List[Dataset], calledAET: str = "PACS", callingAET: str = "TESTSCU", sslContext=None):
    """
    C-STORE C{instances} to 127.0.0.1:C{port} with pynetdicom, in a thread; a
    Deferred firing with the list of C-STORE statuses.
    """
    from pynetdicom import AE
    from twisted.internet.threads import deferToThread

    def store():
        ae = AE(ae_title=callingAET)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        tls = (sslContext, None) if sslContext is not None else None
        association = ae.associate("127.0.0.1", port, ae_title=calledAET, tls_args=tls)
        if not association.is_established:
            raise RuntimeError(f"association with port {port} was not established")
        try:
            return [association.send_c_store(ds).Status for ds in instances]
        finally:
            association.release()

    return deferToThread(store)


class TestAuthority:
    """
    A certificate authority for tests: RSA keys, certificates written as PEM
    files under a folder.
    """

    __test__ = False

    def __init__(self, folder: Path, name: str = "Test CA") -> None:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self._folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self._validity = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2))
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._validity[0])
            .not_valid_after(self._validity[1])
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        self.path = self._write("ca.pem", self.certificate, None)

    def issue(self, stem: str, commonName: str, server: bool = False):
        """
        Issue an RSA certificate; return the paths of its certificate and key.
        """
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name([
                    x509.NameAttribute(NameOID.COMMON_NAME, commonName),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test Hospital"),
                ])
            )
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._validity[0])
            .not_valid_after(self._validity[1])
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]),
                critical=False,
            )
        certificate = builder.sign(self._key, hashes.SHA256())
        return self._write(f"{stem}.pem", certificate, None), self._write(f"{stem}.key", None, key)

    def _write(self, name: str, certificate, key) -> Path:
        from cryptography.hazmat.primitives import serialization

        path = self._folder / name
        if certificate is not None:
            path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        else:
            path.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.TraditionalOpenSSL,
                    serialization.NoEncryption(),
                )
            )
        return path


@implementer(ISSLTransport)
class TLSStringTransport(StringTransport):
    """
    An in-memory transport that passes for the HTTPS listener's, as far as
    twisted.web asks (C{request.isSecure()}).
    """

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


def httpExchange(factory, raw: bytes, secure: bool = False):
    """
    Feed the raw HTTP request C{raw} to a protocol built by the web
    C{factory} (a Site) over an in-memory transport (which never pauses its
    producer, and passes for TLS if C{secure}) and return C{(status,
    headers, body)} of the first response, headers as a dict of lower-case
    names to lists of values.
    """
    from twisted.internet.address import IPv4Address
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    transport = (TLSStringTransport if secure else StringTransport)(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 443),
        peerAddress=IPv4Address("TCP", "127.0.0.1", 54321),
    )
    protocol = factory.buildProtocol(transport.getPeer())
    protocol.makeConnection(transport)
    protocol.dataReceived(raw)
    head, _, body = transport.value().partition(b"\r\n\r\n")
    statusLine, *headerLines = head.split(b"\r\n")
    headers: Dict[str, List[str]] = {}
    for line in headerLines:
        name, _, value = line.decode("latin-1").partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    protocol.connectionLost(Failure(ConnectionDone()))
    return int(statusLine.split()[1]), headers, body
