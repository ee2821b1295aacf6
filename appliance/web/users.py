"""
The users file: one account a line, and the daemon's copy of it, read again
whenever the file changes.

    # comments and blank lines are allowed
    NAME:HASH:ROLES          admin:scrypt$ln=15$r=8$p=1$<salt>$<key>:admin

HASH is a password hash of L{appliance.web.passwords}; ROLES a
comma-separated list from L{appliance.web.accounts.ROLES}.  The file is
written by C{pacs-appliance passwd} (see L{setUser}, L{deleteUser}):
atomically, keeping every other line as it was.
"""

import errno
import fcntl
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, FrozenSet, List, Mapping, Optional, Tuple

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from appliance.web.accounts import ROLES, Account, IAccountStore
from appliance.web.passwords import DEFAULT_PARAMETERS, PasswordHash, PasswordHashError, commonParameters, dummyHash


#: A user name: letters, digits and a few separators (e-mail addresses fit),
#: never a colon (the field separator) nor white space.
USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")

#: The users file is small (a line a user); anything larger is not one, and
#: the cap keeps its synchronous read short.
MAX_FILE_SIZE = 1024 * 1024

#: How often the daemon looks at the file's metadata for a change.
CHECK_INTERVAL = 2.0


class UsersFileError(Exception):
    """
    The users file cannot be read or written; the message says why.
    """


def parseRoles(text: str) -> FrozenSet[str]:
    """
    The roles of a comma-separated list.

    @raise ValueError: with a sentence, if a role is unknown or none is given.
    """
    roles = [role.strip() for role in text.split(",") if role.strip()]
    if not roles:
        raise ValueError(f"no role given (roles: {', '.join(ROLES)})")
    unknown = [role for role in roles if role not in ROLES]
    if unknown:
        raise ValueError(f"unknown role {unknown[0]!r} (roles: {', '.join(ROLES)})")
    return frozenset(roles)


def formatRoles(roles: FrozenSet[str]) -> str:
    return ",".join(role for role in ROLES if role in roles)


def checkUserName(name: str) -> None:
    """
    @raise ValueError: with a sentence, if C{name} cannot be a user name.
    """
    if not USER_NAME.fullmatch(name):
        raise ValueError(
            f"{name!r} is not a valid user name (1 to 64 letters, digits, '.', '_', '@',"
            " '+' or '-', starting with a letter or a digit)"
        )


@dataclass(frozen=True)
class UserEntry:
    """
    One valid line of the users file.
    """

    name: str
    passwordHash: str
    roles: FrozenSet[str]

    @property
    def account(self) -> Account:
        return Account(self.name, self.roles)

    def line(self) -> str:
        return f"{self.name}:{self.passwordHash}:{formatRoles(self.roles)}"


def parseLine(line: str) -> Optional[UserEntry]:
    """
    The user on C{line}, or L{None} for a comment or a blank line.

    @raise ValueError: with a sentence, if the line is malformed.
    """
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    fields = stripped.split(":")
    if len(fields) != 3:
        raise ValueError("a user line is NAME:HASH:ROLES")
    name, passwordHash, roles = fields
    checkUserName(name)
    try:
        PasswordHash.parse(passwordHash)
    except PasswordHashError as error:
        raise ValueError(f"the password hash of {name!r} is unusable: {error}") from None
    return UserEntry(name, passwordHash, parseRoles(roles))


def parseUsers(text: str) -> Tuple[Dict[str, UserEntry], List[Tuple[int, str]]]:
    """
    The users of a users file's C{text}, and the number of each malformed
    line with what is wrong with it: such a line is skipped, so the others
    keep working.
    """
    users: Dict[str, UserEntry] = {}
    problems: List[Tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            entry = parseLine(line)
        except ValueError as error:
            problems.append((number, str(error)))
            continue
        if entry is None:
            continue
        if entry.name in users:
            problems.append((number, f"the user {entry.name!r} is already on an earlier line"))
            continue
        users[entry.name] = entry
    return users, problems


def readUsers(path: Path, log: Logger) -> Optional[Dict[str, UserEntry]]:
    """
    The users of the users file, or L{None} if there is none; each malformed
    line is logged (with the file's name and the line number) and skipped.

    @raise UsersFileError: if the file is unreadable or is not a users file:
        not text, or not a single valid user line among its lines (garbage,
        or another file in its place), which is refused whole rather than
        read as no user at all.
    """
    text = readUsersText(path)
    if text is None:
        return None
    users, problems = parseUsers(text)
    if problems and not users:
        number, problem = problems[0]
        more = len(problems) - 1
        others = f"; {more} other malformed line{'s' if more > 1 else ''}" if more else ""
        raise UsersFileError(f"{path} holds no valid user line (line {number}: {problem}{others}): it is not a users file")
    for number, problem in problems:
        log.error("{source}, line {number}: skipped, {problem}", source=str(path), number=number, problem=problem)
    return users


def readUsersText(path: Path) -> Optional[str]:
    """
    The text of the users file, or L{None} if there is none.

    @raise UsersFileError: if the file exists but is unreadable, too large,
        or not text.
    """
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_FILE_SIZE + 1)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise UsersFileError(f"cannot read {path}: {error.strerror}") from None
    if len(data) > MAX_FILE_SIZE:
        raise UsersFileError(f"{path} is larger than {MAX_FILE_SIZE // 1024} KiB: it is not a users file")
    if b"\0" in data:
        raise UsersFileError(f"{path} contains NUL bytes: it is not a users file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsersFileError(f"{path} is not UTF-8 text") from None


# --- writing (pacs-appliance passwd) ----------------------------------------


def _lineUser(line: str) -> Optional[str]:
    """
    The user name a line is about, whether or not the rest of it is valid.
    """
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    return stripped.split(":", 1)[0]


def _rewrite(path: Path, change: Callable[[List[str]], Optional[List[str]]]) -> None:
    """
    Replace the users file with C{change} applied to its lines (L{None}:
    nothing to write), atomically
    (a temporary file renamed over it), keeping its owner and group, mode
    0640; a new file gets the group of its folder.  Another C{passwd} waits:
    the folder is locked for the change.

    @raise UsersFileError: with a sentence.
    """
    folder = path.parent
    try:
        lock = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as error:
        raise UsersFileError(f"cannot open the folder {folder}: {error.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = readUsersText(path)
        lines = change(text.splitlines() if text else [])
        if lines is None:
            return
        try:
            status = os.stat(path)
            owner, group, new = status.st_uid, status.st_gid, False
        except FileNotFoundError:
            # The folder may be root:pacs-appliance, like the packaged file.
            owner, group, new = -1, os.fstat(lock).st_gid, True
        _replace(path, "".join(line + "\n" for line in lines), owner, group, new)
        os.fsync(lock)
    finally:
        os.close(lock)


def _replace(path: Path, text: str, owner: int, group: int, new: bool) -> None:
    try:
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as error:
        raise UsersFileError(f"cannot write in {path.parent}: {error.strerror}") from None
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            os.fchmod(stream.fileno(), 0o640)
            # The daemon reads the file through its group (root:pacs-appliance).
            os.fchown(stream.fileno(), owner, group)
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except OSError as error:
        os.unlink(temporary)
        if error.errno == errno.EPERM:
            wanted = "the group of its folder" if new else "its owner and group"
            raise UsersFileError(f"cannot give {path} {wanted} (run the command as root)") from None
        raise UsersFileError(f"cannot write {path}: {error.strerror}") from None


def findUser(path: Path, name: str) -> Optional[UserEntry]:
    """
    The valid line of user C{name} in the users file, if there is one.

    @raise UsersFileError: if the file cannot be read.
    """
    text = readUsersText(path) or ""
    for line in text.splitlines():
        if _lineUser(line) == name:
            try:
                return parseLine(line)
            except ValueError:
                return None
    return None


def setUser(path: Path, entry: UserEntry) -> bool:
    """
    Write C{entry} into the users file: in place of the user's line (valid
    or not) if there is one, else at the end.  Every other line stays as it
    was.  Returns whether the user was already there.

    @raise UsersFileError: with a sentence.
    """
    found = False

    def change(lines: List[str]) -> List[str]:
        nonlocal found
        result = []
        for line in lines:
            if _lineUser(line) == entry.name:
                if not found:
                    result.append(entry.line())
                found = True
            else:
                result.append(line)
        if not found:
            result.append(entry.line())
        return result

    _rewrite(path, change)
    return found


def deleteUser(path: Path, name: str) -> bool:
    """
    Remove every line of user C{name}; returns whether there was one (the
    file is left untouched if not).

    @raise UsersFileError: with a sentence.
    """
    found = False

    def change(lines: List[str]) -> Optional[List[str]]:
        nonlocal found
        kept = [line for line in lines if _lineUser(line) != name]
        found = len(kept) != len(lines)
        return kept if found else None

    _rewrite(path, change)
    return found


# --- the daemon's copy ------------------------------------------------------


_Signature = Tuple[int, int, int, int, int]


def _signature(status: os.stat_result) -> _Signature:
    # The inode catches a rename over the file (passwd), the change time a
    # rewrite in place within the same modification time.
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)


@implementer(IAccountStore)
class AccountEntries:
    """
    The accounts a daemon holds, by name (read from the users file, or from
    a cluster's database), and who is told when they change.

    C{dummyHash} is what an unknown user's password is checked against: a
    hash with the scrypt parameters most users have (L{commonParameters}),
    so that an unknown name costs what most known ones do, whatever
    parameters were the default when their passwords were set.
    """

    log = Logger()

    def __init__(self) -> None:
        self._users: Dict[str, UserEntry] = {}
        self.dummyHash = dummyHash(DEFAULT_PARAMETERS)
        self._listeners: List[Callable[[FrozenSet[str]], None]] = []

    @property
    def users(self) -> Mapping[str, UserEntry]:
        return self._users

    def lookup(self, name: str) -> Optional[UserEntry]:
        return self._users.get(name)

    def subscribe(self, listener: Callable[[FrozenSet[str]], None]) -> None:
        """
        Call C{listener} with the names whose account changed or went away,
        after each read that changed any.
        """
        self._listeners.append(listener)

    def _replace(self, users: Dict[str, UserEntry]) -> FrozenSet[str]:
        """
        Hold C{users} from now on; tell the listeners, and return, the names
        whose account changed or went away.
        """
        changed = frozenset(name for name, entry in self._users.items() if users.get(name) != entry)
        self._users = users
        self.dummyHash = dummyHash(commonParameters(entry.passwordHash for entry in users.values()))
        if changed:
            for listener in self._listeners:
                try:
                    listener(changed)
                except Exception:
                    self.log.failure("Could not apply the change of accounts {users}", users=", ".join(sorted(changed)))
        return changed


class UsersFile(Service, AccountEntries):
    """
    The accounts of the users file, read at construction (so they are there
    before any listener starts) and again when it changes: its metadata is
    checked every C{interval} seconds while the service runs, and
    L{reload} (SIGHUP) reads it whatever the metadata says.

    The file is read in the reactor thread: it is a local file, read up to
    L{MAX_FILE_SIZE} and refused if it holds more (a few KiB in practice), so
    the read is as short as a stat, and reading synchronously keeps changes in
    order (no two reads can finish out of turn).

    A missing file means no users.  A file that cannot be read or is not a
    users file (L{readUsers}) keeps the previous accounts in force, said in
    one log line.  Listeners given to
    L{subscribe} learn the names whose line changed or went away.
    """

    log = Logger()

    def __init__(self, path: Path, reactor=None, interval: float = CHECK_INTERVAL) -> None:
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        AccountEntries.__init__(self)
        self.path = path
        self._interval = interval
        self._signature: Optional[_Signature] = None
        self._checking = LoopingCall(self.check)
        self._checking.clock = reactor
        self._read(starting=True)

    def startService(self) -> None:
        Service.startService(self)
        self._checking.start(self._interval, now=False).addErrback(
            lambda failure: self.log.failure("Stopped watching {path}", failure, path=str(self.path))
        )

    def stopService(self) -> None:
        Service.stopService(self)
        if self._checking.running:
            self._checking.stop()

    def check(self) -> None:
        """
        Read the file again if its metadata changed.
        """
        if self._currentSignature() != self._signature:
            self._read()

    def reload(self) -> None:
        """
        Read the file again now (SIGHUP).
        """
        self._read()

    def _currentSignature(self) -> Optional[_Signature]:
        try:
            return _signature(os.stat(self.path))
        except OSError:
            return None

    def _read(self, starting: bool = False) -> None:
        signature = self._currentSignature()
        try:
            users = readUsers(self.path, self.log)
        except UsersFileError as error:
            self._signature = signature
            if starting:
                self.log.error("{problem}: nobody can log in until it is fixed", problem=str(error))
            else:
                self.log.error(
                    "{problem}: the {count} users read before stay in force", problem=str(error), count=len(self._users)
                )
            return
        self._signature = signature
        if users is None:
            users = {}
            self.log.warn(
                "There is no users file {path}: nobody can log in. Create the first"
                " administrator with: pacs-appliance passwd admin --roles admin",
                path=str(self.path),
            )
        elif users:
            self.log.info("Read {count} users from {path}", count=len(users), path=str(self.path))
        else:
            self.log.warn(
                "The users file {path} holds no user: nobody can log in. Create the"
                " first administrator with: pacs-appliance passwd admin --roles admin",
                path=str(self.path),
            )
        self._replace(users)
