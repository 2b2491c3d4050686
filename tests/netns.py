"""A private network for tests that cut links: network namespaces on one bridge.

Each host is a network namespace of its own with one veth whose other end
sits on a bridge in a switch namespace; addresses are 10.77.0.N/24, which
exist only inside these namespaces (nothing is added to the machine's own
network). Processes join a host with `nsenter --net`, which enters only the
network namespace: a FUSE mount made there is visible to the test as usual.

Links are cut per direction by pointing a host's neighbour entry for another
host at a MAC address nobody has: its packets to that host are then silently
lost on the bridge (no error, as on a dead link), while the other direction
still works. This needs neither netfilter nor netem, which this kernel lacks.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess

NOWHERE = "02:00:00:00:00:01"  # a locally administered MAC no host has
_serial = itertools.count(1)


def available() -> str | None:
    """Why these tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


class Host:
    def __init__(self, net: Net, name: str, ns: str, address: str) -> None:
        self.net, self.name, self.ns, self.address = net, name, ns, address

    @property
    def prefix(self) -> list[str]:
        """Put in front of a command to run it on this host."""
        return ["nsenter", f"--net=/run/netns/{self.ns}"]

    def __repr__(self) -> str:
        return f"Host({self.name} {self.address})"


class Net:
    def __init__(self) -> None:
        self.tag = f"vt{os.getpid() % 100000}x{next(_serial)}"
        self.switch = f"{self.tag}-sw"
        self.hosts: list[Host] = []
        self.dropped: set[tuple[Host, Host]] = set()
        ip("netns", "add", self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")

    def host(self, name: str) -> Host:
        n = len(self.hosts) + 1
        ns = f"{self.tag}-{name}"
        ip("netns", "add", ns)
        port = f"p{n}"
        ip("link", "add", f"{self.tag}{port}", "type", "veth", "peer", "name", f"{self.tag}e{n}")
        ip("link", "set", f"{self.tag}{port}", "netns", self.switch)
        ip("link", "set", f"{self.tag}e{n}", "netns", ns)
        ip("-n", self.switch, "link", "set", f"{self.tag}{port}", "name", port)
        ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        ip("-n", ns, "link", "set", f"{self.tag}e{n}", "name", "eth0")
        ip("-n", ns, "addr", "add", f"10.77.0.{n}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "link", "set", "lo", "up")
        h = Host(self, name, ns, f"10.77.0.{n}")
        self.hosts.append(h)
        return h

    # -- faults ------------------------------------------------------------------------

    def drop(self, src: Host, dst: Host) -> None:
        """Lose every packet from `src` to `dst` (one direction)."""
        ip("-n", src.ns, "neigh", "replace", dst.address, "lladdr", NOWHERE, "nud", "permanent", "dev", "eth0")
        self.dropped.add((src, dst))

    def undrop(self, src: Host, dst: Host) -> None:
        """Packets from `src` to `dst` flow again (the address is resolved afresh)."""
        ip("-n", src.ns, "neigh", "del", dst.address, "dev", "eth0")
        self.dropped.discard((src, dst))

    def cut(self, a: Host, b: Host) -> None:
        """No packet between `a` and `b`, either way."""
        self.drop(a, b)
        self.drop(b, a)

    def isolate(self, a: Host) -> None:
        for b in self.hosts:
            if b is not a:
                self.cut(a, b)

    def heal(self) -> None:
        """Every link back."""
        for src, dst in list(self.dropped):
            self.undrop(src, dst)

    def close(self) -> None:
        for h in self.hosts:
            subprocess.run(["ip", "netns", "del", h.ns], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.switch], capture_output=True)
