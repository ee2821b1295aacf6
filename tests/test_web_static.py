"""
The HTTPS site in memory: the viewer's files, app-config.js, /healthz, the
redirect listener and the access log, against a small build made per test.
"""

import gzip
import json
import socket
import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

import appliance
from appliance.orthanc.state import OrthancState
from appliance.web.appconfig import renderAppConfig
from appliance.web.assets import MEMORY_CACHE_LIMIT, inlineScriptHashes
from appliance.web.site import ApplianceSite, NoCredentials, RedirectToHTTPS, buildWebRoot
from appliance.web.static import FileRangeProducer
from tests.support import FakeOrthanc, httpExchange, temporaryFolder, testConfig
from tests.viewerbuild import BIG_BUNDLE, BUNDLE, INDEX_HTML, makeBuild


def request(method: str, path: str, headers: Optional[Dict[str, str]] = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: pacs.example"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class SiteCase(SynchronousTestCase):
    def setUp(self) -> None:
        folder = temporaryFolder(self)
        self.root = makeBuild(folder / "ohif")
        self.orthanc = FakeOrthanc()
        self.useConfig(folder)

    def useConfig(self, folder: Path, **web: object) -> None:
        self.config = testConfig(folder, web={"ohif_root": self.root, "site_name": "St Elsewhere", **web})
        self.site = ApplianceSite.fromConfig(
            self.config, buildWebRoot(self.config, self.orthanc), MemoryReactorClock(), NoCredentials(), True
        )

    def get(self, path: str, method: str = "GET", **headers: str) -> Tuple[int, Dict[str, List[str]], bytes]:
        return httpExchange(self.site, request(method, path, headers))

    def header(self, headers: Dict[str, List[str]], name: str) -> Optional[str]:
        values = headers.get(name.lower())
        return values[0] if values else None


class SPAFallbackTests(SiteCase):
    def test_rootAndDeepLinksAnswerIndex(self) -> None:
        for path in (
            "/",
            "/viewer",
            "/viewer?StudyInstanceUIDs=1.2.840.113619.2.55.3",
            "/viewer/dicomweb",
            "/segmentation/",
            "/assets",
            "/studies/1.2.840.113619.2.55.3",
        ):
            status, headers, body = self.get(path)
            self.assertEqual((status, body), (200, INDEX_HTML), path)
            self.assertEqual(self.header(headers, "Cache-Control"), "no-cache", path)
            self.assertEqual(self.header(headers, "Content-Type"), "text/html; charset=utf-8")

    def test_missingFileWithExtensionIs404(self) -> None:
        for path in ("/missing.js", "/assets/missing.png", "/viewer/chunk.css"):
            status, headers, body = self.get(path)
            self.assertEqual(status, 404, path)
            self.assertNotIn(b"viewer", body)

    def test_noDirectoryListing(self) -> None:
        status, _, body = self.get("/assets/")
        self.assertEqual((status, body), (200, INDEX_HTML))


class TypeAndCacheTests(SiteCase):
    def test_contentTypes(self) -> None:
        expected = {
            "/app.bundle.0123456789abcdef.js": "text/javascript; charset=utf-8",
            "/module.mjs": "text/javascript; charset=utf-8",
            "/0123456789abcdef.wasm": "application/wasm",
            "/manifest.json": "application/json",
            "/app.bundle.js.map": "application/json",
            "/app.bundle.css": "text/css; charset=utf-8",
            "/a34f9d1faa5f3315.woff2": "font/woff2",
            "/ohif-logo.svg": "image/svg+xml",
            "/assets/icon.png": "image/png",
            "/assets/favicon.ico": "image/x-icon",
            "/assets/browserconfig.xml": "application/xml",
            "/app-config.js": "text/javascript; charset=utf-8",
        }
        for path, contentType in expected.items():
            status, headers, _ = self.get(path)
            self.assertEqual(status, 200, path)
            self.assertEqual(self.header(headers, "Content-Type"), contentType, path)
            self.assertEqual(self.header(headers, "X-Content-Type-Options"), "nosniff", path)

    def test_hashedAssetsAreImmutable(self) -> None:
        for path in ("/app.bundle.0123456789abcdef.js", "/0123456789abcdef.wasm", "/a34f9d1faa5f3315.woff2"):
            _, headers, _ = self.get(path)
            self.assertEqual(
                self.header(headers, "Cache-Control"), "public, max-age=31536000, immutable", path
            )

    def test_entryPointsAreRevalidated(self) -> None:
        for path in ("/", "/index.html", "/app-config.js", "/init-service-worker.js", "/app.bundle.css"):
            _, headers, _ = self.get(path)
            self.assertEqual(self.header(headers, "Cache-Control"), "no-cache", path)


class ConditionalTests(SiteCase):
    def test_etagGives304(self) -> None:
        _, headers, _ = self.get("/app.bundle.css")
        etag = self.header(headers, "ETag")
        self.assertTrue(etag.startswith('"'))
        for condition in (etag, f"W/{etag}", f'"other", {etag}', "*"):
            status, headers, body = self.get("/app.bundle.css", **{"If-None-Match": condition})
            self.assertEqual((status, body), (304, b""), condition)
            self.assertEqual(self.header(headers, "ETag"), etag)
            self.assertEqual(self.header(headers, "Cache-Control"), "no-cache")

    def test_otherEtagGives200(self) -> None:
        status, _, body = self.get("/app.bundle.css", **{"If-None-Match": '"stale"'})
        self.assertEqual((status, body), (200, b"body { color: black }\n"))

    def test_ifModifiedSince(self) -> None:
        _, headers, _ = self.get("/app.bundle.css")
        lastModified = self.header(headers, "Last-Modified")
        status, _, _ = self.get("/app.bundle.css", **{"If-Modified-Since": lastModified})
        self.assertEqual(status, 304)
        status, _, _ = self.get("/app.bundle.css", **{"If-Modified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"})
        self.assertEqual(status, 200)

    def test_changedFileGetsNewEtag(self) -> None:
        _, headers, _ = self.get("/app.bundle.css")
        path = self.root / "app.bundle.css"
        path.write_bytes(b"body { color: white; }\n")
        os.utime(path, ns=(path.stat().st_mtime_ns + 10**9,) * 2)
        status, newHeaders, body = self.get("/app.bundle.css", **{"If-None-Match": self.header(headers, "ETag")})
        self.assertEqual((status, body), (200, b"body { color: white; }\n"))
        self.assertNotEqual(self.header(newHeaders, "ETag"), self.header(headers, "ETag"))

    def test_appConfigHasEtag(self) -> None:
        _, headers, body = self.get("/app-config.js")
        status, _, _ = self.get("/app-config.js", **{"If-None-Match": self.header(headers, "ETag")})
        self.assertEqual(status, 304)


class RangeTests(SiteCase):
    path = "/app.bundle.0123456789abcdef.js"

    def test_singleRange(self) -> None:
        status, headers, body = self.get(self.path, Range="bytes=10-19")
        self.assertEqual((status, body), (206, BUNDLE[10:20]))
        self.assertEqual(self.header(headers, "Content-Range"), f"bytes 10-19/{len(BUNDLE)}")
        self.assertEqual(self.header(headers, "Content-Length"), "10")

    def test_openAndSuffixRanges(self) -> None:
        status, _, body = self.get(self.path, Range=f"bytes={len(BUNDLE) - 5}-")
        self.assertEqual((status, body), (206, BUNDLE[-5:]))
        status, _, body = self.get(self.path, Range="bytes=-7")
        self.assertEqual((status, body), (206, BUNDLE[-7:]))
        status, _, body = self.get(self.path, Range=f"bytes=0-{len(BUNDLE) * 2}")
        self.assertEqual((status, body), (206, BUNDLE))

    def test_unsatisfiable(self) -> None:
        status, headers, _ = self.get(self.path, Range=f"bytes={len(BUNDLE)}-")
        self.assertEqual(status, 416)
        self.assertEqual(self.header(headers, "Content-Range"), f"bytes */{len(BUNDLE)}")

    def test_ignoredRanges(self) -> None:
        for value in ("bytes=0-1,5-6", "bytes=9-3", "items=0-1", "bytes=a-b"):
            status, _, body = self.get(self.path, Range=value)
            self.assertEqual((status, body), (200, BUNDLE), value)

    def test_ifRange(self) -> None:
        _, headers, _ = self.get(self.path)
        etag = self.header(headers, "ETag")
        status, _, body = self.get(self.path, Range="bytes=0-3", **{"If-Range": etag})
        self.assertEqual((status, body), (206, BUNDLE[:4]))
        status, _, body = self.get(self.path, Range="bytes=0-3", **{"If-Range": '"old"'})
        self.assertEqual((status, body), (200, BUNDLE))


def openDescriptorsOf(path: Path) -> int:
    """
    How many file descriptors of this process are open on C{path}.
    """
    count = 0
    for descriptor in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{descriptor}") == str(path):
                count += 1
        except OSError:
            pass
    return count


class SlowClientTransport(StringTransport):
    """
    A transport that, like the TLS one, pauses its producer once when more
    than C{bufferSize} bytes wait for a client that reads nothing, and resumes
    it when the client has read them all (L{drain}).
    """

    bufferSize = 64 * 1024
    taken = 0
    producerPaused = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if len(self.io.getvalue()) - self.taken > self.bufferSize:
            self.holdBack()

    def holdBack(self) -> None:
        """
        Pause the producer, as a full buffer does, unless it is paused already.
        """
        if self.producer is not None and not self.producerPaused:
            self.producerPaused = True
            self.producer.pauseProducing()

    def drain(self) -> None:
        self.taken = len(self.io.getvalue())
        if self.producerPaused:
            self.producerPaused = False
            self.producer.resumeProducing()


class StreamingTests(SiteCase):
    """
    Large files go out through a producer that the transport paces.
    """

    path = "/big.bundle.fedcba9876543210.js"

    def connect(self, heldBack: bool = False) -> Tuple[SlowClientTransport, object]:
        """
        A connection asking for the big file; C{heldBack}: one whose client
        had not read what was written before the request came.
        """
        transport = SlowClientTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1234))
        protocol = self.site.buildProtocol(transport.getPeer())
        protocol.makeConnection(transport)
        if heldBack:
            transport.holdBack()
        protocol.dataReceived(request("GET", self.path))
        return transport, protocol

    def readAll(self, transport: SlowClientTransport) -> List[int]:
        """
        Read as the client until the file is sent; how much was waiting each time.
        """
        buffered = []
        file = self.root / self.path[1:]
        # The producer closes the file when it has sent the last block.
        while openDescriptorsOf(file) and len(buffered) < 1000:
            buffered.append(len(transport.io.getvalue()) - transport.taken)
            transport.drain()
        return buffered

    def test_slowClientHoldsOneBuffer(self) -> None:
        transport, protocol = self.connect()
        self.addCleanup(protocol.connectionLost, Failure(ConnectionDone()))
        buffered = self.readAll(transport)
        # Never more than the transport's buffer and one block of the file.
        self.assertLessEqual(max(buffered), SlowClientTransport.bufferSize + FileRangeProducer.blockSize + 1024)
        # ...so it took several pauses to send it.
        self.assertGreaterEqual(len(buffered), len(BIG_BUNDLE) // (SlowClientTransport.bufferSize + FileRangeProducer.blockSize))
        self.assertTrue(transport.value().endswith(b"\r\n\r\n" + BIG_BUNDLE))
        self.assertEqual(openDescriptorsOf(self.root / self.path[1:]), 0)

    def test_heldBackClientGetsNothingUntilItReads(self) -> None:
        """
        A file producer that starts while the client's connection holds the
        channel paused writes nothing until the connection resumes it.
        """
        transport, protocol = self.connect(heldBack=True)
        self.addCleanup(protocol.connectionLost, Failure(ConnectionDone()))
        self.assertEqual(transport.value(), b"")
        self.assertEqual(openDescriptorsOf(self.root / self.path[1:]), 1)
        buffered = self.readAll(transport)
        self.assertEqual(buffered[0], 0)
        self.assertLessEqual(max(buffered), SlowClientTransport.bufferSize + FileRangeProducer.blockSize + 1024)
        self.assertTrue(transport.value().endswith(b"\r\n\r\n" + BIG_BUNDLE))

    def test_clientLeavingClosesTheFile(self) -> None:
        transport, protocol = self.connect()
        self.assertEqual(openDescriptorsOf(self.root / self.path[1:]), 1)
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(openDescriptorsOf(self.root / self.path[1:]), 0)

    def test_rangeOfStreamedFile(self) -> None:
        start = MEMORY_CACHE_LIMIT + 3
        status, _, body = self.get(self.path, Range=f"bytes={start}-{start + 99999}")
        self.assertEqual((status, body), (206, BIG_BUNDLE[start : start + 100000]))

    def test_wholeStreamedFile(self) -> None:
        status, headers, body = self.get(self.path)
        self.assertEqual((status, body), (200, BIG_BUNDLE))
        self.assertEqual(self.header(headers, "Content-Length"), str(len(BIG_BUNDLE)))


class EncodingTests(SiteCase):
    path = "/app.bundle.0123456789abcdef.js"

    def test_brotliPreferred(self) -> None:
        status, headers, body = self.get(self.path, **{"Accept-Encoding": "gzip, deflate, br"})
        self.assertEqual((status, body), (200, b"pretend brotli"))
        self.assertEqual(self.header(headers, "Content-Encoding"), "br")
        self.assertEqual(self.header(headers, "Vary"), "Accept-Encoding")

    def test_gzip(self) -> None:
        status, headers, body = self.get(self.path, **{"Accept-Encoding": "gzip"})
        self.assertEqual(self.header(headers, "Content-Encoding"), "gzip")
        self.assertEqual(gzip.decompress(body), BUNDLE)
        self.assertEqual(self.header(headers, "Content-Length"), str(len(body)))

    def test_identity(self) -> None:
        for accept in (None, "identity", "gzip;q=0, br;q=0", "deflate"):
            headers = {"Accept-Encoding": accept} if accept is not None else {}
            status, responseHeaders, body = self.get(self.path, **headers)
            self.assertEqual((status, body), (200, BUNDLE), accept)
            self.assertIsNone(self.header(responseHeaders, "Content-Encoding"))
            self.assertEqual(self.header(responseHeaders, "Vary"), "Accept-Encoding")

    def test_wildcard(self) -> None:
        _, headers, _ = self.get(self.path, **{"Accept-Encoding": "*"})
        self.assertEqual(self.header(headers, "Content-Encoding"), "br")

    def test_variantsHaveTheirOwnEtags(self) -> None:
        tags = {
            self.header(self.get(self.path, **{"Accept-Encoding": accept})[1], "ETag")
            for accept in ("br", "gzip", "identity")
        }
        self.assertEqual(len(tags), 3)

    def test_staleVariantIgnored(self) -> None:
        status, headers, body = self.get("/stale.js", **{"Accept-Encoding": "gzip"})
        self.assertEqual(body, b"// new content\n" * 100)
        self.assertIsNone(self.header(headers, "Content-Encoding"))


#: Requests that try to leave the root or smuggle odd bytes, as sent on the
#: wire, and the answer each must get.
HOSTILE_PATHS = [
    ("/../etc/passwd", 400),
    ("/%2e%2e/etc/passwd", 400),
    ("/%2E%2E/%2E%2E/etc/passwd", 400),
    ("/%2e%2e%2fetc%2fpasswd", 400),
    ("/assets/..%2f..%2fetc/passwd", 400),
    ("/assets/../../../etc/passwd", 400),
    ("/..\\..\\etc\\passwd", 400),
    ("/%5c..%5cetc%5cpasswd", 400),
    ("/C:%5cWindows%5cwin.ini", 400),
    ("/index.html%00.png", 400),
    ("/%00", 400),
    ("/%252e%252e/etc/passwd", 400),
    ("/%c0%ae%c0%ae/etc/passwd", 400),
    ("/./index.html", 400),
    ("//etc/passwd", 400),
    ("/index.html/..", 400),
    ("/assets/%0d%0aSet-Cookie:x=1", 400),
    ("/.pacs-appliance-ohif", 404),
    # The outside review read /.git/config: a hidden segment anywhere is refused.
    ("/.git/config", 404),
    ("/.git/", 404),
    ("/assets/.cache/secret.js", 404),
    ("/escape/secret.txt", 404),
    ("/secret.js", 404),
    ("/" + "a" * 300 + ".js", 404),
]


class TraversalTests(SiteCase):
    def test_hostilePaths(self) -> None:
        self.assertGreaterEqual(len(HOSTILE_PATHS), 15)
        events: List[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for path, expected in HOSTILE_PATHS:
            status, _, body = self.get(path)
            self.assertEqual(status, expected, path)
            self.assertNotIn(b"secret", body, path)
            self.assertNotIn(b"root:", body, path)
        refusals = [event for event in events if event.get("log_format", "").startswith("Refused")]
        self.assertGreaterEqual(len(refusals), len([p for p, code in HOSTILE_PATHS if code == 400]))


class MethodTests(SiteCase):
    def test_head(self) -> None:
        status, headers, body = self.get("/app.bundle.css", method="HEAD")
        self.assertEqual((status, body), (200, b""))
        self.assertEqual(self.header(headers, "Content-Length"), str(len(b"body { color: black }\n")))
        status, headers, body = self.get("/big.bundle.fedcba9876543210.js", method="HEAD")
        self.assertEqual((status, body), (200, b""))
        self.assertEqual(self.header(headers, "Content-Length"), str(len(BIG_BUNDLE)))

    def test_options(self) -> None:
        for path in ("/", "/app.bundle.css", "/healthz"):
            status, headers, body = self.get(path, method="OPTIONS")
            self.assertEqual((status, body), (204, b""), path)
            self.assertEqual(self.header(headers, "Allow"), "GET, HEAD, OPTIONS", path)

    def test_otherMethodsNotAllowed(self) -> None:
        for method in ("POST", "PUT", "DELETE", "PATCH", "TRACE"):
            for path in ("/", "/app.bundle.css", "/healthz"):
                status, headers, _ = self.get(path, method=method)
                self.assertEqual(status, 405, (method, path))


class SecurityHeaderTests(SiteCase):
    def test_viewerHeaders(self) -> None:
        _, headers, _ = self.get("/")
        policy = self.header(headers, "Content-Security-Policy")
        scriptSources = next(d for d in policy.split(";") if d.strip().startswith("script-src"))
        for allowed in inlineScriptHashes(INDEX_HTML):
            self.assertIn(allowed, scriptSources)
        self.assertNotIn("unsafe-inline", scriptSources)
        self.assertIn("frame-ancestors 'none'", policy)
        self.assertEqual(self.header(headers, "Cross-Origin-Opener-Policy"), "same-origin")
        self.assertEqual(self.header(headers, "Cross-Origin-Embedder-Policy"), "require-corp")
        self.assertEqual(self.header(headers, "Referrer-Policy"), "same-origin")
        self.assertEqual(self.header(headers, "Strict-Transport-Security"), "max-age=31536000")
        self.assertEqual(self.header(headers, "Server"), "pacs-appliance")

    def test_policyFollowsANewIndex(self) -> None:
        """
        A new index.html (a viewer upgrade) gets a policy with the hashes of
        its own inline scripts as soon as it is served.
        """
        self.get("/app.bundle.css")
        newIndex = INDEX_HTML.replace(b'window.PUBLIC_URL="/"', b'window.PUBLIC_URL="/viewer/"')
        path = self.root / "index.html"
        path.write_bytes(newIndex)
        os.utime(path, ns=(path.stat().st_mtime_ns + 10**9,) * 2)
        _, headers, body = self.get("/")
        self.assertEqual(body, newIndex)
        policy = self.header(headers, "Content-Security-Policy")
        [new] = inlineScriptHashes(newIndex)
        [old] = inlineScriptHashes(INDEX_HTML)
        self.assertIn(new, policy)
        self.assertNotIn(old, policy)

    def test_isolationAndPolicyConfigurable(self) -> None:
        self.useConfig(
            temporaryFolder(self),
            cross_origin_isolation="no",
            content_security_policy="default-src 'self'; script-src 'self'",
            hsts_max_age="0",
        )
        _, headers, _ = self.get("/")
        self.assertIsNone(self.header(headers, "Cross-Origin-Embedder-Policy"))
        self.assertIsNone(self.header(headers, "Strict-Transport-Security"))
        self.assertTrue(self.header(headers, "Content-Security-Policy").startswith("default-src 'self'; script-src 'self' 'sha256-"))


class AppConfigTests(SiteCase):
    def test_generatedNotTheBuildsOwn(self) -> None:
        status, _, body = self.get("/app-config.js")
        self.assertEqual(status, 200)
        self.assertEqual(body, renderAppConfig(self.config.web))
        self.assertNotIn(b"public demo", body)

    def evaluate(self, body: bytes) -> dict:
        """
        Run app-config.js in node as the browser would, and return what it
        leaves in window.config (the logo function rendered by a stub React).
        """
        if shutil.which("node") is None:
            self.fail("node is needed to evaluate app-config.js (it comes with npm)")
        script = (
            "const window = {};\n" + body.decode("utf-8") + "\n"
            "const React = {createElement: (type, props, text) => ({type, props, text})};\n"
            "window.config.logo = window.config.whiteLabeling.createLogoComponentFn(React);\n"
            "process.stdout.write(JSON.stringify(window.config));\n"
        )
        result = subprocess.run(["node", "-e", script], capture_output=True, check=True, timeout=60)
        return json.loads(result.stdout)

    def test_dataSourceAndOptions(self) -> None:
        config = self.evaluate(self.get("/app-config.js")[2])
        self.assertTrue(config["showStudyList"])
        self.assertEqual(config["defaultDataSourceName"], "dicomweb")
        [source] = config["dataSources"]
        self.assertEqual(source["sourceName"], "dicomweb")
        self.assertEqual(source["namespace"], "@ohif/extension-default.dataSourcesModule.dicomweb")
        settings = source["configuration"]
        self.assertEqual(
            (settings["qidoRoot"], settings["wadoRoot"], settings["wadoUriRoot"]),
            ("/pacs", "/pacs", "/pacs/wado"),
        )
        self.assertEqual(config["investigationalUseDialog"], {"option": "never"})
        self.assertEqual(config["logo"]["text"], "St Elsewhere")

    def test_siteNameAndBanner(self) -> None:
        self.useConfig(temporaryFolder(self), site_name="O'Brien </script> Clinic", investigational_use="yes")
        config = self.evaluate(self.get("/app-config.js")[2])
        self.assertEqual(config["logo"]["text"], "O'Brien </script> Clinic")
        self.assertEqual(config["investigationalUseDialog"], {"option": "always"})


class HealthTests(SiteCase):
    def test_ready(self) -> None:
        status, headers, body = self.get("/healthz")
        self.assertEqual(status, 200)
        self.orthanc.dicomStatus = "answers C-ECHO on 127.0.0.1:4242"
        status, headers, body = self.get("/healthz")
        self.assertEqual(
            json.loads(body),
            {
                "status": "ok",
                "node": socket.gethostname(),
                "orthanc": "ready",
                "dicom": "answers C-ECHO on 127.0.0.1:4242",
                "database": "ready",
                "version": appliance.__version__,
            },
        )
        self.assertEqual(self.header(headers, "Content-Type"), "application/json")
        self.assertEqual(self.header(headers, "Cache-Control"), "no-store")

    def test_notReady(self) -> None:
        for state in (OrthancState.STARTING, OrthancState.RESTARTING, OrthancState.STOPPED, OrthancState.FAILED):
            self.orthanc.state = state
            status, _, body = self.get("/healthz")
            self.assertEqual(status, 503, state)
            self.assertEqual(json.loads(body)["orthanc"], state.value)
            self.assertEqual(json.loads(body)["status"], "unavailable")

    def test_head(self) -> None:
        status, headers, body = self.get("/healthz", method="HEAD")
        self.assertEqual((status, body), (200, b""))


class RedirectTests(SynchronousTestCase):
    def site(self, port: int) -> ApplianceSite:
        config = testConfig(temporaryFolder(self))
        return ApplianceSite.fromConfig(config, RedirectToHTTPS(port), MemoryReactorClock(), NoCredentials(), False)

    def test_everyRequestRedirected(self) -> None:
        site = self.site(8443)
        for method in ("GET", "HEAD", "POST", "DELETE"):
            status, headers, body = httpExchange(site, request(method, "/viewer?StudyInstanceUIDs=1.2.3"))
            self.assertEqual((status, body), (301, b""), method)
            self.assertEqual(headers["location"], ["https://pacs.example:8443/viewer?StudyInstanceUIDs=1.2.3"])
            self.assertNotIn("strict-transport-security", headers)

    def test_defaultPortLeftOut(self) -> None:
        raw = b"GET /healthz HTTP/1.1\r\nHost: [fd00::1]:80\r\n\r\n"
        status, headers, _ = httpExchange(self.site(443), raw)
        self.assertEqual(headers["location"], ["https://[fd00::1]/healthz"])

    def test_noHostHeaderUsesTheAddressConnectedTo(self) -> None:
        status, headers, _ = httpExchange(self.site(443), b"GET / HTTP/1.0\r\n\r\n")
        self.assertEqual((status, headers["location"]), (301, ["https://127.0.0.1/"]))

    def test_badHostRefused(self) -> None:
        raw = b"GET / HTTP/1.1\r\nHost: evil.example/path@x\r\n\r\n"
        status, headers, _ = httpExchange(self.site(443), raw)
        self.assertEqual(status, 400)
        self.assertNotIn("location", headers)


class AccessLogTests(SiteCase):
    def test_oneCombinedLineARequest(self) -> None:
        events: List[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.get(
            '/viewer?PatientName=Doe"',
            **{"User-Agent": 'test-agent\t"x"', "Referer": "https://pacs.example/viewer?StudyInstanceUIDs=1.2"},
        )
        self.get("/missing.js")
        lines = [event for event in events if event.get("log_namespace") == "appliance.web.access"]
        self.assertEqual(len(lines), 2)
        self.assertRegex(
            lines[0]["line"],
            r'^"127\.0\.0\.1" - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\] "GET /viewer\?\.\.\. HTTP/1\.1"'
            rf' 200 {len(INDEX_HTML)} "https://pacs\.example/viewer\?\.\.\." "test-agent\\t\\"x\\""$',
        )
        # Patient data from DICOMweb searches stays out of the journal.
        self.assertNotIn("Doe", repr(lines[0]))
        self.assertEqual((lines[1]["code"], lines[1]["uri"]), (404, "/missing.js"))


class HeaderDeadlineTests(SynchronousTestCase):
    """
    A client gets header_timeout for each request head, however it trickles.
    """

    def setUp(self) -> None:
        config = testConfig(temporaryFolder(self), web={"header_timeout": "10s"})
        self.clock = MemoryReactorClock()
        self.site = ApplianceSite.fromConfig(config, RedirectToHTTPS(443), self.clock, NoCredentials(), False)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1234))
        self.protocol = self.site.buildProtocol(self.transport.getPeer())
        self.protocol.makeConnection(self.transport)
        self.addCleanup(self.protocol.connectionLost, Failure(ConnectionDone()))

    def test_tricklingHeadersAborted(self) -> None:
        for byte in b"GET / HTTP/1.1\r\nHost: a\r\n":
            self.protocol.dataReceived(bytes([byte]))
            self.clock.advance(0.3)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(10)
        self.assertTrue(self.transport.disconnecting)

    def test_silentConnectionAborted(self) -> None:
        self.clock.advance(9.9)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(self.transport.disconnecting)

    def test_eachRequestGetsItsOwnDeadline(self) -> None:
        self.clock.advance(8)
        self.protocol.dataReceived(request("GET", "/"))
        self.assertIn(b"301 Moved Permanently", self.transport.value())
        self.clock.advance(8)
        self.assertFalse(self.transport.disconnecting)
        self.protocol.dataReceived(request("GET", "/again"))
        self.assertIn(b"/again", self.transport.value())
        self.clock.advance(9)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(self.transport.disconnecting)
