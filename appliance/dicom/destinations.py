"""
How Orthanc reaches the modalities (C-MOVE destinations), and why nothing but
the forwarder reaches Orthanc.

Orthanc 1.10 cannot bind its DICOM port to the loopback interface, so it is kept
from serving other hosts by its own association check: its configuration lists
every modality with the host 127.0.0.1, sets C{DicomCheckModalityHost} (the
calling AE title must come from the host its modality names) and turns off every
C{DicomAlwaysAllow*} option.  An association from any other address is then
refused by Orthanc with an A-ASSOCIATE-RJ before any DIMSE message is read,
whatever AE title it claims: only the forwarder (and local processes) get in.

That leaves C-MOVE, where Orthanc connects to the destination modality's own
address and port.  Since the address Orthanc knows is 127.0.0.1, each modality
gets a relay here: a listener on a loopback port, chosen at start and written
into Orthanc's configuration as the modality's port, that relays each
connection to the modality's real address and [modality:NAME] port.  A modality
without a port is no C-MOVE destination: its relay closes the connection and
says so in the log.
"""

from typing import Dict

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    TCP6ClientEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.config import Config, ModalitySection
from appliance.dicom.relay import RelayedConnection, RelayFactory

#: How long opening a connection to a modality may take.
DESTINATION_CONNECT_TIMEOUT = 30


class DestinationRelay(RelayedConnection):
    """
    One connection from Orthanc to a modality, relayed as it is (Orthanc is
    trusted: it is the archive).
    """

    log = Logger()

    def __init__(self, modality: ModalitySection, reactor, idleTimeout: float) -> None:
        super().__init__(reactor, idleTimeout)
        self._modality = modality

    def connectionMade(self) -> None:
        super().connectionMade()
        modality = self._modality
        if modality.port is None:
            self.log.warn(
                "Orthanc tried to reach [modality:{name}], which has no port: set its"
                " port to make it a C-MOVE destination",
                name=modality.name,
            )
            self.transport.loseConnection()
            return
        relaying = self.relayTo(self._endpoint(modality))
        relaying.addErrback(self._unreachable)

    def _endpoint(self, modality: ModalitySection):
        address = str(modality.host.network_address)
        kind = TCP6ClientEndpoint if modality.host.version == 6 else TCP4ClientEndpoint
        return kind(self._reactor, address, modality.port, timeout=DESTINATION_CONNECT_TIMEOUT)

    def _unreachable(self, reason: Failure) -> None:
        self.log.warn(
            "Cannot reach [modality:{name}] at {host} port {port} for Orthanc: {error}",
            name=self._modality.name,
            host=str(self._modality.host.network_address),
            port=self._modality.port,
            error=reason.getErrorMessage(),
        )
        self.transport.loseConnection()

    def connectionEnded(self, reason: Failure, duration: float) -> None:
        if self.received or self.sent:
            self.log.info(
                "Orthanc's connection to [modality:{name}]: {received} bytes out,"
                " {sent} bytes back, {duration:.3f}s",
                name=self._modality.name,
                received=self.received,
                sent=self.sent,
                duration=duration,
            )


class _DestinationFactory(RelayFactory):
    def __init__(self, modality: ModalitySection, reactor, idleTimeout: float) -> None:
        super().__init__()
        self._modality = modality
        self._reactor = reactor
        self._idleTimeout = idleTimeout

    def buildProtocol(self, addr) -> DestinationRelay:
        relay = DestinationRelay(self._modality, self._reactor, self._idleTimeout)
        relay.factory = self
        return relay


class DestinationRelays(Service):
    """
    A loopback relay per modality.

    @ivar ports: the loopback port of each modality's relay, by modality name,
        once the service has started; Orthanc's configuration is rendered
        from it.
    """

    log = Logger()

    def __init__(self, config: Config, reactor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self._config = config
        self._reactor = reactor
        self.ports: Dict[str, int] = {}
        self._relays: Dict[str, object] = {}

    def startService(self) -> None:
        Service.startService(self)
        for modality in self._config.modalities:
            endpoint = TCP4ServerEndpoint(self._reactor, 0, interface="127.0.0.1")
            factory = _DestinationFactory(
                modality, self._reactor, self._config.dicom.idle_timeout
            )
            # Listening on an ephemeral loopback port completes at once: the
            # ports are known before Orthanc's configuration is rendered.
            endpoint.listen(factory).addCallbacks(
                self._listening, self._cannotListen, callbackArgs=(modality,),
                errbackArgs=(modality,),
            )

    def _listening(self, port, modality: ModalitySection) -> None:
        self._relays[modality.name] = port
        self.ports[modality.name] = port.getHost().port

    def _cannotListen(self, reason: Failure, modality: ModalitySection) -> None:
        self.log.failure(
            "Cannot open the loopback relay of [modality:{name}]", reason, name=modality.name
        )

    def stopService(self) -> Deferred:
        Service.stopService(self)
        relays, self._relays = self._relays, {}
        self.ports.clear()
        stopping = []
        for port in relays.values():
            stopping.append(port.factory.abortAll())
            stopping.append(port.stopListening())
        return gatherResults(stopping)
