"""
Readiness needs both sides of Orthanc: its REST API and a C-ECHO on its DICOM
port; the supervisor reports the DICOM side for /healthz.
"""

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from appliance.orthanc.space import StorageSpace
from appliance.orthanc.state import OrthancState
from appliance.orthanc.supervisor import OrthancSupervisor
from tests.orthancfakes import ProcessReactor, ScriptedProbe
from tests.support import temporaryFolder, testConfig


class ScriptedEcho:
    def __init__(self):
        self.calls = []

    def __call__(self):
        pending = Deferred()
        self.calls.append(pending)
        return pending


class EchoReadinessTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = ProcessReactor()
        self.rest = ScriptedProbe()
        self.echo = ScriptedEcho()
        config = testConfig(temporaryFolder(self), orthanc={"unresponsive_after": "1"})
        self.port = config.orthanc.dicom_port
        self.supervisor = OrthancSupervisor(
            config, self.reactor, probe=self.rest, echoProbe=self.echo, space=StorageSpace.forOrthanc(config)
        )
        self.supervisor.startService()
        self.reactor.advance(0.2)

    def test_readyOnlyWhenBothAnswer(self):
        self.rest.answer(ok=True)
        self.echo.calls.pop().errback(ConnectionRefusedError("refused"))
        self.assertEqual(self.supervisor.state, OrthancState.STARTING)
        self.assertIn(f"no C-ECHO answer on 127.0.0.1:{self.port}", self.supervisor.dicomStatus)
        self.reactor.advance(0.2)
        self.rest.answer(ok=True)
        self.echo.calls.pop().callback(None)
        self.assertEqual(self.supervisor.state, OrthancState.READY)
        self.assertEqual(self.supervisor.dicomStatus, f"answers C-ECHO on 127.0.0.1:{self.port}")
        self.assertIn(f"127.0.0.1:{self.port} (DICOM)", self.supervisor.reason)

    def test_dicomSideStoppingToAnswerRestartsOrthanc(self):
        self.rest.answer(ok=True)
        self.echo.calls.pop().callback(None)
        self.reactor.advance(5)
        self.rest.answer(ok=True)
        self.echo.calls.pop().errback(TimeoutError("no answer"))
        self.assertEqual(self.supervisor.state, OrthancState.RESTARTING)
        self.assertIn("no answer", self.supervisor.dicomStatus)
