"""
The load clients: wrk (keep-alive HTTP/1.1 load, latency percentiles, Lua
for many URLs) and curl (single transfers), both C programs, so that the
client is not what limits a measurement; and the plain reads of the static
limit.
"""

import re
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
_TIMES = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


class ClientError(Exception):
    """
    A client saw errors: the measurement is not valid.
    """


def _seconds(text: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text).groups()
    return float(number) * _TIMES[unit]


def _bytes(text: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)([KMGT]?B)", text).groups()
    return float(number) * _UNITS[unit]


def wrk(
    url: str,
    *,
    seconds: float,
    connections: int,
    threads: int = 1,
    headers: Optional[Dict[str, str]] = None,
    script: Optional[Path] = None,
) -> Dict[str, float]:
    """
    Run wrk and return C{requests_per_second}, C{bytes_per_second},
    C{p50}/C{p99} (seconds) and C{requests}.
    """
    command = ["wrk", "--latency", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "30s"]
    for name, value in (headers or {}).items():
        command += ["-H", f"{name}: {value}"]
    if script is not None:
        command += ["-s", str(script)]
    command.append(url)
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120)
    output = result.stdout
    if result.returncode != 0:
        raise ClientError(f"wrk failed ({result.returncode}): {result.stderr.strip() or output}")
    if "Non-2xx or 3xx responses" in output or "Socket errors" in output:
        raise ClientError(f"wrk saw errors on {url}:\n{output}")
    summary = re.search(r"(\d+) requests in ([0-9.]+\w+), ([0-9.]+[KMGT]?B) read", output)
    percentiles = dict(re.findall(r"^\s+(50|99)(?:\.0+)?%\s+(\S+)$", output, re.MULTILINE))
    if summary is None or set(percentiles) != {"50", "99"}:
        raise ClientError(f"cannot read wrk's output:\n{output}")
    requests, duration, read = int(summary.group(1)), _seconds(summary.group(2)), _bytes(summary.group(3))
    if requests == 0:
        raise ClientError(f"wrk completed no request on {url}:\n{output}")
    return {
        "requests": requests,
        "requests_per_second": requests / duration,
        "bytes_per_second": read / duration,
        "p50": _seconds(percentiles["50"]),
        "p99": _seconds(percentiles["99"]),
    }


def frameScript(folder: Path, paths: Sequence[str]) -> Path:
    """
    A wrk script that cycles through C{paths}, each connection at its own
    place (wrk's headers from -H are kept).
    """
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "frames.lua"
    listed = ",\n".join(f'  "{path}"' for path in paths)
    script.write_text(
        f"""local paths = {{
{listed}
}}
local next = 0
request = function()
  next = next % #paths + 1
  return wrk.format("GET", paths[next])
end
""",
        encoding="utf-8",
    )
    return script


def curl(
    urls: Sequence[str],
    *,
    headers: Optional[Dict[str, str]] = None,
    upload: Optional[Path] = None,
    timeout: float = 600,
) -> List[Dict[str, float]]:
    """
    Fetch C{urls} one after the other over one keep-alive connection (or POST
    the file C{upload} to each); for each, C{status}, C{bytes} (received or
    sent) and C{seconds}.
    """
    command = ["curl", "--insecure", "--silent", "--show-error", "--max-time", str(int(timeout))]
    # No 100-continue round trip (Orthanc does not answer it: curl would wait 1 s).
    for name, value in dict({"Expect": ""}, **(headers or {})).items():
        command += ["-H", f"{name}: {value}" if value else f"{name}:"]
    if upload is not None:
        command += ["--data-binary", f"@{upload}"]
    for url in urls:
        command += ["-o", "/dev/null", "-w", r"%{http_code} %{size_download} %{size_upload} %{time_total}\n", url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout * len(urls) + 60)
    if result.returncode != 0:
        raise ClientError(f"curl failed ({result.returncode}): {result.stderr.strip()}")
    answers = []
    for line in result.stdout.splitlines():
        status, received, sent, seconds = line.split()
        if not 200 <= int(status) < 300:
            raise ClientError(f"curl got {status} from {urls[0]}")
        answers.append(
            {"status": int(status), "bytes": float(sent if upload is not None else received), "seconds": float(seconds)}
        )
    return answers


def readFile(path: Path, seconds: float) -> Dict[str, float]:
    """
    The static limit for a large file: read it whole from the page cache,
    again and again, for C{seconds}.
    """
    buffer = bytearray(1 << 20)
    total = 0
    started = time.perf_counter()
    with path.open("rb", buffering=0) as stream:
        while time.perf_counter() - started < seconds:
            stream.seek(0)
            while True:
                count = stream.readinto(buffer)
                if not count:
                    break
                total += count
    return {"bytes_per_second": total / (time.perf_counter() - started)}


def openReadClose(path: Path, seconds: float) -> Dict[str, float]:
    """
    The static limit for a small file: open, read and close it in a loop
    for C{seconds}; the rate and latency percentiles of one such request.
    """
    latencies: List[float] = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        before = time.perf_counter()
        with path.open("rb") as stream:
            stream.read()
        latencies.append(time.perf_counter() - before)
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests_per_second": len(latencies) / elapsed,
        "p50": latencies[len(latencies) // 2],
        "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
    }
