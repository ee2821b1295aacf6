"""
The appliance's HTTPS site (access gate, request layer, proxy routes) in front
of the real Orthanc from Debian, started by the supervisor, on loopback, every
client sending HTTP Basic for a user of the users file: QIDO-RS, WADO-RS,
STOW-RS (spooled uploads too) and WADO-URI through /pacs (with dicomweb-client
as one of the clients), every URL Orthanc writes fetched back through the
site, Orthanc Explorer and a refused endpoint through /pacs-admin, refusals
for missing credentials and roles, and Orthanc killed between and during
requests.
"""

import gzip
import json
import os
import signal
import socket
import ssl
import threading
import urllib.parse
import zipfile
from io import BytesIO
from pathlib import Path
from typing import Iterator, List, Sequence, Tuple

from pydicom.dataset import Dataset
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher

from appliance.orthanc.settings import orthancConfigurationPath
from appliance.orthanc.state import OrthancState
from appliance.web.request import MEMORY_BODY_LIMIT
from appliance.web.routes import ORTHANC_EXPLORER_POLICY
from tests.support import (
    ctSeries,
    storeInstances,
)
from tests.webclients import ADMIN, DICOM_JSON, MULTIPART_DICOM, UPLOADER, VIEWER, Answer, ProxyToOrthancCase

#: The [web] idle_timeout of the tests of a client that stops reading, in seconds.
STALL_TIMEOUT = 3

MULTIPART_OCTETS = 'multipart/related; type="application/octet-stream"'

#: The tags whose values are URLs Orthanc writes: RetrieveURL, and every
#: element's BulkDataURI.
RETRIEVE_URL = "00081190"


def writtenURLs(document) -> Iterator[str]:
    """
    Every RetrieveURL and BulkDataURI in a DICOM JSON document.
    """
    if isinstance(document, list):
        for item in document:
            yield from writtenURLs(item)
    elif isinstance(document, dict):
        for key, value in document.items():
            if key == "BulkDataURI":
                yield value
            elif key == RETRIEVE_URL and isinstance(value, dict):
                yield from value.get("Value", [])
            else:
                yield from writtenURLs(value)


def multipartParts(contentType: str, body: bytes) -> List[bytes]:
    """
    The bodies of the parts of a multipart/related answer.
    """
    boundary = [p.split("=", 1)[1].strip('"') for p in contentType.split(";") if p.strip().startswith("boundary=")][0]
    delimiter = b"--" + boundary.encode("ascii")
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        _, _, content = chunk.partition(b"\r\n\r\n")
        parts.append(content[: -len(b"\r\n")] if content.endswith(b"\r\n") else content)
    return parts


def stowBody(datasets: Sequence[Dataset]) -> Tuple[str, bytes]:
    """
    The content type and body of a STOW-RS request storing C{datasets}.
    """
    boundary = "stow-test-boundary"
    body = b""
    for ds in datasets:
        encoded = BytesIO()
        ds.save_as(encoded, enforce_file_format=True)
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii") + encoded.getvalue() + b"\r\n"
    body += f"--{boundary}--\r\n".encode("ascii")
    return f'multipart/related; type="application/dicom"; boundary={boundary}', body


class DicomWebTests(ProxyToOrthancCase):
    async def test_queryRetrieveAndEveryWrittenURL(self):
        series = ctSeries(3)
        self.assertEqual(await storeInstances(self.config.orthanc.dicom_port, series), [0, 0, 0])
        study, seriesUID = series[0].StudyInstanceUID, series[0].SeriesInstanceUID
        instances = {ds.SOPInstanceUID: ds for ds in series}

        # QIDO-RS, the studies answer compressed for a client that accepts gzip.
        status, headers, body = await self.fetch(
            "/pacs/studies?PatientID=TEST-0001", headers={"Accept": DICOM_JSON, "Accept-Encoding": "gzip"}
        )
        self.assertEqual((status, headers["Content-Encoding"]), (200, "gzip"))
        self.assertIn("Accept-Encoding", headers["Vary"])
        studies = json.loads(gzip.decompress(body))
        self.assertEqual([s["0020000D"]["Value"] for s in studies], [[study]])
        # The same search without credentials: an API client is challenged.
        status, headers, body = await self.fetch(
            "/pacs/studies?PatientID=TEST-0001", headers={"Accept": DICOM_JSON}, anonymous=True
        )
        self.assertEqual(status, 401, body)
        self.assertTrue(headers["WWW-Authenticate"].startswith("Basic realm="), headers["WWW-Authenticate"])
        self.assertNotIn(study.encode("ascii"), body)
        seriesList = await self.fetchJSON(f"/pacs/studies/{study}/series")
        self.assertEqual([s["0020000E"]["Value"] for s in seriesList], [[seriesUID]])
        found = await self.fetchJSON(f"/pacs/studies/{study}/series/{seriesUID}/instances")
        self.assertEqual(sorted(i["00080018"]["Value"][0] for i in found), sorted(instances))

        # HEAD, which Orthanc itself answers with 404.
        status, headers, body = await self.fetch(f"/pacs/studies/{study}/series", method="HEAD", headers={"Accept": DICOM_JSON})
        self.assertEqual((status, headers["Content-Type"], body), (200, DICOM_JSON, b""))

        # WADO-RS metadata.
        metadata = await self.fetchJSON(f"/pacs/studies/{study}/metadata")
        self.assertEqual(len(metadata), 3)

        # Every URL Orthanc wrote is the public one, and answers through the proxy.
        urls = set(writtenURLs([studies, seriesList, found, metadata]))
        self.assertTrue(any("/bulk/" in url for url in urls), urls)
        self.assertIn(f"{self.origin}/pacs/studies/{study}", urls)
        for url in sorted(urls):
            self.assertTrue(url.startswith(f"{self.origin}/pacs/"), url)
            accept = MULTIPART_OCTETS if "/bulk/" in url else MULTIPART_DICOM
            status, headers, body = await self.fetch(url, headers={"Accept": accept})
            self.assertEqual(status, 200, (url, body[:300]))
            self.assertTrue(headers["Content-Type"].startswith("multipart/related"), url)

        # The whole study, one instance per part.
        status, headers, body = await self.fetch(f"/pacs/studies/{study}", headers={"Accept": MULTIPART_DICOM})
        parts = multipartParts(headers["Content-Type"], body)
        self.assertEqual((status, len(parts)), (200, 3))
        self.assertTrue(all(part[128:132] == b"DICM" for part in parts))

        # One frame: the pixels as they were stored.
        some = series[1]
        status, headers, body = await self.fetch(
            f"/pacs/studies/{study}/series/{seriesUID}/instances/{some.SOPInstanceUID}/frames/1",
            headers={"Accept": MULTIPART_OCTETS},
        )
        self.assertEqual(status, 200)
        self.assertEqual(multipartParts(headers["Content-Type"], body), [some.PixelData])

        # Rendered.
        status, headers, body = await self.fetch(
            f"/pacs/studies/{study}/series/{seriesUID}/instances/{some.SOPInstanceUID}/rendered",
            headers={"Accept": "image/png"},
        )
        self.assertEqual((status, headers["Content-Type"], body[:4]), (200, "image/png", b"\x89PNG"))

        # WADO-URI.
        status, headers, body = await self.fetch(
            f"/pacs/wado?requestType=WADO&studyUID={study}&seriesUID={seriesUID}"
            f"&objectUID={some.SOPInstanceUID}&contentType=application/dicom"
        )
        self.assertEqual((status, headers["Content-Type"], body[128:132]), (200, "application/dicom", b"DICM"))

    async def test_dicomwebClientStoresAndRetrieves(self):
        import requests
        from dicomweb_client.api import DICOMwebClient

        # Larger than dicomweb-client's chunk size (10**6 bytes by default),
        # so sent chunked, and than the request layer keeps in memory, so
        # spooled to disk.
        series = ctSeries(4, rows=512, columns=512, patientID="STOW-0001")
        self.assertGreater(sum(len(ds.PixelData) for ds in series), max(MEMORY_BODY_LIMIT, 10**6))
        for ds in series:
            # dicomweb-client writes a dataset as it is: with a preamble, as a
            # DICOM file, which is what it expects back.
            ds.preamble = b"\0" * 128
        study, seriesUID = series[0].StudyInstanceUID, series[0].SeriesInstanceUID

        # A viewer may not store: refused before its body is read.
        contentType, body = stowBody(series)
        status, _, answer = await self.fetch(
            "/pacs/studies", "POST", {"Content-Type": contentType, "Accept": DICOM_JSON}, body, user=VIEWER
        )
        self.assertEqual(status, 403, answer[:300])
        self.assertIn(b"uploader role", answer)
        self.assertEqual(await self.fetchJSON("/pacs/studies?PatientID=STOW-0001"), [])

        def session() -> Tuple[DICOMwebClient, requests.Session]:
            http = requests.Session()
            # requests lets REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE, when set,
            # replace a Session's verify (psf/requests#3829): none of the
            # environment's settings apply to a loopback test.
            http.trust_env = False
            http.verify = self.caFile
            http.auth = self.user[:2]
            client = DICOMwebClient(url=f"{self.origin}/pacs", session=http)
            # dicomweb-client sends a Host header without the port (RFC 9110
            # wants it when it is not the scheme's default), from which Orthanc
            # writes URLs for port 443: give it the whole authority.
            client.host = f"127.0.0.1:{self.port}"
            return client, http

        def storeAndRetrieve():
            client, http = session()
            try:
                stored = client.store_instances(series)
                studies = client.search_for_studies(search_filters={"PatientID": "STOW-0001"})
                instances = client.search_for_instances(study, seriesUID)
                metadata = client.retrieve_study_metadata(study)
                frames = client.retrieve_instance_frames(
                    study, seriesUID, series[2].SOPInstanceUID, [1],
                    media_types=(("application/octet-stream", series[2].file_meta.TransferSyntaxUID),),
                )
                bulk = [
                    client.retrieve_bulkdata(url, media_types=("application/octet-stream",))
                    for url in writtenURLs(metadata)
                    if url.endswith("/7fe00010")
                ]
                retrieved = client.retrieve_study(study)
                return stored, studies, instances, metadata, frames, bulk, retrieved
            finally:
                http.close()

        stored, studies, instances, metadata, frames, bulk, retrieved = await deferToThread(storeAndRetrieve)
        self.assertIsInstance(stored, Dataset)
        self.assertEqual(len(stored.ReferencedSOPSequence), 4)
        self.assertEqual(len(stored.get("FailedSOPSequence", [])), 0)
        written = [stored.RetrieveURL] + [item.RetrieveURL for item in stored.ReferencedSOPSequence]
        self.assertTrue(all(url.startswith(f"{self.origin}/pacs/studies/{study}") for url in written), written)
        self.assertEqual([s["0020000D"]["Value"][0] for s in studies], [study])
        self.assertEqual(len(instances), 4)
        self.assertEqual(len(metadata), 4)
        self.assertEqual(frames, [series[2].PixelData])
        self.assertEqual(sorted(b"".join(parts) for parts in bulk), sorted(ds.PixelData for ds in series))
        self.assertEqual(sorted(ds.SOPInstanceUID for ds in retrieved), sorted(ds.SOPInstanceUID for ds in series))


class AdminTests(ProxyToOrthancCase):
    user = ADMIN

    async def test_explorerAndRefusedShutdown(self):
        status, headers, _ = await self.fetch("/pacs-admin")
        self.assertEqual((status, headers["Location"]), (301, "/pacs-admin/"))
        status, headers, _ = await self.fetch("/pacs-admin/")
        self.assertEqual(status // 100, 3)
        target = urllib.parse.urljoin(f"{self.origin}/pacs-admin/", headers["Location"])
        self.assertEqual(target, f"{self.origin}/pacs-admin/app/explorer.html")
        status, headers, body = await self.fetch(target)
        self.assertEqual(status, 200)
        self.assertIn(b"Orthanc Explorer", body)
        self.assertNotIn("WWW-Authenticate", headers)
        self.assertEqual(headers["Content-Security-Policy"], ORTHANC_EXPLORER_POLICY.decode())

        pid = self.supervisor.pid
        for path in ("/pacs-admin/tools/shutdown", "/pacs-admin/tools/%73hutdown", "/pacs-admin/tools/x/..%2fshutdown"):
            status, headers, body = await self.fetch(path, method="POST", body=b"")
            self.assertEqual(status, 403, path)
            self.assertIn("admin_unsafe_endpoints", json.loads(body)["error"])
        status, _, body = await self.fetch("/pacs-admin/system")
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body)["DicomAet"], self.config.orthanc.aet)
        self.assertEqual((self.supervisor.state, self.supervisor.pid), (OrthancState.READY, pid))

    async def test_orthancErrorPagesNeverRenderedOnTheSite(self):
        """
        The outside review's search: Orthanc answered 400 with an HTML page
        that holds the query's text, on the viewer's origin.  Now a JSON
        sentence without it, under a sandboxing policy; so is every answer
        of the DICOMweb API.
        """
        payload = "<img/src=x/onerror=alert(1)>"
        for user, path in (
            (VIEWER, "/pacs/studies?fuzzymatching=" + urllib.parse.quote(payload)),
            (ADMIN, "/pacs-admin/patients?expand=" + urllib.parse.quote(payload) + "&since=x"),
        ):
            status, headers, body = await self.fetch(path, user=user)
            self.assertEqual(status // 100, 4, (path, body[:300]))
            self.assertEqual(headers["Content-Type"], "application/json", body[:300])
            self.assertNotIn(b"onerror", body)
            self.assertEqual(headers["X-Content-Type-Options"], "nosniff")
            self.assertIn("error", json.loads(body))
        status, headers, _ = await self.fetch("/pacs/studies", user=VIEWER)
        self.assertEqual((status, headers["Content-Security-Policy"]), (200, "default-src 'none'; sandbox"))

    async def test_archiveComesWhole(self):
        """
        Orthanc sends a study's ZIP archive without a length, ending it by
        closing its connection: the proxy finds the archive's end, so the
        client gets it with its chunked end.
        """
        series = ctSeries(3)
        self.assertEqual(await storeInstances(self.config.orthanc.dicom_port, series), [0] * 3)
        status, _, body = await self.fetch(
            "/pacs-admin/tools/lookup", method="POST", body=series[0].StudyInstanceUID.encode("ascii")
        )
        self.assertEqual(status, 200)
        [study] = json.loads(body)
        status, headers, body = await self.fetch(f"/pacs-admin/studies/{study['ID']}/archive")
        self.assertEqual((status, headers["Content-Type"], headers["Transfer-Encoding"]), (200, "application/zip", "chunked"))
        with zipfile.ZipFile(BytesIO(body)) as archive:
            self.assertIsNone(archive.testzip())
            self.assertEqual(len(archive.namelist()), 3)

    async def test_pathsOrthancReadsDifferently(self):
        # Orthanc's HTTP server (civetweb 1.15 on Debian 12) reads a
        # backslash, even percent-encoded, as a slash, and drops the dots
        # that end a segment: such paths must neither take a viewer or an
        # uploader out of the DICOMweb API nor an administrator to a refused
        # endpoint.
        pid = self.supervisor.pid
        for user, method, path in (
            (VIEWER, "GET", "/pacs/studies/x%5C..%5C..%5C..%5Csystem"),
            (VIEWER, "GET", "/pacs/studies/x\\..\\..\\..\\system"),
            (UPLOADER, "POST", "/pacs/studies/x%5C..%5C..%5C..%5Ctools%5Cshutdown"),
            (ADMIN, "POST", "/pacs-admin/tools%5Cshutdown"),
            (ADMIN, "POST", "/pacs-admin/tools/shutdown."),
        ):
            body = b"" if method == "POST" else None
            status, _, answer = await self.fetch(path, method, {"Accept": "application/json"}, body, user=user)
            self.assertIn(status, (400, 403), (user[0], method, path, answer[:200]))
        self.assertEqual((self.supervisor.state, self.supervisor.pid), (OrthancState.READY, pid))


class OrthancKilledTests(ProxyToOrthancCase):
    async def test_killedBetweenRequests(self):
        restarting = self.supervisor.whenState(OrthancState.RESTARTING)
        os.kill(self.supervisor.pid, signal.SIGKILL)
        await restarting
        status, headers, body = await self.fetch("/pacs/studies", headers={"Accept": DICOM_JSON})
        self.assertEqual((status, headers["Retry-After"], headers["Content-Type"]), (503, "5", "application/json"))
        self.assertIn("Orthanc", json.loads(body)["error"])
        await self.waitFor(OrthancState.READY)
        status, _, body = await self.fetch("/pacs/studies", headers={"Accept": DICOM_JSON})
        self.assertEqual((status, json.loads(body)), (200, []))

    async def test_killedDuringADownload(self):
        # Orthanc is still sending when it is killed.
        big = await self.storeLargeStudy()
        started, killed = threading.Event(), threading.Event()
        path = f"/pacs/studies/{big[0].StudyInstanceUID}"

        def download() -> bytes:
            raw = socket.create_connection(("127.0.0.1", self.port), timeout=60)
            with self.context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                received = [self.startStudyDownload(tls, path)]
                started.set()
                self.assertTrue(killed.wait(60))
                # Ends (no hang) when the proxy closes the connection.
                while True:
                    data = tls.recv(1024 * 1024)
                    if not data:
                        break
                    received.append(data)
                return b"".join(received)

        downloading = deferToThread(download)
        await deferToThread(started.wait, 60)
        restarting = self.supervisor.whenState(OrthancState.RESTARTING)
        os.kill(self.supervisor.pid, signal.SIGKILL)
        await restarting
        killed.set()
        answer = Answer(await downloading)
        self.assertEqual((answer.status, answer.header("Transfer-Encoding")), (200, "chunked"))
        self.assertLess(len(answer.body), sum(len(ds.PixelData) for ds in big))
        # Orthanc ends this answer by closing its connection: the close of a
        # killed Orthanc must not reach the client as a whole study.
        self.assertFalse(answer.complete)
        await self.waitFor(OrthancState.READY)
        status, _, _ = await self.fetch(f"{path}/metadata", headers={"Accept": DICOM_JSON})
        self.assertEqual(status, 200)


def connectionsTo(port: int) -> int:
    """
    The established TCP connections to C{port} on this machine (IPv4).
    """
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        _, _, remote, state, *_ = line.split()
        if state == "01" and int(remote.rpartition(":")[2], 16) == port:
            count += 1
    return count


class StalledReaderTests(ProxyToOrthancCase):
    """
    A client that stops reading its answer holds an Orthanc thread: the
    appliance closes its connection after [web] idle_timeout, which closes
    the connection to Orthanc; Orthanc's own send timeout is set longer.
    """

    webSettings = {"idle_timeout": f"{STALL_TIMEOUT}s"}

    async def test_stalledReaderClosedAndOrthancFreed(self):
        big = await self.storeLargeStudy()
        path = f"/pacs/studies/{big[0].StudyInstanceUID}"
        events: List[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def startThenStall() -> Tuple[ssl.SSLSocket, bytes]:
            raw = socket.create_connection(("127.0.0.1", self.port), timeout=60)
            tls = self.context.wrap_socket(raw, server_hostname="127.0.0.1")
            return tls, self.startStudyDownload(tls, path)

        # From then on the client reads nothing.
        tls, head = await deferToThread(startThenStall)
        self.addCleanup(tls.close)
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertEqual(self.proxy.turns.inUse, 1)
        orthancPort = self.config.orthanc.http_port
        self.assertGreaterEqual(connectionsTo(orthancPort), 1)
        # Once the appliance has closed the client, the exchange gives its
        # turn back and its connection to Orthanc is closed.
        deadline = reactor.seconds() + STALL_TIMEOUT + 30
        while (self.proxy.turns.inUse or connectionsTo(orthancPort)) and reactor.seconds() < deadline:
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(self.proxy.turns.inUse, 0, "the stalled client still holds its exchange with Orthanc")
        self.assertEqual(connectionsTo(orthancPort), 0, "a connection to Orthanc is still open")
        [closed] = [
            formatEvent(event) for event in events if "did not take what was sent to it" in event.get("log_format", "")
        ]
        self.assertIn(f"within {float(STALL_TIMEOUT)}s", closed)
        # Orthanc's send timeout outlasts the appliance's.
        document = json.loads(orthancConfigurationPath(self.config).read_text())
        self.assertGreater(document["HttpRequestTimeout"], STALL_TIMEOUT)
        # Orthanc was not restarted, and answers.
        self.assertEqual(self.supervisor.state, OrthancState.READY)
        status, _, _ = await self.fetch(f"{path}/metadata", headers={"Accept": DICOM_JSON})
        self.assertEqual(status, 200)
