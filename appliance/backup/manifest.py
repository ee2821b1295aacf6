"""
What a backup holds, and checking it.

A backup folder (C{DEST} of C{pacs-appliance backup DEST}) holds one folder
per backup, named by its UTC time (C{2026-12-04T19-30-00.250Z}), each complete
by itself::

    manifest.json                 every file below: size, SHA-256, and what it is
    instances/ab/abcdef….dcm      each instance's DICOM file, as Orthanc keeps it
    config/etc/pacs-appliance/…   the configuration and every file it names
    audit/audit-2026-12-04.log    the audit trail
    database/accounts.json        the accounts of the appliance's database

A file that the previous backup already holds (an instance Orthanc has not
stored again since, an audit file that has not grown) is a hard link to
that backup's copy, not a copy: removing an old backup's folder removes
only what no other backup shares.  A backup is complete once its
C{manifest.json} is written, last; one being made is a C{.partial} folder.
Backups hold patient data, private keys and password hashes: folders are
0700 and files 0600.
"""

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

from appliance.orthanc.archive import ArchiveCommandFailed

MANIFEST = "manifest.json"
PARTIAL_SUFFIX = ".partial"
#: The version of this layout; restore and verify refuse a later one.
FORMAT = 1

INSTANCE, CONFIG, AUDIT, DATABASE = "instance", "config", "audit", "database"
ACCOUNTS_FILE = "database/accounts.json"

#: Bytes read at a time when hashing.
CHUNK = 1 << 20


class BackupFailed(ArchiveCommandFailed):
    """
    The backup, restore or verification cannot go on; the message says why.
    """


@dataclass(frozen=True)
class Entry:
    """
    One file of a backup.
    """

    #: Its path in the backup's folder.
    path: str
    kind: str
    size: int
    sha256: str
    #: An instance's Orthanc identifier.
    instance: str = ""
    #: Where a configuration file goes back to, its mode and owner.
    original: str = ""
    mode: int = 0o600
    user: str = ""
    group: str = ""
    #: An audit file's modification time (whether it has grown since).
    mtime_ns: int = 0


@dataclass
class Manifest:
    created: str
    appliance: str
    node: str
    #: The main configuration file, and the state folder it names.
    config: str
    state_dir: str
    state_user: str
    state_group: str
    #: Orthanc's last change when the list of instances was taken.
    orthanc_last_change: int
    entries: List[Entry] = field(default_factory=list)
    format: int = FORMAT

    def of(self, kind: str) -> List[Entry]:
        return [entry for entry in self.entries if entry.kind == kind]

    def write(self, folder: Path) -> None:
        """
        Write the manifest durably (its folder's entry too).
        """
        path = folder / MANIFEST
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
            json.dump(asdict(self), out, indent=1)
            out.flush()
            os.fsync(out.fileno())
        syncFolder(folder)

    @classmethod
    def read(cls, folder: Path) -> "Manifest":
        path = folder / MANIFEST
        try:
            document = json.loads(path.read_text())
            if document.get("format", 0) > FORMAT:
                raise BackupFailed(f"{path} is of a later format ({document['format']}) than this appliance reads")
            entries = [Entry(**entry) for entry in document.pop("entries")]
            return cls(entries=entries, **document)
        except OSError as error:
            raise BackupFailed(f"cannot read {path}: {error.strerror}") from None
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise BackupFailed(f"{path} is not a backup's manifest ({error})") from None


def syncFolder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fileDigest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def backups(destination: Path) -> List[Path]:
    """
    The complete backups in C{destination}, oldest first.
    """
    if not destination.is_dir():
        return []
    return sorted(
        child for child in destination.iterdir() if child.is_dir() and (child / MANIFEST).is_file()
    )


def findBackup(source: Path) -> Path:
    """
    The backup C{source} names: a backup's folder, or the newest complete
    one in a folder of backups.
    """
    if (source / MANIFEST).is_file():
        return source
    found = backups(source)
    if not found:
        raise BackupFailed(f"there is no complete backup in {source} (a backup's folder holds {MANIFEST})")
    return found[-1]


def entryProblem(folder: Path, entry: Entry) -> Optional[str]:
    """
    What is wrong with C{entry}'s file in the backup C{folder}, if anything.
    """
    path = folder / entry.path
    try:
        size = path.stat().st_size
        if size != entry.size:
            return f"{entry.path}: {size} bytes instead of {entry.size}"
        if fileDigest(path) != entry.sha256:
            return f"{entry.path}: its content is not what was backed up (SHA-256 differs)"
    except OSError as error:
        return f"{entry.path}: {error.strerror}"
    return None


def verifyBackup(folder: Path) -> List[str]:
    """
    Every problem of the backup in C{folder}: files missing, of another
    size or content than its manifest says, or there and not in it.
    """
    manifest = Manifest.read(folder)
    problems = [problem for entry in manifest.entries if (problem := entryProblem(folder, entry)) is not None]
    listed = {entry.path for entry in manifest.entries} | {MANIFEST}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_file() and relative not in listed:
            problems.append(f"{relative}: not in the manifest")
    return problems

