"""One writer per VDI across mounts: leases and fencing with real mounts."""

import errno
import os
import signal
import subprocess
import sys

import pytest

from tests.e2e.conftest import read_at, run

from .conftest import vdifs, wait_for

TERM = "3"
HOLDER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
print("open", flush=True)
for line in sys.stdin:
    cmd, off, byte, n = line.split()
    try:
        os.pwrite(fd, bytes([int(byte, 16)]) * int(n), int(off))
        if cmd == "ws":
            os.fsync(fd)
        print("ok", flush=True)
    except OSError as e:
        print("err", e.errno, flush=True)
"""


class Holder:
    """A process keeping a VDI open for writing, writing when told."""

    def __init__(self, path: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, path], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if line != "open":
            raise OSError(f"holder could not open {path}: {self.proc.stderr.read()}")

    def write(self, offset: int, byte: int, n: int, *, sync: bool = False) -> str:
        self.proc.stdin.write(f"{'ws' if sync else 'w'} {offset} {byte:x} {n}\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def open_errno(path: str, flags: int) -> int:
    try:
        os.close(os.open(path, flags))
        return 0
    except OSError as e:
        return e.errno


@pytest.fixture
def two(cluster):
    cluster.format(3, copies=3)
    a = cluster.mount("a", "--lease-term", TERM)
    b = cluster.mount("b", "--lease-term", TERM)
    with open(a.path("vm"), "wb") as f:
        f.truncate(16 << 20)
    wait_for(lambda: os.path.exists(b.path("vm")), 10, "vm on b")
    holders = []
    yield cluster, a, b, holders
    for h in holders:
        if h.proc.poll() is None:
            h.proc.kill()


def test_one_writer_read_only_everywhere_and_handover(two):
    cluster, a, b, holders = two
    h = Holder(a.path("vm"))
    holders.append(h)
    assert h.write(0, 0x11, 65536, sync=True) == "ok"
    assert open_errno(b.path("vm"), os.O_RDWR) == errno.EBUSY
    assert open_errno(b.path("vm"), os.O_WRONLY) == errno.EBUSY
    assert open_errno(b.path("vm"), os.O_RDONLY) == 0  # readers are welcome
    assert "virtual size: 16 MiB" in run("qemu-img", "info", b.path("vm")).stdout
    info = vdifs("vdi", "--mount", b.mp, "lock-info", "vm").stdout
    assert a.mp in info and "generation" in info
    # maintenance from the other mount must not race the writer
    for args in (["resize", "vm", "32M"], ["rename", "vm", "vm2"], ["delete", "vm"]):
        res = vdifs("vdi", "--mount", b.mp, *args, check=False)
        assert res.returncode == 1 and "in use by" in res.stderr and a.mp in res.stderr, res.stderr
    h.close()  # the last writable handle: the lease goes at once
    wait_for(lambda: open_errno(b.path("vm"), os.O_RDWR) == 0, 10, "B can write after A closed")
    hb = Holder(b.path("vm"))
    holders.append(hb)
    assert read_at(b.path("vm"), 0, 65536) == b"\x11" * 65536  # hand-over keeps the data
    assert hb.write(65536, 0x22, 4096, sync=True) == "ok"
    assert open_errno(a.path("vm"), os.O_RDWR) == errno.EBUSY
    hb.close()


def test_a_reader_elsewhere_drops_its_cached_pages_when_the_holder_changed_the_vdi(two):
    """The mount asks the kernel for no attribute check before each read
    (design change 61): when another mount's writes show in the directory
    (a new mtime), a reader here holding the file open must lose its cached
    pages, or it would read the old bytes for as long as the file is open."""
    cluster, a, b, holders = two
    h = Holder(a.path("vm"))
    holders.append(h)
    assert h.write(0, 0x11, 65536, sync=True) == "ok"
    fd = os.open(b.path("vm"), os.O_RDONLY)  # buffered: its pages stay in b's page cache
    try:
        assert os.pread(fd, 65536, 0) == b"\x11" * 65536
        assert h.write(0, 0x33, 65536, sync=True) == "ok"
        h.close()  # the mtime reaches the directory
        wait_for(lambda: os.pread(fd, 65536, 0) == b"\x33" * 65536, 10, "the reader sees the new bytes")
    finally:
        os.close(fd)


def test_paused_holder_is_fenced_after_takeover(two):
    cluster, a, b, holders = two
    h = Holder(a.path("vm"))
    holders.append(h)
    assert h.write(0, 0x11, 1 << 20, sync=True) == "ok"
    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        # B's writable open is refused until the lease stood still for a whole term
        wait_for(lambda: open_errno(b.path("vm"), os.O_RDWR) == 0, 60, "takeover by B")
        hb = Holder(b.path("vm"))
        holders.append(hb)
        assert hb.write(0, 0x22, 1 << 20, sync=True) == "ok"
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    # The old holder resumes. It has sent an fsync, so its writes go behind:
    # the first may still be taken into the window, but its write-back is
    # refused, every later write and every fsync fails, and nothing lands.
    results = [h.write((2 << 20) + i * 4096, 0x33, 4096, sync=bool(i % 2)) for i in range(6)]
    assert results[0] in ("ok", f"err {errno.EIO}")
    assert results[1:] == [f"err {errno.EIO}"] * 5, results
    hb.close()
    out = run("qemu-io", "-r", "-f", "raw", "-c", f"read -P 0x22 0 {1 << 20}",
              "-c", f"read -P 0 {2 << 20} {6 * 4096}", b.path("vm")).stdout
    assert "verification failed" not in out and out.count("read ") == 2, out
    log = open(a.log).read()
    assert "lease lost" in log or "fenced at lease generation" in log


def test_killed_holder_is_taken_over_with_its_fsynced_data(two):
    cluster, a, b, holders = two
    h = Holder(a.path("vm"))
    holders.append(h)
    assert h.write(4 << 20, 0x44, 8192, sync=True) == "ok"
    a.kill9()
    h.proc.kill()
    wait_for(lambda: open_errno(b.path("vm"), os.O_RDWR) == 0, 60, "takeover after kill -9")
    assert read_at(b.path("vm"), 4 << 20, 8192) == b"\x44" * 8192


def test_break_lock_fences_a_live_holder(two):
    cluster, a, b, holders = two
    h = Holder(a.path("vm"))
    holders.append(h)
    assert h.write(0, 0x55, 4096, sync=True) == "ok"
    out = vdifs("vdi", "--mount", b.mp, "break-lock", "vm").stdout
    assert "broke the lock" in out and a.mp in out
    assert h.write(0, 0x66, 4096, sync=True) == f"err {errno.EIO}"  # the write or its fsync
    assert open_errno(b.path("vm"), os.O_RDWR) == 0
    assert read_at(b.path("vm"), 0, 4096) == b"\x55" * 4096


def test_the_holder_snapshots_while_writing_and_fencing_follows_the_new_data_vid(two):
    import json

    cluster, a, b, holders = two
    h = Holder(a.path("vm"))
    holders.append(h)
    assert h.write(0, 0x55, 4096, sync=True) == "ok"
    res = vdifs("vdi", "--mount", b.mp, "snapshot", "vm", "s1", check=False)
    assert res.returncode == 1 and "in use by" in res.stderr and a.mp in res.stderr  # only the holder cuts
    vdifs("vdi", "--mount", a.mp, "snapshot", "vm", "s1")
    assert h.write(0, 0x66, 4096, sync=True) == "ok"  # a copy-up under the new data vid
    snap_b = b.path(".snapshots/vm@s1")
    wait_for(lambda: os.path.exists(snap_b), 10, "the snapshot seen on b")
    assert read_at(snap_b, 0, 4096) == b"\x55" * 4096 and read_at(a.path("vm"), 0, 4096) == b"\x66" * 4096
    # a clone with its own copies count: inherited objects stay where they are
    vdifs("vdi", "--mount", b.mp, "clone", "vm@s1", "vm2", "--copies", "2")
    with open(b.path("vm2"), "r+b") as f:
        f.seek(5 << 20)
        f.write(b"\x99" * 4096)
        f.flush()
        os.fsync(f.fileno())
    tree = {v["name"]: v for v in json.loads(vdifs("vdi", "--mount", b.mp, "tree", "--json").stdout)}
    own = tree["vm2"]["data_vid"]
    assert sum(len(p.object_files(own)) for p in cluster.peers) == 2  # one object, two copies
    assert read_at(b.path("vm2"), 0, 4096) == b"\x55" * 4096
    # break the lock: the old holder's writes to the new data vid are refused by every peer
    vdifs("vdi", "--mount", b.mp, "break-lock", "vm")
    assert h.write(8192, 0x77, 4096, sync=True) == f"err {errno.EIO}"
    assert open_errno(b.path("vm"), os.O_RDWR) == 0
    assert read_at(b.path("vm"), 0, 4096) == b"\x66" * 4096
    assert read_at(b.path("vm"), 8192, 4096) == bytes(4096)


def test_shared_vdi_two_writers(two):
    import threading

    cluster, a, b, holders = two
    # the shared flag only changes while nobody holds the lease
    h = Holder(a.path("vm"))
    holders.append(h)
    with pytest.raises(OSError) as e:
        os.setxattr(b.path("vm"), "user.vdifs.shared", b"1")
    assert e.value.errno == errno.EBUSY
    h.close()
    vdifs("vdi", "--mount", a.mp, "create", "gfs", "32M", "--shared")
    wait_for(lambda: os.path.exists(b.path("gfs")), 10, "gfs on b")
    assert b.info("gfs")["shared"] is True
    block = 64 << 10
    blocks = (32 << 20) // block
    errors = []

    def writer(m, parity: int) -> None:
        try:
            fd = os.open(m.path("gfs"), os.O_RDWR)  # no lease: both mounts write at once
            try:
                for i in range(parity, blocks, 2):
                    os.pwrite(fd, bytes([(i % 250) + 1]) * block, i * block)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(a, 0)), threading.Thread(target=writer, args=(b, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for m in (a, b):
        data = read_at(m.path("gfs"), 0, 32 << 20)
        bad = [i for i in range(blocks) if data[i * block:(i + 1) * block] != bytes([(i % 250) + 1]) * block]
        assert not bad, (m.mp, bad[:10])
    # every object exists exactly once per replica: no lost or duplicated allocation
    vid = a.vid("gfs")
    assert all(len(p.object_files(vid)) == 8 for p in cluster.peers)


def test_stopping_the_holders_mount_releases_the_lease(cluster):
    cluster.format(3, copies=3)
    a = cluster.mount("a", "--lease-term", "30")  # long: only a release can free it quickly
    b = cluster.mount("b", "--lease-term", "30")
    with open(a.path("vm"), "wb") as f:
        f.truncate(1 << 20)
    wait_for(lambda: os.path.exists(b.path("vm")), 10, "vm on b")
    h = Holder(a.path("vm"))
    try:
        assert h.write(0, 0x77, 4096, sync=True) == "ok"
        assert open_errno(b.path("vm"), os.O_RDWR) == errno.EBUSY
        a.proc.send_signal(signal.SIGTERM)  # systemd stop, with the file still open
        wait_for(lambda: open_errno(b.path("vm"), os.O_RDWR) == 0, 10, "lease released by SIGTERM")
        assert read_at(b.path("vm"), 0, 4096) == b"\x77" * 4096
    finally:
        h.proc.kill()


def test_a_writable_open_right_after_the_holders_last_close_waits_instead_of_failing(two):
    """Live migration's hand-over: the destination opens for writing the
    moment the source's close() returns, before the kernel's asynchronous
    FUSE release has given the lease back. The source marks the lease as
    closing in the synchronous part of its last close (flush), and an open
    that meets such a lease waits for it (bounded) instead of EBUSY."""
    cluster, a, b, holders = two
    for i in range(12):
        src, dst = (a, b) if i % 2 == 0 else (b, a)
        fd = os.open(src.path("vm"), os.O_RDWR)
        os.pwrite(fd, bytes([i]) * 4096, i * 4096)
        os.fsync(fd)
        os.close(fd)
        fd = os.open(dst.path("vm"), os.O_RDWR)  # at once: no EBUSY
        try:
            assert os.pread(fd, 4096, i * 4096) == bytes([i]) * 4096
        finally:
            os.close(fd)
    # a holder that keeps its file open still makes a writable open fail
    h = Holder(a.path("vm"))
    holders.append(h)
    assert h.write(0, 0x33, 4096, sync=True) == "ok"
    assert open_errno(b.path("vm"), os.O_RDWR) == errno.EBUSY
    h.close()


def test_a_writer_right_after_another_sees_the_size_it_left(two):
    """The last writer grew the VDI and closed; a writer on another mount
    opens it the moment that close returns, before its view of the
    directory (watched every half second) has the new size: the open reads
    the directory again, so the volume it writes has the last writer's
    size, and its own write and close never persist an older one over it.
    (The kernel's cached attributes of the file on the second mount may
    still show the old size for that half second: see docs/usage.md.)"""
    cluster, a, b, holders = two
    for i in range(6):
        src, dst = (a, b) if i % 2 == 0 else (b, a)
        size = (17 + i) << 20
        fd = os.open(src.path("vm"), os.O_RDWR)
        os.ftruncate(fd, size)
        os.close(fd)
        fd = os.open(dst.path("vm"), os.O_RDWR)  # at once
        try:
            assert dst.info("vm")["size"] == size, i  # the volume the writer writes
            os.pwrite(fd, b"\x5a" * 4096, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        wait_for(lambda: src.info("vm")["size"] == size, 5, f"the size kept after writer {i}")
