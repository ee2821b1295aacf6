"""
The viewer's files as assets: each file described once (type, caching,
validators, its precompressed variants), cached and revalidated with one
C{stat} a request, small representations kept in memory; a gzip copy made
for the compressible files that have none (see L{appliance.web.compressedcopies}).
"""

import base64
import hashlib
import mimetypes
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from twisted.logger import Logger
from twisted.web import http

from appliance.web.compressedcopies import CompressedCopies, compressible

#: Representations up to this size are read once and kept in memory: the
#: viewer's small files are requested on every page load.
MEMORY_CACHE_LIMIT = 256 * 1024

IMMUTABLE = b"public, max-age=31536000, immutable"
REVALIDATE = b"no-cache"

#: webpack names its chunks and assets with a content hash of 16 hex digits
#: (C{1180.bundle.762993518ea30ae3.js}, C{0ddf166f7a343eda.wasm}).
_CONTENT_HASH = re.compile(r"(^|[.-])[0-9a-f]{16,}\.")

#: Precompressed variants, in the order they are preferred, by file suffix.
ENCODINGS = ((b"br", ".br"), (b"gzip", ".gz"))

_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".wasm": "application/wasm",
    ".json": "application/json",
    ".jsonc": "application/json",
    ".map": "application/json",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".xml": "application/xml",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".ttf": "font/ttf",
    ".otf": "font/otf",
    ".webmanifest": "application/manifest+json",
    ".webapp": "application/x-web-app-manifest+json",
}

_INLINE_SCRIPT = re.compile(rb"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", re.DOTALL | re.IGNORECASE)


def contentType(name: str) -> bytes:
    suffix = os.path.splitext(name)[1].lower()
    known = _TYPES.get(suffix) or mimetypes.guess_type(name, strict=False)[0]
    return (known or "application/octet-stream").encode("ascii")


def cacheControl(name: str) -> bytes:
    return IMMUTABLE if _CONTENT_HASH.search(name) else REVALIDATE


def inlineScriptHashes(html: bytes) -> List[str]:
    """
    CSP source expressions allowing the inline scripts of C{html}.
    """
    return [
        "'sha256-" + base64.b64encode(hashlib.sha256(body).digest()).decode("ascii") + "'"
        for body in _INLINE_SCRIPT.findall(html)
        if body.strip()
    ]


@dataclass(frozen=True)
class Representation:
    """
    One stored form of an asset: the file itself or a precompressed copy.
    """

    path: Path
    encoding: Optional[bytes]
    size: int
    etag: bytes
    body: Optional[bytes]


@dataclass(frozen=True)
class Asset:
    """
    A file of the viewer and all that is needed to answer for it.

    @ivar stamp: what C{stat} said when it was read; a change means re-read.
    @ivar representations: the precompressed ones first, the file itself last.
    """

    stamp: Tuple[int, int, int]
    contentType: bytes
    cacheControl: bytes
    lastModified: bytes
    modified: int
    representations: Tuple[Representation, ...]


def _stamp(status: os.stat_result) -> Tuple[int, int, int]:
    return (status.st_ino, status.st_mtime_ns, status.st_size)


def _hasGzip(representations) -> bool:
    return any(representation.encoding == b"gzip" for representation in representations)


def _representation(path: Path, status: os.stat_result, encoding: Optional[bytes]) -> Representation:
    suffix = "-" + encoding.decode("ascii") if encoding else ""
    etag = f'"{status.st_mtime_ns:x}-{status.st_size:x}{suffix}"'.encode("ascii")
    body = path.read_bytes() if status.st_size <= MEMORY_CACHE_LIMIT else None
    return Representation(path, encoding, status.st_size, etag, body)


class AssetCatalog:
    """
    The files under one root, described on first use and kept while unchanged.
    """

    log = Logger()

    def __init__(self, root: Path, copies: Optional[CompressedCopies] = None) -> None:
        self.root = Path(os.path.realpath(root))
        #: Where gzip copies of the files that have none beside them are made.
        self._copies = copies
        # Every request joins and stats a path: plain strings cost a fraction
        # of pathlib's objects there.
        self._rootText = str(self.root)
        self._assets: Dict[str, Asset] = {}

    def find(self, relative: str) -> Optional[Asset]:
        """
        The asset at C{relative} (a checked path under the root), or L{None} if
        there is no regular file there inside the root.
        """
        path = os.path.join(self._rootText, relative)
        try:
            status = os.stat(path)
        except OSError:
            # Missing, not a folder on the way, name too long, unreadable.
            return None
        if not stat.S_ISREG(status.st_mode):
            return None
        cached = self._assets.get(relative)
        if cached is not None and cached.stamp == _stamp(status):
            return cached
        if not self._inside(path):
            self.log.warn("Refused {path}: a link that leads out of {root}", path=relative, root=str(self.root))
            return None
        asset = self._describe(Path(path), status, relative)
        self._assets[relative] = asset
        if (
            self._copies is not None
            and not _hasGzip(asset.representations)
            and compressible(asset.contentType, status.st_size)
        ):
            # Described again once the copy is made.
            self._copies.make(relative, Path(path), status, lambda: self._assets.pop(relative, None))
        return asset

    def known(self, relative: str) -> Optional[Asset]:
        """
        The asset at C{relative} as last found, without looking at the file.
        """
        return self._assets.get(relative)

    def _inside(self, path: "str | Path") -> bool:
        return os.path.realpath(path).startswith(self._rootText + os.sep)

    def _describe(self, path: Path, status: os.stat_result, relative: str) -> Asset:
        representations = []
        for encoding, suffix in ENCODINGS:
            variant = path.with_name(path.name + suffix)
            try:
                variantStatus = os.stat(variant)
            except OSError:
                continue
            # A variant older than its file is left over from a previous build.
            if (
                stat.S_ISREG(variantStatus.st_mode)
                and variantStatus.st_mtime_ns >= status.st_mtime_ns
                and self._inside(variant)
            ):
                representations.append(_representation(variant, variantStatus, encoding))
        copy = self._copies.existing(relative, status) if self._copies is not None else None
        if copy is not None and not _hasGzip(representations):
            representations.append(_representation(copy[0], copy[1], b"gzip"))
        representations.append(_representation(path, status, None))
        return Asset(
            stamp=_stamp(status),
            contentType=contentType(path.name),
            cacheControl=cacheControl(path.name),
            lastModified=http.datetimeToString(status.st_mtime),
            modified=int(status.st_mtime),
            representations=tuple(representations),
        )


def generatedAsset(name: str, body: bytes) -> Asset:
    """
    An asset made in memory (app-config.js), revalidated by its content hash.
    """
    digest = hashlib.sha256(body).hexdigest()[:32]
    return Asset(
        stamp=(0, 0, len(body)),
        contentType=contentType(name),
        cacheControl=REVALIDATE,
        lastModified=b"",
        modified=0,
        representations=(Representation(Path(name), None, len(body), f'"{digest}"'.encode("ascii"), body),),
    )
