import os
import threading

import pytest

from vdifs.model.cluster import ClusterMap
from vdifs.model.ids import unpack_oid
from vdifs.model.placement import placement
from tests.e2e.conftest import OBJ, FioVerify, need, read_at, run, write_at
from tests.pagecache import pages_cached

from .conftest import vdifs, wait_for


def local_map(peer) -> ClusterMap:
    with open(os.path.join(peer.store, "meta", "cluster_map"), "rb") as f:
        return ClusterMap.decode(f.read())


def test_format_info_and_replicated_io(cluster):
    need("qemu-img", "qemu-io", "fio")
    cluster.format(3, copies=3)
    info = cluster.info()
    assert info["epoch"] == 1 and info["copies"] == 3 and len(info["peers"]) == 3
    assert all(p["reachable"] and p["state"] == "up" and p["meta"] for p in info["peers"])
    assert info["capacity"] == info["raw_total"] // 3
    m = cluster.mount("a")
    run("qemu-img", "create", "-f", "raw", m.path("db01"), "64M")
    pattern = [("0xab", OBJ - 4096, 8192), ("0x11", 0, 512), ("0x77", (64 << 20) - 512, 512)]
    run("qemu-io", "-f", "raw", *sum([["-c", f"write -P {p} {o} {n}"] for p, o, n in pattern], []), m.path("db01"))
    out = run("qemu-io", "-f", "raw", *sum([["-c", f"read -P {p} {o} {n}"] for p, o, n in pattern], []),
              m.path("db01")).stdout
    assert "verification failed" not in out
    with FioVerify(m.path("fio.img"), 32) as fio:
        fio.finish(timeout=300)
    # every data object is on exactly `copies` peers: the ones placement names
    cmap = local_map(cluster.peers[0])
    by_id = {p.peer_id: p for p in cluster.peers}
    for name in ("db01", "fio.img"):
        vid = m.vid(name)
        held = {pid: p.object_files(vid) for pid, p in by_id.items()}
        all_objects = set().union(*held.values())
        assert all_objects
        for fname in all_objects:
            oid = int(fname, 16)
            holders = {pid for pid, files in held.items() if fname in files}
            assert holders == set(placement(cmap, oid, 3)), fname
    assert len(cluster.peers[0].object_files(m.vid("fio.img"))) == 8  # 32 MiB = 8 objects
    # statfs: the pool's capacity divided by copies
    st = os.statvfs(m.mp)
    assert abs(st.f_blocks * st.f_frsize - info["capacity"]) < 1 << 30
    # small O_DIRECT overwrites and reads of allocated objects are answered by
    # the peers at once (their fast path), and the bytes are right
    import mmap

    def answered() -> int:
        return sum(p["answered_at_once"] for p in cluster.info()["peers"])

    before = answered()
    buf = mmap.mmap(-1, 4096)
    fd = os.open(m.path("fio.img"), os.O_RDWR | os.O_DIRECT)
    try:
        for i in range(16):
            buf[:] = bytes([i + 1]) * 4096
            assert os.pwritev(fd, [buf], i * (1 << 20)) == 4096
        for i in range(16):
            assert os.preadv(fd, [buf], i * (1 << 20)) == 4096 and buf[:] == bytes([i + 1]) * 4096
    finally:
        os.close(fd)
    assert answered() - before >= 16 * 3  # 16 writes to 3 replicas, 16 reads from one


def test_two_mounts_share_one_namespace(cluster):
    cluster.format(3, copies=2)
    a, b = cluster.mount("a"), cluster.mount("b")
    errors = []

    def create_many(m, prefix):
        for i in range(50):
            try:
                open(m.path(f"{prefix}{i:02d}"), "wb").close()
            except OSError as e:
                errors.append(e)

    threads = [threading.Thread(target=create_many, args=(a, "a")), threading.Thread(target=create_many, args=(b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    wait_for(lambda: len(os.listdir(a.mp)) == 100 and len(os.listdir(b.mp)) == 100, 10, "100 VDIs on both")
    assert sorted(os.listdir(a.mp)) == sorted(os.listdir(b.mp))
    vids = {a.vid(n) for n in os.listdir(a.mp)}
    assert len(vids) == 100  # no vid handed out twice
    # a rename on one mount shows on the other within a second
    write_at(a.path("a00"), 0, b"renamed data")
    os.rename(a.path("a00"), a.path("moved"))
    # (mounts watch the directory every 0.5 s; no timing assertion, a bounded wait)
    wait_for(lambda: "moved" in os.listdir(b.mp) and "a00" not in os.listdir(b.mp), 10, "rename seen")
    assert read_at(b.path("moved"), 0, 12) == b"renamed data"
    os.unlink(b.path("b07"))
    wait_for(lambda: "b07" not in os.listdir(a.mp), 5, "delete seen")
    with pytest.raises(FileNotFoundError):
        os.stat(a.path("b07"))


def test_labels_set_by_another_mount_while_the_holder_writes(cluster):
    """As libvirt labels an image on a migration's destination while the
    source still runs the VM: the labels (security.*, trusted.*) are set from
    the mount that does not hold the lease, every mount sees them, and the
    holder's own directory updates (a size change, its flushes) keep them."""
    cluster.format(3, copies=2)
    a, b = cluster.mount("a"), cluster.mount("b")
    label = b"system_u:object_r:svirt_image_t:s0:c17,c604"
    fd = os.open(a.path("vm"), os.O_RDWR | os.O_CREAT)
    try:
        os.pwrite(fd, b"first" * 1000, 0)
        os.fsync(fd)
        wait_for(lambda: "vm" in os.listdir(b.mp), 10, "the VDI seen by b")
        os.setxattr(b.path("vm"), "security.selinux", label)
        os.setxattr(b.path("vm"), "trusted.libvirt.security.ref_selinux", b"1")

        def seen_by_a() -> bool:
            try:
                return os.getxattr(a.path("vm"), "security.selinux") == label
            except OSError:
                return False

        wait_for(seen_by_a, 10, "the label seen by the writing mount")
        os.pwrite(fd, b"grown", 8 << 20)  # a size change: the holder rewrites its record
        os.fsync(fd)
    finally:
        os.close(fd)
    for m in (a, b):
        assert os.getxattr(m.path("vm"), "security.selinux") == label
        assert sorted(os.listxattr(m.path("vm"))) == ["security.selinux", "trusted.libvirt.security.ref_selinux"]
    wait_for(lambda: os.stat(b.path("vm")).st_size == (8 << 20) + 5, 10, "the new size seen by b")
    assert read_at(b.path("vm"), 0, 5000) == b"first" * 1000
    assert read_at(b.path("vm"), 8 << 20, 5) == b"grown"
    os.removexattr(a.path("vm"), "trusted.libvirt.security.ref_selinux")
    wait_for(lambda: os.listxattr(b.path("vm")) == ["security.selinux"], 10, "the removal seen by b")


def test_per_vdi_copies(cluster):
    cluster.format(3, copies=3)
    m = cluster.mount("a")
    vdifs("vdi", "--mount", m.mp, "create", "two", "16M", "--copies", "2")
    open(m.path("one"), "wb").close()
    os.setxattr(m.path("one"), "user.vdifs.copies", b"1")
    for name in ("two", "one"):
        with open(m.path(name), "r+b") as f:
            f.write(os.urandom(2 * OBJ))
    for name, copies in (("two", 2), ("one", 1)):
        vid = m.vid(name)
        counts = [len(p.object_files(vid)) for p in cluster.peers]
        assert sum(counts) == 2 * copies, (name, counts)
    with pytest.raises(OSError):
        os.setxattr(m.path("one"), "user.vdifs.copies", b"4")  # more than the peers


def test_peer_joins_later_and_refuses_foreign_store(cluster, tmp_path):
    cluster.format(3, copies=2)
    newcomer = cluster.add_peer("--join", cluster.peers[0].address, "--secret-file", cluster.secret)
    wait_for(lambda: len(cluster.info()["peers"]) == 4, 20, "4 peers in the map")
    assert cluster.info()["epoch"] == 2
    wait_for(lambda: local_map(cluster.peers[1]).epoch == 2, 10, "map propagated")
    # a peer refuses to start on a store that belongs to another cluster
    assert newcomer.stop() == 0
    newcomer.start()  # restarts from its own store, no --join or --secret-file needed
    wait_for(lambda: "epoch 2" in newcomer.log_text(), 10, "restarted peer back in its cluster")
    assert newcomer.stop() == 0
    other = tmp_path / "other-secret"
    other.write_text("cluster=ffff\nsecret=" + "00" * 32 + "\n")
    res = vdifs("peer", "--store", newcomer.store, "--listen", "127.0.0.1:1",
                "--secret-file", str(other), check=False, timeout=30)
    assert res.returncode == 1 and "belongs to cluster" in res.stderr and "Traceback" not in res.stderr


def test_peer_stops_cleanly_on_sigterm(cluster):
    cluster.format(1, copies=1)
    assert cluster.peers[0].stop() == 0
    assert "SIGTERM" in cluster.peers[0].log_text()


def test_peer_threads_run_with_the_chosen_cpu_policy(cluster):
    """Every thread of a peer, its worker threads too, is SCHED_BATCH by
    default (design change 25); --cpu-policy normal keeps the default policy."""
    cluster.format(1, copies=1)
    m = cluster.mount("a")
    with open(m.path("disk"), "wb") as f:  # creates: the store's worker threads start
        f.write(b"x" * (1 << 20))
    batch = cluster.peers[0]
    normal = cluster.add_peer("--cpu-policy", "normal")

    def policies(peer) -> set[int]:
        tasks = os.listdir(f"/proc/{peer.proc.pid}/task")
        return {os.sched_getscheduler(int(t)) for t in tasks}

    assert len(os.listdir(f"/proc/{batch.proc.pid}/task")) > 1
    assert policies(batch) == {os.SCHED_BATCH}
    assert policies(normal) == {os.SCHED_OTHER}


def test_bad_traffic_is_refused_while_fio_runs(cluster):
    import socket
    import struct

    import trio

    from vdifs.meta.credentials import read_credentials
    from vdifs.wire.rpc import RpcClient

    cluster.format(3, copies=3)
    m = cluster.mount("a")
    target = cluster.peers[0]
    fio = FioVerify(m.path("fio.img"), 48)
    host, port = target.address.rsplit(":", 1)

    def raw(payload: bytes) -> None:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.recv(4096)  # the server's hello
            s.sendall(payload)
            s.settimeout(5)
            try:
                while s.recv(65536):
                    pass
            except (ConnectionResetError, socket.timeout):
                pass

    raw(os.urandom(4096))  # random bytes
    raw(struct.pack(">I", 2 << 30) + b"x" * 64)  # a 2 GiB length prefix
    raw(struct.pack(">II", 7, 3) + b"\xc1\xc1\xc1")  # a well-framed message that is not msgpack
    creds = read_credentials(cluster.secret)

    async def bad_clients():
        async with trio.open_nursery() as n:
            wrong = RpcClient(target.address, b"not the secret", n)
            with pytest.raises(Exception, match="authentication failed"):
                await wrong.call("cluster.map")
            good = RpcClient(target.address, creds.secret, n)
            await good.call("cluster.map")
            await good._frames.send([1, 2, 3])  # authenticated, then a frame with wrong types
            await trio.sleep(0.5)
            with pytest.raises(Exception):
                await good.call("obj.read", {"oid": "x", "offset": -1, "length": 1, "epoch": 1})
            n.cancel_scope.cancel()

    with fio:
        trio.run(bad_clients)
        fio.finish(timeout=300)
    log = target.log_text()
    assert log.count("refused connection") >= 5, log
    for reason in ("exceeds", "authentication failed", "request must be", "undecodable"):
        assert reason in log, reason
    assert target.proc.poll() is None  # still serving


def test_cluster_cli_errors_are_one_line(cluster, tmp_path):
    p = cluster.add_peer()
    res = vdifs("cluster", "format", "--copies", "3", "--secret-file", str(tmp_path / "s"), p.address, check=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") == 0 and "copies=3 needs at least 3 peers" in res.stderr
    assert not (tmp_path / "s").exists()  # a refused format writes no secret
    vdifs("cluster", "format", "--copies", "1", "--secret-file", str(tmp_path / "s"), p.address)
    res = vdifs("cluster", "info", "--cluster", "127.0.0.1:1", "--secret-file", str(tmp_path / "s"), check=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr and "no peer answered" in res.stderr
    res = vdifs("cluster", "info", "--secret-file", str(tmp_path / "missing"), "--cluster", p.address, check=False)
    assert res.returncode == 1 and "no secret file" in res.stderr


@pytest.mark.parametrize("uncached", [False, True])
def test_large_writes_are_cached_only_where_reads_go(cluster, uncached):
    """By default, sequential 1 MiB writes land in the page cache of each
    object's first replica (which serves its reads) and past it on the
    others; with --cached-replica-writes, on every replica (random writes
    that follow find their blocks there). The data reads back whole, from the
    mount and from every replica's file."""
    import hashlib
    import mmap

    cluster.format(3, copies=3, peer_options=() if uncached else ("--cached-replica-writes",))
    m = cluster.mount("a")
    mib, size = 1 << 20, 16 << 20
    data = os.urandom(size)
    with open(m.path("seq.img"), "wb") as f:
        f.truncate(size)
    buf = mmap.mmap(-1, mib)
    fd = os.open(m.path("seq.img"), os.O_WRONLY | os.O_DIRECT)
    try:
        for off in range(0, size, mib):
            buf[:] = data[off:off + mib]
            assert os.pwritev(fd, [buf], off) == mib
        os.fsync(fd)
    finally:
        os.close(fd)
    vid = m.vid("seq.img")
    cmap = local_map(cluster.peers[0])
    by_id = {p.peer_id: p for p in cluster.peers}
    names = cluster.peers[0].object_files(vid)
    assert len(names) == size // OBJ
    for name in sorted(names):
        oid = int(name, 16)
        first = placement(cmap, oid, 1)[0]
        chunk = data[unpack_oid(oid)[2] * OBJ:][:OBJ]
        for pid in placement(cmap, oid, 3):
            path = os.path.join(by_id[pid].store, "obj", f"{vid:06x}", name)
            ofd = os.open(path, os.O_RDONLY)
            try:
                cached = pages_cached(path, 0, OBJ)
                want = OBJ // 4096 if pid == first or not uncached else 0
                assert cached == want, (name, pid, first, cached)
                assert os.pread(ofd, OBJ, 0) == chunk, (name, pid)
            finally:
                os.close(ofd)
    with open(m.path("seq.img"), "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
