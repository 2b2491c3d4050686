"""Real QEMU guests on the mount's NBD exports: TRIM that gives space back
to the cluster, and a mount restarted (kill -9) under a writing guest."""

from __future__ import annotations

import os
import re
import sys

import pytest

from tests.guest import Guest

from .conftest import wait_for

MiB = 1 << 20
OBJ = 4 * MiB


def nbd_disk(form: str, sock: str, export: str, reconnect: int = 0) -> list[str]:
    """An NBD export as a virtio disk with discard passed through: `blockdev`
    as libvirt attaches it, `drive` in the plain form."""
    if form == "drive":
        return ["-drive", f"file=nbd+unix:///{export}?socket={sock},format=raw,if=virtio,cache=none,discard=unmap"]
    extra = f",reconnect-delay={reconnect}" if reconnect else ""
    return ["-blockdev", f"driver=nbd,node-name=n0,export={export},server.type=unix,server.path={sock},"
                         f"discard=unmap{extra}",
            "-blockdev", "driver=raw,file=n0,node-name=d0,discard=unmap",
            "-device", "virtio-blk-pci,drive=d0"]


def data_objects_on_peers(cluster, vid: int) -> int:
    return sum(len(p.object_files(vid)) for p in cluster.peers)


@pytest.mark.parametrize("form", ["blockdev", "drive"])
def test_fstrim_in_a_guest_frees_objects_on_the_peers(cluster, tmp_path, form):
    """mkfs.ext4 and 96 MiB of files in a guest on an NBD export; three
    quarters removed and fstrim: the VDI's allocated space and the peers'
    object files drop by what was freed, and the files left verify."""
    cluster.format(3, copies=2)
    m = cluster.mount("a")
    with open(m.path("vm"), "wb") as f:
        f.truncate(256 * MiB)
    vid = m.vid("vm")
    sock = os.path.join(m.store, "nbd.sock")
    g = Guest(str(tmp_path), f"trim-{form}", nbd_disk(form, sock, "vm"), "trim", cmdline="vdifs.files=12")
    try:
        wait_for(lambda: "written 12" in g.console() or "ERR" in g.console(), 300, "the guest wrote its files")
        assert not g.errors(), g.console()[-2000:]
        before = m.info("vm")["allocated"]
        wait_for(lambda: "done" in g.console(), 300, "the guest trimmed and verified")
        g.proc.wait(60)
    finally:
        g.stop()
    console = g.console()
    assert not g.errors() and "verified 3 of 3" in console, console[-2000:]
    trimmed = int(re.search(r"(\d+) bytes\)? trimmed", console).group(1))  # busybox: "/mnt: N bytes trimmed"
    after = m.info("vm")["allocated"]
    # 72 MiB of files removed: at least 12 of their 18 objects were whole and are freed
    assert before >= 96 * MiB and before - after >= 12 * OBJ, (before, after, trimmed)
    assert after // OBJ * 2 == data_objects_on_peers(cluster, vid)  # two copies of each object left
    assert trimmed >= 72 * MiB


def test_a_guest_rides_through_a_kill_9_and_restart_of_the_mount(cluster, tmp_path):
    """A guest writing a counter over NBD with reconnect-delay; the mount is
    killed (-9) and started again on the same store: the guest pauses and
    goes on, no I/O error reaches it, and every sector it wrote holds its
    value. The restarted mount takes its earlier run's lease at once."""
    cluster.format(3, copies=3)
    m = cluster.mount("a")
    with open(m.path("vm"), "wb") as f:
        f.truncate(16 * MiB)
    sock = os.path.join(m.store, "nbd.sock")
    g = Guest(str(tmp_path), "counter", nbd_disk("blockdev", sock, "vm", reconnect=60), "counter")
    try:
        wait_for(lambda: g.last_written() >= 200 or g.errors(), 120, "the guest writing")
        m.kill9()
        stopped = g.last_written()
        m.start()
        wait_for(lambda: g.last_written() >= stopped + 300 or g.errors(), 180, "the guest writing again")
        assert not g.errors(), g.console()[-2000:]
        status = g.qmp.cmd("query-status")
        assert status["status"] == "running", status
        last = g.last_written()
        g.stop()
    finally:
        g.stop()
    assert "earlier run of this mount" in open(m.log).read()
    assert last < 20000  # no sector written twice: each holds its own number
    fd = os.open(m.path("vm"), os.O_RDONLY)
    try:
        for i in range(1, last + 1):
            assert os.pread(fd, 15, i * 512) == b"vdifs %08d\n" % i, i
    finally:
        os.close(fd)


def test_a_second_writer_on_another_mount_gets_a_clean_refusal(cluster):
    """A VDI held open for writing on mount a: mount b's NBD export of it is
    refused at attach with the holder named (QEMU prints it), nothing is
    written; once a lets go, b attaches and writes, and a reads b's bytes."""
    from tests.e2e.conftest import run

    cluster.format(3, copies=2)
    a, b = cluster.mount("a"), cluster.mount("b")
    with open(a.path("vm"), "wb") as f:
        f.truncate(8 * MiB)
    wait_for(lambda: os.path.exists(b.path("vm")), 10, "vm on b")
    url = f"nbd+unix:///vm?socket={os.path.join(b.store, 'nbd.sock')}"
    fd = os.open(a.path("vm"), os.O_RDWR)
    try:
        os.pwrite(fd, b"\x11" * 4096, 0)
        refused = run("qemu-io", "-f", "raw", "-c", "write -P 0x22 0 4096", url, check=False)
        assert refused.returncode != 0 and "in use by" in refused.stderr, refused.stderr
        assert os.pread(fd, 4096, 0) == b"\x11" * 4096
    finally:
        os.close(fd)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x22 0 4096", url)
    with open(a.path("vm"), "rb") as f:
        assert f.read(4096) == b"\x22" * 4096
    # a VDI and a snapshot made on a a moment ago attach on b at once
    with open(a.path("fresh"), "wb") as f:
        f.truncate(4 * MiB)
    info = run("qemu-img", "info", url.replace("/vm?", "/fresh?"))
    assert "virtual size: 4 MiB" in info.stdout, info.stdout
    run(sys.executable, "-m", "vdifs", "vdi", "--mount", a.mp, "snapshot", "vm", "s1")
    run("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x22 0 4096", url.replace("/vm?", "/vm@s1?"))
