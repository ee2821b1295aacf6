"""
DICOM peers and the forwarder's fixtures, shared by the DICOM tests.
"""

import socket
import ssl
import warnings
from pathlib import Path
from typing import List, Optional, Sequence

from pynetdicom import AE, build_role
from pynetdicom.pdu import A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import INegotiated
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from appliance.dicom.destinations import DestinationRelays
from appliance.dicom.forwarder import DicomForwarderService
from appliance.orthanc.space import StorageSpace
from appliance.orthanc.state import OrthancState
from tests.support import (
    TestAuthority,
    freePort,
    httpGet,
    realSupervisor,
    serverCertificate,
    temporaryFolder,
    testConfig,
)


@implementer(INegotiated)
class NegotiatedTransport(StringTransport):
    """
    An in-memory transport that passes for the forwarder's TLS connection.
    """

    negotiatedProtocol = None


READY_TIMEOUT = 120


#: How long a peer waits for an answer before the test fails.
PEER_TIMEOUT = 20


def associateRequest(
    callingAET: str, calledAET: str = "PACS", abstractSyntax: str = Verification, receives: Sequence[str] = ()
) -> bytes:
    """
    A well-formed A-ASSOCIATE-RQ proposing C{abstractSyntax} (Verification),
    and the SOP classes it C{receives} (as the SCP only, as C-GET does),
    encoded by pynetdicom.
    """
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = callingAET
    primitive.called_ae_title = calledAET
    contexts = [build_context(syntax) for syntax in (abstractSyntax, *receives)]
    for number, context in enumerate(contexts):
        context.context_id = 2 * number + 1
    primitive.presentation_context_definition_list = contexts
    maximumLength = MaximumLengthNotification()
    maximumLength.maximum_length_received = 16382
    primitive.user_information = [maximumLength, *(build_role(syntax, scp_role=True) for syntax in receives)]
    request = A_ASSOCIATE_RQ()
    request.from_primitive(primitive)
    return request.encode()


def decodeRejection(answer: bytes):
    """
    The (result, source, reason) of the A-ASSOCIATE-RJ C{answer} is.
    """
    assert answer[:1] == b"\x03", f"not an A-ASSOCIATE-RJ: {answer[:16]!r}"
    rejection = A_ASSOCIATE_RJ()
    rejection.decode(answer)
    return rejection.result, rejection.source, rejection.reason_diagnostic


def exchange(port: int, payload: bytes, context: Optional[ssl.SSLContext]):
    """
    In a thread: connect (over TLS if C{context}), send C{payload}, and read
    until the forwarder closes; a Deferred firing with what it answered.
    """

    def run() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=PEER_TIMEOUT) as raw:
            stream = context.wrap_socket(raw) if context is not None else raw
            if payload:
                stream.sendall(payload)
            answer = b""
            while True:
                try:
                    chunk = stream.recv(65536)
                except (ConnectionResetError, ssl.SSLError):
                    return answer
                if not chunk:
                    return answer
                answer += chunk

    return deferToThread(run)


class Appliance:
    """
    The DICOM half of the service tree, as buildService assembles it: the
    destination relays, the Orthanc supervisor and the forwarder.
    """

    def __init__(self, config) -> None:
        self.config = config
        self.root = MultiService()
        self.relays = DestinationRelays(config, reactor)
        self.relays.setServiceParent(self.root)
        self.orthanc = realSupervisor(config, relayPorts=self.relays.ports)
        self.orthanc.setServiceParent(self.root)
        self.forwarder = DicomForwarderService(
            config, serverCertificate(config), reactor, StorageSpace.forOrthanc(config)
        )
        self.forwarder.setServiceParent(self.root)

    def start(self):
        self.root.startService()
        return self.orthanc.whenState(OrthancState.READY).addTimeout(READY_TIMEOUT, reactor)

    def stop(self):
        return self.root.stopService()

    @property
    def port(self) -> int:
        return self.config.dicom.listen.port

    def restCredentials(self):
        return {"Authorization": self.orthanc.credentials.authorization().decode("ascii")}

    def rest(self, path: str):
        url = f"http://127.0.0.1:{self.config.orthanc.http_port}{path}"
        return httpGet(url, self.restCredentials())


class ForwarderTestCase(TestCase):
    """
    Starts Orthanc behind the forwarder with certificates of a test authority.
    """

    timeout = 300
    dicom: dict = {}
    modalities: dict = {
        "modality:ct1": {"aet": "CT1", "host": "127.0.0.0/8"},
        "modality:faraway": {"aet": "FARAWAY", "host": "10.255.0.0/16"},
    }

    def associateAsCT1(self, abstractSyntax):
        """
        An association through the forwarder, as the modality CT1 over TLS
        (blocking: call it in a thread).
        """
        ae = AE(ae_title="CT1")
        ae.add_requested_context(abstractSyntax)
        association = ae.associate(
            "127.0.0.1", self.appliance.port, ae_title="PACS",
            tls_args=(self.clientContext(), None),
        )
        assert association.is_established
        return association

    def setUp(self):
        self.folder = temporaryFolder(self)
        self.authority = self.sharedAuthority()
        self.serverCertificate, self.serverKey = self.authority.issue(
            "server", "localhost", server=True
        )
        self.events: List[dict] = []
        self.waiting: List[tuple] = []
        globalLogPublisher.addObserver(self.observe)
        self.addCleanup(globalLogPublisher.removeObserver, self.observe)
        self.appliance = Appliance(self.makeConfig())
        self.addCleanup(self.appliance.stop)
        return self.appliance.start()

    @classmethod
    def sharedAuthority(cls) -> TestAuthority:
        # RSA keys are slow to make: one authority per class is enough.
        if "_authority" not in cls.__dict__:
            import tempfile

            folder = Path(tempfile.mkdtemp(prefix="pacs-appliance-ca-"))
            cls._authority = TestAuthority(folder)
        return cls._authority

    def makeConfig(self, **overrides):
        sections = {
            "tls": {"certificate": self.serverCertificate, "private_key": self.serverKey},
            "dicom": {"listen": f"127.0.0.1:{freePort()}", **self.dicom},
            **self.modalities,
        }
        sections.update(overrides)
        return testConfig(self.folder, **sections)

    # --- peers

    def clientContext(self, certificate=None, key=None, **versions) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_verify_locations(str(self.authority.path))
        if certificate is not None:
            context.load_cert_chain(str(certificate), str(key))
        with warnings.catch_warnings():
            # Old TLS versions are asked for on purpose, to be refused.
            warnings.simplefilter("ignore", DeprecationWarning)
            for name, value in versions.items():
                setattr(context, name, value)
        if versions:
            # Let this client offer what OpenSSL would otherwise refuse to.
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
        return context

    def echo(self, callingAET="CT1", context="default") -> "Deferred":
        """
        A C-ECHO through the forwarder with pynetdicom; fires with its status,
        or None if no association was established.
        """
        if context == "default":
            context = self.clientContext()

        def run():
            ae = AE(ae_title=callingAET)
            ae.acse_timeout = ae.network_timeout = ae.connection_timeout = PEER_TIMEOUT
            ae.add_requested_context(Verification)
            tls = (context, None) if context is not None else None
            association = ae.associate(
                "127.0.0.1", self.appliance.port, ae_title="PACS", tls_args=tls
            )
            if not association.is_established:
                return None
            try:
                return association.send_c_echo().Status
            finally:
                association.release()

        return deferToThread(run)

    async def assertStillServing(self):
        self.assertEqual(await self.echo(), 0x0000)

    def dcmtk(self, program: str, *arguments: str):
        return getProcessOutputAndValue(
            f"/usr/bin/{program}",
            ["-to", str(PEER_TIMEOUT), "-ta", str(PEER_TIMEOUT), "-td", str(PEER_TIMEOUT), *arguments],
            env={"PATH": "/usr/bin:/bin"},
        )

    def connectionLogs(self) -> List[dict]:
        return [event for event in self.events if "outcome" in event and "calling" in event]

    def observe(self, event: dict) -> None:
        self.events.append(event)
        waiting, self.waiting = self.waiting, []
        for count, waiter in waiting:
            if len(self.connectionLogs()) >= count:
                waiter.callback(self.connectionLogs())
            else:
                self.waiting.append((count, waiter))

    def logged(self, count: int) -> Deferred:
        """
        Fires with the connection log lines once there are C{count} of them:
        the line is written when the forwarder has seen the connection close,
        which may be just after the peer has.
        """
        if len(self.connectionLogs()) >= count:
            return succeed(self.connectionLogs())
        waiter: Deferred = Deferred()
        self.waiting.append((count, waiter))
        return waiter.addTimeout(PEER_TIMEOUT, reactor)

    async def lastOutcome(self) -> str:
        """
        The outcome of the connection that just closed (the first of the test
        unless others were waited for).
        """
        self.seen = getattr(self, "seen", 0) + 1
        logs = await self.logged(self.seen)
        return logs[self.seen - 1]["outcome"]


class StandInTestCase(TestCase):
    """
    Starts the forwarder alone (L{startForwarder}) in front of a stand-in for
    Orthanc's DICOM port, with certificates of a test authority.
    """

    timeout = 120

    def setUp(self):
        self.folder = temporaryFolder(self)
        self.authority = TestAuthority(self.folder / "ca")
        self.certificate, self.key = self.authority.issue("server", "localhost", server=True)
        # The forwarder logs a connection once it has seen it close, which may
        # be just after the peer has.
        self.outcome: Deferred = Deferred()

        def observe(event):
            if "outcome" in event and "calling" in event and not self.outcome.called:
                self.outcome.callback(event["outcome"])

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def startForwarder(self, orthancPort: int, **dicom) -> int:
        config = testConfig(
            self.folder,
            orthanc={"dicom_port": orthancPort},
            tls={"certificate": self.certificate, "private_key": self.key},
            dicom={"listen": f"127.0.0.1:{freePort()}", **dicom},
            **{"modality:ct1": {"aet": "CT1", "host": "127.0.0.1"}},
        )
        forwarder = DicomForwarderService(config, serverCertificate(config), reactor, StorageSpace.forOrthanc(config))
        forwarder.startService()
        self.addCleanup(forwarder.stopService)
        return config.dicom.listen.port

    def clientContext(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_verify_locations(str(self.authority.path))
        return context
