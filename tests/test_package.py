"""
The frozen binary (build.spec), the systemd unit and the .deb, as operators get
them: the binary runs without the virtualenv or the source tree, the daemon
speaks systemd's notification protocol with the real Orthanc behind it, and the
package installs, runs as the unit would run it, and is removed and purged.

The binary is built once per test session and shared by the .deb test.
"""

import base64
import grp
import http.client
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

from tests.commandline import LineReader
from tests.orthancfakes import processExists
from tests.postgres import requirePostgres
from tests.support import UNIT, TestAuthority, freePort, unitSettings, writeConfig, writeTestConfig
from tests.tlsclients import NotifySocket, commonName, logIn, peerCertificateSubject, unverifiedContext

CHECKOUT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

#: What the frozen binary gets as its whole environment: no virtualenv, no
#: PYTHONPATH, the PATH of a system service.
BARE_ENVIRONMENT = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


# --- building


@pytest.fixture(scope="session")
def frozenBuild(tmp_path_factory) -> Path:
    """
    dist/pacs-appliance of build.spec, built once per session.
    """
    folder = tmp_path_factory.mktemp("frozen")
    started = time.monotonic()
    result = subprocess.run(
        [
            str(VENV_BIN / "pyinstaller"),
            "--noconfirm",
            "--log-level=WARN",
            "--distpath", str(folder / "dist"),
            "--workpath", str(folder / "work"),
            str(CHECKOUT / "build.spec"),
        ],
        cwd=CHECKOUT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    print(f"\nfrozen build: {time.monotonic() - started:.0f}s", file=sys.stderr)
    return folder / "dist" / "pacs-appliance"


@pytest.fixture(scope="session")
def debPackage(frozenBuild, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("deb")
    started = time.monotonic()
    result = subprocess.run(
        [str(CHECKOUT / "packaging" / "build-deb"), "--frozen", str(frozenBuild), "--output", str(folder)],
        cwd=CHECKOUT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    print(f"\n.deb build: {time.monotonic() - started:.0f}s", file=sys.stderr)
    return Path(result.stdout.strip().splitlines()[-1])


# --- the unit file


def test_unitVerifies(tmp_path):
    """
    systemd-analyze verify finds nothing wrong (ExecStart= pointed at a
    binary that exists here, as verify checks that it does).
    """
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/bin/pacs-appliance", str(VENV_BIN / "pacs-appliance")))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (0, "")


def test_unitExposureIsOK(tmp_path):
    """
    systemd-analyze security rates the unit "OK" or better (2.0 or less).
    """
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/bin/pacs-appliance", str(VENV_BIN / "pacs-appliance")))
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=20", "--no-pager", str(unit)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    exposure = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert float(exposure.group(1)) <= 2.0, result.stdout


def nftTableExists(table: str) -> bool:
    return subprocess.run(["nft", "list", "table", "inet", table], capture_output=True).returncode == 0


def test_unitSettingsTheDaemonRelies():
    settings = unitSettings()
    assert settings["Type"] == "notify"
    assert settings["KillMode"] == "mixed"
    assert settings["User"] == "pacs-appliance"
    assert settings["AmbientCapabilities"] == settings["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    # Longer than Orthanc's default stop_timeout (30 s): the daemon gets to
    # stop Orthanc itself before systemd kills what is left.
    assert int(settings["TimeoutStopSec"].rstrip("s")) > 30


# --- the frozen binary


def runFrozen(frozenBuild, *arguments, cwd):
    return subprocess.run(
        [str(frozenBuild / "pacs-appliance"), *arguments],
        env=BARE_ENVIRONMENT, cwd=cwd, capture_output=True, text=True, timeout=120,
    )


def test_frozenVersion(frozenBuild, tmp_path):
    result = runFrozen(frozenBuild, "version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"pacs-appliance \d+\.\d+\.\d+", lines[0])
    assert any(re.fullmatch(r"Twisted \d+\.\d+\.\d+.*", line) for line in lines)
    assert lines[-1].endswith("1.10.1"), lines[-1]


def test_frozenCheckConfig(frozenBuild, tmp_path):
    good = writeTestConfig(tmp_path / "good")
    result = runFrozen(frozenBuild, "check-config", "--config", str(good), cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{good}: OK\n", "")
    broken = writeConfig(tmp_path / "broken", {"orthanc": {"http_port": "0"}})
    result = runFrozen(frozenBuild, "check-config", "--config", str(broken), cwd=tmp_path)
    assert result.returncode == 1
    assert f"{broken}: [orthanc] http_port: '0' is not a port number (1-65535)" in result.stderr
    assert "Traceback" not in result.stderr


class Daemon:
    """
    The daemon as systemd runs it: a NOTIFY_SOCKET we listen on, a watchdog,
    its output read line by line.
    """

    def __init__(self, argv, notify: NotifySocket, cwd: Path, watchdogSeconds: int = 2) -> None:
        self.notify = notify
        environment = dict(
            BARE_ENVIRONMENT, NOTIFY_SOCKET=notify.address, WATCHDOG_USEC=str(watchdogSeconds * 1_000_000)
        )
        self.process = subprocess.Popen(
            argv, env=environment, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.output = LineReader(self.process)

    def orthancPid(self) -> int:
        return int(self.output.waitFor(r"Orthanc is starting: started as pid (\d+)").group(1))

    def terminate(self) -> None:
        """
        SIGTERM, as systemctl stop sends it: exit 0 and no Orthanc left.
        """
        orthanc = self.orthancPid()
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=90) == 0
        assert self.notify.waitFor("STOPPING", timeout=5)["STOPPING"] == "1"
        assert not processExists(orthanc)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


#: The user the package tests create with the frozen C{pacs-appliance passwd}.
READER = ("reader", "package test password")
READER_HEADERS = {"Authorization": "Basic " + base64.b64encode(":".join(READER).encode()).decode()}


def addReader(program: str, usersFile: Optional[Path] = None, config: Optional[Path] = None) -> None:
    """
    Add the reader with the frozen C{passwd}: to C{usersFile}, else where
    C{config} keeps accounts, else where the default configuration does.
    """
    command = [program, "passwd", READER[0], "--roles", "viewer", "--password-stdin"]
    if usersFile is not None:
        command[2:2] = ["--users", str(usersFile)]
    elif config is not None:
        command[2:2] = ["--config", str(config)]
    added = subprocess.run(command, input=READER[1] + "\n", capture_output=True, text=True, env=BARE_ENVIRONMENT)
    assert added.returncode == 0, added.stderr


def httpsGet(port: int, path: str, headers: Optional[dict] = None):
    connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=unverifiedContext())
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def installCertificate(authority: TestAuthority, folder: Path, commonName: str) -> None:
    certificate, key = authority.issue(commonName, commonName, server=True)
    folder.mkdir(exist_ok=True)
    shutil.copyfile(certificate, folder / "cert.pem")
    shutil.copyfile(key, folder / "key.pem")


def test_frozenDaemonUnderSystemd(frozenBuild, tmp_path):
    """
    READY=1 once HTTPS answers and Orthanc is ready; watchdog pings; SIGHUP
    with a new certificate: new connections (HTTPS and DICOM) see it while a
    download in flight completes; SIGHUP with a broken configuration: refused, logged, still
    serving; SIGTERM: exit 0 and no Orthanc left.
    """
    authority = TestAuthority(tmp_path / "ca")
    installCertificate(authority, tmp_path / "tls", "first.example")
    httpsPort, dicomPort = freePort(), freePort()
    addReader(str(frozenBuild / "pacs-appliance"), tmp_path / "users")
    config = writeTestConfig(
        tmp_path,
        web={"listen_https": f"127.0.0.1:{httpsPort}"},
        dicom={"listen": f"127.0.0.1:{dicomPort}"},
        auth={"users_file": tmp_path / "users"},
    )
    download = 48 * 1024 * 1024
    (tmp_path / "ohif" / "large.bin").write_bytes(os.urandom(1024) * (download // 1024))
    notify = NotifySocket(tmp_path / "notify")
    daemon = Daemon([str(frozenBuild / "pacs-appliance"), "run", "--config", str(config)], notify, tmp_path)
    try:
        ready = notify.waitFor("READY")
        assert ready["STATUS"].startswith("Orthanc is ready"), ready
        status, body = httpsGet(httpsPort, "/healthz")
        assert (status, json.loads(body)["status"]) == (200, "ok")
        assert notify.waitFor("WATCHDOG", timeout=5)["WATCHDOG"] == "1"
        assert notify.waitFor("WATCHDOG", timeout=5)["WATCHDOG"] == "1"

        inFlight = http.client.HTTPSConnection("127.0.0.1", httpsPort, timeout=30, context=unverifiedContext())
        inFlight.request("GET", "/large.bin", headers=READER_HEADERS)
        response = inFlight.getresponse()
        received = len(response.read(1024 * 1024))
        assert commonName(inFlight.sock) == "first.example"

        installCertificate(authority, tmp_path / "tls", "second.example")
        daemon.process.send_signal(signal.SIGHUP)
        assert notify.waitFor("RELOADING", timeout=30)["RELOADING"] == "1"
        reloaded = notify.waitFor("READY", timeout=30)
        assert reloaded["STATUS"].startswith("Reloaded"), reloaded
        assert peerCertificateSubject(httpsPort) == "second.example"
        assert peerCertificateSubject(dicomPort) == "second.example"
        received += len(response.read())
        assert received == download
        inFlight.close()

        config.write_text(config.read_text().replace("[web]\n", "[web]\ncolour = blue\n", 1))
        daemon.process.send_signal(signal.SIGHUP)
        refused = notify.waitFor("READY", timeout=30)
        assert refused["STATUS"].startswith("Reload refused"), refused
        daemon.output.waitFor("Reload refused, the running configuration stays in force")
        daemon.output.waitFor(re.escape(f"{config}: [web] colour: unknown key"))
        assert httpsGet(httpsPort, "/healthz")[0] == 200
        assert peerCertificateSubject(httpsPort) == "second.example"

        daemon.terminate()
    finally:
        daemon.kill()
        notify.close()


def test_frozenDaemonOnPostgreSQL(frozenBuild, tmp_path, request):
    """
    The frozen binary carries the PostgreSQL driver (psycopg, over the
    system's libpq): with [database] set, its passwd writes the account
    there, and the daemon keeps its sessions there, over verified TLS, with
    its Orthanc's index beside them.
    """
    server = requirePostgres(pytest.skip)
    database = server.newDatabase(request.addfinalizer)
    httpsPort = freePort()
    config = writeTestConfig(
        tmp_path,
        appliance={"node_name": "frozen-node"},
        web={"listen_https": f"127.0.0.1:{httpsPort}"},
        database=database.section(),
    )
    addReader(str(frozenBuild / "pacs-appliance"), config=config)
    assert server.sql("SELECT name FROM accounts", database.name).split() == [READER[0]]
    notify = NotifySocket(tmp_path / "notify")
    daemon = Daemon([str(frozenBuild / "pacs-appliance"), "run", "--config", str(config)], notify, tmp_path)
    try:
        notify.waitFor("READY")
        status, body = httpsGet(httpsPort, "/healthz")
        health = json.loads(body)
        assert (status, health["node"], health["database"]) == (200, "frozen-node", "ready")
        # Orthanc's index is there too, beside the appliance's tables.
        assert server.sql("SELECT count(*) FROM pg_tables WHERE tablename = 'resources'", database.name).split() == ["1"]
        cookie = logIn(httpsPort, *READER, context=unverifiedContext())
        assert httpsGet(httpsPort, "/app-config.js", {"Cookie": cookie})[0] == 200
        assert server.sql("SELECT account FROM sessions", database.name).split() == [READER[0]]
        connections = server.sql(
            f"SELECT ssl FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE usename = '{database.user}'"
        ).split()
        assert connections and set(connections) == {"t"}, "every connection encrypted"
        daemon.terminate()
    finally:
        daemon.kill()
        notify.close()


def test_frozenDaemonWithTheHospitalsIdentity(frozenBuild, tmp_path):
    """
    The frozen binary carries the directory's client (ldap3) and the token
    checks (PyJWT over cryptography): its check-config reaches the
    directory, and its daemon lets a directory user in with HTTP Basic and
    the provider's user with a Bearer token.
    """
    from tests.oidcprovider import requireOidcProvider
    from tests.slapd import requireSlapd

    directory = requireSlapd(pytest.skip)
    provider = requireOidcProvider(pytest.skip)
    httpsPort = freePort()
    redirect = f"https://localhost:{httpsPort}/login/oidc/callback"
    clientId, secret = provider.addClient([redirect])
    (tmp_path / "oidc-secret").write_text(secret)
    config = writeTestConfig(
        tmp_path,
        web={"listen_https": f"127.0.0.1:{httpsPort}"},
        ldap=directory.section(),
        oidc={
            "issuer": provider.issuer,
            "client_id": clientId,
            "client_secret_file": tmp_path / "oidc-secret",
            "ca_file": provider.caFile,
            "audience": provider.resource,
            "viewer_values": "pacs-viewers",
        },
    )
    checked = runFrozen(frozenBuild, "check-config", "--config", str(config), cwd=tmp_path)
    assert (checked.returncode, checked.stderr) == (0, ""), checked.stderr
    notify = NotifySocket(tmp_path / "notify")
    daemon = Daemon([str(frozenBuild / "pacs-appliance"), "run", "--config", str(config)], notify, tmp_path)
    try:
        notify.waitFor("READY")
        viewer = base64.b64encode(f"viewer1:{directory.passwords['viewer1']}".encode()).decode()
        assert httpsGet(httpsPort, "/pacs/studies", {"Authorization": "Basic " + viewer})[0] == 200
        tokens = provider.tokens("viewer2", clientId, secret, redirect)
        assert httpsGet(httpsPort, "/pacs/studies", {"Authorization": "Bearer " + tokens["access_token"]})[0] == 200
        assert httpsGet(httpsPort, "/pacs/studies", {"Authorization": "Basic " + viewer[:-4] + "AAAA"})[0] == 401
        daemon.terminate()
    finally:
        daemon.kill()
        notify.close()


# --- the .deb


def test_debContents(debPackage):
    info = subprocess.run(["dpkg-deb", "--info", str(debPackage)], capture_output=True, text=True, check=True).stdout
    assert re.search(r"^ Depends: orthanc, orthanc-dicomweb, nftables, adduser, libpq5,", info, re.M)
    assert re.search(r"^ Recommends: orthanc-postgresql$", info, re.M)
    contents = subprocess.run(
        ["dpkg-deb", "--contents", str(debPackage)], capture_output=True, text=True, check=True
    ).stdout
    for path in (
        "./usr/lib/pacs-appliance/pacs-appliance",
        "./usr/bin/pacs-appliance -> ../lib/pacs-appliance/pacs-appliance",
        "./usr/share/pacs-appliance/ohif/index.html",
        "./lib/systemd/system/pacs-appliance.service",
        "./lib/systemd/system/nftables.service.d/pacs-appliance.conf",
        "./etc/pacs-appliance/appliance.ini",
        "./etc/pacs-appliance/users",
    ):
        assert path in contents, path
    # The viewer's precompressed files come along.
    assert re.search(r"\./usr/share/pacs-appliance/ohif/\S+\.js\.gz$", contents, re.M)
    conffiles = subprocess.run(
        ["dpkg-deb", "--ctrl-tarfile", str(debPackage)], capture_output=True, check=True
    ).stdout
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(conffiles)) as control:
        listed = control.extractfile("./conffiles").read().decode().split()
    assert listed == ["/etc/pacs-appliance/appliance.ini", "/etc/pacs-appliance/users"]


def dpkg(*arguments):
    return subprocess.run(
        ["dpkg", *arguments],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
    )


def userExists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.mark.skipif(os.geteuid() != 0, reason="installs a package: needs root, as CI has")
def test_debInstallRunAsTheUnitRemovePurge(debPackage, tmp_path):
    if dpkg("-s", "pacs-appliance").returncode == 0:
        pytest.skip("pacs-appliance is installed on this machine: not touching it")
    if Path("/run/systemd/system").exists():
        # postinst would start the unit, on the ports of the shipped configuration.
        pytest.skip("systemd runs this machine: the test installs only where the package's scripts start nothing")
    orthancWants = Path("/etc/systemd/system/multi-user.target.wants/orthanc.service")
    orthancWasEnabled = orthancWants.is_symlink()
    testConfig = Path("/etc/pacs-appliance/conf.d/zz-test.ini")
    try:
        installed = dpkg("-i", str(debPackage))
        output = installed.stdout
        if installed.returncode != 0:
            # What an operator does after dpkg -i when dependencies are missing.
            fixed = subprocess.run(
                ["apt-get", "-f", "install", "-y", "-q"],
                capture_output=True, text=True, timeout=600,
                env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
            )
            assert fixed.returncode == 0, fixed.stdout + fixed.stderr
            output += fixed.stdout
        assert dpkg("-s", "pacs-appliance").returncode == 0, installed.stderr
        assert "pacs-appliance is installed" in output
        assert "create the first administrator with: pacs-appliance passwd admin --roles admin" in output

        state = Path("/var/lib/pacs-appliance")
        assert pwd.getpwuid(state.stat().st_uid).pw_name == "pacs-appliance"
        users = Path("/etc/pacs-appliance/users")
        assert (oct(users.stat().st_mode & 0o777), users.stat().st_uid) == ("0o640", 0)
        assert not orthancWants.exists(), "Debian's orthanc.service is still enabled"
        # The operator's first step; the file stays readable by the unit's group.
        addReader("/usr/bin/pacs-appliance")
        assert (users.stat().st_mode & 0o777, grp.getgrgid(users.stat().st_gid).gr_name) == (0o640, "pacs-appliance")
        # The shipped configuration is valid as installed (the viewer is there).
        checked = subprocess.run(
            ["/usr/bin/pacs-appliance", "check-config"], env=BARE_ENVIRONMENT, capture_output=True, text=True
        )
        assert (checked.returncode, checked.stdout) == (0, "/etc/pacs-appliance/appliance.ini: OK\n"), checked.stderr
        version = subprocess.run(
            ["/usr/bin/pacs-appliance", "version"], env=BARE_ENVIRONMENT, capture_output=True, text=True
        )
        assert version.stdout.startswith("pacs-appliance "), version.stderr

        # The unit's ExecStart, as its User=, with the capability it grants,
        # against a configuration drop-in that moves the listeners to free
        # loopback ports (this machine is shared).
        settings = unitSettings(Path("/lib/systemd/system/pacs-appliance.service"))
        httpsPort = freePort()
        writeConfig(
            testConfig.parent,
            {
                "orthanc": {"http_port": freePort(), "dicom_port": freePort()},
                "web": {"listen_https": f"127.0.0.1:{httpsPort}", "listen_http": f"127.0.0.1:{freePort()}"},
                "dicom": {"listen": f"127.0.0.1:{freePort()}"},
            },
            testConfig.name,
        )
        user = settings["User"]
        subprocess.run(["install", "-d", "-o", user, "-g", user, "-m", "0750", "/run/pacs-appliance"], check=True)
        capability = settings["AmbientCapabilities"].lower().removeprefix("cap_")
        argv = [
            "setpriv", f"--reuid={user}", f"--regid={settings['Group']}", "--init-groups",
            f"--inh-caps=+{capability}", f"--ambient-caps=+{capability}", "--no-new-privs", "--",
            *shlex.split(settings["ExecStart"]),
        ]
        # ExecStartPre and ExecStopPost run as root ("+"): the rules that close
        # Orthanc's ports to other hosts, around the daemon's life.
        startPre, stopPost = (shlex.split(settings[key].removeprefix("+")) for key in ("ExecStartPre", "ExecStopPost"))
        applied = subprocess.run(startPre, env=BARE_ENVIRONMENT, capture_output=True, text=True)
        assert applied.returncode == 0, applied.stderr
        table = re.search(r"nftables table inet (\S+)\)", applied.stdout).group(1)
        assert nftTableExists(table)
        # An abstract socket: the unit's user may send to it.
        notify = NotifySocket()
        daemon = Daemon(argv, notify, Path("/"))
        try:
            notify.waitFor("READY")
            daemon.output.waitFor(re.escape(f"are closed to other hosts (nftables table inet {table})"))
            status, body = httpsGet(httpsPort, "/healthz")
            assert (status, json.loads(body)["status"]) == (200, "ok")
            assert httpsGet(httpsPort, "/")[0] == 401
            status, body = httpsGet(httpsPort, "/", READER_HEADERS)
            assert status == 200 and b"<title>OHIF" in body, body[:300]
            assert notify.waitFor("WATCHDOG", timeout=5)["WATCHDOG"] == "1"
            # The self-signed certificate was written as the unit's user.
            assert (state / "tls" / "self-signed-cert.pem").stat().st_uid == pwd.getpwnam(user).pw_uid
            daemon.terminate()
        finally:
            daemon.kill()
            notify.close()
            removed = subprocess.run(stopPost, env=BARE_ENVIRONMENT, capture_output=True, text=True)
        assert removed.returncode == 0, removed.stderr
        assert not nftTableExists(table)
        testConfig.unlink()

        removed = dpkg("-r", "pacs-appliance")
        assert removed.returncode == 0, removed.stderr
        assert not Path("/usr/bin/pacs-appliance").exists()
        assert Path("/etc/pacs-appliance/appliance.ini").exists()
        assert state.is_dir() and userExists("pacs-appliance")

        purged = dpkg("-P", "pacs-appliance")
        assert purged.returncode == 0, purged.stderr
        assert not Path("/etc/pacs-appliance").exists()
        assert not state.exists()
        assert not userExists("pacs-appliance")
        assert orthancWants.is_symlink() == orthancWasEnabled
    finally:
        testConfig.unlink(missing_ok=True)
        dpkg("-P", "pacs-appliance")
        if orthancWasEnabled and not orthancWants.exists():
            subprocess.run(["systemctl", "--no-reload", "enable", "orthanc.service"], capture_output=True)
