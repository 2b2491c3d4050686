"""Network partitions: peers and mounts on hosts of their own (network
namespaces on one bridge, tests.netns), links cut and healed under fio
verify. A cut costs writes a bounded pause, never an error; afterwards every
object is back at its replicas, identical."""

from __future__ import annotations

import errno
import mmap
import os
import random
import signal
import time

import pytest

from tests.e2e.conftest import FioVerify, run

from .conftest import current_map, fully_replicated, peer_states, recovery_settled, wait_for
from .test_leases import Holder, open_errno

#: As for a paused peer (test_hangs): failure detection or the mount's own
#: probes (3 s without an answer), with room for a loaded machine.
PAUSE_BOUND_S = 12.0
CUT_S = 20.0


def settle_and_check(cluster, m) -> None:
    """After healing: every peer up, every object of the fio file at its
    replicas, `cluster check` finds them identical."""
    wait_for(lambda: set(peer_states(cluster).values()) == {"up"}, 90, "every peer up again")
    vid = m.vid("fio.img")
    wait_for(lambda: recovery_settled(cluster) and fully_replicated(cluster.peers, vid), 120,
             "every peer recovered, 3 replicas of every object")
    check = cluster.cli("cluster", "check", "--cluster", cluster.addresses, "--secret-file", cluster.secret)
    assert "all replicas where placement says, identical" in check.stdout, check.stdout


def under_fio(cluster, m, fault, during=None) -> float:
    """fio verify on `m` with `fault()` in force for CUT_S seconds of its write
    phase (then every link healed); `during()` runs while it is. The longest
    write fio saw, in seconds."""
    with FioVerify(m.path("fio.img"), 96, rate="3m", fsync=16) as fio:
        time.sleep(3)
        fault()
        cut = time.monotonic()
        try:
            if during is not None:
                during()
            time.sleep(max(0.0, CUT_S - (time.monotonic() - cut)))
        finally:
            cluster.net.heal()
        job = fio.finish(timeout=300)
    longest = job["write"]["clat_ns"]["max"] / 1e9
    print(f"longest write: {longest:.2f} s")
    return longest


def write_and_read_back(path: str, size: int) -> None:
    """A file written with O_DIRECT and fsync, read back with O_DIRECT (from
    the peers, not a cache) through the mount."""
    data = os.urandom(size)
    buf = mmap.mmap(-1, size)
    buf[:] = data
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], 0) == size
        os.fsync(fd)
        buf[:] = bytes(size)
        assert os.preadv(fd, [buf], 0) == size
    finally:
        os.close(fd)
    assert buf[:] == data


def test_a_peer_cut_off_from_the_mount_only(net_cluster):
    """The mount loses its link to one data peer, which the other peers still
    reach: the peer stays up, the mount sends its requests through another
    peer; writes pause at most a few seconds, and reads and writes of data
    placed on the cut-off peer work meanwhile."""
    cluster = net_cluster
    cluster.format(4, copies=3)
    m = cluster.mount("a")
    cmap = current_map(cluster.peers[0])
    victim = next(p for p in cluster.peers if p.peer_id not in cmap.meta)

    def during() -> None:
        wait_for(lambda: "has not answered this mount" in open(m.log).read(), 15, "the mount cuts the peer off")
        write_and_read_back(m.path("during"), 24 << 20)  # 6 objects: most have a replica on the victim
        assert peer_states(cluster)[victim.address] == "up"  # the cluster still reaches it

    longest = under_fio(cluster, m, lambda: cluster.net.cut(m.host, victim.host), during)
    assert longest < PAUSE_BOUND_S, f"a write waited {longest:.1f} s"
    assert f"peer at {victim.address} has not answered this mount" in open(m.log).read()
    assert sum(p.get("relayed", 0) for p in cluster.info()["peers"]) > 0  # requests went around
    wait_for(lambda: f"peer at {victim.address} answers again" in open(m.log).read(), 15, "direct again")
    settle_and_check(cluster, m)


def test_the_mount_cut_off_from_a_minority_of_peers(net_cluster):
    """5 peers: the mount loses its links to two of them, a consensus peer
    among them; the cluster is whole. Every write still reaches its 3
    replicas."""
    cluster = net_cluster
    cluster.format(5, copies=3)
    m = cluster.mount("a")
    cmap = current_map(cluster.peers[0])
    meta = next(p for p in cluster.peers if p.peer_id in cmap.meta)
    data = next(p for p in cluster.peers if p is not meta)

    def fault() -> None:
        cluster.net.cut(m.host, meta.host)
        cluster.net.cut(m.host, data.host)

    def during() -> None:
        write_and_read_back(m.path("during"), 16 << 20)
        assert {peer_states(cluster)[p.address] for p in (meta, data)} == {"up"}

    longest = under_fio(cluster, m, fault, during)
    assert longest < PAUSE_BOUND_S, f"a write waited {longest:.1f} s"
    settle_and_check(cluster, m)


@pytest.mark.parametrize("how", ["isolated", "cannot send"])
def test_a_consensus_peer_isolated_or_losing_what_it_sends(net_cluster, how):
    """A meta peer cut off from every host (or whose packets to every host are
    lost, while it still receives): the others mark it down, writes go on
    after a bounded pause; healed, it rejoins and catches up."""
    cluster = net_cluster
    cluster.format(4, copies=3)
    m = cluster.mount("a")
    cmap = current_map(cluster.peers[0])
    victim = next(p for p in cluster.peers if p.peer_id in cmap.meta)

    def fault() -> None:
        if how == "isolated":
            cluster.net.isolate(victim.host)
        else:
            for h in cluster.net.hosts:
                if h is not victim.host:
                    cluster.net.drop(victim.host, h)

    def during() -> None:
        wait_for(lambda: peer_states(cluster)[victim.address] == "down", 30, "the victim marked down")

    longest = under_fio(cluster, m, fault, during)
    assert longest < PAUSE_BOUND_S, f"a write waited {longest:.1f} s"
    settle_and_check(cluster, m)


def test_an_isolated_lease_holder_is_fenced_after_takeover(net_cluster):
    """The host of the mount that holds a VDI's lease is cut off from
    everything; another mount takes the VDI over and writes. When the link
    heals, the old holder changes no byte: its writes and fsyncs fail."""
    cluster = net_cluster
    cluster.format(3, copies=3)
    a = cluster.mount("a", "--lease-term", "3")
    b = cluster.mount("b", "--lease-term", "3")
    with open(a.path("vm"), "wb") as f:
        f.truncate(16 << 20)
    wait_for(lambda: os.path.exists(b.path("vm")), 10, "vm on b")
    h = Holder(a.path("vm"))
    hb = None
    try:
        assert h.write(0, 0x11, 1 << 20, sync=True) == "ok"
        assert open_errno(b.path("vm"), os.O_RDWR) == errno.EBUSY
        cluster.net.isolate(a.host)
        wait_for(lambda: open_errno(b.path("vm"), os.O_RDWR) == 0, 60, "takeover by B")
        hb = Holder(b.path("vm"))
        assert hb.write(0, 0x22, 1 << 20, sync=True) == "ok"
        cluster.net.heal()
        time.sleep(2)  # A's connections come back
        results = [h.write((2 << 20) + i * 4096, 0x33, 4096, sync=bool(i % 2)) for i in range(6)]
        assert results[0] in ("ok", f"err {errno.EIO}")
        assert results[1:] == [f"err {errno.EIO}"] * 5, results
    finally:
        cluster.net.heal()
        for holder in (h, hb):
            if holder is not None and holder.proc.poll() is None:
                holder.proc.kill()
    out = run("qemu-io", "-r", "-f", "raw", "-c", f"read -P 0x22 0 {1 << 20}",
              "-c", f"read -P 0 {2 << 20} {6 * 4096}", b.path("vm")).stdout
    assert "verification failed" not in out and out.count("read ") == 2, out


@pytest.mark.soak
def test_fio_verify_through_kills_pauses_and_partitions(net_cluster):
    """fio writes and verifies (crc32c) while, VDIFS_SOAK_CYCLES times (1 in
    the default run, `make soak` runs 10), a random peer is in turn killed
    and restarted, paused and resumed, cut off from the mount, and isolated
    from everyone: zero verify errors, and every replica current and in
    place after."""
    cycles = int(os.environ.get("VDIFS_SOAK_CYCLES", "1"))
    cluster = net_cluster
    cluster.format(5, copies=3)  # five meta peers: one at a time out keeps a majority
    m = cluster.mount("a")
    size = 64 * cycles
    rng = random.Random(cycles)

    def state(p) -> str:
        return peer_states(cluster)[p.address]

    def kill(p) -> None:
        os.kill(p.proc.pid, signal.SIGKILL)
        p.proc.wait()
        p.proc = None
        wait_for(lambda: state(p) == "down", 30, f"{p.name} down")
        p.start()

    def pause(p) -> None:
        os.kill(p.proc.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: state(p) == "down", 30, f"{p.name} down")
        finally:
            os.kill(p.proc.pid, signal.SIGCONT)

    def cut_from_mount(p) -> None:
        cluster.net.cut(m.host, p.host)
        try:
            wait_for(lambda: f"peer at {p.address} has not answered" in open(m.log).read(), 30, "cut off")
            time.sleep(2)
        finally:
            cluster.net.heal()

    def isolate(p) -> None:
        cluster.net.isolate(p.host)
        try:
            wait_for(lambda: state(p) == "down", 30, f"{p.name} down")
        finally:
            cluster.net.heal()

    with FioVerify(m.path("soak.img"), size, rate=",1m") as fio:  # writes at 1 MB/s, the verify at full speed
        for _ in range(cycles):
            for fault in (kill, pause, cut_from_mount, isolate):
                victim = rng.choice(cluster.peers)
                print(f"{fault.__name__} {victim.name}")
                fault(victim)
                wait_for(lambda: state(victim) == "up", 60, f"{victim.name} up again")
        fio.finish(timeout=120 + 30 * size)  # everything written was read back and verified
    check = ("cluster", "check", "--cluster", cluster.addresses, "--secret-file", cluster.secret)
    try:
        wait_for(lambda: cluster.cli(*check, check=False).returncode == 0, 120, "every replica current and in place")
    except AssertionError:
        status = cluster.cli("cluster", "status", "--cluster", cluster.addresses, "--secret-file", cluster.secret)
        raise AssertionError(cluster.cli(*check, check=False).stdout + status.stdout) from None
