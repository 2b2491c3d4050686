"""Running a mount: store, pool, catalog, FUSE session and control server.

`run_mount` is blocking (it owns `trio.run`). The embedded pool is the
default; the store is locked with flock so two mounts can never share one.
SIGTERM/SIGINT flush everything, then unmount; `umount`/`fusermount3 -u`
ends the FUSE loop and the same flush runs on the way out.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
from typing import IO

import pyfuse3
import trio

from vdifs.client.catalog import Catalog
from vdifs.client.pool import LocalPool
from vdifs.control.client import CONTROL_SOCKET
from vdifs.control.server import ControlServer
from vdifs.errors import StoreBusy, VdifsError
from vdifs.fuse.ops import ROOT, VdifsOperations
from vdifs.meta.directory import DirectoryService
from vdifs.meta.register import FileRegister
from vdifs.peer.store import ObjectStore

log = logging.getLogger(__name__)


def default_store() -> str:
    if os.geteuid() == 0:
        return "/var/lib/vdifs"
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(base, "vdifs")


def lock_store(store: str) -> IO[str]:
    """Take the store's lock for this process, or say who holds it."""
    os.makedirs(store, mode=0o700, exist_ok=True)
    f = open(os.path.join(store, "lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise StoreBusy(f"store {store} is in use by another vdifs process (pid {holder})") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def check_mountpoint(mountpoint: str) -> None:
    if os.path.ismount(mountpoint):
        raise VdifsError(f"{mountpoint} is already a mount point", code=errno.EBUSY)
    if os.path.exists(mountpoint) and not os.path.isdir(mountpoint):
        raise VdifsError(f"{mountpoint} is not a directory", code=errno.ENOTDIR)
    os.makedirs(mountpoint, exist_ok=True)


def fuse_options(allow_other: bool) -> set[str]:
    opts = set(pyfuse3.default_options) | {"fsname=vdifs", "subtype=vdifs"}
    if allow_other:
        opts.add("allow_other")
    return opts


class Mount:
    def __init__(self, mountpoint: str, store: str, *, allow_other: bool = False) -> None:
        self.mountpoint = os.path.abspath(mountpoint)
        self.store_path = os.path.abspath(store)
        self.allow_other = allow_other
        self.store = ObjectStore(self.store_path)
        self.pool = LocalPool(self.store)
        os.makedirs(os.path.join(self.store_path, "meta"), mode=0o700, exist_ok=True)
        self.directory = DirectoryService(FileRegister(os.path.join(self.store_path, "meta", "directory")))
        self.catalog = Catalog(self.pool, self.directory)
        self.control_path = os.path.join(self.store_path, CONTROL_SOCKET)

    def invalidate(self, event: str, vid: int, names: list[str]) -> None:
        """Drop what the kernel cached after a change made outside FUSE."""
        for name in names:
            pyfuse3.invalidate_entry_async(ROOT, name.encode(), ignore_enoent=True)
        try:
            pyfuse3.invalidate_inode(vid + 1)
        except OSError:
            pass  # the kernel never saw this inode

    async def run(self, ready: IO[bytes] | None = None) -> None:
        self.store.open()
        async with trio.open_nursery() as nursery:
            await self.catalog.start(nursery)
            ops = VdifsOperations(self.catalog, control_path=self.control_path, store_path=self.store_path)
            control = ControlServer(self.catalog, self.control_path,
                                    {"mountpoint": self.mountpoint, "store": self.store_path},
                                    self.invalidate)
            await nursery.start(control.serve)
            try:
                pyfuse3.init(ops, self.mountpoint, fuse_options(self.allow_other))
            except RuntimeError as e:
                raise VdifsError(f"could not mount {self.mountpoint}: {e}") from None
            try:
                nursery.start_soon(self._signals)
                nursery.start_soon(self.catalog.reconcile_all)
                log.info("mounted %s (store %s, embedded pool)", self.mountpoint, self.store_path)
                if ready is not None:
                    ready.write(b"ok\n")
                    ready.close()
                await pyfuse3.main()
            finally:
                with trio.CancelScope(shield=True):
                    await self.catalog.flush_all()
                pyfuse3.close(unmount=True)
                log.info("unmounted %s", self.mountpoint)
            nursery.cancel_scope.cancel()
        await self.pool.aclose()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("%s: flushing and unmounting", signal.Signals(signum).name)
                await self.catalog.flush_all()
                pyfuse3.terminate()
                return
