"""
The benchmark still works: its smoke mode (tiny studies, one repetition of
one second) runs every scenario against the appliance, nginx and the limit
from this checkout, and its JSON has a positive figure for each; so does the
comparison of Orthanc's index per node (SQLite beside PostgreSQL).  No
threshold: the numbers of a smoke run on a shared machine mean nothing.
"""

import json
import subprocess
import sys
from pathlib import Path
from typing import Tuple

from twisted.trial.unittest import SynchronousTestCase

from appliance.orthanc.settings import POSTGRESQL_INDEX_PLUGIN
from bench import index
from bench.scenarios import ALL
from tests.postgres import serverPrograms
from tests.support import temporaryFolder
from tests.viewerbuild import CHECKOUT, requireViewer


class BenchSmokeTests(SynchronousTestCase):
    def smoke(self, *arguments: str) -> Tuple[subprocess.CompletedProcess, Path]:
        """
        Run the benchmark's smoke mode with C{arguments}; its output and the
        folder of its results.
        """
        requireViewer(self)
        folder = temporaryFolder(self)
        result = subprocess.run(
            [sys.executable, "-m", "bench", "--smoke", *arguments, "--work", str(folder), "--output", str(folder / "results")],
            cwd=CHECKOUT,
            capture_output=True,
            text=True,
            timeout=900,
        )
        self.assertEqual(result.returncode, 0, result.stdout[-4000:] + result.stderr[-4000:])
        return result, folder

    def test_everyScenarioMeasuresEveryTarget(self) -> None:
        result, folder = self.smoke()
        document = json.loads((folder / "results" / "latest.json").read_text())
        self.assertGreater((folder / "results" / "latest.png").stat().st_size, 10_000)
        self.assertEqual(set(document["scenarios"]), {scenario.name for scenario in ALL})
        for key in ("cpu", "cores", "memory", "kernel", "nginx", "orthanc", "twisted", "python"):
            self.assertTrue(document["machine"][key], key)
        for name, scenario in document["scenarios"].items():
            self.assertEqual(scenario["errors"], [], name)
            self.assertTrue(scenario["client"], name)
            self.assertTrue(scenario["metrics"], name)
            if scenario["applianceOnly"]:
                targets: tuple = ("appliance",)
            else:
                targets = ("appliance", "nginx", "limit") if scenario["hasLimit"] else ("appliance", "nginx")
            for key, metric in scenario["metrics"].items():
                for target in targets:
                    self.assertGreater(metric[target]["median"], 0, f"{name} {key} {target}")
                if not scenario["applianceOnly"]:
                    self.assertGreater(metric["ratio"], 0, f"{name} {key}")
        self.assertIn("app/nginx", result.stdout)

    def test_theIndexComparisonMeasuresBothNodes(self) -> None:
        if serverPrograms() is None or not POSTGRESQL_INDEX_PLUGIN.exists():
            self.skipTest("Debian's postgresql and orthanc-postgresql packages are not installed")
        result, folder = self.smoke("--index")
        document = json.loads((folder / "results" / "index.json").read_text())
        self.assertEqual(set(document["scenarios"]), {scenario.name for scenario in index.SCENARIOS})
        for name, scenario in document["scenarios"].items():
            self.assertEqual(scenario["errors"], [], name)
            for key, metric in scenario["metrics"].items():
                for node in index.NODES:
                    self.assertGreater(metric[node]["median"], 0, f"{name} {key} {node}")
                self.assertGreater(metric["ratio"], 0, f"{name} {key}")
        self.assertIn("PostgreSQL/SQLite", result.stdout)
