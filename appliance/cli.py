"""
The C{pacs-appliance} command: C{run}, C{check-config} and C{version}.

C{run} starts the same service as C{twistd -n pacs-appliance}, but hands twistd
the service maker directly: plugin discovery walks the file system, which a frozen
binary does not have (Tahoe-LAFS's C{tahoe run} does the same).
"""

import platform
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from twisted.python import usage
from twisted.scripts import twistd

import appliance
from appliance.config import DEFAULT_CONFIG_PATH, ConfigError, loadConfig
from appliance.service import serviceMaker


class _ConfigOption(usage.Options):
    optParameters = [
        ["config", "c", str(DEFAULT_CONFIG_PATH), "The appliance's main configuration file."],
    ]


class RunOptions(_ConfigOption):
    synopsis = "[--config PATH]"


class CheckConfigOptions(_ConfigOption):
    synopsis = "[--config PATH]"


class VersionOptions(_ConfigOption):
    synopsis = "[--config PATH]"


class CommandLine(usage.Options):
    synopsis = "pacs-appliance COMMAND [options]"
    subCommands = [
        ["run", None, RunOptions, "Run the daemon in the foreground, logging to stdout."],
        ["check-config", None, CheckConfigOptions, "Check the configuration; exit 1 on any problem."],
        ["version", None, VersionOptions, "Print the versions of the appliance and what it runs."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("give a command: run, check-config or version")


class ApplianceServerOptions(twistd.ServerOptions):
    """
    twistd's options, with the appliance's service maker as the only plugin.
    """

    def _getPlugins(self, interface):
        return [serviceMaker]


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
    twistd._SomeApplicationRunner(options).run()
    return 0


def checkConfig(configPath: str) -> int:
    try:
        config = loadConfig(Path(configPath))
    except ConfigError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return 1
    print(f"{', '.join(str(path) for path in config.sources)}: OK")
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
    return version(configPath)


if __name__ == "__main__":
    sys.exit(main())
