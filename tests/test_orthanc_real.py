"""
The supervisor with the real Orthanc from Debian: it becomes ready, answers only on
loopback and only to the appliance, comes back after kill -9, and leaves nothing
behind when stopped.
"""

import json
import os
import signal
import subprocess

from twisted.trial.unittest import TestCase

from appliance.orthanc.state import OrthancState
from tests.orthancfakes import processExists
from tests.support import ctSeries, httpGet, realSupervisor, storeInstances, temporaryFolder, testConfig

#: Generous: the machines are shared, and Orthanc creates its database first.
READY_TIMEOUT = 120


def nonLoopbackAddress() -> str:
    """
    An IPv4 address of this host that is not on the loopback interface.
    """
    output = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "scope", "global"],
        capture_output=True, text=True, check=True,
    ).stdout
    for line in output.splitlines():
        return line.split()[3].split("/")[0]
    raise AssertionError("this test needs a non-loopback IPv4 address on the host")


class RealOrthancTests(TestCase):
    timeout = 300

    def setUp(self):
        # Orthanc only serves the modalities it knows, from the loopback interface.
        self.config = testConfig(
            temporaryFolder(self), **{"modality:test": {"aet": "TESTSCU", "host": "127.0.0.1"}}
        )
        self.supervisor = realSupervisor(self.config)
        self.supervisor.startService()
        self.addCleanup(self.stopSupervisor)
        return self.waitFor(OrthancState.READY)

    def stopSupervisor(self):
        if self.supervisor.running:
            return self.supervisor.stopService()

    def waitFor(self, state):
        from twisted.internet import reactor

        return self.supervisor.whenState(state).addTimeout(READY_TIMEOUT, reactor)

    def url(self, path, host="127.0.0.1"):
        return f"http://{host}:{self.config.orthanc.http_port}{path}"

    def credentials(self):
        return {"Authorization": self.supervisor.credentials.authorization().decode("ascii")}

    async def test_restAnswersTheApplianceOnlyOnLoopback(self):
        status, _, body = await httpGet(self.url("/system"), self.credentials())
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body)["DicomAet"], "PACS")
        status, headers, _ = await httpGet(self.url("/system"))
        self.assertEqual(status, 401)
        wrong = {"Authorization": "Basic cGFjcy1hcHBsaWFuY2U6d3Jvbmc="}
        status, _, _ = await httpGet(self.url("/system"), wrong)
        self.assertEqual(status, 401)
        status, _, _ = await httpGet(self.url("/system", nonLoopbackAddress()), self.credentials())
        # The same credentials that work on loopback are refused from elsewhere.
        self.assertIn(status, (401, 403), "Orthanc must refuse every non-loopback client")

    async def test_killedOrthancIsRestarted(self):
        first = self.supervisor.pid
        restarting = self.supervisor.whenState(OrthancState.RESTARTING)
        os.kill(first, signal.SIGKILL)
        await restarting
        await self.waitFor(OrthancState.READY)
        self.assertNotEqual(self.supervisor.pid, first)
        self.assertFalse(processExists(first))
        status, _, _ = await httpGet(self.url("/system"), self.credentials())
        self.assertEqual(status, 200)

    async def test_stopLeavesNoOrthanc(self):
        pid = self.supervisor.pid
        self.assertTrue(processExists(pid))
        await self.supervisor.stopService()
        self.assertEqual(self.supervisor.state, OrthancState.STOPPED)
        self.assertFalse(processExists(pid))

    async def test_storedStudyIsListedByDicomWeb(self):
        series = ctSeries(3)
        statuses = await storeInstances(self.config.orthanc.dicom_port, series)
        self.assertEqual(statuses, [0, 0, 0])
        status, _, body = await httpGet(
            self.url("/pacs/studies"), {**self.credentials(), "Accept": "application/dicom+json"}
        )
        self.assertEqual(status, 200)
        [study] = json.loads(body)
        self.assertEqual(study["0020000D"]["Value"], [series[0].StudyInstanceUID])
        self.assertEqual(study["00201208"]["Value"], [3])
