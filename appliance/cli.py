"""
The C{pacs-appliance} command: C{run}, C{check-config}, C{passwd}, C{version},
C{firewall}, C{move-archive}, C{backup}, C{restore} and C{verify}.

C{run} starts the same service as C{twistd -n pacs-appliance}, but hands twistd
the service maker directly: plugin discovery walks the file system, which a frozen
binary does not have (Tahoe-LAFS's C{tahoe run} does the same).
"""

import getopt
import getpass
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Union

from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage
from twisted.scripts import twistd

import appliance
from appliance.compat import runTwistd
from appliance.backup.manifest import BackupFailed
from appliance.backup.restore import restoreCommand, verifyCommand
from appliance.backup.take import backupCommand
from appliance.config import DEFAULT_CONFIG_PATH, Config, ConfigError, DatabaseSection, loadConfig
from appliance.orthanc.firewall import FirewallError, OrthancFirewall, removeEveryTable
from appliance.orthanc.move import DEFAULT_PARALLEL, MoveFailed, moveArchive
from appliance.orthanc.settings import orthancHome
from appliance.plugin import serviceMaker
from appliance.preflight import loadChecked
from appliance.secretfiles import readSecret
from appliance.state.database import DatabaseUnavailable, interactOnce
from appliance.web.passwords import hashPassword
from appliance.web.sharedaccounts import findAccount, removeAccount, writeAccount
from appliance.web.users import (
    UserEntry,
    UsersFileError,
    checkUserName,
    deleteUser,
    findUser,
    formatRoles,
    parseRoles,
    setUser,
)

#: The shortest password C{passwd} accepts.
MIN_PASSWORD_LENGTH = 8


class _ConfigOption(usage.Options):
    optParameters = [
        ["config", "c", str(DEFAULT_CONFIG_PATH), "The appliance's main configuration file."],
    ]


class _OptionsAfterArguments(_ConfigOption):
    """
    Options that may also follow the arguments, as the documented command
    lines write them (C{passwd admin --roles admin}, C{firewall apply
    --config PATH}): twisted.python.usage's getopt would take them for
    arguments.
    """

    def parseOptions(self, options: Optional[List[str]] = None) -> None:
        options = sys.argv[1:] if options is None else options
        try:
            pairs, arguments = getopt.gnu_getopt(options, self.shortOpt, self.longOpt)
        except getopt.error as error:
            raise usage.UsageError(str(error))
        valued = {"--" + name[:-1] for name in self.longOpt if name.endswith("=")}
        valued |= {"-" + letter for letter, after in zip(self.shortOpt, self.shortOpt[1:] + " ") if after == ":"}
        ordered: List[str] = []
        for option, value in pairs:
            ordered += [option, value] if option in valued else [option]
        super().parseOptions(ordered + ["--"] + arguments)


class RunOptions(_ConfigOption):
    synopsis = "[--config PATH]"


class CheckConfigOptions(_ConfigOption):
    synopsis = "[--config PATH]"


class VersionOptions(_ConfigOption):
    synopsis = "[--config PATH]"


class FirewallOptions(_OptionsAfterArguments):
    synopsis = "apply|remove|restore [--config PATH]"

    def parseArgs(self, action: str) -> None:
        if action not in ("apply", "remove", "restore"):
            raise usage.UsageError(f"{action!r} is not apply, remove or restore")
        self["action"] = action


class PasswdOptions(_OptionsAfterArguments):
    synopsis = "[--config PATH] [--users PATH] [--roles ROLES] [--password-stdin | --delete] USER"
    optFlags = [
        ["password-stdin", None, "Read the password from the first line of standard input (no prompt)."],
        ["delete", None, "Delete the user instead."],
    ]
    optParameters = [
        [
            "users",
            "u",
            None,
            "The users file (default: where the configuration keeps accounts: the database of [database],"
            " else [auth] users_file).",
        ],
        [
            "roles",
            "r",
            None,
            "The roles, separated by commas: viewer, uploader, admin (default: the user's"
            " current roles, or viewer for a new user).",
        ],
    ]

    def parseArgs(self, user: str) -> None:
        self["user"] = user

    def postOptions(self) -> None:
        if self["delete"] and (self["roles"] is not None or self["password-stdin"]):
            raise usage.UsageError("--delete takes neither --roles nor --password-stdin")


class MoveArchiveOptions(_ConfigOption):
    synopsis = "[--config PATH] [--from FOLDER] [--from-storage FOLDER] [--parallel N]"
    optParameters = [
        ["from", None, None, "The old Orthanc folder, which holds index/ (default: state_dir/orthanc)."],
        ["from-storage", None, None, "The old storage folder (default: storage/ in the old Orthanc folder)."],
        ["parallel", None, DEFAULT_PARALLEL, "How many instances are copied at once.", int],
    ]

    def postOptions(self) -> None:
        if self["parallel"] < 1:
            raise usage.UsageError("--parallel must be at least 1")


class BackupOptions(_OptionsAfterArguments):
    synopsis = "[--config PATH] DEST"

    def parseArgs(self, destination: str) -> None:
        self["destination"] = destination


class RestoreOptions(_OptionsAfterArguments):
    synopsis = "[--config PATH] SRC"

    def parseArgs(self, source: str) -> None:
        self["source"] = source


class VerifyOptions(_OptionsAfterArguments):
    synopsis = "SRC"

    def parseArgs(self, source: str) -> None:
        self["source"] = source


class CommandLine(usage.Options):
    synopsis = "pacs-appliance COMMAND [options]"
    subCommands = [
        ["run", None, RunOptions, "Run the daemon in the foreground, logging to stdout."],
        ["check-config", None, CheckConfigOptions, "Check the configuration; exit 1 on any problem."],
        ["passwd", None, PasswdOptions, "Set a user's password and roles in the users file, or delete the user."],
        ["version", None, VersionOptions, "Print the versions of the appliance and what it runs."],
        [
            "firewall",
            None,
            FirewallOptions,
            "Close Orthanc's ports to other hosts (apply), open them again (remove), or close them again"
            " after the box's firewall was reloaded (restore); needs root.",
        ],
        [
            "move-archive",
            None,
            MoveArchiveOptions,
            "Move a single box's archive (Orthanc's SQLite index and its files) into the PostgreSQL of"
            " [database]; run it again to go on after an interruption.",
        ],
        [
            "backup",
            None,
            BackupOptions,
            "Back up the archive, the configuration, the audit trail and the accounts into a new folder of DEST,"
            " while the appliance serves (what the previous backup there holds is linked, not copied).",
        ],
        [
            "restore",
            None,
            RestoreOptions,
            "Restore a backup (SRC: a backup's folder, or the newest in a folder of backups) onto a freshly"
            " installed appliance, whose state folder is empty.",
        ],
        ["verify", None, VerifyOptions, "Check every file of a backup against its manifest, without restoring it."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError(
                "give a command: run, check-config, passwd, version, firewall, move-archive, backup, restore or verify"
            )


class ApplianceServerOptions(twistd.ServerOptions):
    """
    twistd's options, with the appliance's service maker as the only
    command: no plugin scan (as Tahoe-LAFS runs its node).
    """

    # Both public attributes of twistd's options (loadedPlugins is what the
    # runner makes the service with); the options are read only when parsed.
    subCommands = [(serviceMaker.tapname, None, lambda: serviceMaker.options(), serviceMaker.description)]
    loadedPlugins = {serviceMaker.tapname: serviceMaker}


def run(configPath: str) -> int:
    options = ApplianceServerOptions()
    try:
        options.parseOptions(
            [
                "--nodaemon",
                "--pidfile=",
                "--logger=appliance.logs.observer",
                serviceMaker.tapname,
                "--config",
                configPath,
            ]
        )
    except usage.UsageError as error:
        print(f"pacs-appliance: {error}", file=sys.stderr)
        return 1
    # twistd.runApp would end the process with the signal that stopped the
    # reactor; for the appliance, SIGTERM and SIGINT are the normal way to stop
    # and a clean stop exits 0.
    try:
        runTwistd(options)
    except (CannotListenError, FirewallError) as error:
        # Raised by a service's start, before the reactor runs: a port taken,
        # or Orthanc's ports that could not be closed.  The operator's
        # business, in one sentence (logging has started: it goes there).
        Logger(namespace="appliance.cli").critical("The appliance cannot start: {error}", error=str(error))
        return 1
    return 0


def loadOrReport(configPath: str) -> Optional[Config]:
    """
    The configuration at C{configPath}, or L{None} once each of its
    problems is printed on standard error.
    """
    try:
        return loadChecked(Path(configPath))
    except ConfigError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return None


def checkConfig(configPath: str) -> int:
    config = loadOrReport(configPath)
    if config is None:
        return 1
    print(f"{', '.join(str(path) for path in config.sources)}: OK")
    # Warnings, not problems: the directory may be down while the box boots.
    for warning in identityWarnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def identityWarnings(config: Config) -> List[str]:
    """
    What is wrong with the directory's servers and the single sign-on's
    provider as the appliance reaches them now (blocking).
    """
    warnings = []
    if config.ldap.url and config.ldap.bind_password_file is not None:
        from appliance.web.directory import Directory

        directory = Directory(config.ldap, readSecret(config.ldap.bind_password_file))
        warnings.extend(f"{config.where('ldap', 'url')}: {problem}" for problem in directory.probe())
    if config.oidc.issuer:
        problem = _discoveryProblem(config.oidc)
        if problem is not None:
            warnings.append(f"{config.where('oidc', 'issuer')}: {problem}")
    return warnings


def _discoveryProblem(section) -> Optional[str]:
    import json
    import ssl
    import urllib.request

    context = ssl.create_default_context(cafile=str(section.ca_file) if section.ca_file is not None else None)
    url = section.issuer.rstrip("/") + "/.well-known/openid-configuration"
    try:
        with urllib.request.urlopen(url, timeout=section.timeout, context=context) as answer:
            document = json.load(answer)
    except (OSError, ValueError) as error:
        return f"the provider's discovery document {url} cannot be read ({error})"
    if not isinstance(document, dict) or document.get("issuer") != section.issuer:
        return f"{url} names another issuer than {section.issuer}"
    return None


class PasswdError(Exception):
    """
    The passwd command cannot go on; the message says why, in one sentence.
    """


class _UsersFileAccounts:
    """
    The accounts of a users file, for passwd.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)

    def find(self, name: str) -> Optional[UserEntry]:
        return findUser(self.path, name)

    def set(self, entry: UserEntry) -> bool:
        return setUser(self.path, entry)

    def delete(self, name: str) -> bool:
        return deleteUser(self.path, name)


class _DatabaseAccounts:
    """
    The accounts of a cluster's database ([database]), for passwd: every
    node reads them again within a few seconds.
    """

    def __init__(self, section: DatabaseSection) -> None:
        self._section = section
        self.where = f"the database {section.name} on {section.host}"

    def find(self, name: str) -> Optional[UserEntry]:
        return interactOnce(self._section, findAccount, name)

    def set(self, entry: UserEntry) -> bool:
        return interactOnce(self._section, writeAccount, entry, time.time())

    def delete(self, name: str) -> bool:
        return interactOnce(self._section, removeAccount, name)


def _accounts(options: PasswdOptions) -> Union[_UsersFileAccounts, _DatabaseAccounts]:
    """
    Where passwd writes: the users file given, else where the configuration
    keeps its accounts.
    """
    if options["users"] is not None:
        return _UsersFileAccounts(Path(options["users"]))
    try:
        config = loadConfig(Path(options["config"]))
    except ConfigError as error:
        raise PasswdError(
            f"the configuration {options['config']} has problems (fix them, or name the"
            " users file with --users PATH):\n" + "\n".join(error.problems)
        ) from None
    if config.database.host:
        return _DatabaseAccounts(config.database)
    return _UsersFileAccounts(config.auth.users_file)


def _readPassword(name: str, fromStandardInput: bool) -> str:
    if fromStandardInput:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise PasswdError("there is no password on standard input")
    else:
        try:
            password = getpass.getpass(f"New password for {name}: ")
            again = getpass.getpass("The same password again: ")
        except (EOFError, KeyboardInterrupt):
            raise PasswdError("no password was given; nothing was changed") from None
        if password != again:
            raise PasswdError("the two passwords differ; nothing was changed")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise PasswdError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters; nothing was changed")
    return password


def passwd(options: PasswdOptions) -> int:
    """
    Set the password (and roles) of a user where the configuration keeps
    accounts (the users file, every other line staying as it was, or a
    cluster's database), or delete the user.  The running daemons read the
    accounts again by themselves.
    """
    name = options["user"]
    try:
        checkUserName(name)
        roles = parseRoles(options["roles"]) if options["roles"] is not None else None
    except ValueError as error:
        print(f"pacs-appliance passwd: {error}", file=sys.stderr)
        return 1
    try:
        accounts = _accounts(options)
        if options["delete"]:
            if not accounts.delete(name):
                raise PasswdError(f"there is no user {name} in {accounts.where}")
            print(f"Deleted the user {name} from {accounts.where}.")
            return 0
        if roles is None:
            existing = accounts.find(name)
            roles = existing.roles if existing is not None else frozenset({"viewer"})
        password = _readPassword(name, options["password-stdin"])
        created = isinstance(accounts, _UsersFileAccounts) and not accounts.path.exists()
        replaced = accounts.set(UserEntry(name, hashPassword(password), roles))
    except (PasswdError, UsersFileError, DatabaseUnavailable) as error:
        print(f"pacs-appliance passwd: {error}", file=sys.stderr)
        return 1
    print(f"{'Changed' if replaced else 'Added'} the user {name} (roles: {formatRoles(roles)}) in {accounts.where}.")
    if created and isinstance(accounts, _UsersFileAccounts) and accounts.path.stat().st_gid == 0:
        path = accounts.path
        # A new file has the group of its folder (appliance.web.users).
        print(
            f"pacs-appliance passwd: warning: the new file {path} belongs to the group root: unless the"
            f" daemon runs as root, give it the daemon's group so that it can read it (for the package:"
            f" chgrp pacs-appliance {path})",
            file=sys.stderr,
        )
    return 0


def firewall(configPath: str, action: str) -> int:
    """
    The nftables rules that close Orthanc's ports to other hosts, as root:
    apply them (the unit's C{ExecStartPre=+}), remove them (its
    C{ExecStopPost=+}), or restore those a running appliance recorded (after
    the box's own firewall has flushed them: the nftables.service drop-in).
    """
    config = loadOrReport(configPath)
    try:
        if config is None:
            if action != "remove":
                return 1
            # Stopping must not leave the rules behind for a broken file.
            removed = removeEveryTable()
            print(f"Could not read the configuration: removed every appliance's rules ({', '.join(removed) or 'none'}).")
            return 0
        rules = OrthancFirewall.fromConfig(config)
        if action == "apply":
            if not config.orthanc.firewall:
                print("[orthanc] firewall = no: Orthanc's ports are left to this box's own firewall.")
                return 0
            rules.apply()
            print(f"Orthanc's ports {rules.httpPort} and {rules.dicomPort} are closed to other hosts"
                  f" (nftables table inet {rules.table}).")
        elif action == "remove":
            rules.remove()
            print(f"Removed the rules on Orthanc's ports {rules.httpPort} and {rules.dicomPort}.")
        else:
            restored = rules.restore()
            if restored is None:
                print("No appliance has recorded rules on Orthanc's ports: nothing to restore.")
            else:
                print(f"Orthanc's ports {restored.httpPort} and {restored.dicomPort} are closed to other hosts"
                      f" again (nftables table inet {restored.table}).")
    except FirewallError as error:
        print(f"pacs-appliance firewall: {error}", file=sys.stderr)
        return 1
    return 0


def orthancVersion(configPath: str) -> str:
    try:
        executable = loadConfig(Path(configPath)).orthanc.executable
    except ConfigError:
        executable = Path("/usr/sbin/Orthanc")
    try:
        result = subprocess.run(
            [str(executable), "--version"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unavailable ({executable}: {error})"
    first = (result.stdout or result.stderr).strip().splitlines()
    return first[0] if first else f"unavailable ({executable} printed nothing)"


def version(configPath: str) -> int:
    import OpenSSL
    import twisted
    from OpenSSL import SSL

    openssl = SSL.SSLeay_version(SSL.OPENSSL_VERSION).decode("ascii")
    print(f"pacs-appliance {appliance.__version__}")
    print(f"Python {platform.python_version()}")
    print(f"Twisted {twisted.__version__}")
    print(f"pyOpenSSL {OpenSSL.__version__}, {openssl}")
    print(orthancVersion(configPath))
    return 0


def moveArchiveCommand(options: MoveArchiveOptions) -> int:
    config = loadOrReport(options["config"])
    if config is None:
        return 1
    oldHome = Path(options["from"]) if options["from"] else orthancHome(config)
    oldStorage = Path(options["from-storage"]) if options["from-storage"] else oldHome / "storage"
    try:
        return moveArchive(config, oldHome.absolute(), oldStorage.absolute(), options["parallel"])
    except MoveFailed as error:
        print(f"pacs-appliance: {error}", file=sys.stderr)
        return 1


def backupCommands(command: str, options: usage.Options) -> int:
    """
    C{backup}, C{restore} and C{verify}.
    """
    try:
        if command == "verify":
            return verifyCommand(Path(options["source"]).absolute())
        if command == "restore":
            return restoreCommand(Path(options["config"]).absolute(), Path(options["source"]).absolute())
        config = loadOrReport(options["config"])
        if config is None:
            return 1
        return backupCommand(config, Path(options["destination"]).absolute())
    except BackupFailed as error:
        print(f"pacs-appliance {command}: {error}", file=sys.stderr)
        return 1


def main(argv: Optional[List[str]] = None) -> int:
    commandLine = CommandLine()
    try:
        commandLine.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as error:
        print(f"{commandLine}\npacs-appliance: {error}", file=sys.stderr)
        return 2
    command = commandLine.subCommand
    configPath = commandLine.subOptions["config"]
    if command == "run":
        return run(configPath)
    if command == "check-config":
        return checkConfig(configPath)
    if command == "passwd":
        return passwd(commandLine.subOptions)
    if command == "firewall":
        return firewall(configPath, commandLine.subOptions["action"])
    if command == "move-archive":
        return moveArchiveCommand(commandLine.subOptions)
    if command in ("backup", "restore", "verify"):
        return backupCommands(command, commandLine.subOptions)
    return version(configPath)


if __name__ == "__main__":
    sys.exit(main())
