"""The lean netfs probe (../shared/bench/lean-netfs.py) with vdifs's own FUSE
loop (vdifs/fuse/session.py) in place of pyfuse3: the same storage processes,
the same client connections and file system class, only the dispatch differs.
Issue 12 asked for the probe to be measured again once the techniques vdifs
uses are applied to it; this is that probe.

    python bench/lean_netfs_own_loop.py MOUNTPOINT SIZE_MIB PORT1,PORT2,PORT3

(start the storage processes with `lean-netfs.py serve PORT SIZE_MIB` first).
Every request runs as a task, as a vdifs cluster mount's reads and writes do.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import socket
import sys
from typing import Any

import trio

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from vdifs.fuse import abi, session  # noqa: E402

SHARED = os.environ.get("SHARED", os.path.join(HERE, "..", "..", "shared"))
_spec = importlib.util.spec_from_file_location("lean_netfs", os.path.join(SHARED, "bench", "lean-netfs.py"))
assert _spec is not None and _spec.loader is not None
lean: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lean)


class LeanOnOwnLoop(lean.LeanFS):  # type: ignore[misc]
    """The probe's file system; nothing is answered inline (every read and
    write waits for a storage process)."""

    def read_now(self, fh: int, off: int, size: int) -> None:
        return None

    def write_now(self, fh: int, off: int, buf: memoryview) -> bool:
        return False

    async def write(self, fh: int, off: int, data: bytes, synchronous: bool = False) -> int:
        return int(await super().write(fh, off, data))

    async def getxattr(self, inode: int, name: bytes, ctx: object) -> bytes:
        # ENOSYS in the session's own error type, so the kernel stops asking
        # (pyfuse3's FUSEError would be answered EIO, and asked again before every write)
        raise abi.FUSEError(errno.ENOSYS)


async def mount(mountpoint: str, size: int, ports: list[int]) -> None:
    conns = []
    for port in ports:
        s = socket.create_connection(("127.0.0.1", port))
        lean._nodelay(s)  # and non-blocking
        conns.append(lean.Conn(s))
    fs = LeanOnOwnLoop(size, conns)
    fd = session.mount(mountpoint, "leanfs", ["default_permissions"])
    fuse = session.Session(fd, fs)
    try:
        async with trio.open_nursery() as nursery:
            for c in conns:
                nursery.start_soon(c.reader)
                nursery.start_soon(c.flusher)
            nursery.start_soon(fs.watchdog)
            await fuse.serve()
            nursery.cancel_scope.cancel()
    finally:
        session.unmount(mountpoint)
        os.close(fd)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    trio.run(mount, sys.argv[1], int(sys.argv[2]) << 20, [int(p) for p in sys.argv[3].split(",")])
