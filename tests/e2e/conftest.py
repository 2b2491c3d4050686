"""A real `vdifs mount` process per test, always unmounted and killed afterwards."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

OBJ = 4 << 20


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing tools {missing}: run 'make deps'")


def run(*cmd: str, check: bool = True, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def vdifs(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "vdifs", *args, check=check)


class FioVerify:
    """fio writing a file at random (64 KiB blocks, direct I/O, queue depth 8)
    and then reading every block back against its crc32c, in the background.
    A context manager: fio is killed if the test leaves before it finished."""

    def __init__(self, path: str, size_mb: int, rate: str | None = None, fsync: int | None = None) -> None:
        """`fsync`: an fsync every that many writes, as a guest flushes
        (after the first, the mount acknowledges writes from its window)."""
        need("fio")
        self.size = size_mb << 20
        argv = ["fio", "--name=verify", f"--filename={path}", f"--size={size_mb}M", "--rw=randwrite",
                "--bs=64k", "--ioengine=libaio", "--iodepth=8", "--direct=1", "--verify=crc32c",
                "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--output-format=json"]
        if rate:
            argv.append(f"--rate={rate}")
        if fsync:
            argv.append(f"--fsync={fsync}")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def __enter__(self) -> FioVerify:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def finish(self, timeout: float) -> dict:
        """Wait for fio; assert it wrote and verified every byte without error."""
        import json
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err or out[-3000:]  # fio reports some failures in its output
        job = json.loads(out[out.index("{"):])["jobs"][0]
        assert job["error"] == 0, err
        assert job["write"]["io_bytes"] == self.size and job["read"]["io_bytes"] == self.size, job
        return job


class MountProc:
    def __init__(self, mountpoint: str, store: str, log: str, extra: tuple[str, ...] = ()) -> None:
        """`extra`: more `vdifs mount` options."""
        self.mp, self.store, self.log = mountpoint, store, log
        self.extra = extra
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        os.makedirs(self.mp, exist_ok=True)
        logf = open(self.log, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vdifs", "mount", self.mp, "--store", self.store, "--foreground",
             "--log-level", "debug", *self.extra], stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mp):
            if self.proc.poll() is not None:
                raise AssertionError(f"mount exited with {self.proc.returncode}:\n{open(self.log).read()}")
            if time.monotonic() > deadline:
                raise AssertionError("mount did not come up in 30 s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Unmount cleanly (flush) and wait for the process."""
        if self.proc is None:
            return
        if os.path.ismount(self.mp):
            for _ in range(50):
                if subprocess.run(["fusermount3", "-u", self.mp], capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        self._force_unmount()

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None
        self._force_unmount()

    def _force_unmount(self) -> None:
        subprocess.run(["fusermount3", "-u", "-z", self.mp], capture_output=True)
        if os.path.ismount(self.mp):
            subprocess.run(["umount", "-l", self.mp], capture_output=True)

    def restart(self) -> None:
        self.stop()
        self.start()

    def path(self, name: str) -> str:
        return os.path.join(self.mp, name)

    def data_objects(self, vid: int | None = None) -> list[str]:
        out = []
        root = os.path.join(self.store, "obj")
        for d in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            if vid is not None and int(d, 16) != vid:
                continue
            out += [f for f in os.listdir(os.path.join(root, d)) if f.startswith("00")]
        return out

    def call(self, op: str, args: dict | None = None):
        """One request to this mount's control socket (found as the CLI finds it)."""
        import trio

        from vdifs.control import caller

        return trio.run(lambda: caller.call(caller.socket_for_mount(self.mp), op, args))

    def info(self, name: str) -> dict:
        """`vdifs vdi info NAME --json`: vid, allocated, copies, shared, ..."""
        return self.call("vdi.info", {"name": name})

    def vid(self, name: str) -> int:
        return self.info(name)["vid"]


@pytest.fixture
def mount(tmp_path):
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("FUSE tests need root and /dev/fuse")
    m = MountProc(str(tmp_path / "mnt"), str(tmp_path / "store"), str(tmp_path / "mount.log"))
    m.start()
    try:
        yield m
    finally:
        m.stop()
        if m.proc is not None:
            m.proc.kill()


def write_at(path: str, offset: int, data: bytes, *, fsync: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_at(path: str, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def fuse_stats(mount: MountProc) -> dict:
    """The FUSE counters of a running mount (`status` over its control socket)."""
    return mount.call("status")["fuse"]
