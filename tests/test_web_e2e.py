"""
The README's promise, end to end in headless Chromium against the whole
daemon (real Orthanc, real OHIF): an admin logs in on the login page, uploads a
study in Orthanc Explorer under /pacs-admin/, sees it in the OHIF study list,
opens it and the image is drawn on the canvas; every request the viewer made
carried the session.  A viewer gets 403 from /pacs-admin/.
"""

import base64
import json
import re
import ssl
import urllib.request
from pathlib import Path
from typing import Dict, List

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from appliance.tls import selfSignedPaths
from tests.browser import logIn, viewStudy, waitUntil
from tests.daemon import addUser, startDaemon
from tests.support import ctSeries, temporaryFolder, testConfig
from tests.viewerbuild import ARTIFACTS, VIEWER, requireViewer, startChromium

ADMIN = ("imaging-admin", "admin password for the test")
READER = ("reader", "reader password for the test")

def basic(user) -> Dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()}


def insecureContext() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class ViewerEndToEndTests(TestCase):
    timeout = 420

    @inlineCallbacks
    def setUp(self):
        requireViewer(self)
        self.folder = temporaryFolder(self)
        users = self.folder / "users"
        addUser(users, ADMIN[0], ADMIN[1], ["admin"])
        addUser(users, READER[0], READER[1], ["viewer"])
        self.config = testConfig(self.folder, web={"ohif_root": VIEWER}, auth={"users_file": users})
        self.output, _ = yield startDaemon(self, self.config)
        self.base = f"https://localhost:{self.config.web.listen_https.port}"
        self.series = ctSeries(12, rows=256, columns=256)
        self.studyUID = self.series[0].StudyInstanceUID
        self.files: List[Path] = []
        for number, instance in enumerate(self.series):
            path = self.folder / "upload" / f"{number:03d}.dcm"
            path.parent.mkdir(exist_ok=True)
            instance.save_as(path, enforce_file_format=True)
            self.files.append(path)

    def studiesInArchive(self) -> List[dict]:
        request = urllib.request.Request(
            f"{self.base}/pacs/studies?StudyInstanceUID={self.studyUID}&includefield=00201208",
            headers=basic(ADMIN),
        )
        with urllib.request.urlopen(request, context=insecureContext(), timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else []

    def uploadInExplorer(self, browser) -> None:
        from selenium.webdriver.common.by import By

        browser.get(self.base + "/pacs-admin/")
        waitUntil(browser, lambda b: b.current_url.endswith("/pacs-admin/app/explorer.html"))
        browser.get(self.base + "/pacs-admin/app/explorer.html#upload")
        # jQuery Mobile shows the upload page once its transition is over.
        waitUntil(browser, lambda b: b.find_element(By.ID, "upload-button").is_displayed())
        browser.find_element(By.ID, "fileupload").send_keys("\n".join(str(path) for path in self.files))
        browser.find_element(By.ID, "upload-button").click()
        waitUntil(
            browser,
            lambda b: any(int(s.get("00201208", {}).get("Value", [0])[0]) == len(self.files) for s in self.studiesInArchive()),
            timeout=120,
            message="the study uploaded in Orthanc Explorer did not reach the archive",
        )

    def openStudy(self, browser) -> List[dict]:
        from selenium.webdriver.common.by import By

        browser.get(self.base + "/")
        waitUntil(
            browser,
            lambda b: "ACC0001" in b.find_element(By.TAG_NAME, "body").text,
            timeout=90,
            message="the study list does not show the uploaded study",
        )
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "study-list-with-study.png"))
        canvases = viewStudy(browser, self.base, self.studyUID)
        browser.save_screenshot(str(ARTIFACTS / "study-viewer.png"))
        return canvases

    def test_adminUploadsAndViewsReaderIsRefusedAdmin(self):
        certificate = selfSignedPaths(self.config.appliance.state_dir)[0]
        profile = self.folder / "chromium"

        def browse():
            from selenium.webdriver.common.by import By

            browser = startChromium(certificate, str(profile))
            try:
                logIn(browser, self.base, ADMIN, "/pacs-admin/")
                self.uploadInExplorer(browser)
                canvases = self.openStudy(browser)
                browser.get(self.base + "/logout")
                waitUntil(browser, lambda b: "/login" in b.current_url)
                # The old session is over: the viewer asks for a login again.
                browser.get(self.base + "/")
                waitUntil(browser, lambda b: "/login" in b.current_url)

                logIn(browser, self.base, READER)
                waitUntil(
                    browser,
                    lambda b: "ACC0001" in b.find_element(By.TAG_NAME, "body").text,
                    timeout=90,
                    message="the reader's study list does not show the study",
                )
                browser.get(self.base + "/pacs-admin/")
                refusal = browser.find_element(By.TAG_NAME, "body").text
                return canvases, refusal, browser.get_log("browser")
            except Exception:
                # What the browser showed, and what it said, for the CI artefacts.
                ARTIFACTS.mkdir(exist_ok=True)
                browser.save_screenshot(str(ARTIFACTS / "e2e-failure.png"))
                (ARTIFACTS / "e2e-failure-console.json").write_text(json.dumps(browser.get_log("browser"), indent=1))
                (ARTIFACTS / "e2e-failure-daemon.log").write_text("\n".join(self.output.lines))
                raise
            finally:
                browser.quit()

        def check(result):
            canvases, refusal, console = result
            self.assertTrue(canvases)
            self.assertIn("needs the admin role", refusal)
            refused = [
                entry["message"]
                for entry in console
                if entry["level"] == "SEVERE"
                and (" 401 " in entry["message"] or (" 403 " in entry["message"] and "pacs-admin" not in entry["message"]))
            ]
            self.assertEqual(refused, [])
            # Neither Orthanc Explorer, under the policy written for it, nor
            # the viewer met a Content-Security-Policy it broke.
            violations = [entry["message"] for entry in console if "Content Security Policy" in entry["message"]]
            self.assertEqual(violations, [])
            self.assertGreater((ARTIFACTS / "study-viewer.png").stat().st_size, 10_000)
            self.checkEveryViewerRequestCarriedTheSession()
            refusals = [line for line in self.output.lines if f" - local:{READER[0]} [" in line and '"GET /pacs-admin/' in line]
            self.assertTrue(refusals and all('" 403 ' in line for line in refusals), "\n".join(self.output.lines[-40:]))

        return deferToThread(browse).addCallback(check)

    def checkEveryViewerRequestCarriedTheSession(self) -> None:
        """
        The access log names the user of every request: each DICOMweb and
        WADO request the viewer made (from the page, its workers or its
        service worker) was answered for a logged-in user and none refused;
        the only anonymous requests were for public paths, and redirects to
        the login page of pages opened before logging in.
        """
        pattern = re.compile(r'\S+ - (?P<user>\S+) \[[^\]]+\] "(?P<method>\S+) (?P<path>\S+) [^"]*" (?P<status>\d{3})')
        requests = [m for m in map(pattern.search, self.output.lines) if m]
        dicomweb = [m for m in requests if m.group("path").startswith("/pacs/")]
        self.assertTrue(dicomweb, "the viewer made no DICOMweb request")
        for match in dicomweb:
            self.assertIn(match.group("user"), (f"local:{ADMIN[0]}", f"local:{READER[0]}"), match.group(0))
            self.assertLess(int(match.group("status")), 400, match.group(0))
        frames = [m for m in dicomweb if "/frames/" in m.group("path") or "/wado" in m.group("path")]
        self.assertTrue(frames, "the viewer fetched no pixel data")
        public = re.compile(r"/(login|logout|healthz|favicon\.ico|manifest\.json)(\b|$)")
        for match in requests:
            if match.group("user") == "-":
                self.assertTrue(
                    public.match(match.group("path")) or match.group("status") == "302", match.group(0)
                )
