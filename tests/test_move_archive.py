"""
Growing from one box: `pacs-appliance move-archive` moves a loaded single
appliance's archive (real Orthanc on SQLite, local files) into the tests'
PostgreSQL (tests/postgres.py) and a shared storage folder.  The move is
interrupted with SIGTERM in the middle and run again: afterwards the new
index holds every instance of the old one exactly once, each file's MD5 the
same, and the interrupted run left no Orthanc behind.  The appliance runs on
the new configuration meanwhile, and serves the moved studies.
"""

import json
import signal
import sqlite3
import subprocess
from pathlib import Path
from typing import Dict

from pydicom.uid import generate_uid
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from appliance.config import loadConfig
from appliance.state.database import interactOnce
from appliance.web.passwords import hashPassword
from appliance.web.sharedaccounts import writeAccount
from appliance.web.users import UserEntry
from appliance.orthanc.settings import POSTGRESQL_INDEX_PLUGIN
from appliance.orthanc.state import OrthancState
from tests.commandline import COMMAND
from tests.daemon import DaemonClient, startDaemon
from tests.postgres import requirePostgres
from tests.support import (
    TEST_SCRYPT,
    basicAuthorization,
    ctSeries,
    realSupervisor,
    storeInstances,
    temporaryFolder,
    writeTestConfig,
)
from tests.webclients import DICOM_JSON, VIEWER

STUDIES = 8
INSTANCES_PER_STUDY = 5
#: Orthanc's AttachedFiles.fileType of the DICOM file.
DICOM_FILE = 1
READY_TIMEOUT = 120
MOVE_TIMEOUT = 300


def attachmentsInSQLite(index: Path) -> Dict[str, str]:
    """
    Each instance's Orthanc identifier and its DICOM file's MD5, from an
    Orthanc SQLite index.
    """
    with sqlite3.connect(f"file:{index}?mode=ro", uri=True) as connection:
        rows = connection.execute(
            "SELECT r.publicId, a.uncompressedMD5 FROM AttachedFiles a JOIN Resources r ON a.id = r.internalId"
            " WHERE a.fileType = ?",
            (DICOM_FILE,),
        ).fetchall()
    return dict(rows)


class MoveArchiveTests(DaemonClient, TestCase):
    timeout = 600

    async def test_aMoveInterruptedAndRunAgainMovesEveryInstanceOnce(self):
        if not POSTGRESQL_INDEX_PLUGIN.exists():
            self.skipTest("Debian's orthanc-postgresql package is not installed")
        server = requirePostgres(self.skipTest)
        database = server.newDatabase(self.addCleanup)
        folder = temporaryFolder(self)

        # The single box, loaded over DICOM as its modalities would.
        single = loadConfig(writeTestConfig(folder, **{"modality:ct": {"aet": "CT1", "host": "127.0.0.1"}}))
        supervisor = realSupervisor(single)
        supervisor.startService()
        self.addCleanup(lambda: supervisor.stopService() if supervisor.running else None)
        await supervisor.whenState(OrthancState.READY, OrthancState.FAILED).addTimeout(READY_TIMEOUT, reactor)
        self.assertEqual(supervisor.state, OrthancState.READY)
        for study in range(STUDIES):
            series = ctSeries(INSTANCES_PER_STUDY, rows=64, columns=64, studyUID=generate_uid(), patientID=f"MOVE-{study}")
            statuses = await storeInstances(single.orthanc.dicom_port, series, callingAET="CT1")
            self.assertEqual(statuses, [0] * INSTANCES_PER_STUDY)
        await supervisor.stopService()
        oldIndex = single.appliance.state_dir / "orthanc" / "index" / "index"
        before = attachmentsInSQLite(oldIndex)
        self.assertEqual(len(before), STUDIES * INSTANCES_PER_STUDY)

        # The same box, configured for the cluster: the same state_dir, the
        # database and a shared storage folder.
        clustered = writeTestConfig(
            folder,
            appliance={"state_dir": single.appliance.state_dir, "runtime_dir": folder / "run"},
            database=database.section(),
            orthanc={"storage_dir": folder / "shared"},
        )
        self.config = loadConfig(clustered)
        interactOnce(
            self.config.database,
            writeAccount,
            UserEntry(VIEWER[0], hashPassword(VIEWER[1], TEST_SCRYPT), frozenset(VIEWER[2])),
            0.0,
        )
        self.output, _ = await startDaemon(self, self.config)
        self.trustDaemon()
        done = single.appliance.state_dir / "move-archive.done"
        command = [COMMAND, "move-archive", "--config", str(clustered), "--parallel", "2"]

        # Interrupted once two studies are moved.
        first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: first.poll() is None and first.kill())
        deadline = reactor.seconds() + MOVE_TIMEOUT
        while not (done.exists() and len(done.read_text().split()) >= 2):
            self.assertIsNone(first.poll(), "the move ended before it was interrupted")
            self.assertLess(reactor.seconds(), deadline, "no study moved")
            await deferLater(reactor, 0.05, lambda: None)
        first.send_signal(signal.SIGTERM)
        out, err = await deferToThread(first.communicate, timeout=MOVE_TIMEOUT)
        self.assertEqual(first.returncode, 1, out + err)
        self.assertIn("Interrupted:", err)
        self.assertIn("Run the same command again", err)
        movedFirst = len(done.read_text().split())
        self.assertLess(movedFirst, STUDIES, "the interruption came too late to test a resumption")
        leftover = subprocess.run(["pgrep", "-f", str(folder / "run" / "move-archive")], capture_output=True, text=True)
        self.assertEqual(leftover.stdout, "", "an Orthanc of the interrupted move is still running")

        # Run again: it goes on from the studies moved.
        second = await deferToThread(
            subprocess.run, command, capture_output=True, text=True, timeout=MOVE_TIMEOUT
        )
        self.assertEqual(second.returncode, 0, second.stdout + second.stderr)
        self.assertIn(f"Moved {STUDIES} of {STUDIES} studies", second.stdout)
        self.assertIn(f"all {len(before)} instances", second.stdout)
        self.assertEqual(len(done.read_text().split()), STUDIES)

        rows = server.sql(
            "SELECT r.publicId || ' ' || a.uncompressedHash FROM AttachedFiles a"
            f" JOIN Resources r ON a.id = r.internalId WHERE a.fileType = {DICOM_FILE}",
            database.name,
        ).split("\n")
        after = [tuple(row.split()) for row in rows if row]
        self.assertEqual(len(after), len(before), "an instance is missing or stored twice")
        self.assertEqual(dict(after), before)
        # The old archive is left as it was.
        self.assertEqual(attachmentsInSQLite(oldIndex), before)
        # The appliance serves the moved studies.
        status, body = await deferToThread(
            self.request, "GET", "/pacs/instances", {"Authorization": basicAuthorization(*VIEWER[:2]), "Accept": DICOM_JSON}
        )
        self.assertEqual((status, len(json.loads(body))), (200, len(before)))
