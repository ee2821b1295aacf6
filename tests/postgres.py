"""
A private PostgreSQL server for the tests: Debian's (package postgresql), in a
temporary folder, on a free port of 127.0.0.1, with TLS from a test authority
and password logins.  One server serves the whole test run (started at its
first use, removed when the run ends); each test gets a database and a user
of its own (L{PostgresServer.newDatabase}).

As root (CI), the server runs as the package's "postgres" user: PostgreSQL
refuses to run as root.
"""

import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

from tests.support import SharedServer, TestAuthority, freePort

#: How long the server may take to accept connections after it starts.
START_TIMEOUT = 60.0


def serverPrograms() -> Optional[Path]:
    """
    The folder of the newest installed PostgreSQL server's programs; L{None}
    if there is none.
    """
    folders = glob.glob("/usr/lib/postgresql/*/bin/postgres")
    if not folders:
        return None
    return Path(max(folders, key=lambda path: int(Path(path).parts[-3]))).parent


def requirePostgres(skip) -> "PostgresServer":
    """
    The shared server, started if need be; calls C{skip} (a test case's
    C{skipTest}, or C{pytest.skip}) with the reason where PostgreSQL's server
    is not installed (CI installs it: packaging/apt-packages-test.txt).
    """
    if serverPrograms() is None:
        skip("Debian's postgresql package is not installed")
    return PostgresServer.shared()


@dataclass(frozen=True)
class DatabaseSettings:
    """
    What a test writes into [database] to use its database.
    """

    host: str
    port: int
    name: str
    user: str
    password: str
    passwordFile: Path
    caFile: Path

    def section(self, **overrides: object) -> Dict[str, object]:
        section: Dict[str, object] = {
            "host": self.host,
            "port": self.port,
            "name": self.name,
            "user": self.user,
            "password_file": self.passwordFile,
            "ssl_mode": "verify-full",
            "ca_file": self.caFile,
        }
        section.update(overrides)
        return section


class PostgresServer(SharedServer):
    def __init__(self, durable: bool = False) -> None:
        """
        @param durable: sync every commit to disk, as a real server does (the
            benchmark); the tests do not measure durability and go faster
            without.
        """
        self.programs = serverPrograms()
        self.folder = Path(tempfile.mkdtemp(prefix="pacs-appliance-postgres-"))
        self.data = self.folder / "data"
        self.sockets = self.folder / "sockets"
        self.port = freePort()
        self.authority = TestAuthority(self.folder / "tls")
        certificate, key = self.authority.issue("server", "localhost", server=True)
        self.sockets.mkdir()
        self._owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        if self._owner is not None:
            for path in (self.folder, *self.folder.rglob("*")):
                os.chown(path, self._owner.pw_uid, self._owner.pw_gid)
        key.chmod(0o600)
        self._run(
            str(self.programs / "initdb"),
            "--pgdata", str(self.data),
            "--username", "postgres",
            "--auth-local", "trust",
            "--auth-host", "scram-sha-256",
            "--encoding", "UTF8",
            "--no-instructions",
        )
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"port = {self.port}\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.sockets}'\n"
                "ssl = on\n"
                f"ssl_cert_file = '{certificate}'\n"
                f"ssl_key_file = '{key}'\n"
                "max_connections = 200\n"
            )
            if not durable:
                conf.write("fsync = off\nfull_page_writes = off\n")
        # Administration through the socket; the appliance over TCP, with a
        # password, encrypted or (for the refusal tests) not.
        (self.data / "pg_hba.conf").write_text(
            "local all postgres trust\n"
            "hostssl all all 127.0.0.1/32 scram-sha-256\n"
            "hostnossl all all 127.0.0.1/32 scram-sha-256\n"
        )
        self.process: Optional[subprocess.Popen] = None
        self.start()

    def _run(self, *argv: str) -> str:
        result = subprocess.run(
            argv, user=self._owner.pw_uid if self._owner else None, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {result.stderr or result.stdout}")
        return result.stdout

    def start(self) -> None:
        """
        Start the server (again, on the same port); returns once it accepts
        connections.
        """
        log = (self.folder / "server.log").open("a")
        self.process = subprocess.Popen(
            [str(self.programs / "postgres"), "-D", str(self.data)],
            user=self._owner.pw_uid if self._owner else None,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            ready = subprocess.run(
                [str(self.programs / "pg_isready"), "-h", str(self.sockets), "-p", str(self.port), "-t", "1"],
                capture_output=True,
            )
            if ready.returncode == 0:
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("PostgreSQL did not start:\n" + (self.folder / "server.log").read_text())
            time.sleep(0.05)

    def stop(self) -> None:
        """
        Stop the server at once (fast shutdown: sessions are ended).
        """
        if self.process is not None and self.process.poll() is None:
            # SIGINT is PostgreSQL's fast shutdown; SIGTERM would wait for
            # every client to leave.
            self.process.send_signal(signal.SIGINT)
            self.process.wait(timeout=60)
        self.process = None

    def sql(self, statement: str, database: str = "postgres") -> str:
        """
        Run C{statement} as the superuser; its output, tuples only.
        """
        return self._run(
            str(self.programs / "psql"),
            "-h", str(self.sockets),
            "-p", str(self.port),
            "-U", "postgres",
            "-d", database,
            "-v", "ON_ERROR_STOP=1",
            "-At",
            "-c", statement,
        )

    def newDatabase(self, addCleanup) -> DatabaseSettings:
        """
        A database and a user that owns it, removed by C{addCleanup} (a test
        case's, or pytest's C{request.addfinalizer}); the password is written
        to a file of its own.
        """
        name = "test_" + secrets.token_hex(6)
        password = secrets.token_urlsafe(18)
        self.sql(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
        self.sql(f"CREATE DATABASE {name} OWNER {name}")
        addCleanup(lambda: self._drop(name))
        folder = Path(tempfile.mkdtemp(prefix="pacs-appliance-test-db-"))
        addCleanup(lambda: shutil.rmtree(folder, ignore_errors=True))
        passwordFile = folder / "password"
        passwordFile.write_text(password + "\n")
        passwordFile.chmod(0o640)
        return DatabaseSettings("127.0.0.1", self.port, name, name, password, passwordFile, self.authority.path)

    def _drop(self, name: str) -> None:
        if self.process is None:
            self.start()
        self.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        self.sql(f"DROP ROLE IF EXISTS {name}")
