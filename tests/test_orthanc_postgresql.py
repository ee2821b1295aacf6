"""
Orthanc on PostgreSQL, as the supervisor renders it: the real Orthanc 1.10.1
with Debian's orthanc-postgresql 4.0 plugins, on the tests' private
PostgreSQL server (tests/postgres.py) over verified TLS.  Two Orthancs, each
supervised as a node runs its own, share one index and one storage folder: an
instance stored through either is found and read back through the other; the
files can live in PostgreSQL instead.
"""

import json
from pathlib import Path
from typing import List

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from appliance.config import Config
from appliance.orthanc.settings import POSTGRESQL_INDEX_PLUGIN, orthancConfigurationPath, postgresqlPasswordPath
from appliance.orthanc.state import OrthancState
from appliance.orthanc.supervisor import OrthancSupervisor
from tests.postgres import requirePostgres
from tests.support import ctSeries, httpGet, realSupervisor, storeInstances, temporaryFolder, testConfig

#: Generous: the machines are shared, and Orthanc creates its tables first.
READY_TIMEOUT = 120


class OrthancOnPostgreSQLTests(TestCase):
    timeout = 300

    def setUp(self):
        if not POSTGRESQL_INDEX_PLUGIN.exists():
            self.skipTest("Debian's orthanc-postgresql package is not installed")
        self.server = requirePostgres(self.skipTest)
        self.database = self.server.newDatabase(self.addCleanup)
        self.shared = temporaryFolder(self) / "storage"

    def nodeConfig(self, node: str, **orthanc: object) -> Config:
        return testConfig(
            temporaryFolder(self),
            appliance={"node_name": node},
            database=self.database.section(),
            orthanc={"storage_dir": self.shared, **orthanc},
            **{"modality:test": {"aet": "TESTSCU", "host": "127.0.0.1"}},
        )

    async def startNode(self, config: Config) -> OrthancSupervisor:
        supervisor = realSupervisor(config)
        supervisor.startService()
        self.addCleanup(lambda: supervisor.stopService() if supervisor.running else None)
        await supervisor.whenState(OrthancState.READY, OrthancState.FAILED).addTimeout(READY_TIMEOUT, reactor)
        self.assertEqual(supervisor.state, OrthancState.READY, "Orthanc did not start on PostgreSQL")
        return supervisor

    async def rest(self, supervisor: OrthancSupervisor, config: Config, path: str):
        status, _, body = await httpGet(
            f"http://127.0.0.1:{config.orthanc.http_port}{path}",
            {"Authorization": supervisor.credentials.authorization().decode("ascii")},
        )
        self.assertEqual(status, 200, path)
        return body

    def sql(self, statement: str) -> List[str]:
        return self.server.sql(statement, self.database.name).split()

    async def test_twoNodesShareOneArchive(self):
        first, second = self.nodeConfig("node1"), self.nodeConfig("node2")
        nodes = [await self.startNode(first), await self.startNode(second)]
        rendered = json.loads(orthancConfigurationPath(first).read_text())
        self.assertEqual(rendered["DatabaseServerIdentifier"], "node1")
        self.assertFalse(rendered["PostgreSQL"]["Lock"])
        self.assertIn("sslmode=verify-full", rendered["PostgreSQL"]["ConnectionUri"])
        self.assertNotIn(self.database.password, orthancConfigurationPath(first).read_text())
        self.assertEqual(postgresqlPasswordPath(first).stat().st_mode & 0o777, 0o600)

        series = ctSeries(3)
        statuses = await storeInstances(first.orthanc.dicom_port, series[:2])
        statuses += await storeInstances(second.orthanc.dicom_port, series[2:])
        self.assertEqual(statuses, [0, 0, 0])
        study = series[0].StudyInstanceUID
        for node, config in zip(nodes, (first, second)):
            found = json.loads(await self.rest(node, config, "/pacs/studies?StudyInstanceUID=" + study))
            self.assertEqual(len(found), 1, config.appliance.node_name)
            instances = json.loads(
                await self.rest(node, config, f"/pacs/studies/{study}/series/{series[0].SeriesInstanceUID}/instances")
            )
            self.assertEqual(len(instances), 3, "all three, whichever node stored them")
        # Read back through the node that did not store it: from the shared folder.
        orthancIds = json.loads(await self.rest(nodes[1], second, "/instances"))
        self.assertEqual(len(orthancIds), 3)
        for orthancId in orthancIds:
            tags = json.loads(await self.rest(nodes[1], second, f"/instances/{orthancId}/simplified-tags"))
            self.assertEqual(tags["StudyInstanceUID"], study)
            self.assertGreater(len(await self.rest(nodes[1], second, f"/instances/{orthancId}/file")), 1000)
        self.assertEqual(self.sql("SELECT count(*) FROM Resources WHERE resourceType = 3"), ["3"])
        self.assertEqual(sum(1 for path in Path(self.shared).rglob("*") if path.is_file()), 3)
        connections = self.sql(
            "SELECT ssl FROM pg_stat_ssl JOIN pg_stat_activity USING (pid)"
            f" WHERE usename = '{self.database.user}' AND application_name LIKE 'orthanc %'"
        )
        self.assertTrue(connections and set(connections) == {"t"}, connections)

    async def test_filesInPostgreSQL(self):
        config = self.nodeConfig("node1", storage="postgresql")
        node = await self.startNode(config)
        series = ctSeries(2)
        self.assertEqual(await storeInstances(config.orthanc.dicom_port, series), [0, 0])
        [orthancId, _] = json.loads(await self.rest(node, config, "/instances"))
        self.assertGreater(len(await self.rest(node, config, f"/instances/{orthancId}/file")), 1000)
        self.assertEqual([path for path in Path(self.shared).rglob("*") if path.is_file()], [], "no file on disk")
        self.assertNotEqual(self.sql("SELECT count(*) FROM pg_largeobject_metadata"), ["0"])

