"""
The OHIF build (real, or a small one made for a test) and headless Chromium.
"""

import base64
import gzip
import hashlib
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.web.assets import MEMORY_CACHE_LIMIT
from appliance.web.static import FileRangeProducer

INDEX_HTML = (
    b'<!doctype html><html><head><script>window.PUBLIC_URL="/"</script>'
    b'<script src="/app-config.js"></script>'
    b'<script defer src="/app.bundle.0123456789abcdef.js"></script></head>'
    b'<body><div id="root"></div></body></html>'
)


BUNDLE = b"console.log('viewer');\n" * 200


#: Streamed (too large to keep in memory), in several blocks.
BIG_BUNDLE = bytes(range(256)) * (max(MEMORY_CACHE_LIMIT, FileRangeProducer.blockSize) // 256 * 3 + 7)


def makeBuild(root: Path) -> Path:
    """
    A miniature OHIF build: hashed and unhashed files of every type the
    viewer has, precompressed variants, a hidden file and links out of it.
    """
    files = {
        "index.html": INDEX_HTML,
        "app.bundle.0123456789abcdef.js": BUNDLE,
        "big.bundle.fedcba9876543210.js": BIG_BUNDLE,
        "app.bundle.css": b"body { color: black }\n",
        "0123456789abcdef.wasm": b"\0asm\1\0\0\0",
        "a34f9d1faa5f3315.woff2": b"wOF2 font",
        "module.mjs": b"export default 1;\n",
        "manifest.json": b'{"name": "OHIF"}',
        "app.bundle.js.map": b'{"version": 3}',
        "init-service-worker.js": b"// no service worker\n",
        "stale.js": b"// new content\n" * 100,
        "assets/favicon.ico": b"\0\0\1\0",
        "assets/icon.png": b"\x89PNG\r\n\x1a\n",
        "assets/browserconfig.xml": b"<browserconfig/>",
        "ohif-logo.svg": b"<svg/>",
        "app-config.js": b"window.config = {dataSources: ['public demo']};",
        ".pacs-appliance-ohif": b"@ohif/app@x",
        # A checkout's leftovers: hidden folders are not part of the build.
        ".git/config": b"[remote secret]",
        "assets/.cache/secret.js": b"secret",
    }
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    for name in ("app.bundle.0123456789abcdef.js", "stale.js"):
        (root / (name + ".gz")).write_bytes(gzip.compress((root / name).read_bytes(), mtime=0))
    (root / "app.bundle.0123456789abcdef.js.br").write_bytes(b"pretend brotli")
    # A .gz older than its file is left over from a previous build.
    stale = root / "stale.js"
    os.utime(root / "stale.js.gz", ns=(stale.stat().st_mtime_ns - 10**9,) * 2)
    outside = root.parent / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret.txt").write_bytes(b"secret")
    (root / "escape").symlink_to(outside)
    (root / "secret.js").symlink_to(outside / "secret.txt")
    return root


CHECKOUT = Path(__file__).resolve().parent.parent


VIEWER = CHECKOUT / "var" / "ohif"


ARTIFACTS = CHECKOUT / "tests" / "artifacts"


def requireViewer(case) -> None:
    if not (VIEWER / "index.html").is_file():
        case.fail(f"the OHIF build is not in {VIEWER}: run packaging/ohif (packaging/dev test does)")


def spkiHash(certificatePath: Path) -> str:
    """
    What Chromium's --ignore-certificate-errors-spki-list wants: the base64
    SHA-256 of the certificate's public key, which it then trusts (and only it).
    """
    certificate = x509.load_pem_x509_certificate(certificatePath.read_bytes())
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


def startChromium(certificatePath: Path, profile: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        # WebGL (the viewer's renderer) on the CPU: there is no GPU here.
        "--enable-unsafe-swiftshader",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,900",
        f"--user-data-dir={profile}",
        f"--ignore-certificate-errors-spki-list={spkiHash(certificatePath)}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
