"""Peers die and come back: detection and map changes."""

import os
import signal

import pytest

from .conftest import wait_for


def write_durably(path: str, data: bytes, *, overwrite: bool = False) -> None:
    """Write (from offset 0) and fsync: the bytes are on the peers' disks."""
    with open(path, "r+b" if overwrite else "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def states(cluster):
    info = cluster.info()
    return info["epoch"], {p["address"]: p["state"] for p in info["peers"]}


def test_dead_peer_is_marked_down_and_returns(cluster):
    cluster.format(4, copies=3)
    victim = cluster.peers[3]
    epoch0, st = states(cluster)
    assert set(st.values()) == {"up"}
    kill(victim)
    wait_for(lambda: states(cluster)[1][victim.address] == "down", 30, "victim marked down")
    epoch1, st = states(cluster)
    assert epoch1 > epoch0 and list(st.values()).count("up") == 3
    logs = "".join(p.log_text() for p in cluster.peers[:3])
    assert "stopped answering: marked down" in logs
    victim.start()  # its store remembers the cluster
    wait_for(lambda: states(cluster)[1][victim.address] == "up", 30, "victim back up")
    assert states(cluster)[0] > epoch1


def test_fio_verify_survives_a_peer_kill(cluster):
    import time

    from tests.e2e.conftest import FioVerify

    cluster.format(4, copies=3)
    m = cluster.mount("a")
    # 64 MiB at 8 MB/s: the write phase spans the kill, the detection and the new epoch;
    # an fsync every 16 writes, so the writes go through the write-behind window
    with FioVerify(m.path("fio.img"), 64, rate="8m", fsync=16) as fio:
        time.sleep(1.5)
        victim = cluster.peers[2]
        kill(victim)
        fio.finish(timeout=300)
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
    write_durably(m.path("vm"), b"\xaa" * size)
    victim = cluster.peers[1]
    kill(victim)
    wait_for(lambda: states(cluster)[1][victim.address] == "down", 30, "victim down")
    write_durably(m.path("vm"), b"\xbb" * size, overwrite=True)  # overwritten while the victim is away
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
    write_durably(m.path("vm"), b"\x5a" * (4 << 20))
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


def test_the_min_copies_gate_refuses_writes_the_map_allows(cluster):
    """4 peers, copies 3, min_copies 3: with two peers down (one of them a
    consensus peer, so the map can still change) only 2 replicas are up.
    Placement would accept the write on those 2; the gate makes it wait
    --io-wait and fail with EIO instead. Reads work; the data is unchanged."""
    import errno as _errno

    from tests.e2e.conftest import read_at

    from vdifs.model.cluster import ClusterMap

    cluster.format(4, copies=3, min_copies=3)
    m = cluster.mount("a", "--io-wait", "4")
    write_durably(m.path("vm"), b"\x5a" * (4 << 20))
    with open(os.path.join(cluster.peers[0].store, "meta", "cluster_map"), "rb") as f:
        meta = set(ClusterMap.decode(f.read()).meta)
    victims = [next(p for p in cluster.peers if p.peer_id in meta),
               next(p for p in cluster.peers if p.peer_id not in meta)]
    for v in victims:
        kill(v)
    wait_for(lambda: all(states(cluster)[1][v.address] == "down" for v in victims), 40, "both marked down")
    assert read_at(m.path("vm"), 0, 4096) == b"\x5a" * 4096
    fd = os.open(m.path("vm"), os.O_RDWR)
    try:
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"\x11" * 4096, 0)
        assert e.value.errno == _errno.EIO
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    assert read_at(m.path("vm"), 0, 4096) == b"\x5a" * 4096
    assert "only 2 replicas are up, 3 are needed" in open(m.log).read()


def test_deleted_while_a_peer_is_down_stays_deleted(cluster):
    from .conftest import vdifs

    cluster.format(4, copies=3)
    m = cluster.mount("a")
    with open(m.path("gone"), "wb") as f:
        f.write(os.urandom(8 << 20))
    vid = m.vid("gone")
    victim = max(cluster.peers[1:], key=lambda p: len(p.object_files(vid)))  # one that holds some
    held_before = len(victim.object_files(vid))
    kill(victim)
    wait_for(lambda: states(cluster)[1][victim.address] == "down", 30, "victim down")
    os.unlink(m.path("gone"))
    others = [p for p in cluster.peers if p is not victim]
    wait_for(lambda: all(not p.object_files(vid) for p in others), 30, "purged on the live peers")
    victim.start()
    wait_for(lambda: states(cluster)[1][victim.address] == "up", 30, "victim back")
    status = vdifs("cluster", "status", "--cluster", cluster.addresses, "--secret-file", cluster.secret).stdout
    assert "4 up, 0 down" in status
    # its old copies were set aside and are dropped, never recovered anywhere
    wait_for(lambda: not os.path.exists(os.path.join(victim.store, "stale")), 30, "stale copies dropped")
    assert all(not p.object_files(vid) for p in cluster.peers)
    assert held_before > 0


@pytest.mark.parametrize("how", ["shrink", "zeros"])
def test_freed_while_a_peer_is_down_stays_freed(cluster, how):
    """Objects freed inside a live VDI (a shrink, or zeros written over them
    whole) while one of their holders was down are never served again. The
    returning peer sets its copies aside, and no other peer has them, which
    is also what a last copy looks like: only the VDI's map may decide that
    a copy is taken back."""
    obj = 4 << 20
    cluster.format(5, copies=3)
    m = cluster.mount("a")
    data = os.urandom(16 * obj)
    with open(m.path("shrunk"), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    vid = m.vid("shrunk")
    victim = max(cluster.peers[1:], key=lambda p: len(p.object_files(vid)))
    assert len(victim.object_files(vid)) >= 4
    kill(victim)
    wait_for(lambda: states(cluster)[1][victim.address] == "down", 30, "victim down")
    if how == "shrink":
        os.truncate(m.path("shrunk"), obj)  # frees objects 1-15
        expect = data[:obj]
    else:  # all-zero writes covering objects 1-15: zero detection frees them
        zeros = mmap_aligned(obj)
        zeros[:] = bytes(obj)
        fd = os.open(m.path("shrunk"), os.O_WRONLY | os.O_DIRECT)
        try:
            for i in range(1, 16):
                assert os.pwritev(fd, [zeros], i * obj) == obj
            os.fsync(fd)
        finally:
            os.close(fd)
        expect = data[:obj] + bytes(15 * obj)
    others = [p for p in cluster.peers if p is not victim]
    first = f"{(vid << 32):016x}"  # the data object of index 0
    wait_for(lambda: set().union(*(p.object_files(vid) for p in others)) <= {first}, 30, "freed on the live peers")
    victim.start()
    wait_for(lambda: states(cluster)[1][victim.address] == "up", 30, "victim back")
    wait_for(lambda: not os.path.exists(os.path.join(victim.store, "stale")), 60, "stale copies dropped")
    wait_for(lambda: sum(len(p.object_files(vid)) for p in cluster.peers) == 3, 60, "three copies of object 0")
    for p in cluster.peers:
        assert p.object_files(vid) <= {first}, f"peer {p.peer_id} serves freed objects"
    with open(m.path("shrunk"), "rb") as f:
        assert f.read() == expect


def _map(peer):
    from vdifs.model.cluster import ClusterMap

    path = os.path.join(peer.store, "meta", "cluster_map")
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return ClusterMap.decode(f.read())


def _exactly_at_placement(peers, vid: int, copies: int) -> bool:
    """Every object of `vid` is served by exactly the peers placement names, and
    no handed-off copy is left anywhere."""
    from vdifs.model.placement import placement

    cmap = _map(peers[0])
    up = {p.peer_id for p in cmap.up_peers()}
    live = [p for p in peers if p.peer_id in up]
    held = {p.peer_id: p.object_files(vid, kind="") for p in live}
    everything = set().union(*held.values())
    if any(os.listdir(os.path.join(p.store, "handoff")) for p in live
           if os.path.isdir(os.path.join(p.store, "handoff"))):
        return False
    return bool(everything) and all(
        {pid for pid, names in held.items() if o in names} == set(placement(cmap, int(o, 16), copies))
        for o in everything)


def test_new_peer_gets_its_share_and_old_copies_never_come_back(cluster):
    """A peer joins: objects move to it, the peers they moved from stop serving
    them and drop them once everyone recovered. Then data changes and the new
    peer dies: placement hands its objects back to their old holders, which
    must fetch the current bytes, not serve what they held before the join."""
    import hashlib

    from tests.e2e.conftest import read_at

    cluster.format(3, copies=2)
    m = cluster.mount("a")
    payload = os.urandom(32 << 20)
    with open(m.path("vm"), "wb") as f:
        f.write(payload)
    vid = m.vid("vm")
    newcomer = cluster.add_peer("--join", cluster.peers[0].address, "--secret-file", cluster.secret)
    wait_for(lambda: (_map(newcomer) is not None and len(_map(newcomer).up_peers()) == 4
                      and _map(cluster.peers[0]).epoch == _map(newcomer).epoch
                      and newcomer.object_files(vid, kind="")
                      and _exactly_at_placement(cluster.peers, vid, 2)),
             90, "objects moved to the new peer and nowhere else")
    assert hashlib.sha256(read_at(m.path("vm"), 0, len(payload))).digest() == hashlib.sha256(payload).digest()
    moved = newcomer.object_files(vid, kind="00")

    changed = os.urandom(32 << 20)  # every object changes while the newcomer holds its share
    write_durably(m.path("vm"), changed, overwrite=True)
    kill(newcomer)
    wait_for(lambda: states(cluster)[1][newcomer.address] == "down", 30, "newcomer down")
    wait_for(lambda: _exactly_at_placement(cluster.peers[:3], vid, 2), 90, "objects back at 2 replicas")
    assert moved, "the newcomer held data objects"
    got = read_direct(m.path("vm"), len(changed))  # from the peers, not the mount's page cache
    assert hashlib.sha256(got).digest() == hashlib.sha256(changed).digest()


def read_direct(path: str, length: int) -> bytes:
    import mmap

    buf = mmap.mmap(-1, 1 << 20)
    out = bytearray()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        while len(out) < length:
            n = os.preadv(fd, [buf], len(out))
            assert n > 0
            out += buf[:min(n, length - len(out))]
    finally:
        os.close(fd)
    return bytes(out)


def test_cluster_check_finds_and_repairs_a_corrupted_replica(cluster):
    from .conftest import vdifs

    cluster.format(3, copies=3)
    m = cluster.mount("a")
    payload = os.urandom(8 << 20)
    write_durably(m.path("vm"), payload)
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
    assert res.returncode == 1 and "MISSING ON" in res.stdout and "needs --repair" in res.stdout
    vdifs(*args, "--repair")
    assert os.path.exists(path) and "identical" in vdifs(*args).stdout


def test_two_failures_one_after_the_other_lose_nothing(cluster):
    import hashlib

    from tests.e2e.conftest import read_at

    from .conftest import vdifs

    cluster.format(5, copies=3)  # five meta peers: a majority survives two failures
    m = cluster.mount("a")
    payload = os.urandom(24 << 20)
    write_durably(m.path("vm"), payload)
    check = ("cluster", "check", "--cluster", cluster.addresses, "--secret-file", cluster.secret)
    for victim in (cluster.peers[4], cluster.peers[3]):
        kill(victim)
        wait_for(lambda: states(cluster)[1][victim.address] == "down", 30, "victim down")
        # recovery brings every object back to 3 replicas before the next failure
        wait_for(lambda: vdifs(*check, check=False).returncode == 0, 90, "recovered to 3 replicas")
        assert hashlib.sha256(read_at(m.path("vm"), 0, len(payload))).digest() == hashlib.sha256(payload).digest()


def _first_replica(cluster, oid: int):
    """The peer a read of `oid` goes to first (placement order)."""
    from vdifs.model.cluster import ClusterMap
    from vdifs.model.placement import placement

    with open(os.path.join(cluster.peers[0].store, "meta", "cluster_map"), "rb") as f:
        cmap = ClusterMap.decode(f.read())
    first = placement(cmap, oid, cmap.copies)[0]
    return next(p for p in cluster.peers if p.peer_id == first)


def test_a_rotten_replica_is_never_served_and_repairs_itself_on_read(cluster):
    """Flipped bits in the replica a read goes to: the peer's block checksums
    catch them, it sets the file aside, fetches a good copy and serves that."""
    try:
        os.setxattr(cluster.root, "user.vdifs.probe", b"1")
    except OSError:
        pytest.skip("the file system under the test stores has no user xattrs (no checksums)")
    cluster.format(3, copies=3)
    m = cluster.mount("a", "--cache-size", "0")  # every read goes to a peer (none to the mount's own copies)
    payload = os.urandom(8 << 20)
    write_durably(m.path("vm"), payload)
    vid = m.vid("vm")
    name = sorted(cluster.peers[0].object_files(vid))[1]  # the second 4 MiB object
    bad = _first_replica(cluster, int(name, 16))
    path = os.path.join(bad.store, "obj", f"{vid:06x}", name)
    good = open(path, "rb").read()
    with open(path, "r+b") as f:
        f.seek(123456)
        f.write(b"\xde\xad\xbe\xef")
    assert read_direct(m.path("vm"), 8 << 20) == payload  # past the mount's page cache
    assert open(path, "rb").read() == good  # repaired in place
    aside = [os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(bad.store, "corrupt")) for f in fs]
    assert len(aside) == 1 and os.path.basename(aside[0]) == name
    assert open(aside[0], "rb").read() != good  # the rotten bytes were kept for inspection
    assert "corrupt" in bad.log_text() and "repaired from another peer" in bad.log_text()


def test_recovery_stops_short_of_filling_a_small_store(cluster):
    """A new peer whose store is a 40 MiB tmpfs, with a 24 MiB recovery reserve:
    recovery copies what fits, stops with free space >= the reserve, says so
    in `cluster status`, and the data stays whole (read from the other copies)."""
    import hashlib
    import subprocess

    from .conftest import vdifs

    cluster.format(3, copies=2)
    m = cluster.mount("a")
    payload = os.urandom(64 << 20)
    write_durably(m.path("vm"), payload)
    small = os.path.join(cluster.root, f"peer{len(cluster.peers)}")
    os.makedirs(small)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", small], check=True)
    try:
        newcomer = cluster.add_peer("--join", cluster.peers[0].address, "--secret-file", cluster.secret,
                                    "--recovery-reserve", "24M")
        status = ("cluster", "status", "--cluster", cluster.addresses, "--secret-file", cluster.secret)
        wait_for(lambda: "stopped: only" in vdifs(*status).stdout, 60, "recovery on the small store stops")
        out = vdifs(*status).stdout
        assert "the reserve is 24 MiB" in out and newcomer.peer_id in out
        st = os.statvfs(small)
        assert st.f_bavail * st.f_frsize >= 24 << 20
        assert newcomer.object_files(vid=None, kind="")  # it took what fit
        assert "recovery stopped: only" in newcomer.log_text()
        # the newcomer did not finish its epoch: the others keep what they handed off
        handed_off = [os.path.join(dp, f) for p in cluster.peers[:3]
                      for dp, _, fs in os.walk(os.path.join(p.store, "handoff")) for f in fs]
        assert handed_off
        got = read_direct(m.path("vm"), len(payload))
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    finally:
        cluster.stop()  # the peer must let go of the tmpfs
        subprocess.run(["umount", "-l", small], check=False)


def test_a_returning_peer_fetches_only_what_changed_while_it_was_away(cluster):
    """Delta resync: 16 objects, the peer is killed and marked down, one object
    changes, the peer comes back. It fetches what changed (and what moved to
    it), not the objects it still holds; every replica ends up current."""
    import hashlib
    import json

    from .conftest import vdifs

    cluster.format(4, copies=3)
    m = cluster.mount("a")
    size = 16 << 22
    payload = bytearray(os.urandom(size))
    write_durably(m.path("vm"), payload)
    vid = m.vid("vm")
    victim = cluster.peers[2]
    held_before = victim.object_files(vid)
    assert len(held_before) >= 8
    kill(victim)
    wait_for(lambda: states(cluster)[1][victim.address] == "down", 30, "victim down")
    changed = os.urandom(4 << 20)
    payload[0:4 << 20] = changed  # one object changes while it is away
    write_durably(m.path("vm"), changed, overwrite=True)
    victim.start()
    wait_for(lambda: states(cluster)[1][victim.address] == "up", 30, "victim back")
    check = ("cluster", "check", "--cluster", cluster.addresses, "--secret-file", cluster.secret)
    wait_for(lambda: vdifs(*check, check=False).returncode == 0, 90, "every replica current and in place")
    status = json.loads(vdifs("cluster", "status", "--json", "--cluster", cluster.addresses,
                              "--secret-file", cluster.secret).stdout)
    mine = next(p for p in status["peers"] if p["peer_id"] == victim.peer_id)
    pulled = mine["recovery"]["recovered_total"]
    assert pulled <= 2, f"pulled {pulled} objects: not a delta"
    assert "delta resync" in victim.log_text()
    assert len(victim.object_files(vid) & held_before) >= len(held_before) - 1  # kept, not refetched
    got = read_direct(m.path("vm"), size)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_peer_that_stops_and_returns_at_once_leaves_and_rejoins(cluster, how):
    """Killed (or stopped cleanly) and restarted before anyone noticed: it may
    have missed writes, so it takes itself out of the map (new epoch: waiting
    writers retry) and comes back through a resync; what it serves afterwards
    is current, including a write made while it was gone."""
    import hashlib

    cluster.format(3, copies=3)
    m = cluster.mount("a")
    payload = bytearray(os.urandom(16 << 20))
    write_durably(m.path("vm"), payload)
    victim = cluster.peers[1]
    epoch = states(cluster)[0]
    if how == "kill":
        kill(victim)
    else:
        assert victim.stop() == 0
    changed = os.urandom(1 << 20)  # waits for the map without it, then lands on the others
    payload[5 << 20:6 << 20] = changed
    fd = os.open(m.path("vm"), os.O_WRONLY | os.O_DIRECT)
    try:
        import mmap

        buf = mmap.mmap(-1, len(changed))
        buf[:] = changed
        victim.start()
        assert os.pwritev(fd, [buf], 5 << 20) == len(changed)
        os.fsync(fd)
    finally:
        os.close(fd)
    wait_for(lambda: states(cluster)[0] >= epoch + 2 and states(cluster)[1][victim.address] == "up", 30,
             "victim left and rejoined")
    # Either it came back before the others noticed and left by itself, or they
    # marked it down first (timing); both end in a resync, never in stale data.
    text = victim.log_text()
    assert "restarted before the cluster marked it down" in text or "was away since epoch" in text
    assert hashlib.sha256(read_direct(m.path("vm"), len(payload))).digest() == hashlib.sha256(payload).digest()
    from .conftest import vdifs

    check = ("cluster", "check", "--cluster", cluster.addresses, "--secret-file", cluster.secret)
    wait_for(lambda: vdifs(*check, check=False).returncode == 0, 60, "every replica identical and in place")


def test_replace_meta_swaps_a_dead_consensus_peer(cluster):
    """Three of four peers run the registers. One dies; replace-meta puts the
    fourth in its place. Then a second original one dies: the registers still
    have a majority (the survivor and the newcomer), so the map changes and
    VDIs can be created; without the swap they would be stuck."""
    from .conftest import vdifs

    cluster.format(4, copies=2)
    m = cluster.mount("a")
    meta = [p for p in cluster.info()["peers"] if p["meta"]]
    assert len(meta) == 3
    by_id = {p.peer_id: p for p in cluster.peers}
    old, second = by_id[meta[0]["peer_id"]], by_id[meta[1]["peer_id"]]
    new = next(p for p in cluster.peers if p.peer_id not in {x["peer_id"] for x in meta})
    args = ("cluster", "replace-meta", "--cluster", cluster.addresses, "--secret-file", cluster.secret)
    res = vdifs(*args, old.peer_id, new.peer_id, check=False)
    assert res.returncode != 0 and "is up" in res.stderr  # a live meta peer is never replaced
    with open(m.path("before"), "wb") as f:
        f.write(b"x" * 4096)
    kill(old)
    wait_for(lambda: states(cluster)[1][old.address] == "down", 30, "old meta peer down")
    res = vdifs(*args, old.address, new.address)
    assert new.peer_id in res.stdout and "registers copied" in res.stdout
    meta_now = {p["peer_id"] for p in cluster.info()["peers"] if p["meta"]}
    assert meta_now == {meta[1]["peer_id"], meta[2]["peer_id"], new.peer_id}
    # the new member holds every register (the directory among them)
    assert any(n == b"directory".hex() for n in os.listdir(os.path.join(new.store, "meta", "acceptor")))
    check = ("cluster", "check", "--cluster", cluster.addresses, "--secret-file", cluster.secret)
    wait_for(lambda: vdifs(*check, check=False).returncode == 0, 60, "copies=2 again before the next failure")
    kill(second)
    wait_for(lambda: states(cluster)[1][second.address] == "down", 30, "second meta peer down (map changed)")
    with open(m.path("after"), "wb") as f:  # a directory change needs a register majority
        f.write(b"y" * 4096)
    assert sorted(os.listdir(m.mp)) == ["after", "before"]
    with open(m.path("before"), "rb") as f:
        assert f.read() == b"x" * 4096


def test_snapshots_and_clones_are_recovered_and_checked_like_vdis(cluster):
    """Recovery and `cluster check` cover every data vid: the VDI's current
    one, its snapshot's, and a clone's (a snapshot moves a VDI to a new data
    vid; recovering only the VDI's first vid would lose the copies-up)."""
    import hashlib
    import json
    import time

    from tests.e2e.conftest import read_at, write_at

    from .conftest import vdifs

    cluster.format(4, copies=2)
    m = cluster.mount("a")
    base = os.urandom(12 << 20)
    write_durably(m.path("vm"), base)
    vdifs("vdi", "--mount", m.mp, "snapshot", "vm", "s1")
    write_at(m.path("vm"), 5 << 20, b"\x42" * 8192, fsync=True)  # copy-up under the new data vid
    vdifs("vdi", "--mount", m.mp, "clone", "vm@s1", "c1")
    write_at(m.path("c1"), 9 << 20, b"\x43" * 8192, fsync=True)
    tree = {v["name"]: v for v in json.loads(vdifs("vdi", "--mount", m.mp, "tree", "--json").stdout)}
    data_vids = {tree["vm"]["data_vid"], tree["vm"]["snapshots"][0]["data_vid"], tree["c1"]["data_vid"]}
    assert len(data_vids) == 3
    check = ("cluster", "check", "--cluster", cluster.addresses, "--secret-file", cluster.secret, "--json")
    report = json.loads(vdifs(*check).stdout)
    # data: 3 objects (12 MiB) + one copy-up each; plus one map object per data vid
    assert report["problems"] == [] and report["objects"] == (3 + 1 + 1) + 3
    victim = next(p for p in cluster.peers if any(p.object_files(v) for v in data_vids))
    kill(victim)
    wait_for(lambda: states(cluster)[1][victim.address] == "down", 30, "victim down")
    try:
        wait_for(lambda: vdifs(*check, check=False).returncode == 0, 90, "every data vid back to 2 replicas")
    except AssertionError:
        raise AssertionError(vdifs(*check[:-1], check=False).stdout) from None
    expect_vm = bytearray(base)
    expect_vm[5 << 20:(5 << 20) + 8192] = b"\x42" * 8192
    expect_c1 = bytearray(base)
    expect_c1[9 << 20:(9 << 20) + 8192] = b"\x43" * 8192
    for path, want in ((m.path("vm"), expect_vm), (m.path(".snapshots/vm@s1"), base), (m.path("c1"), expect_c1)):
        assert hashlib.sha256(read_at(path, 0, len(base))).digest() == hashlib.sha256(want).digest(), path
    # Deleting the snapshot and the clone frees what nothing points at; check proves it
    vdifs("vdi", "--mount", m.mp, "delete", "c1")
    vdifs("vdi", "--mount", m.mp, "snapshot-delete", "vm@s1")
    wait_for(lambda: json.loads(vdifs(*check, check=False).stdout)["objects"] == 3 + 1, 60,
             "the clone's and the snapshot's own objects freed")  # vm's 3 data objects and its map
    report = json.loads(vdifs(*check).stdout)
    assert report["unreferenced"] == [] and report["lost"] == [] and report["stray_vids"] == []
    assert hashlib.sha256(read_at(m.path("vm"), 0, len(base))).digest() == hashlib.sha256(expect_vm).digest()
    # and it notices a leaked object and a lost one
    holder = next(p for p in cluster.peers if p.proc is not None and p.object_files(tree["vm"]["data_vid"]))
    own = tree["vm"]["data_vid"]
    leak = os.path.join(holder.store, "obj", f"{own:06x}", f"{(own << 32) | 999:016x}")
    with open(leak, "wb") as f:
        f.write(b"nobody points at me")
    res = vdifs(*check, check=False)
    report = json.loads(res.stdout)
    assert res.returncode == 1 and [u["oid"] for u in report["unreferenced"]] == [f"{(own << 32) | 999:016x}"]
    # and a stray vid nobody knows, with one old object and one just written
    stray_dir = os.path.join(holder.store, "obj", f"{0x777:06x}")
    os.makedirs(stray_dir)
    stray_old, stray_young = (os.path.join(stray_dir, f"{(0x777 << 32) | i:016x}") for i in (1, 2))
    for path in (stray_old, stray_young):
        with open(path, "wb") as f:
            f.write(b"left behind")
    two_hours_ago = time.time() - 7200
    os.utime(stray_old, (two_hours_ago, two_hours_ago))
    repair = (*check, "--repair")
    report = json.loads(vdifs(*repair, check=False).stdout)  # the planted leak is young: kept
    assert report["stray_vids"] == [0x777] and report["collected"] == 1 and report["kept_young"] == 2
    assert os.path.exists(leak) and os.path.exists(stray_young) and not os.path.exists(stray_old)
    for path in (leak, stray_young):
        os.utime(path, (two_hours_ago, two_hours_ago))
    res = vdifs(*repair, check=False)
    report = json.loads(res.stdout)
    assert res.returncode == 0 and report["collected"] == 2 and report["kept_young"] == 0, res.stdout
    assert not os.path.exists(leak) and not os.path.exists(stray_dir)
    report = json.loads(vdifs(*check).stdout)
    assert report["unreferenced"] == [] and report["stray_vids"] == []
    # what the VDI's map points at was never touched
    assert hashlib.sha256(read_at(m.path("vm"), 0, len(base))).digest() == hashlib.sha256(expect_vm).digest()
    copy_up = f"{(own << 32) | 1:016x}"  # the object vm copied up: its map points at it
    for p in cluster.peers:
        path = os.path.join(p.store, "obj", f"{own:06x}", copy_up)
        if os.path.exists(path):
            os.unlink(path)
    report = json.loads(vdifs(*check, check=False).stdout)
    assert report["lost"] == [{"oid": copy_up}]
    assert "LOST: 1 objects" in vdifs(*check[:-1], check=False).stdout


@pytest.fixture
def small_stores(cluster):
    """The first three peers' stores on 96 MiB tmpfs file systems."""
    import subprocess

    paths = [os.path.join(cluster.root, f"peer{i}") for i in range(3)]
    for p in paths:
        os.makedirs(p)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", p], check=True)
    yield paths
    for p in paths:
        subprocess.run(["umount", "-l", p])


def test_a_full_pool_answers_enospc_not_eio(cluster, small_stores):
    """A write the replicas cannot store fails with ENOSPC, which QEMU
    answers by pausing the VM (werror=enospc), not with an I/O error. The
    peers' reserve keeps room for what must still be written: the close
    stores the object map at once, `rm` works, and then writes work again."""
    import errno
    import time

    cluster.format(3, copies=3)
    m = cluster.mount("a")
    with open(m.path("big"), "wb") as f:
        f.truncate(400 << 20)
    fd = os.open(m.path("big"), os.O_WRONLY | os.O_DIRECT)
    buf = mmap_aligned(1 << 20)
    failed = None
    try:
        for i in range(200):
            buf[:8] = i.to_bytes(8, "little")
            try:
                os.pwrite(fd, buf, i << 20)
            except OSError as e:
                failed = (i, e.errno)
                break
        small = None  # then 4 KiB writes, which could take the file system's last pages
        for j in range(4096):
            try:
                os.pwrite(fd, buf[:4096], (300 << 20) + (j << 12))
            except OSError as e:
                small = e.errno
                break
    finally:
        closing = time.monotonic()
        os.close(fd)
    assert failed is not None and failed[1] == errno.ENOSPC, failed
    assert small == errno.ENOSPC
    assert 60 <= failed[0] <= 96  # the stores hold 96 MiB each, some of it kept back
    assert time.monotonic() - closing < 10  # the map of what was written fits in the reserve
    assert all(p.proc.poll() is None for p in cluster.peers)
    info = cluster.info()
    assert all(p["free"] < (8 << 20) for p in info["peers"]), info  # what data may still take
    # what was acknowledged reads back
    with open(m.path("big"), "rb") as f:
        for i in (0, failed[0] - 1):
            f.seek(i << 20)
            assert f.read(8) == i.to_bytes(8, "little")
    os.unlink(m.path("big"))  # the directory register and the deletes still go through
    wait_for(lambda: all(not p.object_files() for p in cluster.peers), 60, "the VDI's objects freed")
    with open(m.path("again"), "wb") as f:  # and the pool takes writes again
        f.write(os.urandom(16 << 20))
        f.flush()
        os.fsync(f.fileno())


def mmap_aligned(n: int):
    import mmap

    m = mmap.mmap(-1, n)  # page-aligned, as O_DIRECT wants
    m.write(os.urandom(n))
    return m


@pytest.mark.parametrize("form", ["drive", "blockdev"])
def test_a_guest_that_fills_the_pool_pauses_and_resumes_when_space_is_freed(cluster, small_stores, tmp_path, form):
    """A real QEMU guest writes its disk until the pool is full: QEMU pauses
    it (the write failed with ENOSPC, its default werror=enospc), QMP says
    io-error / nospace, every peer lives. Another VDI is deleted to make room
    (deletes work on a full pool); `cont` resumes the guest, which finishes,
    and every block it wrote reads back."""
    from tests.guest import Guest

    from .test_migration import disk

    cluster.format(3, copies=3)
    m = cluster.mount("a")
    with open(m.path("ballast"), "wb") as f:
        f.write(os.urandom(40 << 20))
        f.flush()
        os.fsync(f.fileno())
    blocks = 72  # more than fits beside the ballast, less than fits without it
    with open(m.path("vm"), "wb") as f:
        f.truncate(blocks << 20)
    g = Guest(str(tmp_path), "fill", disk(form, m.path("vm")), "fill", cmdline=f"vdifs.blocks={blocks}")
    try:
        wait_for(lambda: g.qmp.cmd("query-status")["status"] != "running" or "done" in g.console(), 180,
                 "the guest paused on a full pool")
        status = g.qmp.cmd("query-status")
        assert status["status"] == "io-error" and not status["running"], (status, g.console()[-2000:])
        assert [b.get("io-status") for b in g.qmp.cmd("query-block") if b.get("inserted")] == ["nospace"]
        filled = g.console().count("filled ")
        assert 10 < filled < blocks and not g.errors(), g.console()[-2000:]
        assert all(p.proc.poll() is None for p in cluster.peers)

        ballast = m.vid("ballast")
        os.unlink(m.path("ballast"))
        wait_for(lambda: not any(p.object_files(ballast) for p in cluster.peers), 60, "the ballast's objects freed")
        g.qmp.cmd("cont")
        wait_for(lambda: f"done {blocks}" in g.console() or g.errors()
                 or g.qmp.cmd("query-status")["status"] == "io-error", 180, "the guest finished")
        assert not g.errors() and f"done {blocks}" in g.console(), g.console()[-2000:]
        g.proc.wait(60)  # it powers off
    finally:
        g.stop()
    fd = os.open(m.path("vm"), os.O_RDONLY)
    try:
        for i in range(blocks):
            assert os.pread(fd, 16, i << 20) == b"block %08d\n\0" % i, i
    finally:
        os.close(fd)


def test_the_background_leak_pass_removes_old_leaks_and_nothing_in_use(cluster):
    """With a pass every 2 s (and the default grace of an hour): an object of
    a live VDI that no map points at, left alone for two hours, and an old
    object of a vid the directory does not know are removed by the peers
    themselves; a leak written just now is kept; an old one in the VDI fio
    is writing is kept while fio holds it open (a writer's map may not be
    stored yet), and removed once it is closed; fio writing and verifying
    all the while (objects created, maps growing) loses nothing."""
    import hashlib
    import json
    import time

    from tests.e2e.conftest import FioVerify, read_at

    from .conftest import vdifs

    cluster.format(3, copies=3, peer_options=("--leak-pass-interval", "2"))
    m = cluster.mount("a")
    base = os.urandom(12 << 20)
    write_durably(m.path("vm"), base)
    own = m.vid("vm")
    holder = cluster.peers[1]
    folder = os.path.join(holder.store, "obj", f"{own:06x}")
    old_leak, young_leak = (os.path.join(folder, f"{(own << 32) | i:016x}") for i in (999, 998))
    stray_dir = os.path.join(holder.store, "obj", f"{0x777:06x}")
    os.makedirs(stray_dir)
    stray = os.path.join(stray_dir, f"{(0x777 << 32) | 1:016x}")
    two_hours_ago = time.time() - 7200

    def fio_holds_its_lease() -> bool:
        out = vdifs("vdi", "--mount", m.mp, "lock-info", "fio.img", "--json", check=False).stdout
        return bool(out) and json.loads(out)["holder"] is not None

    # made full size with no file handle of ours: fio opens it once (no layout pass that opens and
    # closes it first), and the only lease on it is fio's, so no leak pass falls between two opens
    vdifs("vdi", "--mount", m.mp, "create", "fio.img", "48M")
    with FioVerify(m.path("fio.img"), 48, rate="4m", fsync=16) as fio:
        wait_for(fio_holds_its_lease, 30, "fio's open of its file")
        busy = m.vid("fio.img")
        in_use = os.path.join(holder.store, "obj", f"{busy:06x}", f"{(busy << 32) | 999:016x}")
        os.makedirs(os.path.dirname(in_use), exist_ok=True)
        for path in (old_leak, young_leak, stray, in_use):
            with open(path, "wb") as f:
                f.write(b"nobody points at me")
        for path in (old_leak, stray, in_use):
            os.utime(path, (two_hours_ago, two_hours_ago))
        wait_for(lambda: not os.path.exists(old_leak) and not os.path.exists(stray_dir), 60,
                 "the old leaks removed by the background pass")
        time.sleep(4)  # two more passes
        assert os.path.exists(in_use)  # fio holds its VDI's lease
        fio.finish(timeout=300)
    wait_for(lambda: not os.path.exists(in_use), 60, "the leak of the closed VDI removed")
    assert os.path.exists(young_leak)
    info = cluster.info()["peers"]
    assert sum(p["leaks_collected"] for p in info) == 3 and sum(p["leak_passes"] > 0 for p in info) == 1
    assert hashlib.sha256(read_at(m.path("vm"), 0, len(base))).digest() == hashlib.sha256(base).digest()
    report = json.loads(vdifs("cluster", "check", "--cluster", cluster.addresses, "--secret-file", cluster.secret,
                              "--json", check=False).stdout)
    assert [u["oid"] for u in report["unreferenced"]] == [f"{(own << 32) | 998:016x}"], report
    assert report["lost"] == [] and report["stray_vids"] == []
    assert [p["oid"] for p in report["problems"]] == [f"{(own << 32) | 998:016x}"]  # the leak has one replica
