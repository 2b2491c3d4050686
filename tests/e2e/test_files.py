"""Sparse accounting, persistence, crash safety and namespace operations."""

import errno
import os
import struct
import subprocess
import threading
import time

import pytest

from vdifs.control.mounts import read_mounts

from .conftest import OBJ, fuse_stats, read_at, write_at

GiB = 1 << 30


def wait_for(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def test_sparse_accounting_and_df(mount):
    p = mount.path("sparse")
    with open(p, "wb") as f:
        f.truncate(10 * GiB)
    st = os.stat(p)
    assert st.st_size == 10 * GiB and st.st_blocks == 0
    write_at(p, 5 * GiB + 123, b"x" * 4096)
    assert len(mount.data_objects(mount.vid("sparse"))) == 1  # exactly one object
    assert os.stat(p).st_blocks * 512 == OBJ
    assert mount.info("sparse")["allocated"] == OBJ
    # df: fill some space, rm, and the space comes back
    big = mount.path("big")
    with open(big, "wb") as f:
        for i in range(16):
            f.write(os.urandom(1 << 20) * 4)
        f.flush()
        os.fsync(f.fileno())
    big_vid = mount.vid("big")
    assert len(mount.data_objects(big_vid)) == 16
    free_before = os.statvfs(mount.mp).f_bavail
    os.unlink(big)
    wait_for(lambda: not mount.data_objects(big_vid))  # all 16 freed in the background
    assert len(mount.data_objects()) == 1  # the sparse VDI's one object stays
    wait_for(lambda: os.statvfs(mount.mp).f_bavail * 4096 >= free_before * 4096 + 48 * (1 << 20))
    assert sorted(os.listdir(mount.mp)) == ["sparse"]


def test_persistence_across_unmount(mount):
    data = os.urandom(3 * OBJ)
    open(mount.path("vm"), "wb").close()
    write_at(mount.path("vm"), OBJ // 3, data)
    os.chmod(mount.path("vm"), 0o600)
    mount.restart()
    assert read_at(mount.path("vm"), OBJ // 3, len(data)) == data
    st = os.stat(mount.path("vm"))
    assert st.st_size == OBJ // 3 + len(data) and (st.st_mode & 0o777) == 0o600


def test_kill9_keeps_fsynced_data_and_leaks_nothing(mount):
    synced = os.urandom(2 * OBJ)
    p = mount.path("crash")
    open(p, "wb").close()
    write_at(p, OBJ, synced, fsync=True)
    open(mount.path("gone"), "wb").close()
    write_at(mount.path("gone"), 0, b"z" * 8192, fsync=True)
    os.unlink(mount.path("gone"))
    # unsynced writes, some of them growing the file, then kill -9
    write_at(p, 10 * OBJ, b"unsynced" * 1000)
    write_at(p, 0, b"head")
    mount.kill9()
    mount.start()
    assert sorted(os.listdir(mount.mp)) == ["crash"]
    assert read_at(p, OBJ, len(synced)) == synced
    vid = mount.vid("crash")
    size = os.stat(p).st_size
    allocated = os.stat(p).st_blocks * 512 // OBJ
    time.sleep(0.5)  # let the background reconcile finish
    # the pool holds exactly the objects the map references, nothing of the deleted VDI
    assert len(mount.data_objects()) == len(mount.data_objects(vid)) == allocated
    assert all(int(o, 16) & 0xFFFFFFFF < -(-size // OBJ) for o in mount.data_objects(vid))


def test_rename_is_atomic_and_replaces(mount):
    for name, byte in (("a", b"A"), ("b", b"B")):
        with open(mount.path(name), "wb") as f:
            f.write(byte * 4096)
    vid_b = mount.vid("b")
    os.rename(mount.path("a"), mount.path("b"))
    assert sorted(os.listdir(mount.mp)) == ["b"]
    assert read_at(mount.path("b"), 0, 4096) == b"A" * 4096
    wait_for(lambda: not mount.data_objects(vid_b))
    # rsync-style: write a hidden temp name, rename it into place
    tmp = mount.path(".b.XyZ123")
    with open(tmp, "wb") as f:
        f.write(b"new")
    assert ".b.XyZ123" in os.listdir(mount.mp)
    os.rename(tmp, mount.path("b"))
    assert read_at(mount.path("b"), 0, 3) == b"new"
    mount.restart()
    assert os.listdir(mount.mp) == ["b"] and read_at(mount.path("b"), 0, 3) == b"new"


def test_shrink_frees_objects(mount):
    p = mount.path("shrink")
    with open(p, "wb") as f:
        f.write(b"\x55" * (6 * OBJ))
    assert len(mount.data_objects(mount.vid("shrink"))) == 6
    os.truncate(p, OBJ + 10)
    assert len(mount.data_objects(mount.vid("shrink"))) == 2
    os.truncate(p, 6 * OBJ)
    assert read_at(p, OBJ, 16) == b"\x55" * 10 + bytes(6)
    assert read_at(p, 3 * OBJ, 16) == bytes(16)


def test_zero_writes_discard(mount):
    p = mount.path("discard")
    with open(p, "wb") as f:
        f.truncate(4 * OBJ)
    write_at(p, 0, bytes(OBJ))  # zeros into a hole allocate nothing
    assert os.stat(p).st_blocks == 0
    write_at(p, OBJ, os.urandom(OBJ))
    assert os.stat(p).st_blocks * 512 == OBJ
    write_at(p, OBJ, bytes(OBJ))  # zeroing a whole object frees it
    assert os.stat(p).st_blocks == 0 and mount.data_objects(mount.vid("discard")) == []


def test_concurrent_writers_on_one_object(mount):
    p = mount.path("shared-object")
    with open(p, "wb") as f:
        f.truncate(OBJ)
    errors = []

    def writer(k: int) -> None:
        try:
            fd = os.open(p, os.O_WRONLY)
            for i in range(k, 256, 8):
                os.pwrite(fd, bytes([i]) * 4096, i * 4096)
            os.close(fd)
        except OSError as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(mount.data_objects(mount.vid("shared-object"))) == 1
    got = read_at(p, 0, OBJ)
    assert all(got[i * 4096:(i + 1) * 4096] == bytes([i]) * 4096 for i in range(256))


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def test_security_labels_are_kept_and_writes_cost_no_attribute_lookup(mount):
    """libvirt's labels (security.*, trusted.*) are kept per VDI, across a
    remount (design change 49); the kernel does not ask for
    security.capability before each write (FUSE_HANDLE_KILLPRIV_V2: before
    it did, a round trip under the inode lock); ACLs, capabilities and
    other names are refused; user.vdifs.copies/shared stay settable; the CLI
    finds the control socket from the mount source, which names the store."""
    p = mount.path("x")
    with open(p, "wb") as f:
        f.truncate(OBJ)
    label = "system_u:object_r:svirt_image_t:s0:c392,c662"
    _run("setfattr", "-n", "security.selinux", "-v", label, p)
    _run("setfattr", "-n", "trusted.libvirt.security.dac", "-v", "+107:+107", p)
    os.setxattr(p, "trusted.libvirt.security.ref_dac", b"1", os.XATTR_CREATE)
    with pytest.raises(OSError) as e:
        os.setxattr(p, "trusted.libvirt.security.ref_dac", b"2", os.XATTR_CREATE)
    assert e.value.errno == errno.EEXIST
    with pytest.raises(OSError) as e:
        os.setxattr(p, "trusted.never.set", b"2", os.XATTR_REPLACE)
    assert e.value.errno == errno.ENODATA
    no_capabilities = struct.pack("<5I", 0x02000000, 0, 0, 0, 0)  # VFS_CAP_REVISION_2
    owner_only = struct.pack("<I", 2) + struct.pack("<HHI", 1, 6, 0xFFFFFFFF) + struct.pack("<HHI", 4, 0, 0xFFFFFFFF) \
        + struct.pack("<HHI", 0x20, 0, 0xFFFFFFFF)  # an ACL the kernel accepts: user::rw- group::--- other::---
    for name, value in (("security.capability", no_capabilities), ("system.posix_acl_access", owner_only),
                        ("user.other", b"1")):
        with pytest.raises(OSError) as e:
            os.setxattr(p, name, value)
        assert e.value.errno == errno.EOPNOTSUPP, name
    with pytest.raises(OSError) as e:
        os.getxattr(p, "security.capability")
    assert e.value.errno == errno.ENODATA

    asked = fuse_stats(mount)["getxattrs"]
    for _ in range(4):
        fd = os.open(p, os.O_WRONLY)
        try:
            for i in range(64):
                os.pwrite(fd, b"w" * 4096, i * 4096)
        finally:
            os.close(fd)
    assert fuse_stats(mount)["getxattrs"] <= asked + 1  # once for the inode at most, never once per write
    os.chmod(p, 0o6755)  # a VDI is never run: it keeps no set-ID bits to drop on write
    assert os.stat(p).st_mode & 0o7777 == 0o755

    mount.restart()
    assert sorted(os.listxattr(p)) == ["security.selinux", "trusted.libvirt.security.dac",
                                       "trusted.libvirt.security.ref_dac"]
    assert _run("getfattr", "--only-values", "-n", "security.selinux", p) == label
    assert os.getxattr(p, "trusted.libvirt.security.dac") == b"+107:+107"
    os.removexattr(p, "trusted.libvirt.security.ref_dac")
    with pytest.raises(OSError) as e:
        os.getxattr(p, "trusted.libvirt.security.ref_dac")
    assert e.value.errno == errno.ENODATA
    with open(p, "rb") as f:
        assert f.read(64 * 4096) == b"w" * 64 * 4096  # the data never noticed

    empty = mount.path("empty")
    open(empty, "wb").close()
    os.setxattr(empty, "user.vdifs.copies", b"1")  # only while it holds no data
    assert mount.info("empty")["copies"] == 1
    with pytest.raises(OSError) as e:
        os.setxattr(p, "user.vdifs.copies", b"1")
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        os.setxattr(p, "user.vdifs.copies", b"3")  # the embedded pool has one copy
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        os.setxattr(p, "user.vdifs.vid", b"9")
    assert e.value.errno == errno.EPERM
    with pytest.raises(OSError) as e:
        os.setxattr(p, "user.vdifs.other", b"1")
    assert e.value.errno == errno.ENOTSUP
    source = {e.mountpoint: e.source for e in read_mounts()}[mount.mp]
    assert source == f"vdifs:{mount.store}"


def test_bad_input_gets_clear_errors(mount):
    def err(fn, *args):
        with pytest.raises(OSError) as e:
            fn(*args)
        return e.value.errno

    assert err(open, mount.path("vm@snap"), "wb") == errno.EINVAL
    assert err(open, mount.path(".snapshots"), "wb") == errno.EISDIR  # the snapshot directory
    assert err(open, mount.path(".vdifs-x"), "wb") == errno.EPERM
    assert err(open, mount.path("n" * 256), "wb") == errno.ENAMETOOLONG
    assert err(os.mkdir, mount.path("dir")) == errno.EPERM
    assert err(os.symlink, "/etc/passwd", mount.path("ln")) == errno.EPERM
    p = mount.path("ok")
    with open(p, "wb") as f:
        f.write(b"precious")
    assert err(os.link, p, mount.path("hard")) == errno.EPERM
    assert err(os.rename, p, mount.path("bad@name")) == errno.EINVAL
    assert err(os.truncate, p, (16 << 50) + 1) == errno.EFBIG  # past 16 PiB
    os.truncate(p, 16 << 50)  # exactly 16 PiB is fine
    fd = os.open(p, os.O_WRONLY)
    try:
        assert err(os.pwrite, fd, b"x", 16 << 50) == errno.EFBIG
    finally:
        os.close(fd)
    assert err(os.rmdir, p) == errno.ENOTDIR
    # none of this changed anything
    assert sorted(os.listdir(mount.mp)) == ["ok"]
    assert read_at(p, 0, 8) == b"precious"
    assert os.stat(p).st_size == 16 << 50
    assert len(mount.data_objects()) == 1


def test_unlinked_open_file_stays_readable(mount):
    p = mount.path("tmp")
    with open(p, "w+b") as f:
        f.write(b"still here")
        f.flush()
        os.unlink(p)
        f.seek(0)
        assert f.read() == b"still here"
        assert not os.path.exists(p)
    wait_for(lambda: not mount.data_objects())  # purged once the last handle closed
    assert os.listdir(mount.mp) == []


def test_synchronous_writes_are_synced_on_every_kind_of_handle(mount):
    """O_DSYNC opens and RWF_DSYNC writes (a guest's FUA through QEMU) are
    durable when they return: on the cached path the kernel sends an fsync
    after each; on an uncached (shared VDI) handle the mount syncs itself.
    An O_DIRECT open must stay on the cached path for that (an uncached one
    would drop them: this test caught it). Buffered handles see direct writes."""
    import mmap

    p = mount.path("dsync")
    old = os.urandom(64 << 10)
    with open(p, "wb") as f:
        f.truncate(8 << 20)
    write_at(p, 0, old, fsync=True)
    buf = mmap.mmap(-1, 4096)
    cached = os.open(p, os.O_RDONLY)
    try:
        assert os.pread(cached, len(old), 0) == old  # now in the page cache
        start = fuse_stats(mount)["syncs"]
        fd = os.open(p, os.O_RDWR | os.O_DIRECT)
        try:
            for i in range(4):  # plain O_DIRECT writes: no sync asked for
                buf[:] = bytes([i + 1]) * 4096
                assert os.pwritev(fd, [buf], i * 4096) == 4096
            assert fuse_stats(mount)["syncs"] == start
            for i in range(4, 8):  # RWF_DSYNC: one sync each
                buf[:] = bytes([i + 1]) * 4096
                assert os.pwritev(fd, [buf], i * 4096, os.RWF_DSYNC) == 4096
            assert fuse_stats(mount)["syncs"] >= start + 4
        finally:
            os.close(fd)
        expected = b"".join(bytes([i + 1]) * 4096 for i in range(8))
        assert os.pread(cached, len(expected), 0) == expected  # the stale cached pages were dropped
    finally:
        os.close(cached)
    before = fuse_stats(mount)["syncs"]
    fd = os.open(p, os.O_RDWR | os.O_DIRECT | os.O_DSYNC)
    try:
        for i in range(4):
            assert os.pwritev(fd, [buf], (16 + i) * 4096) == 4096
    finally:
        os.close(fd)
    assert fuse_stats(mount)["syncs"] >= before + 4

    # a shared VDI is served uncached: the mount syncs its O_DSYNC writes itself
    shared = mount.path("shared-dsync")
    with open(shared, "wb") as f:
        f.truncate(8 << 20)
    os.setxattr(shared, "user.vdifs.shared", b"1")
    before = fuse_stats(mount)["syncs"]
    fd = os.open(shared, os.O_RDWR | os.O_DIRECT | os.O_DSYNC)
    try:
        for i in range(4):
            buf[:] = bytes([i + 9]) * 4096
            assert os.pwritev(fd, [buf], i * 4096) == 4096
    finally:
        os.close(fd)
    assert fuse_stats(mount)["syncs"] == before + 4
    assert read_at(shared, 0, 4 * 4096) == b"".join(bytes([i + 9]) * 4096 for i in range(4))
    # ... and its RWF_DSYNC writes on a plain handle (FUA), which the kernel shows in the write's flags
    before = fuse_stats(mount)["syncs"]
    fd = os.open(shared, os.O_RDWR | os.O_DIRECT)
    try:
        for i in range(4):  # plain ones first: no sync
            assert os.pwritev(fd, [buf], (8 + i) * 4096) == 4096
        assert fuse_stats(mount)["syncs"] == before
        for i in range(4):
            assert os.pwritev(fd, [buf], (12 + i) * 4096, os.RWF_DSYNC) == 4096
    finally:
        os.close(fd)
    assert fuse_stats(mount)["syncs"] == before + 4
