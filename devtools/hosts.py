"""Separate network hosts for the local fleet (`flux dev up --hosts`).

Each host (controller, db, docker, gateway, backup) is a network namespace with one address on a
bridge made for this fleet. The machine itself takes the bridge's first address, so the CLI can
reach the API and the gateway. The namespaces have no default route: nothing outside this bridge
is reachable from them, and no other network is ever touched. A running dockerd drops forwarded
traffic by default, so one ACCEPT rule for this bridge's own traffic is added, and removed by
`remove()`.

Processes enter a host with `nsenter --net` (not `ip netns exec`, which remounts /sys and hides
the cgroup mounts a Docker engine needs).
"""

import ipaddress
import json
import pathlib
import subprocess
from dataclasses import dataclass

from cli.errors import CliError

HOSTS = ("controller", "db", "docker", "gateway", "backup")
# Where the fleet's /24 is taken from: the first one no route of this machine overlaps.
POOL = ipaddress.ip_network("10.213.0.0/16")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise CliError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def free_subnet() -> str:
    routes = json.loads(_ip("-j", "route", "show", "table", "all").stdout or "[]")
    used = []
    for route in routes:
        try:
            used.append(ipaddress.ip_network(route.get("dst", ""), strict=False))
        except ValueError:
            continue  # "default", "local" names and the like
    for subnet in POOL.subnets(new_prefix=24):
        if not any(subnet.overlaps(net) for net in used if net.version == 4 and net.prefixlen > 0):
            return str(subnet)
    raise CliError(f"no free /24 in {POOL} for the fleet's bridge")


@dataclass
class Hosts:
    tag: str
    subnet: str

    @property
    def bridge(self) -> str:
        return f"fx{self.tag}"

    def netns(self, host: str) -> str:
        return f"flux-{self.tag}-{host}"

    def address(self, host: str) -> str:
        """The host's address; "machine" is this machine's own address on the bridge."""
        offset = 1 if host == "machine" else HOSTS.index(host) + 2
        return str(ipaddress.ip_network(self.subnet)[offset])

    def enter(self, host: str) -> list[str]:
        """The command prefix that runs a program on `host`."""
        return ["nsenter", f"--net=/run/netns/{self.netns(host)}", "--"]

    @property
    def _rule(self) -> list[str]:
        return ["-i", self.bridge, "-o", self.bridge, "-m", "comment", "--comment", f"flux dev {self.tag}",
                "-j", "ACCEPT"]

    @staticmethod
    def _chain() -> str:
        # Docker evaluates DOCKER-USER first and keeps it first; without a Docker engine, FORWARD.
        return "DOCKER-USER" if subprocess.run(["iptables", "-n", "-L", "DOCKER-USER"],
                                               capture_output=True).returncode == 0 else "FORWARD"

    def exists(self) -> bool:
        return pathlib.Path(f"/sys/class/net/{self.bridge}").exists()

    def create(self) -> None:
        prefix = ipaddress.ip_network(self.subnet).prefixlen
        if not self.exists():
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.address('machine')}/{prefix}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for index, host in enumerate(HOSTS):
            ns = self.netns(host)
            if not pathlib.Path(f"/run/netns/{ns}").exists():
                _ip("netns", "add", ns)
            if _ip("-n", ns, "link", "show", "eth0", check=False).returncode != 0:
                outside = f"{self.bridge}{index}"
                _ip("link", "del", outside, check=False)
                _ip("link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", ns)
                _ip("link", "set", outside, "master", self.bridge, "up")
                _ip("-n", ns, "addr", "add", f"{self.address(host)}/{prefix}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        chain = self._chain()
        if subprocess.run(["iptables", "-C", chain, *self._rule], capture_output=True).returncode != 0:
            subprocess.run(["iptables", "-I", chain, "1", *self._rule], check=True, capture_output=True)

    def remove(self) -> list[str]:
        removed = []
        for chain in ("DOCKER-USER", "FORWARD"):
            while subprocess.run(["iptables", "-D", chain, *self._rule], capture_output=True).returncode == 0:
                removed.append(f"firewall rule in {chain}")
        for host in HOSTS:
            if pathlib.Path(f"/run/netns/{self.netns(host)}").exists():
                _ip("netns", "del", self.netns(host))
                removed.append(f"namespace {self.netns(host)}")
        if self.exists():
            _ip("link", "del", self.bridge)
            removed.append(f"bridge {self.bridge}")
        return removed

    def describe(self) -> list[dict]:
        return [{"name": host, "address": self.address(host), "netns": self.netns(host)} for host in HOSTS]
