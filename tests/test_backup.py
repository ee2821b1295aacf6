"""
Backup, restore and verify: `pacs-appliance backup` of a loaded appliance
(real Orthanc, the daemon serving) while uploads go on, a second backup
that links what the first holds, `verify` catching a damaged copy, and
`restore` onto the same paths after the state folder and the configuration
are gone (the disk died): every instance acknowledged before the backup
began comes back with identical bytes, accounts log in, the audit trail is
there, and the viewer in headless Chromium opens a study.  And a cluster's
accounts carried from one PostgreSQL database to a fresh one.
"""

import hashlib
import json
import os
import pwd
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Dict, List

from pydicom.uid import generate_uid
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from appliance.backup.manifest import INSTANCE, BackupFailed, Manifest, backups, verifyBackup
from appliance.backup.restore import MARKER, checkTarget, handOver, restoreAccounts
from appliance.backup.take import Snapshot, configurationFiles, lockFolder, readAccountRows, writeAccounts
from appliance.config import loadConfig
from appliance.state.database import interactOnce
from appliance.tls import selfSignedPaths
from appliance.web.passwords import hashPassword
from appliance.web.sharedaccounts import readAccounts, writeAccount
from appliance.web.users import UserEntry
from tests.browser import logIn, viewStudy
from tests.commandline import COMMAND
from tests.daemon import DaemonClient, addUser, startDaemon
from tests.postgres import requirePostgres
from tests.support import TEST_SCRYPT, basicAuthorization, ctSeries, temporaryFolder, testConfig, writeTestConfig
from tests.viewerbuild import VIEWER, requireViewer, startChromium
from tests.webclients import ADMIN, UPLOADER
from tests.webclients import VIEWER as READER
from tests.webclients import stowBody

STUDIES = 3
INSTANCES_PER_STUDY = 4
COMMAND_TIMEOUT = 300


def orthancID(instance) -> str:
    """
    Orthanc's identifier of an instance: the SHA-1 of its patient's and
    its own UIDs, in five groups.
    """
    uids = (instance.PatientID, instance.StudyInstanceUID, instance.SeriesInstanceUID, instance.SOPInstanceUID)
    digest = hashlib.sha1("|".join(uids).encode("ascii")).hexdigest()
    return "-".join(digest[start : start + 8] for start in range(0, 40, 8))


def basic(user) -> Dict[str, str]:
    return {"Authorization": basicAuthorization(user[0], user[1])}


def run(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([COMMAND, *arguments], capture_output=True, text=True, timeout=COMMAND_TIMEOUT)


class BackupAndRestoreTests(DaemonClient, TestCase):
    timeout = 900

    @inlineCallbacks
    def setUp(self):
        requireViewer(self)
        self.folder = temporaryFolder(self)
        users = self.folder / "users"
        for user in (READER, UPLOADER, ADMIN):
            addUser(users, user[0], user[1], list(user[2]))
        self.config = testConfig(self.folder, auth={"users_file": users}, web={"ohif_root": VIEWER})
        self.output, self.process = yield startDaemon(self, self.config)
        self.trustDaemon()
        #: Each stored instance's file as sent, and its Orthanc identifier,
        #: by SOP Instance UID.
        self.sent: Dict[str, bytes] = {}
        self.orthancIDs: Dict[str, str] = {}

    def store(self, instance) -> None:
        contentType, body = stowBody(instance)
        status, answer = self.request(
            "POST", "/pacs/studies", {**basic(UPLOADER), "Content-Type": contentType, "Accept": "application/dicom+json"}, body
        )
        assert status == 200, (status, answer[:300])
        part = body.split(b"\r\n\r\n", 1)[1]
        self.sent[instance.SOPInstanceUID] = part[: part.rindex(b"\r\n--")]
        self.orthancIDs[instance.SOPInstanceUID] = orthancID(instance)

    def storeUntil(self, stop: threading.Event, acknowledged: List[str]) -> None:
        """
        Upload new instances, one study, until C{stop} is set.
        """
        study = generate_uid()
        while not stop.is_set():
            (instance,) = ctSeries(1, studyUID=study, patientID="BACKUP-LIVE")
            self.store(instance)
            acknowledged.append(instance.SOPInstanceUID)

    def storedFiles(self, user=ADMIN) -> Dict[str, bytes]:
        """
        Each instance Orthanc keeps, by SOP Instance UID: its file, through
        /pacs-admin.
        """
        status, body = self.request("GET", "/pacs-admin/instances?expand", basic(user))
        assert status == 200, status
        files = {}
        for instance in json.loads(body):
            status, content = self.request("GET", f"/pacs-admin/instances/{instance['ID']}/file", basic(user))
            assert status == 200, status
            files[instance["MainDicomTags"]["SOPInstanceUID"]] = content
        return files

    @inlineCallbacks
    def test_backupWhileServingThenRestoreOntoAFreshAppliance(self):
        config = str(self.config.sources[0])
        destination = self.folder / "backups"
        studies = []
        for number in range(STUDIES):
            series = ctSeries(INSTANCES_PER_STUDY, patientID=f"BACKUP-{number}")
            studies.append(series[0].StudyInstanceUID)
            for instance in series:
                yield deferToThread(self.store, instance)

        # The first backup, while an uploader goes on.
        stop, during = threading.Event(), []
        uploading = deferToThread(self.storeUntil, stop, during)
        yield self.poll(lambda: bool(during), "the uploads under way", blocking=False)
        before, uploadedBefore = dict(self.sent), len(during)
        first = yield deferToThread(run, "backup", "--config", config, str(destination))
        stop.set()
        yield uploading
        self.assertEqual(first.returncode, 0, first.stdout + first.stderr)
        self.assertIn("Backed up", first.stdout)
        self.assertGreater(len(during), uploadedBefore, "no upload went on during the backup")
        (firstFolder,) = backups(destination)
        self.assertEqual(firstFolder.stat().st_mode & 0o777, 0o700)
        firstManifest = Manifest.read(firstFolder)
        backedUp = {entry.instance for entry in firstManifest.of(INSTANCE)}
        self.assertGreaterEqual(len(backedUp), len(before))
        self.assertIn(str(self.config.auth.users_file), [entry.original for entry in firstManifest.entries])
        self.assertTrue(firstManifest.of("audit"), "the audit trail is not in the backup")

        # The second links what the first holds, and copies what is new.
        second = yield deferToThread(run, "backup", "--config", config, str(destination))
        self.assertEqual(second.returncode, 0, second.stdout + second.stderr)
        firstFolder, secondFolder = backups(destination)
        secondManifest = Manifest.read(secondFolder)
        linked = {
            entry.instance for entry in firstManifest.of(INSTANCE)
            if (firstFolder / entry.path).stat().st_ino == (secondFolder / entry.path).stat().st_ino
        }
        # Instances stored while the first backup ran may be taken again
        # (Orthanc's changes say they were stored after it began); none of
        # those stored before it began is.
        self.assertLessEqual({self.orthancIDs[uid] for uid in before}, linked, "an unchanged instance was copied again")
        self.assertIn(f" {len(secondManifest.of(INSTANCE)) - len(linked)} new", second.stdout)

        verified = yield deferToThread(run, "verify", str(destination))
        self.assertEqual(verified.returncode, 0, verified.stdout + verified.stderr)
        self.assertIn(f"OK, {len(secondManifest.entries)} files", verified.stdout)

        # Restoring onto the running appliance is refused; nothing changes.
        refused = yield deferToThread(run, "restore", "--config", config, str(destination))
        self.assertEqual(refused.returncode, 1)
        self.assertIn("is not empty", refused.stderr)

        # The disk dies: the state folder and the configuration are gone.
        yield self.stopDaemon()
        dead = self.folder / "dead"
        dead.mkdir()
        shutil.move(str(self.config.appliance.state_dir), dead / "state")
        for path in (Path(config), self.config.auth.users_file):
            shutil.move(str(path), dead / path.name)
        restored = yield deferToThread(run, "restore", "--config", config, str(destination))
        self.assertEqual(restored.returncode, 0, restored.stdout + restored.stderr)
        self.assertIn(f"Restored {len(secondManifest.of(INSTANCE))} instances", restored.stdout)
        self.assertFalse((self.config.appliance.state_dir / MARKER).exists())
        for path in (Path(config), self.config.auth.users_file):
            self.assertEqual(path.read_bytes(), (dead / path.name).read_bytes())
        for entry in secondManifest.of("audit"):
            restoredFile = self.config.appliance.state_dir / entry.path
            self.assertEqual(restoredFile.read_bytes(), (secondFolder / entry.path).read_bytes())

        self.config = loadConfig(Path(config))
        self.output, self.process = yield startDaemon(self, self.config)
        self.trustDaemon()
        stored = yield deferToThread(self.storedFiles)
        for uid, content in before.items():
            self.assertIn(uid, stored, "an instance acknowledged before the backup is missing")
            self.assertEqual(stored[uid], content, "an instance came back with other bytes")
        self.assertEqual(len(stored), len(secondManifest.of(INSTANCE)))
        self.assertLessEqual(set(stored), set(self.sent))
        status, _ = yield deferToThread(self.request, "GET", "/pacs/studies", basic(READER))
        self.assertEqual(status, 200, "the restored account does not log in")

        def browse() -> List[dict]:
            browser = startChromium(self.trustedCertificate(), str(self.folder / "chromium"))
            try:
                base = f"https://localhost:{self.config.web.listen_https.port}"
                logIn(browser, base, READER)
                return viewStudy(browser, base, studies[0])
            finally:
                browser.quit()

        drawn = yield deferToThread(browse)
        self.assertTrue(drawn)

    def trustedCertificate(self) -> Path:
        return selfSignedPaths(self.config.appliance.state_dir)[0]

    def stopDaemon(self):
        self.process.signalProcess("TERM")
        return self.output.ended


class ClusterBackupTests(BackupAndRestoreTests):
    """
    A node of a cluster (Orthanc's index and the accounts in PostgreSQL,
    the files in a shared folder) backed up, and restored after its
    database, its state and its configuration (with the database's
    password file, outside the configuration's folder) are gone.
    """

    @inlineCallbacks
    def setUp(self):
        server = requirePostgres(self.skipTest)
        self.folder = temporaryFolder(self)
        self.database = server.newDatabase(self.addCleanup)
        self.server = server
        self.config = testConfig(
            self.folder, database=self.database.section(), orthanc={"storage_dir": self.folder / "shared"}
        )
        for user in (READER, UPLOADER, ADMIN):
            entry = UserEntry(user[0], hashPassword(user[1], TEST_SCRYPT), frozenset(user[2]))
            interactOnce(self.config.database, writeAccount, entry, 1.0)
        self.output, self.process = yield startDaemon(self, self.config)
        self.trustDaemon()
        self.sent, self.orthancIDs = {}, {}

    @inlineCallbacks
    def test_backupWhileServingThenRestoreOntoAFreshAppliance(self):
        config = str(self.config.sources[0])
        for instance in ctSeries(INSTANCES_PER_STUDY, patientID="CLUSTER-BACKUP"):
            yield deferToThread(self.store, instance)
        destination = self.folder / "backups"
        taken = yield deferToThread(run, "backup", "--config", config, str(destination))
        self.assertEqual(taken.returncode, 0, taken.stdout + taken.stderr)
        yield self.stopDaemon()

        # The database, the state, the shared files and the configuration go.
        name = self.database.name
        self.server.sql(f"DROP DATABASE {name} WITH (FORCE)")
        self.server.sql(f"CREATE DATABASE {name} OWNER {name}")
        dead = self.folder / "dead"
        dead.mkdir()
        passwordFile = self.config.database.password_file
        for path in (self.config.appliance.state_dir, self.folder / "shared", Path(config), passwordFile):
            shutil.move(str(path), dead / path.name)
        restored = yield deferToThread(run, "restore", "--config", config, str(destination))
        self.assertEqual(restored.returncode, 0, restored.stdout + restored.stderr)
        self.assertIn(f"Restored {INSTANCES_PER_STUDY} instances", restored.stdout)
        self.assertIn("3 database accounts", restored.stdout)
        self.assertEqual(passwordFile.read_bytes(), (dead / passwordFile.name).read_bytes())

        self.output, self.process = yield startDaemon(self, self.config)
        self.trustDaemon()
        stored = yield deferToThread(self.storedFiles)
        self.assertEqual(stored, self.sent)
        status, _ = yield deferToThread(self.request, "GET", "/pacs/studies", basic(READER))
        self.assertEqual(status, 200, "the restored account does not log in")


class BackupFolderTests(TestCase):
    """
    The parts of a backup that need no appliance running.
    """

    def makeBackup(self) -> Path:
        folder = temporaryFolder(self) / "backup"
        folder.mkdir(mode=0o700)
        snapshot = Snapshot(folder, None, None)
        source = folder.parent / "source"
        source.write_bytes(b"DICM" * 1000)
        snapshot.copy(source, "instances/ab/abcd.dcm", INSTANCE, instance="abcd")
        writeAccounts([["reader", "hash", "viewer", 1.0]], snapshot)
        manifest = Manifest("now", "0", "node", "/etc/pacs-appliance/appliance.ini", str(folder.parent / "state"),
                            "root", "root", 0, snapshot.entries)
        manifest.write(folder)
        return folder

    def test_verifyNamesEveryDamagedMissingOrExtraFile(self):
        folder = self.makeBackup()
        self.assertEqual(verifyBackup(folder), [])
        instance = folder / "instances/ab/abcd.dcm"
        damaged = bytearray(instance.read_bytes())
        damaged[100] ^= 1
        instance.write_bytes(bytes(damaged))
        (folder / "database/accounts.json").unlink()
        (folder / "stray").write_text("x")
        problems = verifyBackup(folder)
        self.assertEqual(len(problems), 3, problems)
        self.assertIn("instances/ab/abcd.dcm: its content is not what was backed up", problems[0])
        self.assertIn("database/accounts.json", problems[1])
        self.assertIn("stray: not in the manifest", problems[2])

    def test_verifyCommandFailsOnADamagedBackup(self):
        folder = self.makeBackup()
        (folder / "instances/ab/abcd.dcm").write_bytes(b"DICM" * 999)
        checked = run("verify", str(folder.parent))
        self.assertEqual(checked.returncode, 1, checked.stdout)
        self.assertIn("4000", checked.stderr)

    def test_restoreGoesOnlyOntoAnEmptyStateFolderOfTheSameConfiguration(self):
        folder = self.makeBackup()
        manifest = Manifest.read(folder)
        with self.assertRaises(BackupFailed) as other:
            checkTarget(manifest, Path("/etc/other/appliance.ini"))
        self.assertIn("--config /etc/pacs-appliance/appliance.ini", str(other.exception))
        state = Path(manifest.state_dir)
        self.assertEqual(checkTarget(manifest, Path(manifest.config)), state)
        state.mkdir()
        (state / "appliance.sqlite3").write_text("")
        with self.assertRaises(BackupFailed) as busy:
            checkTarget(manifest, Path(manifest.config))
        self.assertIn("is not empty", str(busy.exception))
        # An interrupted restore goes on.
        (state / MARKER).touch()
        self.assertEqual(checkTarget(manifest, Path(manifest.config)), state)

    def test_restoredFoldersGoBackToTheirOwner(self):
        """
        Run as root, a restore gives the state folder and an audit trail
        kept elsewhere to the state folder's owner in the backup.
        """
        if os.geteuid() != 0:
            self.skipTest("only root gives files away")
        manifest = Manifest.read(self.makeBackup())
        manifest.state_user, manifest.state_group = "nobody", "nogroup"
        folder = temporaryFolder(self)
        (folder / "state" / "orthanc").mkdir(parents=True)
        (folder / "state" / "orthanc" / "index").write_text("")
        (folder / "audit").mkdir()
        (folder / "audit" / "audit-2026-12-04.log").write_text("")
        handOver([folder / "state", folder / "audit"], manifest)
        nobody = pwd.getpwnam("nobody").pw_uid
        for path in (folder / "state", folder / "state/orthanc/index", folder / "audit/audit-2026-12-04.log"):
            self.assertEqual(path.stat().st_uid, nobody, path)

    def test_oneBackupAtATimeIntoAFolder(self):
        folder = temporaryFolder(self)
        held = lockFolder(folder)
        with self.assertRaises(BackupFailed) as busy:
            lockFolder(folder)
        self.assertIn("another backup", str(busy.exception))
        held.close()
        lockFolder(folder).close()

    def test_configurationFilesAreThoseItNames(self):
        folder = temporaryFolder(self)
        users = folder / "users"
        addUser(users, READER[0], READER[1], ["viewer"])
        config = testConfig(folder, auth={"users_file": users})
        found = configurationFiles(config)
        self.assertEqual(found[0], config.sources[0])
        self.assertIn(users, found)
        self.assertNotIn(config.orthanc.executable, found)

    def test_clusterAccountsCarriedToAFreshDatabase(self):
        server = requirePostgres(self.skipTest)
        folder = temporaryFolder(self)
        old = loadConfig(writeTestConfig(folder / "old", database=server.newDatabase(self.addCleanup).section()))
        new = loadConfig(writeTestConfig(folder / "new", database=server.newDatabase(self.addCleanup).section()))
        entry = UserEntry("radiologist", hashPassword("a long password", TEST_SCRYPT), frozenset({"viewer", "admin"}))
        interactOnce(old.database, writeAccount, entry, 5.0)
        backup = folder / "backup"
        backup.mkdir()
        writeAccounts(readAccountRows(old), Snapshot(backup, None, None))
        self.assertEqual(interactOnce(new.database, readAccounts), [])
        self.assertEqual(restoreAccounts(backup, new), 1)
        self.assertEqual(
            interactOnce(new.database, readAccounts), [("radiologist", entry.passwordHash, "viewer,admin")]
        )

