"""
python -m bench [--smoke] [--repetitions N] [--seconds S] [--only SCENARIO ...]
                [--work DIR] [--output DIR] [--profile] [--list] [--index]

Prepares the studies, starts the appliance (and the Orthanc it supervises),
loads the studies into that Orthanc, starts nginx as the OHIF recipe runs it
against the same Orthanc, the discarding DICOM SCP and the appliance's
forwarder pointed at it; then runs every scenario against the appliance, nginx
and the limit, rotating their order at each repetition to cancel drift, and
prints the table and writes it as JSON, Markdown and PNG.  bench/run installs what this
needs first.
"""

import argparse
import asyncio
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Dict, List, Optional

from bench import index, report, scenarios
from bench.clients import ClientError
from bench.data import FULL, SMOKE, OrthancRest, loadDataset, prepareDataset
from bench.scenarios import APPLIANCE, LIMIT, NGINX, TARGETS, Settings, Target
from bench.servers import CHECKOUT, VIEWER, Appliance, Nginx, startSink, startSinkForwarder


#: What a measurement may fail with without it being a bug of the benchmark:
#: a client's complaint, a refused or reset connection, a timeout.
MEASUREMENT_ERRORS = (ClientError, OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, subprocess.TimeoutExpired)


def say(message: str) -> None:
    print(message, flush=True)


def parseArguments(arguments: List[str]) -> argparse.Namespace:
    names = [scenario.name for scenario in scenarios.ALL]
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[1])
    parser.add_argument("--smoke", action="store_true", help="tiny data, one repetition of 1 s: checks that it works")
    parser.add_argument("--repetitions", type=int, default=5, help="runs of each scenario per target (default 5)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each timed load run (default 5)")
    parser.add_argument("--only", nargs="+", choices=names, metavar="SCENARIO", help=f"run only these: {', '.join(names)}")
    parser.add_argument("--work", type=Path, default=CHECKOUT / "var" / "bench", help="generated data and state (default var/bench)")
    parser.add_argument("--output", type=Path, help="where latest.json, latest.md and latest.png go (default bench/results, or WORK/smoke-results with --smoke)")
    parser.add_argument("--ohif", type=Path, default=VIEWER, help="the unpacked OHIF build (default var/ohif)")
    parser.add_argument(
        "--profile", action="store_true",
        help="record each appliance measurement with py-spy: a flame graph per run in WORK/full/profiles/ (WORK/smoke/profiles/ with --smoke)",
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument(
        "--index", action="store_true",
        help="instead: Orthanc's index per node, SQLite beside PostgreSQL (bench/index.py): index.json and index.md",
    )
    options = parser.parse_args(arguments)
    if options.smoke:
        options.repetitions, options.seconds = 1, 1.0
    if options.output is None:
        options.output = options.work / "smoke-results" if options.smoke else CHECKOUT / "bench" / "results"
    return options


def fetchAppConfig(appliance: Appliance) -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    request = urllib.request.Request(
        f"https://127.0.0.1:{appliance.httpsPort}/app-config.js", headers={"Authorization": appliance.authorization}
    )
    with urllib.request.urlopen(request, context=context, timeout=30) as response:
        return response.read()


class Profiler:
    """
    py-spy recording one process while a measurement runs (C{--profile}):
    a flame graph per appliance measurement.
    """

    def __init__(self, pid: int, output: Path) -> None:
        output.parent.mkdir(parents=True, exist_ok=True)
        self.output = output
        self._process = subprocess.Popen(
            [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--rate", "250",
             "--nonblocking", "--output", str(output)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        # py-spy tells when it samples only to a terminal: give it the time
        # it takes to attach.
        time.sleep(1.0)

    def stop(self) -> None:
        self._process.send_signal(signal.SIGINT)
        _, errors = self._process.communicate(timeout=120)
        if self._process.returncode != 0:
            say(f"  py-spy failed: {errors.strip().splitlines()[-1] if errors.strip() else self._process.returncode}")


def runScenario(
    scenario: scenarios.Scenario,
    targets: Dict[str, Target],
    repetitions: int,
    profiles: Optional[Path] = None,
) -> Dict:
    names = [APPLIANCE] if scenario.applianceOnly else list(TARGETS if scenario.hasLimit else (APPLIANCE, NGINX))
    samples: Dict[str, Dict[str, List[float]]] = {name: {} for name in names}
    errors: List[str] = []
    if scenario.repetitionsAtMost is not None:
        repetitions = min(repetitions, scenario.repetitionsAtMost)
    for repetition in range(repetitions):
        # Rotate the order at every repetition: drift and order effects spread
        # over all three instead of favouring one.
        shift = repetition % len(names)
        for name in names[shift:] + names[:shift]:
            profiler = None
            if profiles is not None and name == APPLIANCE:
                profiler = Profiler(
                    targets[name].profiledPid(scenario), profiles / f"{scenario.name}-{repetition + 1}.svg"
                )
            started = time.monotonic()
            try:
                values = scenario.measure(targets[name])
            except MEASUREMENT_ERRORS as error:
                # One failed measurement is recorded and shown; the others go on.
                message = str(error) or type(error).__name__
                errors.append(f"{name}: {message}")
                say(f"  {scenario.name} {name}: FAILED: {message.splitlines()[0]}")
                continue
            finally:
                if profiler is not None:
                    profiler.stop()
                    say(f"  profile: {profiler.output}")
                scenario.after()
            for key, value in values.items():
                samples[name].setdefault(key, []).append(value)
            shown = ", ".join(
                f"{metric.label} {values[metric.key] * metric.scale:.2f} {metric.unit}"
                for metric in scenario.metrics
                if metric.key in values
            )
            say(f"  {scenario.name} #{repetition + 1} {name}: {shown} ({time.monotonic() - started:.1f}s)")
    return report.scenarioResult(scenario, samples, errors, repetitions)


def main(arguments: List[str]) -> int:
    options = parseArguments(arguments)
    if options.list:
        for scenario in scenarios.ALL:
            say(f"{scenario.name}: {scenario.client}")
        return 0
    chosen = [scenario for scenario in scenarios.ALL if not options.only or scenario.name in options.only]
    sizes = SMOKE if options.smoke else FULL
    work = options.work / ("smoke" if options.smoke else "full")
    work.mkdir(parents=True, exist_ok=True)
    dataset = prepareDataset(options.work / "data", sizes, say)
    if options.index:
        return index.compare(options, dataset, work / "index", say)

    with ExitStack() as running:
        appliance = Appliance(work, options.ohif)
        running.callback(appliance.stop)
        say(f"Starting the appliance (log: {work / 'appliance.log'})")
        appliance.start()
        orthanc = OrthancRest(appliance.config.orthanc.http_port, appliance.orthancAuthorization)
        running.callback(orthanc.close)
        loadDataset(orthanc, dataset, say)
        sink = startSink(work)
        running.callback(sink.stop)
        sinkForwarder = startSinkForwarder(work, appliance, sink.port)
        running.callback(sinkForwarder.stop)
        nginx = Nginx(work, appliance, options.ohif, sink.port)
        running.callback(nginx.stop)
        say(f"Starting nginx ({nginx.configPath})")
        nginx.start(fetchAppConfig(appliance))

        targets = {
            APPLIANCE: Target(
                APPLIANCE,
                f"https://127.0.0.1:{appliance.httpsPort}",
                appliance.authorization,
                dicomToOrthanc=appliance.dicomPort,
                dicomToSink=sinkForwarder.port,
                dicomTLS=True,
                pids=appliance.pids,
                forwarderPid=sinkForwarder.pid,
            ),
            NGINX: Target(
                NGINX,
                f"https://127.0.0.1:{nginx.httpsPort}",
                appliance.authorization,
                dicomToOrthanc=nginx.dicomPort,
                dicomToSink=nginx.sinkDicomPort,
                dicomTLS=True,
                pids=nginx.pids,
            ),
            LIMIT: Target(
                LIMIT,
                f"http://127.0.0.1:{appliance.config.orthanc.http_port}",
                appliance.orthancAuthorization,
                dicomToOrthanc=appliance.config.orthanc.dicom_port,
                dicomToSink=sink.port,
                dicomTLS=False,
            ),
        }
        settings = Settings(
            seconds=options.seconds, smoke=options.smoke, work=work, ohifRoot=options.ohif,
            certificate=appliance.certificate[0],
        )
        results = {}
        for kind in chosen:
            scenario = kind(dataset, settings, orthanc)
            say(f"{scenario.name}: {scenario.description}")
            results[scenario.name] = runScenario(
                scenario, targets, options.repetitions, work / "profiles" if options.profile else None
            )
            appliance.checkOrthancKept()

    document = report.document(
        results,
        {
            "repetitions": options.repetitions,
            "seconds": options.seconds,
            "smoke": options.smoke,
            "sizes": sizes.__dict__,
            "order": "appliance, nginx and limit in turn, the order rotating at each repetition",
        },
        report.machine(),
    )
    say("")
    say(report.table(document))
    output = options.output
    report.writeJSON(document, output / "latest.json")
    report.writeMarkdown(document, output / "latest.md")
    report.writeChart(document, output / "latest.png")
    say(f"\nWritten: {output / 'latest.json'}, {output / 'latest.md'}, {output / 'latest.png'}")
    failed = [name for name, result in results.items() if result["errors"]]
    if failed:
        say(f"Scenarios with errors: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
