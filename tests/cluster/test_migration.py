"""Live migration of a real QEMU guest (TCG) between two mounts of one
cluster, back and forth, with the disk attached as plain `-drive` and as
libvirt attaches it (`-blockdev` file with cache.direct, aio=native,
auto-read-only). At the end of each migration the source lets go of the
disk (its close sends FUSE's FLUSH at once and the RELEASE later) and the
destination takes it for writing: the lease must pass every time, the
guest must go on writing on the destination, and nothing it wrote may be
lost."""

from __future__ import annotations

import os
import socket

import pytest

from tests.guest import Guest

from .conftest import log_tail, wait_for

HOPS = 4  # a -> b -> a -> b -> a


def disk(form: str, path: str) -> list[str]:
    """`drive`: plain -drive; `blockdev`: as libvirt attaches a disk; `libvirt`:
    that, and libvirt's flow (-S, deferred incoming, `cont` after the migration)."""
    if form == "drive":
        return ["-drive", f"file={path},format=raw,if=virtio,cache=none"]
    return ["-blockdev", f"driver=file,filename={path},node-name=f0,cache.direct=on,aio=native,auto-read-only=on",
            "-blockdev", "driver=raw,file=f0,node-name=d0,cache.direct=on", "-device", "virtio-blk-pci,drive=d0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def migrate_status(g: Guest) -> str:
    return g.qmp.cmd("query-migrate").get("status", "")


@pytest.mark.parametrize("form", ["drive", "blockdev", "libvirt"])
def test_a_guest_migrates_back_and_forth_and_keeps_writing(cluster, tmp_path, form):
    cluster.format(3, copies=3)
    mounts = [cluster.mount("a"), cluster.mount("b")]
    with open(mounts[0].path("vm"), "wb") as f:
        f.truncate(16 << 20)
    wait_for(lambda: os.path.exists(mounts[1].path("vm")), 10, "vm on b")
    src = Guest(str(tmp_path), "g0", disk(form, mounts[0].path("vm")), "counter")
    guests = [src]

    def explain() -> str:  # for a failed wait: what every QEMU and mount says
        return "\n".join([*(g.diagnosis() for g in guests[-2:]), *(f"{m.log}:\n{log_tail(m.log)}" for m in mounts)])

    try:
        wait_for(lambda: src.last_written() >= 100, 60, "the guest writes", explain)
        for hop in range(1, HOPS + 1):
            uri = f"tcp:127.0.0.1:{free_port()}"
            libvirt = form == "libvirt"
            dst = Guest(str(tmp_path), f"g{hop}", disk(form, mounts[hop % 2].path("vm")), "counter",
                        extra=["-S", "-incoming", "defer"] if libvirt else ["-incoming", uri])
            guests.append(dst)
            if libvirt:
                dst.qmp.cmd("migrate-incoming", uri=uri)
            src.qmp.cmd("migrate", uri=uri)
            wait_for(lambda: migrate_status(src) in ("completed", "failed", "cancelled"), 120, "migration ends", explain)
            assert migrate_status(src) == "completed", src.qmp.cmd("query-migrate")
            if libvirt:  # libvirt resumes the guest once the source reports completion
                wait_for(lambda: dst.qmp.cmd("query-status")["status"] != "inmigrate", 30, "incoming done", explain)
                dst.qmp.cmd("cont")
            wait_for(lambda: dst.proc.poll() is not None or dst.qmp.cmd("query-status")["status"] == "running",
                     30, "destination running", explain)
            with open(dst.stderr) as f:
                assert dst.proc.poll() is None, f"hop {hop}: destination QEMU exited: {f.read()}"
            # the guest goes on from its migrated state and writes through the destination's mount
            before = src.last_written()
            wait_for(lambda: dst.last_written() >= before + 100, 60, f"hop {hop}: the guest writes on the destination",
                     explain)
            src.stop()
            src = dst
        assert not [e for g in guests for e in g.errors()], [g.errors()[:5] for g in guests]
        src.qmp.cmd("stop")
        last = src.last_written()
    finally:
        for g in guests:
            g.stop()
    # what the guest wrote last went through the last destination's mount and the cluster
    for m in mounts:
        with open(m.path("vm"), "rb") as f:
            f.seek((last % 20000) * 512)
            assert f.read(14) == b"vdifs %08d" % last
