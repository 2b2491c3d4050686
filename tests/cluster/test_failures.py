"""Peers die and come back: detection and map changes."""

import os
import signal

from .conftest import wait_for


def states(cluster):
    info = cluster.info()
    return info["epoch"], {p["address"]: p["state"] for p in info["peers"]}


def test_dead_peer_is_marked_down_and_returns(cluster):
    cluster.format(4, copies=3)
    victim = cluster.peers[3]
    epoch0, st = states(cluster)
    assert set(st.values()) == {"up"}
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait()
    victim.proc = None
    wait_for(lambda: states(cluster)[1][victim.address] == "down", 30, "victim marked down")
    epoch1, st = states(cluster)
    assert epoch1 > epoch0 and list(st.values()).count("up") == 3
    logs = "".join(p.log_text() for p in cluster.peers[:3])
    assert "stopped answering: marked down" in logs
    victim.start()  # its store remembers the cluster
    wait_for(lambda: states(cluster)[1][victim.address] == "up", 30, "victim back up")
    assert states(cluster)[0] > epoch1


def test_fio_verify_survives_a_peer_kill(cluster):
    import json
    import subprocess
    import time

    from tests.e2e.conftest import need

    need("fio")
    cluster.format(4, copies=3)
    m = cluster.mount("a")
    # 64 MiB at 8 MB/s: the write phase spans the kill, the detection and the new epoch
    fio = subprocess.Popen(["fio", "--name=v", f"--filename={m.path('fio.img')}", "--size=64M", "--rate=8m",
                            "--rw=randwrite", "--bs=64k", "--ioengine=libaio", "--iodepth=8", "--direct=1",
                            "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
                            "--output-format=json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    victim = cluster.peers[2]
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait()
    victim.proc = None
    out, err = fio.communicate(timeout=300)
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert fio.returncode == 0 and job["error"] == 0, err
    assert job["write"]["io_bytes"] == 64 << 20 and job["read"]["io_bytes"] == 64 << 20
    assert states(cluster)[1][victim.address] == "down"  # it happened while fio was writing
    assert "continuing with cluster map epoch" in open(m.log).read()  # writes waited for it

    # recovery: every object of the VDI gets back to 3 replicas where placement says
    from vdifs.model.cluster import ClusterMap
    from vdifs.model.placement import placement

    survivors = [p for p in cluster.peers if p is not victim]
    vid = m.vid("fio.img")

    def recovered() -> bool:
        with open(os.path.join(survivors[0].store, "meta", "cluster_map"), "rb") as f:
            cmap = ClusterMap.decode(f.read())
        by_id = {p.peer_id: p for p in survivors}
        objects = set().union(*(p.object_files(vid, kind="") for p in survivors))
        return bool(objects) and all(
            fname in by_id[pid].object_files(vid, kind="")
            for fname in objects for pid in placement(cmap, int(fname, 16), 3))

    wait_for(recovered, 60, "3 replicas of every object at the new placement")
    assert sum(len(p.object_files(vid)) for p in survivors) >= 3 * 16  # 64 MiB = 16 data objects


def test_returning_peer_never_serves_stale_data(cluster):
    from tests.e2e.conftest import read_at

    cluster.format(4, copies=3)
    m = cluster.mount("a")
    size = 16 << 22  # 16 objects
    with open(m.path("vm"), "wb") as f:
        f.write(b"\xaa" * size)
        f.flush()
        os.fsync(f.fileno())
    victim = cluster.peers[1]
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait()
    victim.proc = None
    wait_for(lambda: states(cluster)[1][victim.address] == "down", 30, "victim down")
    with open(m.path("vm"), "r+b") as f:  # overwritten while the victim is away
        f.write(b"\xbb" * size)
        f.flush()
        os.fsync(f.fileno())
    victim.start()
    wait_for(lambda: states(cluster)[1][victim.address] == "up", 30, "victim back")
    # whichever replica serves the reads now, it must be the new data
    for _ in range(3):
        data = read_at(m.path("vm"), 0, size)
        stale = [i for i in range(16) if data[i << 22:(i + 1) << 22] != b"\xbb" * (4 << 20)]
        assert not stale, f"objects {stale} served stale"


def kill(peer) -> None:
    os.kill(peer.proc.pid, signal.SIGKILL)
    peer.proc.wait()
    peer.proc = None


def test_below_min_copies_writes_fail_reads_work(cluster):
    import errno as _errno

    from tests.e2e.conftest import read_at

    cluster.format(3, copies=3)  # min_copies 2; meta: all three
    m = cluster.mount("a", "--io-wait", "4")
    with open(m.path("vm"), "wb") as f:
        f.write(b"\x5a" * (4 << 20))
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(m.path("vm"), os.O_RDWR)  # the writer (and its lease) from before the failure
    try:
        kill(cluster.peers[1])
        kill(cluster.peers[2])  # one replica left: no majority to change the map either
        assert read_at(m.path("vm"), 0, 4096) == b"\x5a" * 4096  # reads fail over to the live one
        try:
            os.pwrite(fd, b"\x11" * 4096, 0)  # blocks for --io-wait, then EIO
            raise AssertionError("a write below min_copies succeeded")
        except OSError as e:
            assert e.errno == _errno.EIO
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    # like a disk after a write error: the block holds the old or the new data, never a mix
    assert read_at(m.path("vm"), 0, 4096) in (b"\x5a" * 4096, b"\x11" * 4096)
    assert "did not replace it within 4 s" in open(m.log).read()


def test_deleted_while_a_peer_is_down_stays_deleted(cluster):
    from .conftest import vdifs

    cluster.format(4, copies=3)
    m = cluster.mount("a")
    with open(m.path("gone"), "wb") as f:
        f.write(os.urandom(8 << 20))
    vid = m.vid("gone")
    victim = cluster.peers[3]
    held_before = len(victim.object_files(vid))
    kill(victim)
    wait_for(lambda: states(cluster)[1][victim.address] == "down", 30, "victim down")
    os.unlink(m.path("gone"))
    wait_for(lambda: all(not p.object_files(vid) for p in cluster.peers[:3]), 30, "purged on the live peers")
    victim.start()
    wait_for(lambda: states(cluster)[1][victim.address] == "up", 30, "victim back")
    status = vdifs("cluster", "status", "--cluster", cluster.addresses, "--secret-file", cluster.secret).stdout
    assert "4 up, 0 down" in status
    # its old copies were set aside and are dropped, never recovered anywhere
    wait_for(lambda: not os.path.exists(os.path.join(victim.store, "stale")), 30, "stale copies dropped")
    assert all(not p.object_files(vid) for p in cluster.peers)
    assert held_before > 0


def test_new_peer_gets_its_share(cluster):
    from vdifs.model.cluster import ClusterMap
    from vdifs.model.placement import placement

    import hashlib

    cluster.format(3, copies=2)
    m = cluster.mount("a")
    payload = os.urandom(32 << 20)
    with open(m.path("vm"), "wb") as f:
        f.write(payload)
    vid = m.vid("vm")
    newcomer = cluster.add_peer("--join", cluster.peers[0].address, "--secret-file", cluster.secret)

    def rebalanced() -> bool:
        path = os.path.join(newcomer.store, "meta", "cluster_map")
        if not os.path.exists(path):
            return False  # not joined yet
        with open(path, "rb") as f:
            cmap = ClusterMap.decode(f.read())
        if len(cmap.up_peers()) != 4:
            return False
        mine = {o for o in set().union(*(p.object_files(vid, kind="") for p in cluster.peers[:3]))
                if newcomer.peer_id in placement(cmap, int(o, 16), 2)}
        return bool(mine) and mine <= newcomer.object_files(vid, kind="")

    wait_for(rebalanced, 60, "the new peer holds what placement gives it")
    with open(m.path("vm"), "rb") as f:  # reads now also go to the new peer's copies
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(payload).digest()


def test_cluster_check_finds_and_repairs_a_corrupted_replica(cluster):
    from .conftest import vdifs

    cluster.format(3, copies=3)
    m = cluster.mount("a")
    payload = os.urandom(8 << 20)
    with open(m.path("vm"), "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    vid = m.vid("vm")
    args = ("cluster", "check", "--cluster", cluster.addresses, "--secret-file", cluster.secret)
    assert "all replicas where placement says, identical" in vdifs(*args).stdout
    # flip bytes in one replica file on one peer's disk
    bad = cluster.peers[1]
    name = sorted(bad.object_files(vid))[0]
    path = os.path.join(bad.store, "obj", f"{vid:06x}", name)
    with open(path, "r+b") as f:
        f.seek(1000)
        f.write(b"\xde\xad\xbe\xef")
    res = vdifs(*args, check=False)
    assert res.returncode == 1 and name in res.stdout and bad.peer_id in res.stdout
    res = vdifs(*args, "--repair", check=False)
    assert res.returncode == 0 and "repaired" in res.stdout
    assert "identical" in vdifs(*args).stdout
    good = os.path.join(cluster.peers[0].store, "obj", f"{vid:06x}", name)
    assert open(path, "rb").read() == open(good, "rb").read()
    # a missing replica is found and restored the same way
    os.unlink(path)
    res = vdifs(*args, check=False)
    assert res.returncode == 1 and "MISSING ON" in res.stdout
    vdifs(*args, "--repair")
    assert os.path.exists(path) and "identical" in vdifs(*args).stdout


def test_two_failures_one_after_the_other_lose_nothing(cluster):
    import hashlib

    from tests.e2e.conftest import read_at

    from .conftest import vdifs

    cluster.format(5, copies=3)  # five meta peers: a majority survives two failures
    m = cluster.mount("a")
    payload = os.urandom(24 << 20)
    with open(m.path("vm"), "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    check = ("cluster", "check", "--cluster", cluster.addresses, "--secret-file", cluster.secret)
    for victim in (cluster.peers[4], cluster.peers[3]):
        kill(victim)
        wait_for(lambda: states(cluster)[1][victim.address] == "down", 30, "victim down")
        # recovery brings every object back to 3 replicas before the next failure
        wait_for(lambda: vdifs(*check, check=False).returncode == 0, 90, "recovered to 3 replicas")
        assert hashlib.sha256(read_at(m.path("vm"), 0, len(payload))).digest() == hashlib.sha256(payload).digest()
