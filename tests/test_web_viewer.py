"""
The real OHIF build (unpacked by packaging/ohif into var/ohif): every file its
index.html names is served with the right type, and the study list page loads
in headless Chromium over HTTPS without console errors.
"""

import gzip
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import List

from twisted.internet import reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from appliance.tls import selfSignedPaths
from appliance.web.site import ApplianceSite, NoCredentials, buildWebRoot, buildWebService
from tests.support import FakeOrthanc, httpExchange, temporaryFolder, testConfig, webTLS
from tests.viewerbuild import ARTIFACTS, CHECKOUT, VIEWER, requireViewer, startChromium

EXPECTED_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".xml": "application/xml",
    ".svg": "image/svg+xml",
    ".wasm": "application/wasm",
    ".woff2": "font/woff2",
}


class _References(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.paths: List[str] = []

    def handle_starttag(self, tag, attributes):
        for name, value in attributes:
            if name in ("src", "href") and value and value.startswith("/"):
                self.paths.append(value)


class ReferencedFilesTests(SynchronousTestCase):
    def setUp(self) -> None:
        requireViewer(self)
        config = testConfig(temporaryFolder(self), web={"ohif_root": VIEWER})
        self.site = ApplianceSite.fromConfig(
            config, buildWebRoot(config, FakeOrthanc()), MemoryReactorClock(), NoCredentials(), True
        )

    def get(self, path: str, **headers: str):
        lines = [f"GET {path} HTTP/1.1", "Host: localhost"] + [f"{k}: {v}" for k, v in headers.items()]
        return httpExchange(self.site, ("\r\n".join(lines) + "\r\n\r\n").encode())

    def test_everyFileIndexReferencesIsServed(self) -> None:
        parser = _References()
        parser.feed((VIEWER / "index.html").read_text(encoding="utf-8"))
        self.assertGreater(len(parser.paths), 20)
        for path in parser.paths:
            status, headers, body = self.get(path)
            self.assertEqual(status, 200, path)
            suffix = Path(path).suffix
            expected = EXPECTED_TYPES.get(suffix)
            if path == "/manifest.json" or suffix == ".json":
                expected = "application/json"
            self.assertEqual(headers["content-type"], [expected], path)
            if path != "/app-config.js":
                self.assertEqual(body, (VIEWER / path[1:]).read_bytes(), path)

    def test_wasmAndFontsTyped(self) -> None:
        files = sorted(VIEWER.glob("*.wasm")) + sorted(VIEWER.glob("*.woff2"))
        self.assertGreater(len(files), 3)
        for path in files:
            status, headers, _ = self.get("/" + path.name)
            self.assertEqual(status, 200, path.name)
            self.assertEqual(headers["content-type"], [EXPECTED_TYPES[path.suffix]], path.name)
            self.assertEqual(
                headers["cache-control"], ["public, max-age=31536000, immutable"], path.name
            )

    def test_bundlesArePrecompressed(self) -> None:
        [bundle] = VIEWER.glob("app.bundle.*.js")
        status, headers, body = self.get("/" + bundle.name, **{"Accept-Encoding": "gzip, br"})
        self.assertEqual(headers["content-encoding"], ["gzip"])
        self.assertLess(len(body), bundle.stat().st_size / 2)


class OhifBuildTests(SynchronousTestCase):
    """
    What packaging/ohif left in var/ohif.
    """

    def setUp(self) -> None:
        requireViewer(self)

    def test_pinnedVersionIsThereAndRerunDoesNothing(self) -> None:
        script = CHECKOUT / "packaging" / "ohif"
        pinned = re.search(r'^INTEGRITY = "(.+)"$', script.read_text(), re.MULTILINE).group(1)
        self.assertIn(pinned, (VIEWER / ".pacs-appliance-ohif").read_text())
        result = subprocess.run([sys.executable, str(script), str(VIEWER)], capture_output=True, timeout=60)
        self.assertEqual((result.returncode, result.stdout, result.stderr), (0, b"", b""))

    def test_precompressedCopiesMatchTheirFiles(self) -> None:
        variants = sorted(VIEWER.rglob("*.gz"))
        self.assertGreater(len(variants), 50)
        for variant in variants:
            original = variant.with_suffix("")
            self.assertEqual(gzip.decompress(variant.read_bytes()), original.read_bytes(), variant.name)
            self.assertEqual(variant.stat().st_mtime_ns, original.stat().st_mtime_ns, variant.name)
        [bundle] = VIEWER.glob("app.bundle.*.js")
        self.assertTrue(bundle.with_name(bundle.name + ".gz").is_file())


class BrowserTests(TestCase):
    timeout = 240

    def setUp(self):
        requireViewer(self)
        folder = temporaryFolder(self)
        self.config = testConfig(folder, web={"ohif_root": VIEWER, "site_name": "St Elsewhere Imaging"})
        service = buildWebService(
            self.config, buildWebRoot(self.config, FakeOrthanc()), NoCredentials(), webTLS(self.config), reactor
        )
        service.startService()
        self.addCleanup(service.stopService)
        self.profile = str(folder / "chromium")

    def test_studyListInChromium(self):
        url = f"https://localhost:{self.config.web.listen_https.port}/"
        screenshot = ARTIFACTS / "study-list.png"

        def browse():
            from selenium.webdriver.common.by import By
            from selenium.webdriver.support import expected_conditions
            from selenium.webdriver.support.ui import WebDriverWait

            browser = startChromium(selfSignedPaths(self.config.appliance.state_dir)[0], self.profile)
            try:
                browser.get(url)
                WebDriverWait(browser, 90).until(
                    expected_conditions.text_to_be_present_in_element(
                        (By.CSS_SELECTOR, "[data-cy=site-name]"), "St Elsewhere Imaging"
                    )
                )
                WebDriverWait(browser, 30).until(
                    expected_conditions.text_to_be_present_in_element((By.TAG_NAME, "body"), "Study List")
                )
                ARTIFACTS.mkdir(exist_ok=True)
                browser.save_screenshot(str(screenshot))
                return {
                    "title": browser.title,
                    "text": browser.find_element(By.TAG_NAME, "body").text,
                    "isolated": browser.execute_script("return window.crossOriginIsolated"),
                    "secure": browser.execute_script("return window.isSecureContext"),
                    "log": browser.get_log("browser"),
                }
            finally:
                browser.quit()

        def check(page):
            self.assertEqual(page["title"], "OHIF Viewer")
            for column in ("Patient", "Study Date", "Modalities", "Description"):
                self.assertIn(column, page["text"])
            self.assertTrue(page["secure"])
            self.assertTrue(page["isolated"], "COOP/COEP did not make the page cross-origin isolated")
            # Only the data source may fail until the DICOMweb proxy exists.
            errors = [
                entry["message"]
                for entry in page["log"]
                if entry["level"] == "SEVERE" and "/pacs" not in entry["message"]
            ]
            self.assertEqual(errors, [])
            self.assertGreater(screenshot.stat().st_size, 10_000)

        return deferToThread(browse).addCallback(check)
