import hashlib
import json
import os
import subprocess

import pytest

from .conftest import need, run


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
