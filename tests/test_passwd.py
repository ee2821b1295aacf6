"""
C{pacs-appliance passwd} as an operator runs it: the real console script,
with the password on standard input or typed at a terminal (a pty).
"""

import errno
import os
import pty
import select
import stat
import subprocess
import time
from typing import List, Tuple

import pytest

from appliance.web.passwords import PasswordHash, verifyPassword
from appliance.web.users import findUser
from tests.commandline import COMMAND
from tests.postgres import requirePostgres
from tests.support import freePort, writeTestConfig


def passwd(*arguments: str, password: str = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [COMMAND, "passwd", *arguments],
        input=None if password is None else password + "\n",
        capture_output=True,
        text=True,
        timeout=120,
    )


def passwdAtTerminal(arguments: List[str], answers: List[str], timeout: float = 60) -> Tuple[int, str]:
    """
    Run passwd with a pty as its controlling terminal (where getpass asks),
    typing each of C{answers} after each prompt; its exit status and all it
    wrote to the terminal.
    """
    pid, master = pty.fork()
    if pid == 0:
        try:
            os.execv(COMMAND, [COMMAND, "passwd", *arguments])
        finally:
            os._exit(127)
    output = b""
    pending = list(answers)
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"passwd did not finish; it wrote {output!r}")
            readable, _, _ = select.select([master], [], [], remaining)
            if not readable:
                continue
            try:
                chunk = os.read(master, 4096)
            except OSError as error:
                if error.errno != errno.EIO:
                    raise
                chunk = b""
            if not chunk:
                break
            output += chunk
            # Each prompt ends with ": " and waits for a line.
            if pending and output.rstrip(b" ").endswith(b":"):
                os.write(master, pending.pop(0).encode("utf-8") + b"\n")
    finally:
        os.close(master)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode("utf-8", "replace")


def test_addsAUserFromStandardInput(tmp_path):
    users = tmp_path / "users"
    result = passwd("--users", str(users), "ada", "--roles", "admin", "--password-stdin", password="s3cret pass")
    # stderr: see test_newFileGetsTheGroupOfItsFolder.
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"Added the user ada (roles: admin) in {users}.\n"
    [line] = users.read_text().splitlines()
    name, stored, roles = line.split(":")
    assert (name, roles) == ("ada", "admin")
    assert verifyPassword("s3cret pass", stored)
    assert PasswordHash.parse(stored).parameters.ln == 15
    assert stat.S_IMODE(users.stat().st_mode) == 0o640


def test_keepsEveryOtherLine(tmp_path):
    users = tmp_path / "users"
    assert passwd("--users", str(users), "vera", "--password-stdin", password="first-password").returncode == 0
    vera = users.read_text()
    assert vera.endswith(":viewer\n"), "a new user is a viewer unless told otherwise"
    other = [
        "# Radiology accounts",
        "",
        "this line is broken and stays as it is",
        vera.strip().replace("vera:", "ben:", 1),
    ]
    users.write_text(vera + "\n".join(other) + "\n")
    result = passwd("--users", str(users), "vera", "--password-stdin", password="second-password")
    assert result.stdout == f"Changed the user vera (roles: viewer) in {users}.\n"
    lines = users.read_text().splitlines()
    assert lines[1:] == other
    assert lines[0].startswith("vera:") and lines[0] != vera.strip()
    assert verifyPassword("second-password", findUser(users, "vera").passwordHash)

    # A new password keeps the roles; --roles changes them.
    assert passwd("--users", str(users), "vera", "--roles", "uploader", "--password-stdin", password="third-password").returncode == 0
    assert findUser(users, "vera").roles == frozenset({"uploader"})
    assert passwd("--users", str(users), "vera", "--password-stdin", password="fourth-password").returncode == 0
    assert findUser(users, "vera").roles == frozenset({"uploader"})
    assert users.read_text().splitlines()[1:] == other


def test_prompt(tmp_path):
    users = tmp_path / "users"
    status, output = passwdAtTerminal(["--users", str(users), "ada", "--roles", "admin,viewer"], ["typed password", "typed password"])
    assert status == 0, output
    assert "New password for ada:" in output
    assert "typed password" not in output, "getpass does not echo"
    assert verifyPassword("typed password", findUser(users, "ada").passwordHash)
    assert findUser(users, "ada").roles == frozenset({"viewer", "admin"})


def test_promptedPasswordsMustMatch(tmp_path):
    users = tmp_path / "users"
    status, output = passwdAtTerminal(["--users", str(users), "ada"], ["one password", "another password"])
    assert status == 1
    assert "pacs-appliance passwd: the two passwords differ; nothing was changed" in output
    assert not users.exists()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["bad:name"], "'bad:name' is not a valid user name"),
        (["bad name"], "'bad name' is not a valid user name"),
        (["-dash"], None),
        (["vera", "--roles", "viewer,root"], "unknown role 'root' (roles: viewer, uploader, admin)"),
        (["vera", "--roles", ","], "no role given (roles: viewer, uploader, admin)"),
    ],
)
def test_refusesBadNamesAndRoles(tmp_path, arguments, message):
    users = tmp_path / "users"
    users.write_text("# nobody yet\n")
    result = passwd("--users", str(users), "--password-stdin", *arguments, password="good password")
    if message is None:
        # An option-like name is a usage error of the command line.
        assert result.returncode == 2
    else:
        assert result.returncode == 1
        assert result.stderr.startswith(f"pacs-appliance passwd: {message}"), result.stderr
    assert "Traceback" not in result.stderr
    assert users.read_text() == "# nobody yet\n"


def test_refusesShortOrMissingPasswords(tmp_path):
    users = tmp_path / "users"
    result = passwd("--users", str(users), "vera", "--password-stdin", password="short")
    assert result.returncode == 1
    assert result.stderr == "pacs-appliance passwd: a password needs at least 8 characters; nothing was changed\n"
    result = passwd("--users", str(users), "vera", "--password-stdin")
    assert result.returncode == 1
    assert result.stderr == "pacs-appliance passwd: there is no password on standard input\n"
    assert not users.exists()


def test_delete(tmp_path):
    users = tmp_path / "users"
    for name in ("vera", "ada"):
        passwd("--users", str(users), name, "--password-stdin", password="a password")
    result = passwd("--users", str(users), "vera", "--delete")
    assert (result.returncode, result.stdout) == (0, f"Deleted the user vera from {users}.\n")
    assert [line.split(":")[0] for line in users.read_text().splitlines()] == ["ada"]
    result = passwd("--users", str(users), "vera", "--delete")
    assert (result.returncode, result.stderr) == (1, f"pacs-appliance passwd: there is no user vera in {users}\n")


def test_usersFileOfTheConfiguration(tmp_path):
    users = tmp_path / "accounts" / "users"
    users.parent.mkdir()
    config = writeTestConfig(tmp_path, auth={"users_file": users})
    result = passwd("--config", str(config), "ada", "--roles", "admin", "--password-stdin", password="a password")
    assert result.returncode == 0, result.stderr
    assert findUser(users, "ada").roles == frozenset({"admin"})


def test_brokenConfigurationSaysToNameTheFile(tmp_path):
    config = tmp_path / "appliance.ini"
    config.write_text("[auth]\nusers_file =\n")
    result = passwd("--config", str(config), "ada", "--password-stdin", password="a password")
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"pacs-appliance passwd: the configuration {config} has problems (fix them, or name the users file with --users PATH):\n"
    )
    assert f"{config}: [auth] users_file: a path is required" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's group needs root")
def test_keepsOwnerAndGroup(tmp_path):
    """
    The packaged file is root:pacs-appliance, 0640: the daemon reads it
    through its group, which the new file must keep.
    """
    users = tmp_path / "users"
    users.write_text("")
    os.chown(users, 0, 65534)
    assert passwd("--users", str(users), "ada", "--password-stdin", password="a password").returncode == 0
    status = users.stat()
    assert (status.st_uid, status.st_gid, stat.S_IMODE(status.st_mode)) == (0, 65534, 0o640)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file a group needs root")
def test_newFileGetsTheGroupOfItsFolder(tmp_path):
    """
    A users file created by passwd (as root) gets the group of its folder,
    through which the daemon reads it, and nothing more is said.
    """
    folder = tmp_path / "pacs-appliance"
    folder.mkdir()
    os.chown(folder, 0, 65534)
    users = folder / "users"
    result = passwd("--users", str(users), "ada", "--password-stdin", password="a password")
    assert (result.returncode, result.stderr) == (0, "")
    status = users.stat()
    assert (status.st_uid, status.st_gid, stat.S_IMODE(status.st_mode)) == (0, 65534, 0o640)


@pytest.mark.skipif(os.geteuid() != 0, reason="a folder of the group root needs root")
def test_newFileOfTheGroupRootIsWarnedAbout(tmp_path):
    """
    In a folder of the group root (/etc/pacs-appliance of the package), the
    new file is root's only: one warning line says what to do.
    """
    folder = tmp_path / "pacs-appliance"
    folder.mkdir()
    os.chown(folder, 0, 0)
    users = folder / "users"
    result = passwd("--users", str(users), "ada", "--password-stdin", password="a password")
    assert result.returncode == 0
    assert result.stderr == (
        f"pacs-appliance passwd: warning: the new file {users} belongs to the group root: unless the daemon"
        f" runs as root, give it the daemon's group so that it can read it (for the package: chgrp"
        f" pacs-appliance {users})\n"
    )
    assert users.stat().st_gid == 0
    result = passwd("--users", str(users), "vera", "--password-stdin", password="a password")
    assert (result.returncode, result.stderr) == (0, ""), "said once, when the file is created"


def test_writesAtomically(tmp_path):
    """
    The file is replaced by a rename: a reader sees the old or the new file,
    and no temporary file is left behind.
    """
    users = tmp_path / "users"
    passwd("--users", str(users), "vera", "--password-stdin", password="a password")
    before = users.stat().st_ino
    passwd("--users", str(users), "ada", "--password-stdin", password="a password")
    assert users.stat().st_ino != before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["users"]


def test_unwritableFolder(tmp_path):
    result = passwd("--users", str(tmp_path / "missing" / "users"), "ada", "--password-stdin", password="a password")
    assert result.returncode == 1
    assert result.stderr == f"pacs-appliance passwd: cannot open the folder {tmp_path / 'missing'}: No such file or directory\n"


def test_accountsOfAClusterGoToItsDatabase(request, tmp_path):
    """
    With [database], passwd writes the account into the cluster's database
    (the tables created if need be), where every node reads it.
    """
    server = requirePostgres(pytest.skip)
    database = server.newDatabase(request.addfinalizer)
    config = writeTestConfig(tmp_path, database=database.section())
    added = passwd("--config", str(config), "ward-admin", "--roles", "admin", "--password-stdin", password="a long password")
    assert added.returncode == 0, added.stderr
    assert added.stdout == f"Added the user ward-admin (roles: admin) in the database {database.name} on 127.0.0.1.\n"
    [row] = server.sql("SELECT name || ' ' || roles || ' ' || password_hash FROM accounts", database.name).splitlines()
    name, roles, stored = row.split(" ")
    assert (name, roles) == ("ward-admin", "admin")
    assert verifyPassword("a long password", stored)
    assert not (tmp_path / "state").exists() or not list((tmp_path / "state").glob("users*")), "no users file written"
    changed = passwd("--config", str(config), "ward-admin", "--password-stdin", password="another password")
    assert changed.stdout.startswith("Changed the user ward-admin (roles: admin)"), changed.stdout
    deleted = passwd("--config", str(config), "ward-admin", "--delete")
    assert deleted.returncode == 0, deleted.stderr
    assert server.sql("SELECT count(*) FROM accounts", database.name).strip() == "0"
    missing = passwd("--config", str(config), "ward-admin", "--delete")
    assert (missing.returncode, missing.stderr) == (
        1,
        f"pacs-appliance passwd: there is no user ward-admin in the database {database.name} on 127.0.0.1\n",
    )


def test_anUnreachableDatabaseIsSaid(tmp_path):
    password = tmp_path / "password"
    password.write_text("secret\n")
    config = writeTestConfig(
        tmp_path, database={"host": "127.0.0.1", "port": freePort(), "ssl_mode": "disable", "password_file": password}
    )
    result = passwd("--config", str(config), "someone", "--password-stdin", password="a long password")
    assert result.returncode == 1
    assert result.stderr.startswith("pacs-appliance passwd: cannot reach the database: connection failed"), result.stderr
    assert "Traceback" not in result.stderr
