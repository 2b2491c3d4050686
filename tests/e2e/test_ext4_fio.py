import hashlib
import json
import os
import subprocess

import pytest

from .conftest import fuse_stats, need, run


@pytest.fixture
def loopdev():
    devs: list[str] = []

    def attach(path: str) -> str:
        dev = run("losetup", "--find", "--show", path).stdout.strip()
        devs.append(dev)
        return dev

    yield attach
    for dev in devs:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def test_mkfs_ext4_through_a_loop_device(mount, tmp_path, loopdev):
    need("losetup", "mkfs.ext4", "fsck.ext4")
    with open(mount.path("fs"), "wb") as f:
        f.truncate(256 << 20)
    fsdir = tmp_path / "ext4"
    fsdir.mkdir()
    files = {f"f{i}": os.urandom(1 << 20) * (i + 1) for i in range(6)}
    dev = loopdev(mount.path("fs"))
    try:
        run("mkfs.ext4", "-q", "-F", dev)
        run("mount", dev, str(fsdir))
        for name, data in files.items():
            (fsdir / name).write_bytes(data)
        run("umount", str(fsdir))
        run("fsck.ext4", "-fn", dev)
    finally:
        subprocess.run(["umount", str(fsdir)], capture_output=True)
        subprocess.run(["losetup", "-d", dev], capture_output=True)
    mount.restart()  # everything came from the pool, not from a cache
    dev = loopdev(mount.path("fs"))
    try:
        run("fsck.ext4", "-fn", dev)
        run("mount", "-o", "ro", dev, str(fsdir))
        for name, data in files.items():
            assert hashlib.sha256((fsdir / name).read_bytes()).digest() == hashlib.sha256(data).digest()
    finally:
        subprocess.run(["umount", str(fsdir)], capture_output=True)


@pytest.mark.parametrize("direct", [1, 0])
def test_fio_verify_crc32c(mount, direct):
    need("fio")
    res = run("fio", "--name=verify", f"--filename={mount.path('fio.img')}", "--size=64M",
              "--rw=randwrite", "--bs=64k", "--ioengine=libaio", "--iodepth=8", f"--direct={direct}",
              "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
              "--randseed=42", "--output-format=json")
    job = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 64 << 20
    assert job["read"]["io_bytes"] == 64 << 20  # every block read back and verified
    # and once more after a remount: fio's verify-only pass reads from the pool
    mount.restart()
    res = run("fio", "--name=verify", f"--filename={mount.path('fio.img')}", "--size=64M",
              "--rw=randwrite", "--bs=64k", "--ioengine=libaio", "--iodepth=8", "--direct=1",
              "--verify=crc32c", "--verify_only=1", "--verify_fatal=1", "--verify_state_save=0",
              "--randseed=42", "--output-format=json")
    job = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["read"]["io_bytes"] == 64 << 20


@pytest.mark.parametrize("fsync", [0, 32])
def test_small_writes_answered_inline_verify(mount, fsync):
    """4 KiB random writes over an allocated VDI at queue depth 16, each
    block read back against its crc32c: the writes the FUSE loop answers
    inline (into the store's page cache; with an fsync every 32 writes, into
    the write-behind window) and the reads it answers from the page cache,
    then once more from the pool after a remount."""
    need("fio")
    path = mount.path("small.img")
    with open(path, "wb") as f:
        f.write(os.urandom(32 << 20))  # every object allocated: small writes can go inline
    inline_before = mount.call("status")["io"].get("inline_writes", 0)
    behind_before = fuse_stats(mount)["behind_writes"]
    job = ["fio", "--name=small", f"--filename={path}", "--size=32M", "--rw=randwrite", "--bs=4k",
           "--ioengine=libaio", "--iodepth=16", "--direct=1", "--verify=crc32c", "--verify_fatal=1",
           "--verify_state_save=0", "--randseed=7", "--output-format=json"]
    res = run(*job, "--do_verify=1", *([f"--fsync={fsync}"] if fsync else []))
    out = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]
    assert out["error"] == 0 and out["write"]["io_bytes"] == 32 << 20 and out["read"]["io_bytes"] == 32 << 20
    if fsync:
        assert fuse_stats(mount)["behind_writes"] > behind_before  # acknowledged from the window
    else:
        assert mount.call("status")["io"]["inline_writes"] > inline_before  # written by the loop itself
    mount.restart()
    res = run(*job, "--verify_only=1")
    out = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]
    assert out["error"] == 0 and out["read"]["io_bytes"] == 32 << 20


ATTRIBUTE_JOBS = {
    # Reads alone (design change 27): each time a VDI's attributes expired
    # with O_DIRECT reads in flight, the kernel asked for them before every
    # read and threw every answer away (a read completed while it was on its
    # way): one GETATTR per read until an answer landed alone. fio reads for
    # three times the 1 s names are cached.
    "reads": ["--rw=randread", "--bs=4k", "--iodepth=16"],
    # Reads among writes (design change 61): each O_DIRECT write invalidates
    # the attributes, and with AUTO_INVAL_DATA the kernel asked for them
    # before the next read, a round trip the reader waited for in io_submit.
    "mix": ["--rw=randrw", "--rwmixread=70", "--bs=64k", "--iodepth=8", "--verify=crc32c", "--verify_fatal=1"],
}


@pytest.mark.parametrize("kind", list(ATTRIBUTE_JOBS))
def test_reads_cost_no_attribute_round_trips(mount, kind):
    """The mount is asked for a VDI's attributes a handful of times in 3 s
    of fio, not once per read."""
    need("fio")
    p = mount.path(f"{kind}.img")
    with open(p, "wb") as f:
        f.truncate(64 << 20)
    common = ["--ioengine=libaio", "--direct=1", f"--filename={p}", "--size=64M", "--output-format=json"]
    run("fio", "--name=fill", "--rw=write", "--bs=1M", "--iodepth=8", *common)
    before = fuse_stats(mount)["getattrs"]
    res = run("fio", f"--name={kind}", *ATTRIBUTE_JOBS[kind], "--runtime=3", "--time_based", *common)
    job = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["read"]["total_ios"] > (1000 if kind == "reads" else 200)
    if kind == "mix":
        assert job["write"]["total_ios"] > 100
    assert fuse_stats(mount)["getattrs"] - before <= 10
