"""
python -m bench --index [--smoke] [--repetitions N] [--seconds S]

Orthanc's index, per node: one appliance on SQLite (the single box) beside
one on PostgreSQL (a private server started here, with fsync on, as a real
one runs), each supervising its own Orthanc, both loaded with the same
studies.  Ingest (STOW-RS, and C-STORE over DICOM TLS), QIDO and study
metadata through each, the two in turn, the order rotating at each
repetition.  Writes index.json and index.md beside the main results.
"""

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Dict, List

from bench import report
from bench.data import OrthancRest, loadDataset
from bench.scenarios import DicomStoreOrthanc, Metadata, Qido, Settings, Stow, Target
from bench.servers import Appliance
from tests.postgres import PostgresServer

SQLITE = "sqlite"
POSTGRESQL = "postgresql"
NODES = (SQLITE, POSTGRESQL)

#: What a node's speed on its index shows in: ingest, query, metadata.
SCENARIOS = [Stow, DicomStoreOrthanc, Qido, Metadata]


def compare(options, dataset, work: Path, say) -> int:
    """
    Run the comparison; the exit status (1 if a measurement failed).
    """
    with ExitStack() as running:
        server = PostgresServer(durable=True)
        running.callback(server.remove)
        database = server.newDatabase(running.callback)
        nodes: Dict[str, Appliance] = {
            SQLITE: Appliance(work / SQLITE, options.ohif),
            POSTGRESQL: Appliance(work / POSTGRESQL, options.ohif, {"database": database.section()}),
        }
        targets: Dict[str, Target] = {}
        orthancs: Dict[str, OrthancRest] = {}
        for name, node in nodes.items():
            running.callback(node.stop)
            say(f"Starting the appliance on {name} (log: {node.work / 'appliance.log'})")
            node.start()
            orthancs[name] = OrthancRest(node.config.orthanc.http_port, node.orthancAuthorization)
            running.callback(orthancs[name].close)
            started = time.monotonic()
            loadDataset(orthancs[name], dataset, say)
            say(f"  loaded into {name} in {time.monotonic() - started:.0f}s")
            targets[name] = Target(
                name,
                f"https://127.0.0.1:{node.httpsPort}",
                node.authorization,
                dicomToOrthanc=node.dicomPort,
                dicomToSink=0,
                dicomTLS=True,
                pids=node.pids,
            )
        settings = Settings(
            seconds=options.seconds,
            smoke=options.smoke,
            work=work,
            ohifRoot=options.ohif,
            certificate=nodes[SQLITE].certificate[0],
        )
        results, failed = {}, False
        for kind in SCENARIOS:
            byNode = {name: kind(dataset, settings, orthancs[name]) for name in NODES}
            say(f"{kind.name}: {byNode[SQLITE].description}")
            samples: Dict[str, Dict[str, List[float]]] = {name: {} for name in NODES}
            errors: List[str] = []
            for repetition in range(options.repetitions):
                order = NODES if repetition % 2 == 0 else NODES[::-1]
                for name in order:
                    try:
                        values = byNode[name].measure(targets[name])
                    except Exception as error:  # recorded and shown; the others go on
                        errors.append(f"{name}: {error}")
                        say(f"  {kind.name} {name}: FAILED: {str(error).splitlines()[0] if str(error) else error!r}")
                        continue
                    finally:
                        byNode[name].after()
                    for key, value in values.items():
                        samples[name].setdefault(key, []).append(value)
                    say(f"  {kind.name} #{repetition + 1} {name}: {values}")
            failed = failed or bool(errors)
            results[kind.name] = scenarioResult(byNode[SQLITE], samples, errors)
        for node in nodes.values():
            node.checkOrthancKept()

    document = report.document(
        results,
        {"repetitions": options.repetitions, "seconds": options.seconds, "smoke": options.smoke},
        report.machine(),
    )
    output = options.output
    report.writeJSON(document, output / "index.json")
    text = markdown(document)
    (output / "index.md").write_text(text, encoding="utf-8")
    say("\n" + text)
    say(f"Written: {output / 'index.json'}, {output / 'index.md'}")
    return 1 if failed else 0


def scenarioResult(scenario, samples: Dict[str, Dict[str, List[float]]], errors: List[str]) -> Dict:
    """
    Each metric's summary on both nodes, and PostgreSQL's median over
    SQLite's.
    """
    metrics = {}
    for metric in scenario.metrics:
        entry: Dict[str, object] = {"label": metric.label, "unit": metric.unit, "better": metric.better}
        for name in NODES:
            entry[name] = report.summary(samples[name].get(metric.key, []), metric)
        sqlite, postgresql = entry[SQLITE], entry[POSTGRESQL]
        entry["ratio"] = postgresql["median"] / sqlite["median"] if sqlite and postgresql and sqlite["median"] else None
        metrics[metric.key] = entry
    return {"description": scenario.description, "client": scenario.client, "metrics": metrics, "errors": errors}


def markdown(document: Dict) -> str:
    lines = [
        f"Orthanc's index per node, {document['date']}: {document['machine']['cpu']},"
        f" {document['machine']['cores']} cores; medians (min-max) of {document['settings']['repetitions']} runs",
        "",
        "| scenario | metric | unit | better | SQLite | PostgreSQL | PostgreSQL/SQLite |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, scenario in document["scenarios"].items():
        for metric in scenario["metrics"].values():
            ratio = metric["ratio"]
            lines.append(
                f"| {name} | {metric['label']} | {metric['unit']} | {metric['better']} |"
                f" {report.formatSummary(metric[SQLITE])} | {report.formatSummary(metric[POSTGRESQL])} |"
                f" {'-' if ratio is None else f'{ratio:.2f}'} |"
            )
        for error in scenario["errors"]:
            lines.append(f"| {name} | error | | | {error} | | |")
    return "\n".join(lines) + "\n"

