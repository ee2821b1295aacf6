"""
Keeping other hosts off Orthanc's ports: nftables rules that refuse, at the
packet level, every TCP connection to Orthanc's HTTP and DICOM ports that does
not come through the loopback interface.

Orthanc 1.10 has no bind address: both its ports listen on every interface,
and its own host checks act only once a request or an association has been
sent, so an idle connection from another host holds one of its threads
(measured: one to its DICOM port held every association for about 30 s).
The rules live in an nftables table of their own, named after the
ports, which changes nothing else of the box's firewall:

    table inet pacs_appliance_orthanc_8042_4242 {
        chain input {
            type filter hook input priority filter - 10; policy accept;
            iif != "lo" tcp dport { 8042, 4242 } counter reject with tcp reset
        }
    }

A refused connection gets a TCP reset at once: the other host learns nothing
it could not learn from a closed port, and nothing of it reaches Orthanc.

Applying them takes CAP_NET_ADMIN.  The unit applies them as root before the
daemon starts (C{pacs-appliance firewall apply}, its C{ExecStartPre=+}) and
removes them once it has stopped (C{firewall remove}, C{ExecStopPost=+}); the
daemon, which keeps only CAP_NET_BIND_SERVICE, finds the record of them in its
runtime folder.  A daemon that has CAP_NET_ADMIN itself (C{pacs-appliance run}
as root) applies them around Orthanc's life (L{OrthancPortGuard}).
"""

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.logger import Logger

from appliance.config import Config

#: Debian's nftables command line (package nftables).
NFT = Path("/usr/sbin/nft")

#: The record of the rules in force, in [appliance] runtime_dir: written by
#: whoever applied them, read by the daemon, removed with them.
RECORD_NAME = "orthanc-firewall.json"

#: The appliance's tables: this, then Orthanc's HTTP and DICOM ports.
TABLE_PREFIX = "pacs_appliance_orthanc_"

#: The capability nftables asks for (linux/capability.h).
CAP_NET_ADMIN = 12

#: How long nft may take; it answers in milliseconds.
NFT_TIMEOUT = 30


class FirewallError(Exception):
    """
    The rules could not be applied or removed; the message says why and what
    to do, in a sentence.
    """


@dataclass(frozen=True)
class OrthancFirewall:
    """
    The rules that close Orthanc's ports of C{config} to other hosts, and
    their record in C{runtimeDir}.

    The record names the ports only: root reads it back (to remove or
    restore the rules) from a folder that the daemon's user owns, so nothing
    in it may become a word of an nft command, and it is written without
    following a link that user could have left there.
    """

    httpPort: int
    dicomPort: int
    runtimeDir: Path

    @classmethod
    def fromConfig(cls, config: Config) -> "OrthancFirewall":
        return cls(config.orthanc.http_port, config.orthanc.dicom_port, config.appliance.runtime_dir)

    @property
    def ports(self) -> Tuple[int, int]:
        return (self.httpPort, self.dicomPort)

    @property
    def table(self) -> str:
        return f"{TABLE_PREFIX}{self.httpPort}_{self.dicomPort}"

    @property
    def recordPath(self) -> Path:
        return self.runtimeDir / RECORD_NAME

    def ruleset(self) -> str:
        """
        The nft script that puts the rules in force, replacing the table if
        it exists, in one transaction.
        """
        return (
            f"{_emptied(self.table)}\n"
            f"table inet {self.table} {{\n"
            f'    comment "pacs-appliance: Orthanc\'s HTTP and DICOM ports are for this host only"\n'
            "    chain input {\n"
            "        type filter hook input priority filter - 10; policy accept;\n"
            f'        iif != "lo" tcp dport {{ {self.httpPort}, {self.dicomPort} }} counter reject with tcp reset\n'
            "    }\n"
            "}\n"
        )

    def apply(self) -> None:
        """
        Put the rules in force and record them (blocking: the command line,
        or a start before the reactor runs).

        @raise FirewallError: if nft is missing or refuses.
        """
        _runNft(self.ruleset(), "close Orthanc's ports to other hosts")
        self.record()

    def record(self) -> None:
        """
        Record these rules as in force, for the daemon to read (mode 0644:
        the unit's root writes it, its user reads it).
        """
        self.runtimeDir.mkdir(mode=0o750, parents=True, exist_ok=True)
        temporary = self.recordPath.with_suffix(".tmp")
        temporary.unlink(missing_ok=True)
        # O_EXCL and O_NOFOLLOW: root never writes through a link.
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            os.fchmod(stream.fileno(), 0o644)
            stream.write(json.dumps({"ports": list(self.ports)}) + "\n")
        # Replaces a link left at the record's name, not what it points to.
        os.replace(temporary, self.recordPath)

    def recorded(self) -> Optional["OrthancFirewall"]:
        """
        The rules the record says are in force, if it is there and sound.
        """
        try:
            fd = os.open(self.recordPath, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, encoding="utf-8") as stream:
                httpPort, dicomPort = json.loads(stream.read(4096))["ports"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not all(type(port) is int and 1 <= port <= 65535 for port in (httpPort, dicomPort)):
            return None
        return OrthancFirewall(httpPort, dicomPort, self.runtimeDir)

    def inForce(self) -> bool:
        """
        Whether the record says that rules for exactly these ports are in force.
        """
        recorded = self.recorded()
        return recorded is not None and recorded.ports == self.ports

    def removal(self) -> str:
        """
        The nft command that removes the recorded table (the one applied,
        even if the ports have been edited since) and this configuration's,
        whether they exist or not, in one transaction.
        """
        tables = {self.table}
        recorded = self.recorded()
        if recorded is not None:
            tables.add(recorded.table)
        return _emptied(*sorted(tables))

    def remove(self) -> None:
        """
        Remove the rules and their record (blocking: the command line).

        @raise FirewallError: if nft is missing or refuses.
        """
        _runNft(self.removal(), "remove the rules on Orthanc's ports")
        self.forget()

    def restore(self) -> Optional["OrthancFirewall"]:
        """
        Put the recorded rules in force again, if there is a record (a
        running appliance's): a reload of the box's own firewall flushes
        every table.  The rules restored, if any.

        @raise FirewallError: if nft is missing or refuses.
        """
        recorded = self.recorded()
        if recorded is not None:
            _runNft(recorded.ruleset(), "close Orthanc's ports to other hosts again")
        return recorded

    def forget(self) -> None:
        """
        Delete the record of the rules.
        """
        self.recordPath.unlink(missing_ok=True)


def removeEveryTable() -> List[str]:
    """
    Remove the rules of every appliance on this box (when the configuration
    that names them cannot be read); the tables removed.

    @raise FirewallError: if nft is missing or refuses.
    """
    try:
        listed = subprocess.run([str(NFT), "list", "tables"], capture_output=True, text=True, timeout=NFT_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise FirewallError(f"cannot list the firewall's tables: {error}") from None
    tables = re.findall(rf"(?m)^table inet ({TABLE_PREFIX}[0-9]+_[0-9]+)$", listed.stdout)
    if tables:
        _runNft(_emptied(*tables), "remove the rules on Orthanc's ports")
    return tables


def _emptied(*tables: str) -> str:
    """
    nft commands that delete C{tables}, whether they exist or not: creating
    a table first makes deleting it succeed (nft 1.0.6 has no "destroy").
    """
    return "; ".join(f"add table inet {table}; delete table inet {table}" for table in tables)


def _runNft(script: str, purpose: str) -> None:
    try:
        completed = subprocess.run(
            [str(NFT), "-f", "-"], input=script, capture_output=True, text=True, timeout=NFT_TIMEOUT
        )
    except FileNotFoundError:
        raise FirewallError(f"cannot {purpose}: {NFT} is missing (install the nftables package)") from None
    except (OSError, subprocess.TimeoutExpired) as error:
        raise FirewallError(f"cannot {purpose}: {NFT} failed: {error}") from None
    if completed.returncode != 0:
        said = " ".join(completed.stderr.split()) or f"exit status {completed.returncode}"
        raise FirewallError(f"cannot {purpose}: nft said: {said}")


def mayAdministerNetwork() -> bool:
    """
    Whether this process has CAP_NET_ADMIN, which nftables asks for.
    """
    try:
        status = Path("/proc/self/status").read_text(encoding="ascii")
    except OSError:
        return os.geteuid() == 0
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    return False


class OrthancPortGuard(MultiService):
    """
    The parent of Orthanc's supervisor: Orthanc runs only while its ports are
    closed to other hosts, or after one line in the log says they are not.

      - with [orthanc] firewall = yes and CAP_NET_ADMIN (C{pacs-appliance run}
        as root): the rules are applied before anything starts (a refusal
        stops the daemon from starting: it would serve an exposed Orthanc),
        and removed once Orthanc is gone;
      - with [orthanc] firewall = yes, without the capability: the rules
        recorded by the unit's C{ExecStartPre} are named in the log, or a
        warning says that other hosts can reach Orthanc;
      - with [orthanc] firewall = no: a warning says that the box's own
        firewall must close the ports.

    @param privileged: whether this process may apply the rules (default:
        whether it has CAP_NET_ADMIN).
    """

    log = Logger()

    def __init__(self, config: Config, reactor=None, privileged: Optional[bool] = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self._reactor = reactor
        self._enabled = config.orthanc.firewall
        self.firewall = OrthancFirewall.fromConfig(config)
        self._privileged = mayAdministerNetwork() if privileged is None else privileged
        self._applied = False

    def privilegedStartService(self) -> None:
        # Before the reactor runs, and before Orthanc starts: a blocking nft
        # call is the start's business, like binding a port.
        if self._enabled and self._privileged:
            try:
                self.firewall.apply()
            except FirewallError as error:
                raise FirewallError(
                    f"{error}. Orthanc is not started exposed to other hosts: fix this, or set"
                    " [orthanc] firewall = no if this box's own firewall closes ports"
                    f" {self.firewall.httpPort} and {self.firewall.dicomPort}."
                ) from None
            self._applied = True
        try:
            super().privilegedStartService()
        except BaseException:
            # The start ends here: nothing else would remove the rules.
            if self._applied:
                self._applied = False
                self.firewall.remove()
            raise

    def startService(self) -> None:
        self._report()
        super().startService()

    def _report(self) -> None:
        firewall = self.firewall
        ports = f"{firewall.httpPort} (HTTP) and {firewall.dicomPort} (DICOM)"
        if not self._enabled:
            self.log.warn(
                "Orthanc's ports {ports} are left to this box's firewall ([orthanc] firewall = no):"
                " unless it closes them, other hosts can reach Orthanc without the appliance",
                ports=ports,
            )
        elif self._applied or firewall.inForce():
            self.log.info(
                "Orthanc's ports {ports} are closed to other hosts (nftables table inet {table})",
                ports=ports,
                table=firewall.table,
            )
        else:
            self.log.warn(
                "Other hosts can reach Orthanc's ports {ports}: this process may not change the"
                " firewall (run it as root, or through the pacs-appliance unit, which closes them)",
                ports=ports,
            )

    def stopService(self) -> Deferred:
        stopping = super().stopService()
        if self._applied:
            # Only once Orthanc is gone: until then its ports stay closed.
            stopping.addBoth(self._remove)
        return stopping

    def _remove(self, stopped: object) -> Deferred:
        if isinstance(stopped, Failure):
            self.log.failure("Could not stop Orthanc cleanly", stopped)
        self._applied = False
        firewall = self.firewall
        # One command line, so that nft needs no input: the reactor's process
        # support runs it without blocking.
        removing = getProcessOutputAndValue(str(NFT), [firewall.removal()], env={}, reactor=self._reactor)
        removing.addTimeout(NFT_TIMEOUT, self._reactor)
        removing.addCallback(self._removed)
        removing.addErrback(lambda failure: self.log.failure("Could not remove the rules on Orthanc's ports", failure))
        return removing

    def _removed(self, outcome: Tuple[bytes, bytes, int]) -> None:
        out, err, code = outcome
        if code != 0:
            self.log.error(
                "Could not remove the nftables table inet {table}: nft said: {said}",
                table=self.firewall.table,
                said=" ".join(err.decode("utf-8", "replace").split()),
            )
            return
        self.firewall.forget()
        self.log.info("Removed the rules on Orthanc's ports (nftables table inet {table})", table=self.firewall.table)
