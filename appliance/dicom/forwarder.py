"""
The DICOM TLS forwarder: modalities connect to [dicom] listen over TLS, their
A-ASSOCIATE-RQ is read and checked, and only then is a connection to Orthanc's
DICOM port on the loopback interface opened, the request replayed and the rest
relayed both ways.

Refusals get a proper A-ASSOCIATE-RJ before the connection is closed (a
transient one for an association that may store while Orthanc's storage is
full, see L{appliance.orthanc.space}); a peer
that does not speak TLS, or sends something other than an A-ASSOCIATE-RQ, is
closed.  When Orthanc's connection ends under an association, the modality is
told at once, not left to its own timeout: by an A-ABORT if what it received so
far ends between two PDUs, by a transient A-ASSOCIATE-RJ if Orthanc had not
answered its request yet, and only by the close when Orthanc's connection ended
in the middle of a PDU (any PDU after that would be read as the rest of the cut
one).  Each connection ends with one log line: peer, certificate subject,
calling and called AE titles, the outcome, bytes each way and duration.
"""

import ipaddress
from typing import Dict, Optional

from cryptography import x509
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.ssl import PrivateCertificate
from twisted.logger import Logger, LogLevel
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from appliance.audit.associations import AssociationAudit
from appliance.audit.messages import Participant, node
from appliance.config import Config
from appliance.connections import ConnectionCap, ConnectionLimits, Listener
from appliance.dicom.admission import admit, describeSubject
from appliance.dicom.pdu import (
    ABORT_TYPE,
    ASSOCIATE_RQ_TYPE,
    ENDING_TYPES,
    LOCAL_LIMIT_EXCEEDED,
    NO_REASON_GIVEN,
    PDU_HEADER,
    PROVIDER_ABORT,
    TEMPORARY_CONGESTION,
    NotAnAssociationRequest,
    PDUBoundaries,
    RejectResult,
    RejectSource,
    Rejection,
    decodeAssociationRequest,
)
from appliance.dicom.profiles import dicomPolicy, weakProfileWarning
from appliance.dicom.relay import RelayedConnection, RelayFactory
from appliance.orthanc.space import StorageSpace
from appliance.tls import ServerTLS

#: How long opening the loopback connection to Orthanc may take.
UPSTREAM_CONNECT_TIMEOUT = 10

#: How a peer may leave before its TLS handshake without that being a TLS error.
_QUIET_ENDS = (ConnectionDone, ConnectionLost)


def peerAddress(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.ip_address(host)
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@implementer(IHandshakeListener)
class ModalityConnection(RelayedConnection):
    """
    One TLS connection from a modality, before and while it is relayed to
    Orthanc.
    """

    log = Logger()

    def __init__(self, factory: "ForwarderFactory") -> None:
        settings = factory.config.dicom
        super().__init__(factory.reactor, settings.idle_timeout)
        self.factory = factory
        self._buffer = b""
        #: Where the PDUs relayed each way begin and end.
        self._toModality = PDUBoundaries()
        self._toOrthanc = PDUBoundaries()
        self._deadline = None
        self.subject: Optional[x509.Name] = None
        self.callingAET = "-"
        self.calledAET = "-"
        self.outcome = "closed before the TLS handshake finished"
        #: What the association does, followed for the audit trail (if any).
        self._audited: Optional[AssociationAudit] = None

    # --- the TLS handshake and the association request

    def connectionMade(self) -> None:
        super().connectionMade()
        # Both the handshake and the association request must arrive in time:
        # a peer cannot hold a connection by trickling either.
        self._deadline = self._reactor.callLater(
            self.factory.config.dicom.handshake_timeout, self._tooSlow
        )

    def handshakeCompleted(self) -> None:
        certificate = self.transport.getPeerCertificate()
        if certificate is not None:
            self.subject = certificate.to_cryptography().subject
        self.outcome = "closed before its association request"

    def _tooSlow(self) -> None:
        self._deadline = None
        if not self.transport.disconnecting:
            self.outcome = (
                "refused: no TLS handshake and association request within"
                f" {self.factory.config.dicom.handshake_timeout:g}s"
            )
        # Also ends a refused peer's wait for a TLS close it never answers.
        self.transport.abortConnection()

    def dataBeforeRelaying(self, data: bytes) -> None:
        if self.transport.disconnecting:
            return  # refused already: whatever follows is not read
        self._buffer += data
        if len(self._buffer) < PDU_HEADER.size:
            return
        pduType, _, length = PDU_HEADER.unpack_from(self._buffer)
        if pduType != ASSOCIATE_RQ_TYPE:
            self._close(f"refused: not DICOM (first PDU type 0x{pduType:02x})")
            return
        limit = self.factory.config.dicom.max_first_pdu
        if PDU_HEADER.size + length > limit:
            self._refuse(
                Rejection(
                    RejectResult.PERMANENT,
                    RejectSource.SERVICE_PROVIDER_ACSE,
                    NO_REASON_GIVEN,
                    f"A-ASSOCIATE-RQ of {PDU_HEADER.size + length} bytes is larger than"
                    f" [dicom] max_first_pdu ({limit})",
                )
            )
            return
        if len(self._buffer) < PDU_HEADER.size + length:
            return
        try:
            request = decodeAssociationRequest(self._buffer[: PDU_HEADER.size + length])
        except NotAnAssociationRequest as error:
            self._close(f"refused: {error}")
            return
        self.callingAET, self.calledAET = request.callingAET, request.calledAET
        verdict = admit(
            self.factory.config.modalities,
            self.factory.config.orthanc.aet,
            request,
            peerAddress(self.transport.getPeer().host),
            self.subject,
        )
        if isinstance(verdict, Rejection):
            self._refuse(verdict)
            return
        if request.mayStore and self.factory.space.full():
            # Orthanc cannot be trusted with a full disk (appliance.orthanc.space):
            # the modality keeps its images and tries again later.
            self._refuse(
                Rejection(
                    RejectResult.TRANSIENT,
                    RejectSource.SERVICE_PROVIDER_PRESENTATION,
                    LOCAL_LIMIT_EXCEEDED,
                    "the archive's storage is full",
                )
            )
            return
        self._cancelDeadline()
        self.outcome = f"accepted as [modality:{verdict.name}]"
        buffered, self._buffer = self._buffer, b""
        if self.factory.audit is not None:
            peer = node(request.callingAET, self.transport.getPeer().host)
            self._audited = AssociationAudit(self.factory.audit, peer, self.factory.moveDestination)
            self._audited.requests.feed(buffered)
        relaying = self.relayTo(self.factory.orthancEndpoint(), buffered)
        relaying.addErrback(self._orthancUnreachable)

    def _orthancUnreachable(self, reason: Failure) -> None:
        self._refuse(
            _orthancAway(f"Orthanc's DICOM port cannot be reached ({reason.getErrorMessage()})")
        )

    # --- relaying

    def dataReceived(self, data: bytes) -> None:
        self._toOrthanc.feed(data)
        if self._audited is not None:
            # Before the association is accepted, the request is buffered
            # and handed to the follower with the rest at acceptance.
            self._audited.requests.feed(data)
        super().dataReceived(data)

    def upstreamDataReceived(self, data: bytes) -> None:
        self._toModality.feed(data)
        if self._audited is not None:
            self._audited.responses.feed(data)
        super().upstreamDataReceived(data)

    def upstreamEnded(self) -> None:
        toModality = self._toModality
        if self._toOrthanc.lastType == ABORT_TYPE:
            # The modality aborted, and Orthanc closed as PS3.8 says it must.
            self.outcome += "; aborted by the modality (A-ABORT)"
        elif not toModality.atBoundary:
            self.outcome += "; closed in the middle of a PDU when Orthanc's connection ended"
        elif toModality.lastType is None:
            rejection = _orthancAway("Orthanc closed the connection before answering")
            self.transport.write(rejection.encode())
            self.outcome += f"; refused ({rejection.why})"
        elif toModality.lastType not in ENDING_TYPES:
            self.transport.write(PROVIDER_ABORT)
            self.outcome += "; aborted (A-ABORT) when Orthanc's connection ended"

    def _refuse(self, rejection: Rejection) -> None:
        self.transport.write(rejection.encode())
        self._close(f"refused ({rejection.why})")

    def _close(self, outcome: str) -> None:
        # The deadline stays: a refused peer that never closes is cut off by it.
        self.outcome = outcome
        self.transport.loseConnection()

    def _cancelDeadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def idleTimedOut(self) -> None:
        self.outcome += f"; closed after {self._idleTimeout:g}s without traffic"

    # --- the end

    def connectionEnded(self, reason: Failure, duration: float) -> None:
        self._cancelDeadline()
        if self.outcome.startswith("closed before the TLS handshake") and not reason.check(
            *_QUIET_ENDS
        ):
            self.outcome = f"refused: TLS handshake failed ({_describeTLSError(reason)})"
        self.factory.counted(self.outcome, self.received, self.sent)
        if self._audited is not None:
            self._audited.ended()
        if self.factory.audit is not None and self.outcome.startswith("refused"):
            self.factory.audit.nodeRefused(self.transport.getPeer().host, self.callingAET if self.callingAET != "-" else "", self.outcome)
        self.log.emit(
            LogLevel.info if self.outcome.startswith("accepted") else LogLevel.warn,
            "DICOM connection from {peer} (certificate {subject}), {calling} calling"
            " {called}: {outcome}; {received} bytes in, {sent} bytes out, {duration:.3f}s",
            peer=self.transport.getPeer().host,
            subject=describeSubject(self.subject),
            calling=self.callingAET,
            called=self.calledAET,
            outcome=self.outcome,
            received=self.received,
            sent=self.sent,
            duration=duration,
        )


def _orthancAway(why: str) -> Rejection:
    # Transient, from the service provider (presentation), congestion: the
    # modality may try again later, when Orthanc is back.
    return Rejection(
        RejectResult.TRANSIENT,
        RejectSource.SERVICE_PROVIDER_PRESENTATION,
        TEMPORARY_CONGESTION,
        why,
    )


def _describeTLSError(reason: Failure) -> str:
    # OpenSSL errors are lists of (library, function, reason) tuples; the last
    # reason says it best ("unsupported protocol", "wrong version number"...).
    errors = getattr(reason.value, "args", ())
    if errors and isinstance(errors[0], list) and errors[0]:
        return str(errors[0][-1][-1])
    return reason.getErrorMessage() or reason.type.__name__



class ForwarderFactory(RelayFactory):
    """
    Builds a L{ModalityConnection} per accepted connection, and counts how
    they ended (C{associations}: accepted, refused, or closed before an
    association was asked for) and the bytes relayed each way.
    """

    def __init__(self, config: Config, reactor, space: StorageSpace) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.space = space
        self.associations: Dict[str, int] = {"accepted": 0, "refused": 0, "closed": 0}
        #: The audit trail's events, told of each node refused (if any).
        self.audit = None
        self.bytesFromModalities = 0
        self.bytesToModalities = 0

    def buildProtocol(self, addr) -> ModalityConnection:
        return ModalityConnection(self)

    def counted(self, outcome: str, received: int, sent: int) -> None:
        """
        A connection ended with C{outcome} (its log's words) after relaying
        C{received} bytes from its modality and C{sent} to it.
        """
        kind = outcome.split(" ", 1)[0].rstrip(":")
        self.associations[kind if kind in ("accepted", "refused") else "closed"] += 1
        self.bytesFromModalities += received
        self.bytesToModalities += sent

    def moveDestination(self, aet: str) -> Participant:
        """
        The node a C-MOVE sends to, as the audit trail names it: by its AE
        title, at the address its [modality:NAME] gives.
        """
        for modality in self.config.modalities:
            if modality.aet == aet:
                return node(aet, str(modality.host.network_address), requestor=False)
        return node(aet, None, requestor=False)

    def orthancEndpoint(self) -> TCP4ClientEndpoint:
        return TCP4ClientEndpoint(
            self.reactor,
            "127.0.0.1",
            self.config.orthanc.dicom_port,
            timeout=UPSTREAM_CONNECT_TIMEOUT,
        )


class DicomForwarderService(MultiService):
    """
    Listens on [dicom] listen for as long as the service runs: TLS with the
    profile of [dicom], connections beyond its caps refused before any TLS,
    and a port that cannot be bound ends the start.
    """

    log = Logger()

    def __init__(
        self, config: Config, certificate: PrivateCertificate, reactor, space: StorageSpace, onClosed=None
    ) -> None:
        """
        @param certificate: the server certificate, loaded once for HTTPS and
            DICOM alike (see L{appliance.tls.loadServerCertificate}).
        @param space: the free space of Orthanc's storage: associations that
            may store are refused while it is short.
        @param onClosed: told of each connection that closes.
        """
        super().__init__()
        self._config = config
        settings = config.dicom
        assert settings.listen is not None  # the service exists only then
        self.factory = ForwarderFactory(config, reactor, space)
        self._tls = ServerTLS(certificate, dicomPolicy(settings))
        limits = ConnectionLimits(
            settings.max_connections, settings.max_connections_per_address, "DICOM TLS", "dicom", reactor
        )
        capped = ConnectionCap(TLSMemoryBIOFactory(self._tls, False, self.factory), limits, onClosed)
        Listener(reactor, settings.listen, capped, "dicom").setServiceParent(self)

    def startService(self) -> None:
        settings = self._config.dicom
        warning = weakProfileWarning(settings)
        if warning is not None:
            self.log.warn(warning)
        super().startService()
        self.log.info(
            "DICOM TLS on {address} ({profile} profile{mutual}), forwarding to Orthanc on 127.0.0.1:{upstream}",
            address=str(settings.listen),
            profile=settings.tls_profile.value,
            mutual=", client certificates required" if settings.require_client_certificate else "",
            upstream=self._config.orthanc.dicom_port,
        )

    def useCertificate(self, certificate: PrivateCertificate) -> None:
        """
        New associations present C{certificate}; open ones are not touched.
        """
        self._tls.useCertificate(certificate)

    def stopService(self) -> Deferred:
        return gatherResults([self.factory.abortAll(), super().stopService()])
