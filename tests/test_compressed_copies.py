"""
gzip copies of the viewer's files that its build ships without one
(appliance.web.compressedcopies): made the first time a file is asked for,
served from then on, made again when the file changes.
"""

import gzip
import os
from pathlib import Path
from typing import List

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from appliance.web.assets import AssetCatalog
from appliance.web.compressedcopies import MIN_SIZE, CompressedCopies
from appliance.web.site import ApplianceSite, NoCredentials, viewerResource
from appliance.web.sitemap import SiteMap, viewerRoutes
from appliance.web.health import HealthResource
from tests.support import FakeOrthanc, captureLogs, httpExchange, logText, temporaryFolder, testConfig
from tests.viewerbuild import makeBuild


class DeferredThreads:
    """
    A thread runner that runs what it is given when the test says.
    """

    def __init__(self) -> None:
        self.waiting: List[tuple] = []

    def __call__(self, function, *arguments):
        done: Deferred = Deferred()
        self.waiting.append((function, arguments, done))
        return done

    def runAll(self) -> None:
        while self.waiting:
            function, arguments, done = self.waiting.pop(0)
            maybeDeferred(function, *arguments).chainDeferred(done)


class CatalogTests(SynchronousTestCase):
    def setUp(self) -> None:
        folder = temporaryFolder(self)
        self.root = folder / "ohif"
        self.root.mkdir()
        self.copiesFolder = folder / "state" / "viewer-gzip"
        self.threads = DeferredThreads()
        self.catalog = AssetCatalog(self.root, CompressedCopies(self.copiesFolder, self.threads))

    def write(self, relative: str, body: bytes) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
        return path

    def encodings(self, relative: str):
        return [representation.encoding for representation in self.catalog.find(relative).representations]

    def test_aCopyIsMadeOnceAndServedAfter(self) -> None:
        script = b"function viewer() { return 'a study'; }\n" * 500
        self.write("chunks/app.js", script)
        self.assertEqual(self.encodings("chunks/app.js"), [None])
        # Asked for again while it is being made: made once.
        self.assertEqual(self.encodings("chunks/app.js"), [None])
        self.assertEqual(len(self.threads.waiting), 1)
        self.threads.runAll()
        gzipped, plain = self.catalog.find("chunks/app.js").representations
        self.assertEqual((gzipped.encoding, plain.encoding), (b"gzip", None))
        self.assertEqual(gzip.decompress(gzipped.path.read_bytes()), script)
        self.assertLess(gzipped.size, len(script) / 10)
        self.assertTrue(gzipped.path.is_relative_to(self.copiesFolder))
        self.assertNotEqual(gzipped.etag, plain.etag)

    def test_aChangedFileGetsANewCopy(self) -> None:
        path = self.write("app.js", b"var first = 1;\n" * 200)
        self.catalog.find("app.js")
        self.threads.runAll()
        old = self.catalog.find("app.js").representations[0].path
        path.write_bytes(b"var second = 2; // longer\n" * 200)
        os.utime(path, ns=(1, 1))
        self.assertEqual(self.encodings("app.js"), [None])
        self.threads.runAll()
        gzipped = self.catalog.find("app.js").representations[0]
        self.assertEqual(gzip.decompress(gzipped.path.read_bytes()), path.read_bytes())
        self.assertFalse(old.exists(), "the old version's copy is removed")

    def test_onlyWhatCompressesAndHasNoCopy(self) -> None:
        self.write("image.png", b"\x89PNG" + os.urandom(4096))
        self.write("small.js", b"x" * (MIN_SIZE - 1))
        self.write("shipped.js", b"var shipped;\n" * 200)
        self.write("shipped.js.gz", gzip.compress(b"var shipped;\n" * 200))
        for relative in ("image.png", "small.js", "shipped.js"):
            self.catalog.find(relative)
        self.assertEqual(self.threads.waiting, [])
        self.assertEqual(self.encodings("shipped.js"), [b"gzip", None])

    def test_aCopyThatCannotBeMadeIsSaid(self) -> None:
        self.copiesFolder.parent.mkdir(parents=True)
        self.copiesFolder.write_bytes(b"not a folder")
        self.write("app.js", b"var app;\n" * 200)
        events = captureLogs(self)
        self.catalog.find("app.js")
        self.threads.runAll()
        self.assertIn("Could not keep a compressed copy of app.js", logText(events))
        self.assertEqual(self.encodings("app.js"), [None])


class ViewerTests(SynchronousTestCase):
    """
    Through the site: the second request for an uncompressed bundle gets gzip.
    """

    def test_theSecondRequestIsCompressed(self) -> None:
        folder = temporaryFolder(self)
        root = makeBuild(folder / "ohif")
        (root / "operator.bundle.js").write_bytes(b"window.operatorBuild = true;\n" * 1000)
        config = testConfig(folder, web={"ohif_root": root})
        copies = CompressedCopies(folder / "copies", maybeDeferred)
        resource = SiteMap(viewerRoutes(HealthResource(FakeOrthanc(), "node1"), viewerResource(config, copies))).root()
        site = ApplianceSite.fromConfig(config, resource, MemoryReactorClock(), NoCredentials(), True)
        request = b"GET /operator.bundle.js HTTP/1.1\r\nHost: pacs.example\r\nAccept-Encoding: gzip, br\r\n\r\n"
        status, headers, first = httpExchange(site, request)
        self.assertEqual((status, headers.get("content-encoding")), (200, None))
        status, headers, second = httpExchange(site, request)
        self.assertEqual((status, headers["content-encoding"]), (200, ["gzip"]))
        self.assertIn("Accept-Encoding", headers["vary"][0])
        self.assertEqual(gzip.decompress(second), first)
