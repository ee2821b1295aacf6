"""
Is Orthanc answering?  Its REST C{/system} resource, asked with the appliance's
credentials, is the readiness signal: it answers once the database, the plugins
and the HTTP server are all up.  Its DICOM side is asked for a C-ECHO.
"""

from typing import Tuple

from pynetdicom import AE
from pynetdicom.sop_class import Verification
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThreadPool
from twisted.internet.interfaces import IReactorTCP
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from appliance.config import Config
from appliance.orthanc.settings import PROBE_AET, OrthancCredentials


class OrthancNotAnswering(Exception):
    """
    Orthanc answered the readiness probe with something other than success.
    """


class _BodyPrefix(Protocol):
    """
    Reads a response body to its end, keeping only its first bytes (enough to
    explain an error).
    """

    keep = 512

    def __init__(self) -> None:
        self.finished: Deferred = Deferred()
        self._prefix = b""

    def dataReceived(self, data: bytes) -> None:
        if len(self._prefix) < self.keep:
            self._prefix = (self._prefix + data)[: self.keep]

    def connectionLost(self, reason: Failure) -> None:
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(self._prefix)
        else:
            self.finished.errback(reason)


class RestProbe:
    """
    Asks Orthanc's C{/system} on the loopback interface.
    """

    def __init__(self, reactor: IReactorTCP, port: int, timeout: float) -> None:
        self._reactor = reactor
        self._url = f"http://127.0.0.1:{port}/system".encode("ascii")
        self._timeout = timeout
        # A probe every few seconds does not need a persistent connection, and
        # a fresh one proves that Orthanc still accepts connections.
        self._agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))

    @inlineCallbacks
    def __call__(self, credentials: OrthancCredentials) -> Deferred:
        request = self._agent.request(
            b"GET",
            self._url,
            Headers({b"Authorization": [credentials.authorization()]}),
        )
        request.addTimeout(self._timeout, self._reactor)
        response = yield request
        body = _BodyPrefix()
        response.deliverBody(body)
        prefix = yield body.finished.addTimeout(self._timeout, self._reactor)
        if response.code != 200:
            raise OrthancNotAnswering(f"GET /system answered {response.code}: {prefix!r}")
        return prefix


class DicomEchoProbe:
    """
    Asks Orthanc's DICOM port for a C-ECHO on the loopback interface, as the
    AE title Orthanc's configuration lets only C-ECHO.

    pynetdicom is a blocking library, so each echo runs in the reactor's
    thread pool; a DICOM client of our own on Twisted would have to encode
    and decode DIMSE messages, which pynetdicom already does well, and one
    echo every few seconds does not need to scale.
    """

    def __init__(self, reactor, port: int, calledAET: str, timeout: float) -> None:
        self._reactor = reactor
        self._port = port
        self._calledAET = calledAET
        self._timeout = timeout

    def __call__(self) -> Deferred:
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._echo)

    def _echo(self) -> None:
        ae = AE(ae_title=PROBE_AET)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self._timeout
        ae.connection_timeout = self._timeout
        ae.add_requested_context(Verification)
        association = ae.associate("127.0.0.1", self._port, ae_title=self._calledAET)
        if not association.is_established:
            raise OrthancNotAnswering(
                f"Orthanc's DICOM port {self._port} did not accept an association"
            )
        try:
            status = association.send_c_echo()
        finally:
            association.release()
        if not status or status.Status != 0:
            raise OrthancNotAnswering(f"Orthanc's DICOM port {self._port} did not answer a C-ECHO")


def orthancProbes(config: Config, reactor) -> Tuple[RestProbe, DicomEchoProbe]:
    """
    The supervisor's two questions to the Orthanc of C{config}: its REST
    API, and a C-ECHO on its DICOM port.
    """
    settings = config.orthanc
    return (
        RestProbe(reactor, settings.http_port, settings.health_timeout),
        DicomEchoProbe(reactor, settings.dicom_port, settings.aet, settings.health_timeout),
    )
