"""
gzip copies of the viewer's compressible files that its build ships without
one (an operator's own OHIF build, for example), made the first time each
file is asked for, in a thread, and kept under C{state_dir} (the viewer's
folder may be read-only): the recipe's nginx compresses them on the fly.

    request ──▶ AssetCatalog.find: no .gz beside it, and it compresses?
                  │ answered as it is this time
                  └──▶ CompressedCopies.make (in a thread) ──▶ state_dir/viewer-gzip/PATH.MTIME-SIZE.gz
                                                               the next request gets it

A copy is named by its file's modification time and size: a new build's file
gets a new copy (and the old one is removed), never an old copy.
"""

import gzip
import os
from pathlib import Path
from typing import Callable, Optional, Set, Tuple

from twisted.internet.defer import Deferred, DeferredLock
from twisted.logger import Logger

#: Files smaller than this are sent as they are: a compressed answer's
#: savings would not pay for its headers and a client's decompression.
MIN_SIZE = 1024

#: The media types worth compressing: text, scripts, JSON, SVG, WebAssembly.
_COMPRESSIBLE_TYPES = (
    b"text/",
    b"application/json",
    b"application/manifest+json",
    b"application/x-web-app-manifest+json",
    b"application/xml",
    b"application/wasm",
    b"image/svg+xml",
    b"image/x-icon",
)

#: The best compression: each copy is made once.
LEVEL = 9

#: The folder of the copies, under state_dir.
COMPRESSED_COPIES = "viewer-gzip"


def compressible(contentType: bytes, size: int) -> bool:
    return size >= MIN_SIZE and contentType.startswith(_COMPRESSIBLE_TYPES)


def _compress(source: Path, copy: Path) -> None:
    """
    Write C{copy}, the gzip of C{source}, whole or not at all; remove the
    copies of older versions of the file.
    """
    copy.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = copy.with_name(copy.name + ".partial")
    with open(source, "rb") as original, gzip.GzipFile(partial, "wb", LEVEL, mtime=0) as compressed:
        while True:
            block = original.read(1024 * 1024)
            if not block:
                break
            compressed.write(block)
    os.replace(partial, copy)
    stem = source.name + "."
    for other in copy.parent.iterdir():
        if other != copy and other.name.startswith(stem) and other.name.endswith(".gz"):
            rest = other.name[len(stem) : -len(".gz")]
            if "." not in rest:
                other.unlink(missing_ok=True)


class CompressedCopies:
    """
    The copies under C{folder}, made by C{runInThread} (a function running
    its argument in a thread, returning a Deferred).
    """

    log = Logger()

    def __init__(self, folder: Path, runInThread: Callable[..., Deferred]) -> None:
        self._folder = folder
        self._runInThread = runInThread
        self._making: Set[str] = set()
        # One copy at a time: a page load asks for dozens of files at once,
        # and the reactor's threads serve other work (password checks,
        # the metadata cache) meanwhile.
        self._oneAtATime = DeferredLock()

    def copyPath(self, relative: str, status: os.stat_result) -> Path:
        return self._folder / f"{relative}.{status.st_mtime_ns:x}-{status.st_size:x}.gz"

    def existing(self, relative: str, status: os.stat_result) -> Optional[Tuple[Path, os.stat_result]]:
        """
        The copy of the file at C{relative} as C{status} describes it, if
        it has been made.
        """
        copy = self.copyPath(relative, status)
        try:
            return copy, os.stat(copy)
        except OSError:
            return None

    def make(self, relative: str, path: Path, status: os.stat_result, made: Callable[[], None]) -> None:
        """
        Make the copy of C{path} (at C{relative}, as C{status} describes it)
        in a thread, unless it is being made; call C{made()} once it is.
        """
        if relative in self._making:
            return
        self._making.add(relative)
        making = self._oneAtATime.run(self._runInThread, _compress, path, self.copyPath(relative, status))

        def done(result: object) -> None:
            self._making.discard(relative)
            made()

        def failed(failure) -> None:
            self._making.discard(relative)
            self.log.warn(
                "Could not keep a compressed copy of {path} in {folder}: {why}",
                path=relative,
                folder=str(self._folder),
                why=failure.getErrorMessage(),
            )

        making.addCallbacks(done, failed)
