"""
The DICOM side of the benchmark, each part run as its own process so that no
two share a GIL:

    python -m bench.dicom sink PORT
        a storage SCP that answers every C-STORE with success and keeps nothing
    python -m bench.dicom forwarder CONFIG SINK_PORT LISTEN_PORT
        the appliance's DicomForwarderService, as the daemon builds it, on the
        configuration CONFIG with Orthanc's DICOM port replaced by SINK_PORT
    python -m bench.dicom store PORT TLS FILE...
        C-STORE FILEs over one association; prints a JSON result
    python -m bench.dicom associate PORT TLS SECONDS
        associate and release in a loop for SECONDS; prints a JSON result

Client and SCP are pynetdicom: dcmtk's storescu is paced by delayed ACKs on
loopback, pynetdicom at both ends is not.
"""

import json
import ssl
import sys
import time
from pathlib import Path
from typing import List

#: The called AE title: the appliance's Orthanc's ([orthanc] aet).
CALLED_AET = "PACS"

#: The calling AE title of the benchmark's client: a modality of the
#: appliance, and so one of Orthanc's (on 127.0.0.1).
BENCH_AET = "BENCHSCU"

#: The largest PDU the discarding SCP accepts: the value Orthanc's
#: MaximumPduLength has by default, so that the sink receives what Orthanc would.
SINK_MAX_PDU = 16384


def withoutNagle() -> None:
    """
    Make pynetdicom set TCP_NODELAY on its sockets, client and server: it
    writes a C-STORE's command and data set as separate PDUs and then waits for
    the answer, which Nagle's algorithm and delayed ACKs pace at about 40 ms an
    instance on loopback (dcmtk's storescu suffers the same).
    Modalities that do this are not what the forwarders are measured with.
    """
    import socket

    from pynetdicom import transport

    createSocket = transport.AssociationSocket._create_socket
    getRequest = transport.AssociationServer.get_request

    def _create_socket(self, address):
        sock = createSocket(self, address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def get_request(self):
        sock, address = getRequest(self)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address

    transport.AssociationSocket._create_socket = _create_socket
    transport.AssociationServer.get_request = get_request


def clientContext() -> ssl.SSLContext:
    # The benchmark measures transport, not trust: the self-signed
    # certificate is accepted as it is.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _clientAE():
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title=BENCH_AET)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    return ae


def _associate(ae, port: int, tls: bool):
    association = ae.associate(
        "127.0.0.1", port, ae_title=CALLED_AET, tls_args=(clientContext(), None) if tls else None
    )
    if not association.is_established:
        raise SystemExit(f"no association with port {port}")
    return association


def store(port: int, tls: bool, files: List[Path]) -> dict:
    """
    C-STORE every file over one association; the time from before the
    association to after its release.
    """
    ae = _clientAE()
    started = time.perf_counter()
    association = _associate(ae, port, tls)
    failures = 0
    try:
        for path in files:
            status = association.send_c_store(path)
            if not status or status.Status != 0x0000:
                failures += 1
    finally:
        association.release()
    elapsed = time.perf_counter() - started
    return {
        "seconds": elapsed,
        "instances": len(files),
        "bytes": sum(path.stat().st_size for path in files),
        "failures": failures,
    }


def associate(port: int, tls: bool, seconds: float) -> dict:
    """
    Open and release associations one after the other for C{seconds}.
    """
    ae = _clientAE()
    count = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        _associate(ae, port, tls).release()
        count += 1
    return {"seconds": time.perf_counter() - started, "associations": count}


def sink(port: int) -> None:
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=CALLED_AET)
    ae.maximum_pdu_size = SINK_MAX_PDU
    ae.maximum_associations = 64
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_supported_context(Verification)
    # The dataset is never decoded: the handler does not touch event.dataset.
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])


def forwarder(configPath: Path, sinkPort: int, listenPort: int) -> None:
    from dataclasses import replace

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from appliance.config import loadConfig
    from appliance.configvalues import ListenAddress
    from appliance.dicom.forwarder import DicomForwarderService
    from appliance.logs import observer
    from appliance.orthanc.space import StorageSpace
    from appliance.tls import loadServerCertificate

    config = loadConfig(configPath)
    config = replace(
        config,
        orthanc=replace(config.orthanc, dicom_port=sinkPort),
        dicom=replace(config.dicom, listen=ListenAddress("127.0.0.1", listenPort)),
    )
    # The daemon's own log observer: each connection costs the same log line.
    globalLogBeginner.beginLoggingTo([observer()], redirectStandardIO=False)
    service = DicomForwarderService(config, loadServerCertificate(config.tls, config.appliance.state_dir), reactor, StorageSpace.forOrthanc(config))
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


def main(arguments: List[str]) -> None:
    command, rest = arguments[0], arguments[1:]
    withoutNagle()
    if command == "sink":
        sink(int(rest[0]))
    elif command == "forwarder":
        forwarder(Path(rest[0]), int(rest[1]), int(rest[2]))
    elif command == "store":
        print(json.dumps(store(int(rest[0]), rest[1] == "tls", [Path(p) for p in rest[2:]])))
    elif command == "associate":
        print(json.dumps(associate(int(rest[0]), rest[1] == "tls", float(rest[2]))))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
