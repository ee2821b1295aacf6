"""
The command line as an operator uses it: real processes, real Orthanc.
"""

import re
import signal
import socket
import subprocess
import sys

import pytest

from tests.commandline import COMMAND, SHIPPED, VENV_BIN, LineReader
from tests.orthancfakes import processExists
from tests.support import writeConfig, writeTestConfig


def runCommand(*arguments):
    return subprocess.run([COMMAND, *arguments], capture_output=True, text=True, timeout=120)


def test_checkConfigAcceptsTheShippedFile():
    result = runCommand("check-config", "--config", str(SHIPPED))
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"{SHIPPED}: OK\n"


def test_checkConfigListsEveryProblem(tmp_path):
    path = writeConfig(tmp_path, {"orthanc": {"http_port": "0", "colour": "blue"}, "nope": {}})
    result = runCommand("check-config", "--config", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    colour, nope, port = result.stderr.splitlines()
    assert colour == f"{path}: [orthanc] colour: unknown key"
    assert nope.startswith(f"{path}: [nope]: unknown section (known: appliance, orthanc, ")
    assert port == f"{path}: [orthanc] http_port: '0' is not a port number (1-65535)"
    assert "Traceback" not in result.stderr


def test_runRefusesABrokenConfig(tmp_path):
    path = writeConfig(tmp_path, {"orthanc": {"http_port": "70000"}})
    result = runCommand("run", "--config", str(path))
    assert result.returncode == 1
    assert f"{path}: [orthanc] http_port: '70000' is not a port number (1-65535)" in result.stderr
    assert "Traceback" not in result.stderr


def test_version():
    result = runCommand("version")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"pacs-appliance \d+\.\d+\.\d+", lines[0])
    assert any(re.fullmatch(r"Twisted \d+\.\d+\.\d+.*", line) for line in lines)
    assert any("OpenSSL" in line for line in lines)
    assert lines[-1].endswith("1.10.1"), lines[-1]


def test_pluginScanLoadsNothingOfTheDaemon():
    """
    twistd imports every plugin module at each scan: ours names the module
    of the service, which is imported only once the plugin is chosen.
    """
    probe = (
        "import sys; from twisted.plugin import getPlugins; from twisted.application.service import IServiceMaker;"
        "import twisted.plugins;"
        "makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker, twisted.plugins)};"
        "assert 'pacs-appliance' in makers, sorted(makers);"
        "print(sorted(name for name in sys.modules if name.startswith('appliance')))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['appliance', 'appliance.plugin']"


def test_noCommandIsAUsageError():
    result = runCommand()
    assert result.returncode == 2
    assert "give a command" in result.stderr


@pytest.mark.parametrize(
    "launcher, exitStatus",
    [
        ([COMMAND, "run"], 0),
        # twistd itself ends with the signal that stopped it, by design.
        ([str(VENV_BIN / "twistd"), "--nodaemon", "--pidfile=", "pacs-appliance"], -signal.SIGINT),
    ],
    ids=["pacs-appliance-run", "twistd-plugin"],
)
def test_daemonRunsOrthancAndStopsItOnSigint(tmp_path, launcher, exitStatus):
    config = writeTestConfig(tmp_path)
    process = subprocess.Popen(
        [*launcher, "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        # A test run started in the background (cmd &) ignores SIGINT, and
        # so would the daemon, which inherits it: the default is the case.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    reader = LineReader(process)
    orthancPid = None
    try:
        orthancPid = int(reader.waitFor(r"Orthanc is starting: started as pid (\d+)").group(1))
        reader.waitFor(r"Orthanc is ready")
        reader.waitFor(r"\[orthanc[\]#].*Orthanc has started")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == exitStatus
        reader.waitFor(r"Orthanc is stopped")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not processExists(orthancPid), "Orthanc outlived the daemon"
    assert not (tmp_path / "twistd.pid").exists()


@pytest.mark.parametrize("section, key", [("web", "listen_https"), ("dicom", "listen")], ids=["https", "dicom"])
def test_aListenerThatCannotBindStopsTheStart(tmp_path, section, key):
    """
    A port another process holds stops the start, the HTTPS listener's as
    well as the DICOM listener's: the daemon says so in one line and exits 1
    before it ever reports ready, leaving no Orthanc behind.
    """
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = writeTestConfig(tmp_path, **{section: {key: f"127.0.0.1:{port}"}})
        result = subprocess.run(
            [COMMAND, "run", "--config", str(config)], capture_output=True, text=True, timeout=120, cwd=tmp_path
        )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    refusals = [line for line in output.splitlines() if "The appliance cannot start" in line]
    assert len(refusals) == 1, output
    assert str(port) in refusals[0], refusals
    assert "Traceback" not in output
    assert "is ready" not in output
    started = re.findall(r"Orthanc is starting: started as pid (\d+)", output)
    assert not any(processExists(int(pid)) for pid in started), "Orthanc outlived the daemon"
