"""
The free space of the file system that holds Orthanc's files (its index
beside them, unless that is in PostgreSQL).

Orthanc 1.10.1 cannot be trusted with a full disk (measured on Debian 12, see
C{tests/test_disk_full.py}): an instance smaller than its write buffer (4 KiB:
structured reports, key objects, presentation states) is acknowledged as
stored while its file stays empty, which its cache hides until it restarts;
a STOW-RS it cannot write is answered 200 with neither a reference nor a
failure.  So the appliance does not let uploads reach Orthanc while the free
space is below [orthanc] min_free_space.
"""

import os
from pathlib import Path
from typing import Callable, Optional

from twisted.logger import Logger

from appliance.config import Config, OrthancStorage
from appliance.orthanc.settings import orthancHome, orthancStorageFolder


def describeFree(size: int) -> str:
    """
    C{size} (bytes) in MiB for a sentence, to a tenth.
    """
    return f"{size / 2**20:.1f} MiB"


class StorageSpace:
    """
    Whether Orthanc has room to store more, asked before each upload.

    The answer is one C{statvfs} (a system call on a local file system, as
    short as the C{stat} of the users file's check): asked per upload, it
    cannot be out of date by the time of a burst of them.  The space counted
    is what an unprivileged process may use (C{f_bavail}): Orthanc does not
    run as root.  A change of state is logged once, not once per upload.

    @param folder: Orthanc's storage folder (its index lives beside it).
    @param minimum: the free bytes below which uploads are refused; 0 never
        refuses.
    """

    log = Logger()

    def __init__(self, folder: Path, minimum: int, statvfs: Callable[[Path], os.statvfs_result] = os.statvfs) -> None:
        self.folder = folder
        self.minimum = minimum
        self._statvfs = statvfs
        #: What was last logged: full (True), room (False), unmeasurable (None).
        self._state: Optional[bool] = False

    @classmethod
    def forOrthanc(cls, config: Config) -> "StorageSpace":
        """
        The free space of Orthanc's storage folder, against [orthanc]
        min_free_space; of Orthanc's own folder when the files are in
        PostgreSQL (whose server watches its own disk).
        """
        if config.orthanc.storage is OrthancStorage.POSTGRESQL:
            return cls(orthancHome(config), config.orthanc.min_free_space)
        return cls(orthancStorageFolder(config), config.orthanc.min_free_space)

    def free(self) -> Optional[int]:
        """
        The free bytes, or L{None} when they cannot be measured (yet).
        """
        try:
            status = self._statvfs(self.folder)
        except OSError:
            return None
        return status.f_bavail * status.f_frsize

    def full(self) -> bool:
        """
        Whether fewer than C{minimum} bytes are free.
        """
        if not self.minimum:
            return False
        try:
            status = self._statvfs(self.folder)
        except OSError as error:
            # Orthanc (re)creates its folder: until then it stores nothing, and
            # an upload gets the proxy's answer for an Orthanc that is away.
            if self._state is not None:
                self._state = None
                self.log.warn(
                    "Cannot measure the free space of {folder}: {error}", folder=str(self.folder), error=error.strerror
                )
            return False
        free = status.f_bavail * status.f_frsize
        full = free < self.minimum
        if full != self._state:
            self._state = full
            if full:
                self.log.error(
                    "The archive's storage is full: {free} free in {folder}, less than [orthanc]"
                    " min_free_space ({minimum}); uploads are refused (507, and a transient"
                    " A-ASSOCIATE-RJ for DICOM stores) until space is freed",
                    free=describeFree(free),
                    folder=str(self.folder),
                    minimum=describeFree(self.minimum),
                )
            else:
                self.log.info(
                    "The archive's storage has room again: {free} free in {folder}; uploads are accepted",
                    free=describeFree(free),
                    folder=str(self.folder),
                )
        return full
