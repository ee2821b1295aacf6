"""
A load balancer in front of several appliance nodes, as a hospital would place
one: Debian's haproxy in TCP mode (TLS passes through to the nodes), a
connection to each node in turn, and a node taken out while its /healthz does
not answer 200.
"""

import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

from tests.support import freePorts

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

#: How long haproxy may take to listen.
START_TIMEOUT = 30.0


class LoadBalancer:
    """
    haproxy with one TCP frontend per service, each spreading connections
    over the nodes' ports for that service (round robin), the nodes checked
    by their HTTPS /healthz every half second.

    @param services: for each service (a name), the nodes' ports.
    @param health: the nodes' HTTPS ports, in the order of each service's.
    """

    def __init__(self, folder: Path, services: Dict[str, List[int]], health: List[int]) -> None:
        self.ports = dict(zip(services, freePorts(len(services))))
        lines = [
            "global",
            "    maxconn 2000",
            "defaults",
            "    mode tcp",
            "    timeout connect 5s",
            "    timeout client 5m",
            "    timeout server 5m",
            "    timeout check 2s",
        ]
        for service, nodePorts in services.items():
            lines += [
                f"listen {service}",
                f"    bind 127.0.0.1:{self.ports[service]}",
                "    balance roundrobin",
                "    option httpchk GET /healthz",
                "    http-check expect status 200",
            ]
            for index, (port, healthPort) in enumerate(zip(nodePorts, health)):
                lines.append(
                    f"    server node{index + 1} 127.0.0.1:{port} check port {healthPort} check-ssl verify none"
                    " inter 500ms fall 2 rise 2"
                )
        self.configPath = folder / "haproxy.cfg"
        self.configPath.write_text("\n".join(lines) + "\n")
        self.log = folder / "haproxy.log"
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen([HAPROXY, "-db", "-f", str(self.configPath)], stdout=log, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._listening():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("haproxy did not start:\n" + self.log.read_text())
            time.sleep(0.05)

    def _listening(self) -> bool:
        listening = subprocess.run(["ss", "-Htln"], capture_output=True, text=True).stdout
        return all(f"127.0.0.1:{port} " in listening for port in self.ports.values())

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
