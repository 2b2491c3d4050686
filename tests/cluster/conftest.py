"""Real `vdifs peer` processes on 127.0.0.1 and real cluster mounts.

Everything a fixture starts is stopped by pid and every mount unmounted,
also when the test fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.e2e.conftest import MountProc, run
from vdifs.model.cluster import ClusterMap
from vdifs.model.placement import placement
from tests.netns import Host, Net, available as netns_available


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vdifs(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "vdifs", *args, check=check, timeout=timeout)


def wait_for(cond, timeout: float = 30.0, what: str = "condition", explain=None) -> None:
    """Poll `cond` until true; on timeout fail, with `explain()` (what the
    parties say: consoles, logs) in the message if given."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            detail = f"\n{explain()}" if explain is not None else ""
            raise AssertionError(f"{what} not reached within {timeout} s{detail}")
        time.sleep(0.1)


def log_tail(path: str, lines: int = 40) -> str:
    """The last lines of a process's log, for a failure's message."""
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def peer_states(cluster: Cluster) -> dict[str, str]:
    return {p["address"]: p["state"] for p in cluster.info()["peers"]}


def current_map(peer: PeerProc) -> ClusterMap:
    with open(os.path.join(peer.store, "meta", "cluster_map"), "rb") as f:
        return ClusterMap.decode(f.read())


def recovery_settled(cluster: Cluster) -> bool:
    """Every peer up, at the map's epoch, and finished recovering it. A
    returning peer is marked up before it sets aside what went stale while it
    was away, so its files alone say nothing until its recovery pass ran."""
    info = cluster.info()
    return all(p["state"] == "up" and p.get("epoch") == info["epoch"]
               and (r := p.get("recovery") or {}).get("epoch") == info["epoch"]
               and not r.get("running") and not r.get("stopped") and r.get("done") == r.get("total")
               for p in info["peers"])


def fully_replicated(peers: list[PeerProc], vid: int) -> bool:
    """Every object of `vid` that any peer holds is on each peer placement names."""
    cmap = current_map(peers[0])
    by_id = {p.peer_id: p for p in peers}
    objects = set().union(*(p.object_files(vid, kind="") for p in peers))
    return bool(objects) and all(fname in by_id[pid].object_files(vid, kind="")
                                 for fname in objects for pid in placement(cmap, int(fname, 16), 3))


class PeerProc:
    def __init__(self, root: str, name: str, host: Host | None = None) -> None:
        """`host`: a network namespace of a test network to run in (else 127.0.0.1)."""
        self.name = name
        self.store = os.path.join(root, name)
        self.log = os.path.join(root, f"{name}.log")
        self.host = host
        self.address = f"{host.address}:7000" if host else f"127.0.0.1:{free_port()}"
        self.metrics: str | None = None  # its metrics endpoint, if started with one
        self.proc: subprocess.Popen | None = None

    def start(self, *extra: str) -> None:
        logf = open(self.log, "a")
        prefix = self.host.prefix if self.host else []
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "vdifs", "peer", "--store", self.store,
                                      "--listen", self.address, *extra], stdout=logf, stderr=subprocess.STDOUT)
        wait_for(lambda: self._listening() or self.proc.poll() is not None, 20, f"{self.name} listening")
        if self.proc.poll() is not None:
            raise AssertionError(f"peer {self.name} exited: {open(self.log).read()}")

    def _listening(self) -> bool:
        if self.host:  # not reachable from the test's own namespace: its log says
            return os.path.exists(self.log) and f"on {self.address}" in self.log_text()
        host, port = self.address.rsplit(":", 1)
        with socket.socket() as s:
            return s.connect_ex((host, int(port))) == 0

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a test may have paused it
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc, self.proc = self.proc.returncode, None
        return rc

    def object_files(self, vid: int | None = None, kind: str = "00") -> set[str]:
        root = os.path.join(self.store, "obj")
        out = set()
        if os.path.isdir(root):
            for d in os.listdir(root):
                if vid is not None and int(d, 16) != vid:
                    continue
                out |= {f for f in os.listdir(os.path.join(root, d))
                        if f.startswith(kind) and not f.endswith(".part")}  # not an install in flight
        return out

    @property
    def peer_id(self) -> str:
        with open(os.path.join(self.store, "peer.id")) as f:
            return f.read().strip()

    def log_text(self) -> str:
        with open(self.log) as f:
            return f.read()


class Cluster:
    def __init__(self, root: str, net: Net | None = None) -> None:
        """`net`: run every peer, mount and command on a host of its own there."""
        self.root = root
        self.net = net
        self.admin = net.host("admin") if net else None  # where the test's commands run
        self.peers: list[PeerProc] = []
        self.mounts: list[MountProc] = []
        self.secret = os.path.join(root, "secret")

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        """A vdifs command, run where it can reach the peers."""
        prefix = self.admin.prefix if self.admin else []
        return run(*prefix, sys.executable, "-m", "vdifs", *args, check=check, timeout=timeout)

    @property
    def addresses(self) -> str:
        return ",".join(p.address for p in self.peers)

    def add_peer(self, *extra: str, metrics: bool = False) -> PeerProc:
        """`metrics`: with an endpoint on a free port of 127.0.0.1 (`PeerProc.metrics`)."""
        name = f"peer{len(self.peers)}"
        p = PeerProc(self.root, name, self.net.host(name) if self.net else None)
        if metrics:
            p.metrics = f"127.0.0.1:{free_port()}"
            extra = (*extra, "--metrics", p.metrics)
        self.peers.append(p)
        p.start(*extra)
        return p

    def format(self, n: int, copies: int = 3, min_copies: int | None = None,
               peer_options: tuple[str, ...] = (), metrics: bool = False) -> None:
        first = self.add_peer(*peer_options, metrics=metrics)
        for _ in range(n - 1):
            self.add_peer("--join", first.address, *peer_options, metrics=metrics)
        wait_for(lambda: all("will join at format time" in first.log_text().split(p.peer_id, 1)[-1]
                             for p in self.peers[1:]) if n > 1 else True, 20, "pending joins")
        extra = ("--min-copies", str(min_copies)) if min_copies else ()
        self.cli("cluster", "format", "--copies", str(copies), *extra, "--secret-file", self.secret, first.address)

    def info(self) -> dict:
        return json.loads(self.cli("cluster", "info", "--json", "--cluster", self.addresses,
                                   "--secret-file", self.secret).stdout)

    def mount(self, name: str, *extra: str) -> MountProc:
        m = ClusterMount(os.path.join(self.root, f"mnt-{name}"), os.path.join(self.root, f"ms-{name}"),
                         os.path.join(self.root, f"mount-{name}.log"), self, extra,
                         self.net.host(f"m{name}") if self.net else None)
        self.mounts.append(m)
        m.start()
        return m

    def stop(self) -> None:
        for m in self.mounts:
            m.stop()
            if m.proc is not None:
                m.proc.kill()
        for p in self.peers:
            p.stop()


class ClusterMount(MountProc):
    def __init__(self, mp: str, store: str, log: str, cluster: Cluster, extra: tuple[str, ...],
                 host: Host | None = None) -> None:
        super().__init__(mp, store, log)
        self.cluster = cluster
        self.extra = extra
        self.host = host

    def start(self) -> None:
        os.makedirs(self.mp, exist_ok=True)
        logf = open(self.log, "a")
        self.proc = subprocess.Popen(
            [*(self.host.prefix if self.host else []), sys.executable, "-m", "vdifs", "mount", self.mp,
             "--store", self.store, "--foreground",
             "--cluster", self.cluster.addresses, "--secret-file", self.cluster.secret, *self.extra],
            stdout=logf, stderr=subprocess.STDOUT)
        wait_for(lambda: os.path.ismount(self.mp) or self.proc.poll() is not None, 30, "cluster mount")
        if self.proc.poll() is not None:
            raise AssertionError(f"mount exited: {open(self.log).read()}")


@pytest.fixture
def cluster(tmp_path):
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("cluster tests need root and /dev/fuse")
    c = Cluster(str(tmp_path))
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def net_cluster(tmp_path):
    """A cluster on a private network of namespaces (tests.netns): links can be cut."""
    why = netns_available()
    if why or not os.path.exists("/dev/fuse"):
        pytest.skip(why or "no /dev/fuse")
    net = Net()
    c = Cluster(str(tmp_path), net)
    try:
        yield c
    finally:
        try:
            c.stop()
        finally:
            net.close()
