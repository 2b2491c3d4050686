"""Write-behind through a real mount: writes go through until a handle has
sent its first fsync, are acknowledged from the window after it, and a
kill -9 of the mount loses nothing an fsync covered."""

import mmap
import os
import random

from .conftest import OBJ, FioVerify, fuse_stats, read_at

KiB = 1024


def close_after_kill(fd: int) -> None:
    try:
        os.close(fd)  # closing sends a flush, which a killed mount cannot answer
    except OSError:
        pass


def test_writes_before_the_first_fsync_go_through(mount):
    p = mount.path("through")
    with open(p, "wb") as f:
        f.truncate(16 * OBJ)
    data = os.urandom(256 * KiB)
    start = fuse_stats(mount)["behind_writes"]
    fd = os.open(p, os.O_RDWR)
    try:
        for off in range(0, len(data), 4 * KiB):
            os.pwrite(fd, data[off:off + 4 * KiB], 3 * OBJ + off)
        assert fuse_stats(mount)["behind_writes"] == start  # no fsync yet: every write went through
        mount.kill9()  # nothing was ever in a window, nothing is lost
    finally:
        close_after_kill(fd)
    mount.start()
    assert read_at(p, 3 * OBJ, len(data)) == data


def test_after_the_first_fsync_writes_go_behind_and_kill9_keeps_what_fsync_covered(mount):
    p = mount.path("behind")
    size = 16 * OBJ
    with open(p, "wb") as f:
        f.truncate(size)
    rng = random.Random(12)
    expect = bytearray(size)
    fd = os.open(p, os.O_RDWR)
    start = fuse_stats(mount)["behind_writes"]
    try:
        os.pwrite(fd, b"first", 0)
        expect[0:5] = b"first"
        os.fsync(fd)  # the proof that this client flushes
        # 8 MiB of 4 KiB writes, some over each other, across every object
        for i in range(2048):
            off = rng.randrange(0, size // (4 * KiB)) * 4 * KiB
            block = rng.randbytes(4 * KiB)
            os.pwrite(fd, block, off)
            expect[off:off + len(block)] = block
        assert fuse_stats(mount)["behind_writes"] >= start + 2048
        for off in range(OBJ, 4 * OBJ, 1 << 20):  # large writes: the window fills faster than it drains
            block = rng.randbytes(1 << 20)
            os.pwrite(fd, block, off)
            expect[off:off + len(block)] = block
        os.fsync(fd)  # returns only once the window is on disk
        mount.kill9()
    finally:
        close_after_kill(fd)
    mount.start()
    fd = os.open(p, os.O_RDONLY | os.O_DIRECT)  # from the pool, not from a page cache
    try:
        buf = mmap.mmap(-1, OBJ)
        for index in range(size // OBJ):
            assert os.preadv(fd, [buf], index * OBJ) == OBJ
            assert buf[:] == expect[index * OBJ:(index + 1) * OBJ], f"object {index} differs"
    finally:
        os.close(fd)


def test_direct_reads_see_writes_still_in_the_window(mount):
    """Many small O_DIRECT writes after an fsync, each read back at once by
    another O_DIRECT handle: every read sees the write before it, whether it
    is still in the window, on its way, or written back."""
    p = mount.path("reads")
    with open(p, "wb") as f:
        f.truncate(4 * OBJ)
    wfd = os.open(p, os.O_RDWR | os.O_DIRECT)
    rfd = os.open(p, os.O_RDONLY | os.O_DIRECT)
    try:
        wbuf, rbuf = mmap.mmap(-1, 4 * KiB), mmap.mmap(-1, 4 * KiB)
        os.fsync(wfd)
        rng = random.Random(5)
        for i in range(500):
            off = rng.randrange(0, 64) * 4 * KiB  # a small area: writes land on writes still held
            wbuf[:] = rng.randbytes(4 * KiB)
            assert os.pwritev(wfd, [wbuf], off) == 4 * KiB
            assert os.preadv(rfd, [rbuf], off) == 4 * KiB
            assert rbuf[:] == wbuf[:], f"write {i} at {off} not seen"
        assert fuse_stats(mount)["behind_writes"] >= 500
    finally:
        os.close(wfd)
        os.close(rfd)


def test_fio_verify_with_guest_like_flushes(mount):
    """fio's crc32c verify with an fsync every 16 writes: after the first,
    the writes go through the window, and every block reads back right."""
    start = fuse_stats(mount)["behind_writes"]
    with FioVerify(mount.path("fio-flush.img"), 64, fsync=16) as fio:
        fio.finish(timeout=300)
    assert fuse_stats(mount)["behind_writes"] > start + 900  # 1024 writes, the first 16 through
