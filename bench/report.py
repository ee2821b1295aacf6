"""
The results: median and spread of every metric, the table printed at the
end, the JSON and the PNG chart under bench/results/, and the description of
the machine they were measured on.
"""

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

from bench.scenarios import APPLIANCE, LIMIT, NGINX, Metric, Scenario


def summary(samples: List[float], metric: Metric) -> Optional[Dict[str, object]]:
    """
    Median, min and max of C{samples}, in the metric's unit.
    """
    if not samples:
        return None
    scaled = [value * metric.scale for value in samples]
    return {
        "median": statistics.median(scaled),
        "min": min(scaled),
        "max": max(scaled),
        "samples": scaled,
    }


def scenarioResult(
    scenario: Scenario, samples: Dict[str, Dict[str, List[float]]], errors: List[str], repetitions: int
) -> Dict:
    """
    The JSON of one scenario, measured C{repetitions} times per target;
    C{samples[target][metric key]} are raw values.
    """
    metrics = {}
    for metric in scenario.metrics:
        entry: Dict[str, object] = {"label": metric.label, "unit": metric.unit, "better": metric.better}
        for target in (APPLIANCE, NGINX, LIMIT):
            entry[target] = summary(samples.get(target, {}).get(metric.key, []), metric)
        appliance, nginx = entry[APPLIANCE], entry[NGINX]
        entry["ratio"] = (
            appliance["median"] / nginx["median"] if appliance and nginx and nginx["median"] else None
        )
        metrics[metric.key] = entry
    return {
        "description": scenario.description,
        "client": scenario.client,
        "hasLimit": scenario.hasLimit,
        "applianceOnly": scenario.applianceOnly,
        "metrics": metrics,
        "errors": errors,
        "repetitions": repetitions,
    }


def formatSummary(value: Optional[Dict]) -> str:
    if value is None:
        return "-"
    median = value["median"]
    digits = 0 if abs(median) >= 100 else 1 if abs(median) >= 10 else 2
    spread = f" ({value['min']:.{digits}f}-{value['max']:.{digits}f})" if value["min"] != value["max"] else ""
    return f"{median:.{digits}f}{spread}"


HEADER = ("scenario", "metric", "unit", "better", "appliance", "nginx", "limit", "app/nginx")


def rows(results: Dict) -> List[tuple]:
    """
    A row per metric: median (min-max) for each target, and the
    appliance/nginx ratio of the medians; a row per error.
    """
    found = []
    for name, scenario in results["scenarios"].items():
        for metric in scenario["metrics"].values():
            ratio = metric["ratio"]
            found.append(
                (
                    name,
                    metric["label"],
                    metric["unit"],
                    metric["better"],
                    formatSummary(metric[APPLIANCE]),
                    formatSummary(metric[NGINX]) if not scenario.get("applianceOnly") else "n/a",
                    formatSummary(metric[LIMIT]) if scenario["hasLimit"] else "n/a",
                    f"{ratio:.2f}" if ratio is not None else "-",
                )
            )
        for error in scenario["errors"]:
            found.append((name, "ERROR: " + error.splitlines()[0][:100], "", "", "", "", "", ""))
    return found


def table(results: Dict) -> str:
    """
    The table printed at the end of a run.
    """
    lines = [HEADER] + rows(results)
    widths = [max(len(row[index]) for row in lines) for index in range(len(HEADER))]
    text = []
    for number, row in enumerate(lines):
        text.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if number == 0:
            text.append("  ".join("-" * width for width in widths))
    return "\n".join(text)


def markdown(results: Dict) -> str:
    """
    The table as Markdown, with the date and the machine, for the README.
    """
    machineDescription = results["machine"]
    settings = results["settings"]
    fewer = [
        f"{name} {result['repetitions']}"
        for name, result in results["scenarios"].items()
        if result.get("repetitions", settings["repetitions"]) != settings["repetitions"]
    ]
    repetitions = f"{settings['repetitions']} repetitions" + (f" (but {', '.join(fewer)})" if fewer else "")
    lines = [
        f"Measured {results['date']} ({repetitions}, median (min-max);"
        f" commit {machineDescription['commit']}) on {machineDescription['cpu']}, {machineDescription['cores']}"
        f" cores, {machineDescription['memory']}, Linux {machineDescription['kernel']},"
        f" {machineDescription['os']}; {machineDescription['nginx']}, {machineDescription['orthanc']},"
        f" Twisted {machineDescription['twisted']}, Python {machineDescription['python']}.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join("---" for _ in HEADER) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows(results)]
    return "\n".join(lines) + "\n"


def _firstLine(command: List[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unavailable ({error})"
    lines = (result.stdout + result.stderr).strip().splitlines()
    return lines[0] if lines else "unavailable"


def machine() -> Dict[str, str]:
    """
    What the numbers were measured on.
    """
    import OpenSSL
    import pynetdicom
    import twisted
    from OpenSSL import SSL

    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo").read_text()
    found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    if found:
        cpu = found.group(1).strip()
    memory = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    import appliance

    checkout = Path(__file__).resolve().parent.parent
    description = {
        "pacs-appliance": appliance.__version__,
        # Which code was measured: before/after comparisons need it.
        "commit": _firstLine(["git", "-C", str(checkout), "describe", "--always", "--dirty"]),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": f"{int(memory.group(1)) / 1024 / 1024:.1f} GiB" if memory else "unknown",
        "kernel": platform.release(),
        "os": _firstLine(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "pyopenssl": f"{OpenSSL.__version__}, {SSL.SSLeay_version(SSL.OPENSSL_VERSION).decode('ascii')}",
        "nginx": _firstLine(["nginx", "-v"]),
        "orthanc": _firstLine(["/usr/sbin/Orthanc", "--version"]),
        "orthanc-dicomweb": _firstLine(["dpkg-query", "-W", "-f=${Version}", "orthanc-dicomweb"]),
        "wrk": _firstLine(["wrk", "-v"]),
        "curl": _firstLine(["curl", "--version"]),
        "pynetdicom": pynetdicom.__version__,
        "chromium": _firstLine(["chromium", "--version"]),
    }
    return description


def document(scenarios: Dict[str, Dict], settings: Dict, machineDescription: Dict[str, str]) -> Dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machineDescription,
        "settings": settings,
        "scenarios": scenarios,
    }


def writeJSON(results: Dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


def writeMarkdown(results: Dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(results), encoding="utf-8")


def writeChart(results: Dict, path: Path) -> None:
    """
    One bar per metric: appliance and limit relative to nginx (1.0), with the
    spread of the repetitions; above 1 is better for every bar (metrics where
    lower is better are inverted).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, series = [], {APPLIANCE: [], LIMIT: []}
    errors = {APPLIANCE: [[], []], LIMIT: [[], []]}
    for name, scenario in results["scenarios"].items():
        for metric in scenario["metrics"].values():
            nginx = metric[NGINX]
            if not nginx or not nginx["median"]:
                continue
            lower = metric["better"] == "lower"
            labels.append(f"{metric['label']} ({metric['unit']}{', lower better' if lower else ''})")
            for target in (APPLIANCE, LIMIT):
                value = metric[target]
                if value is None or not value["median"]:
                    series[target].append(float("nan"))
                    errors[target][0].append(0.0)
                    errors[target][1].append(0.0)
                    continue
                relative = (lambda v: nginx["median"] / v) if lower else (lambda v: v / nginx["median"])
                median = relative(value["median"])
                low, high = sorted((relative(value["min"]), relative(value["max"])))
                series[target].append(median)
                errors[target][0].append(max(0.0, median - low))
                errors[target][1].append(max(0.0, high - median))
    height = max(4.0, 0.45 * len(labels) + 1.5)
    figure, axes = plt.subplots(figsize=(11, height))
    positions = range(len(labels))
    bar = 0.38
    axes.barh([p - bar / 2 for p in positions], series[APPLIANCE], bar, xerr=errors[APPLIANCE], label="appliance", color="#2b6cb0")
    axes.barh([p + bar / 2 for p in positions], series[LIMIT], bar, xerr=errors[LIMIT], label="limit", color="#a0aec0")
    axes.axvline(1.0, color="#c53030", linestyle="--", label="nginx = 1")
    axes.set_yticks(list(positions))
    axes.set_yticklabels(labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xscale("log")
    axes.set_xlabel("relative to nginx (median of repetitions; > 1 is better; log scale)")
    machineDescription = results["machine"]
    axes.set_title(
        f"pacs-appliance vs nginx (OHIF recipe), {results['date'][:10]},"
        f" {results['settings']['repetitions']} repetitions\n"
        f"{machineDescription['cpu']}, {machineDescription['cores']} cores, {machineDescription['memory']}",
        fontsize=10,
    )
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
