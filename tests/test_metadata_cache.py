"""
The metadata cache (appliance.web.metadatacache) in front of a real,
supervised Orthanc: what it answers once a series is stable, and that it
never answers what Orthanc's index no longer says.

Whether the cache or Orthanc answered is told by the cache's counts of
both (which the metrics report).
"""

import gzip
import http.client
import json
from typing import Optional

from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase

from appliance.web.metadatacache import (
    MetadataCache,
    MetadataKey,
    fingerprint,
    readChangesRead,
    readEntry,
    readFingerprint,
    render,
    writeEntry,
)
from appliance.web.orthancrest import OrthancAnswer
from tests.support import ctSeries, inlineStateDatabase, storeInstances
from tests.webclients import ADMIN, DICOM_JSON, ProxyToOrthancCase

#: How long a test waits for an entry to be built.
BUILD_TIMEOUT = 60.0


class MetadataCacheTests(ProxyToOrthancCase):
    orthancSettings = {"stable_age": "1s"}

    async def entry(self, resource: str, besides: Optional[str] = None) -> str:
        """
        Wait until the cache holds an entry of C{resource} (other than one
        built from C{besides}); its fingerprint.
        """
        deadline = reactor.seconds() + BUILD_TIMEOUT
        while True:
            found = await self.database.interact(readFingerprint, resource)
            if found is not None and found != besides:
                return found
            if reactor.seconds() > deadline:
                self.fail(f"no entry of {resource} in the metadata cache after {BUILD_TIMEOUT:.0f}s")
            await deferLater(reactor, 0.1, lambda: None)

    async def storedSeries(self, count: int, studyUID: Optional[str] = None):
        series = ctSeries(count, studyUID=studyUID)
        self.assertEqual(await storeInstances(self.config.orthanc.dicom_port, series), [0] * count)
        return series

    async def askMetadata(self, path: str, **headers: str):
        """
        The metadata at C{path}, as a DICOMweb client asks for it: the
        answer's headers and its document.
        """
        status, answerHeaders, body = await self.fetch(path, headers={"Accept": DICOM_JSON, **headers})
        self.assertEqual(status, 200, body[:300])
        self.assertEqual(answerHeaders["Content-Type"], DICOM_JSON)
        if answerHeaders.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        return answerHeaders, json.loads(body)

    async def test_aStableSeriesIsAnsweredFromTheCacheWithTheRequestsOrigin(self):
        series = await self.storedSeries(4)
        study, seriesUID = series[0].StudyInstanceUID, series[0].SeriesInstanceUID
        seriesPath = f"/pacs/studies/{study}/series/{seriesUID}/metadata"
        studyPath = f"/pacs/studies/{study}/metadata"
        await self.entry(f"{study}/{seriesUID}")
        await self.entry(study)
        # What Orthanc answers, asked past the appliance.
        fromOrthanc = await self.fromOrthanc(seriesPath)
        studyFromOrthanc = await self.fromOrthanc(studyPath)
        self.assertEqual(len(fromOrthanc), 4)

        headers, cached = await self.askMetadata(seriesPath, **{"Accept-Encoding": "gzip"})
        self.assertEqual(headers["Content-Encoding"], "gzip")
        self.assertIn("Accept-Encoding", headers["Vary"])
        self.assertEqual(headers["Content-Security-Policy"], "default-src 'none'; sandbox")
        self.assertEqual(cached, fromOrthanc)
        headers, cached = await self.askMetadata(seriesPath)
        self.assertNotIn("Content-Encoding", headers)
        self.assertEqual(cached, fromOrthanc)
        _, cached = await self.askMetadata(studyPath, **{"Accept-Encoding": "gzip"})
        self.assertEqual(cached, studyFromOrthanc)
        self.assertEqual((self.metadata.hits, self.metadata.misses), (3, 0))

        # Another name of the appliance: every URL is under it.
        otherOrigin = f"https://localhost:{self.port}"
        _, cached = await self.askMetadata(seriesPath, Host=f"localhost:{self.port}")
        expected = json.loads(json.dumps(fromOrthanc).replace(self.origin + "/", otherOrigin + "/"))
        self.assertEqual(cached, expected)
        self.assertIn(otherOrigin + "/pacs/studies/", json.dumps(cached))
        self.assertEqual(self.metadata.hits, 4)

        # The XML form is Orthanc's to give.
        status, headers, _ = await self.fetch(
            seriesPath, headers={"Accept": 'multipart/related; type="application/dicom+xml"'}
        )
        self.assertEqual((status, self.metadata.hits), (200, 4))
        self.assertTrue(headers["Content-Type"].startswith("multipart/related"), headers["Content-Type"])

    async def fromOrthanc(self, path: str):
        """
        Orthanc's answer at C{path}, asked directly, with the URLs it would
        write for the appliance's origin.
        """
        credentials = self.supervisor.credentials

        def ask():
            connection = http.client.HTTPConnection("127.0.0.1", self.config.orthanc.http_port, timeout=60)
            try:
                connection.request(
                    "GET",
                    path,
                    headers={
                        "Authorization": credentials.authorization().decode("ascii"),
                        "Accept": DICOM_JSON,
                        "Forwarded": f"host=127.0.0.1:{self.port};proto=https",
                    },
                )
                response = connection.getresponse()
                self.assertEqual(response.status, 200)
                return json.loads(response.read())
            finally:
                connection.close()

        return await deferToThread(ask)

    async def lookUp(self, sopInstanceUID: str) -> str:
        status, _, body = await self.fetch(
            "/pacs-admin/tools/lookup", method="POST", body=sopInstanceUID.encode("ascii"), user=ADMIN
        )
        self.assertEqual(status, 200, body)
        return json.loads(body)[0]["ID"]

    async def test_aDeletedInstanceIsNeverAnsweredFromTheCache(self):
        series = await self.storedSeries(3)
        study, seriesUID = series[0].StudyInstanceUID, series[0].SeriesInstanceUID
        seriesPath = f"/pacs/studies/{study}/series/{seriesUID}/metadata"
        built = await self.entry(f"{study}/{seriesUID}")
        builtStudy = await self.entry(study)
        status, _, body = await self.fetch(
            f"/pacs-admin/instances/{await self.lookUp(series[0].SOPInstanceUID)}", method="DELETE", user=ADMIN
        )
        self.assertEqual(status, 200, body)

        left = {ds.SOPInstanceUID for ds in series[1:]}
        _, answered = await self.askMetadata(seriesPath)
        self.assertEqual({item["00080018"]["Value"][0] for item in answered}, left)
        _, answered = await self.askMetadata(f"/pacs/studies/{study}/metadata")
        self.assertEqual({item["00080018"]["Value"][0] for item in answered}, left)
        self.assertEqual((self.metadata.hits, self.metadata.misses), (0, 2))
        # The requests found the entries out of date: they are built again,
        # and answer what Orthanc's index now says.
        await self.entry(f"{study}/{seriesUID}", besides=built)
        await self.entry(study, besides=builtStudy)
        _, answered = await self.askMetadata(seriesPath)
        self.assertEqual({item["00080018"]["Value"][0] for item in answered}, left)
        self.assertEqual(self.metadata.hits, 1)

    async def test_anInstanceAddedToACachedSeriesIsAnsweredAtOnce(self):
        first = await self.storedSeries(2)
        study, seriesUID = first[0].StudyInstanceUID, first[0].SeriesInstanceUID
        await self.entry(f"{study}/{seriesUID}")
        await self.entry(study)
        # One more instance of the same series, and a second series.
        added = ctSeries(1, studyUID=study)[0]
        added.SeriesInstanceUID = seriesUID
        second = ctSeries(1, studyUID=study)
        self.assertEqual(await storeInstances(self.config.orthanc.dicom_port, [added] + second), [0, 0])

        _, answered = await self.askMetadata(f"/pacs/studies/{study}/series/{seriesUID}/metadata")
        self.assertEqual(
            {item["00080018"]["Value"][0] for item in answered},
            {ds.SOPInstanceUID for ds in first + [added]},
        )
        _, answered = await self.askMetadata(f"/pacs/studies/{study}/metadata")
        self.assertEqual(len(answered), 4)
        self.assertEqual((self.metadata.hits, self.metadata.misses), (0, 2))

    async def test_onlyValidUIDsAreLookedUp(self):
        """
        A wildcard in a path names no study: the cache never looks it up
        (a find would match the studies it matches), Orthanc answers it.
        """
        series = await self.storedSeries(1)
        study = series[0].StudyInstanceUID
        await self.entry(study)
        for wildcard in (study[:-3] + "*", study[:-1] + "?"):
            await self.fetch(f"/pacs/studies/{wildcard}/metadata", headers={"Accept": DICOM_JSON})
        self.assertEqual((self.metadata.hits, self.metadata.misses), (0, 0))


class ScriptedOrthanc:
    """
    Orthanc's REST API as the cache asks it, answering from C{facts} (the
    find answers, in turn) and C{changes}; what was asked is in C{asked}.
    """

    def __init__(self, facts=(), changes=None) -> None:
        self.facts = list(facts)
        self.changes = changes or {}
        self.asked = []

    def json(self, path: bytes, account: str, query=None):
        self.asked.append(path)
        if path == b"/tools/find":
            return succeed(self.facts.pop(0))
        return succeed(self.changes[path])

    def request(self, method, path, account, headers=(), body=None, limit=0):
        self.asked.append(path)
        document = b'[{"00081190": {"vr": "UR", "Value": ["https://metadata-cache.invalid/pacs/studies/1.2"]}}]'
        return succeed(OrthancAnswer(200, b"application/dicom+json", document))


def seriesFound(lastUpdate: str = "20261204T120000", instances=("a", "b"), stable: bool = True):
    return [{"IsStable": stable, "LastUpdate": lastUpdate, "Instances": list(instances)}]


class BuildTests(SynchronousTestCase):
    """
    When the cache builds an entry, and when it does not.
    """

    key = MetadataKey(b"1.2", b"1.2.3")

    def cache(self, orthanc: ScriptedOrthanc, limit: int = 1024 * 1024) -> MetadataCache:
        self.database = inlineStateDatabase(Clock())
        return MetadataCache(orthanc, self.database, limit, "node1", Clock(), runInThread=maybeDeferred)

    def entry(self, resource: str):
        return self.successResultOf(self.database.interact(readEntry, resource))

    def test_built(self):
        orthanc = ScriptedOrthanc([seriesFound(), seriesFound()])
        self.successResultOf(self.cache(orthanc)._build(self.key))
        facts, stored = self.entry("1.2/1.2.3")
        self.assertEqual(facts, fingerprint("20261204T120000", ["b", "a"]))
        self.assertIn(b"https://metadata-cache.invalid/pacs/", gzip.decompress(stored))
        self.assertEqual(
            gzip.decompress(render(stored, b"https://pacs.example:8443", True)),
            b'[{"00081190": {"vr": "UR", "Value": ["https://pacs.example:8443/pacs/studies/1.2"]}}]',
        )

    def test_notWhileReceived(self):
        """
        A series that is not stable is not read; one that changed while it
        was read is not kept.
        """
        orthanc = ScriptedOrthanc([seriesFound(stable=False)])
        self.successResultOf(self.cache(orthanc)._build(self.key))
        self.assertEqual(orthanc.asked, [b"/tools/find"])
        self.assertIsNone(self.entry("1.2/1.2.3"))
        for after in (seriesFound(instances=("a", "b", "c")), seriesFound(lastUpdate="20261204T120005"), []):
            orthanc = ScriptedOrthanc([seriesFound(), after])
            self.successResultOf(self.cache(orthanc)._build(self.key))
            self.assertIn(self.key.path, orthanc.asked)
            self.assertIsNone(self.entry("1.2/1.2.3"))

    def test_oldestGoFirst(self):
        database = inlineStateDatabase(Clock())
        for resource in ("1", "2", "3"):
            removed = self.successResultOf(database.interact(writeEntry, resource, "facts", b"x" * 100, 250))
        self.assertEqual(removed, 1)
        self.assertIsNone(self.successResultOf(database.interact(readFingerprint, "1")))
        self.assertEqual(self.successResultOf(database.interact(readFingerprint, "3")), "facts")

    def test_changesFromWhereTheNodeStopped(self):
        """
        The first start reads the last changes only; later ones go on from
        the last read; a new index (a moved archive) is read from its start.
        """
        stable = {"ChangeType": "StableSeries", "ID": "s1"}
        orthanc = ScriptedOrthanc(
            changes={
                b"/changes?last": {"Last": 1500},
                b"/changes?since=500&limit=1000": {"Changes": [stable], "Last": 1500, "Done": True},
                b"/series/s1": {"MainDicomTags": {"SeriesInstanceUID": "1.2.3"}, "ParentStudy": "t1"},
                b"/studies/t1": {"MainDicomTags": {"StudyInstanceUID": "1.2"}},
            }
        )
        cache = self.cache(orthanc)
        cache.running = True
        built = []
        cache.build = built.append
        self.successResultOf(cache._readChanges())
        self.assertEqual(built, [self.key])
        self.assertEqual(self.successResultOf(self.database.interact(readChangesRead, "node1")), 1500)
        # The archive moved: its index's changes start again from 1.
        orthanc.changes[b"/changes?since=1500&limit=1000"] = {"Changes": [], "Last": 3, "Done": True}
        orthanc.changes[b"/changes?since=0&limit=1000"] = {"Changes": [], "Last": 3, "Done": True}
        self.successResultOf(cache._readChanges())
        self.assertEqual(self.successResultOf(self.database.interact(readChangesRead, "node1")), 3)
