"""Running a mount: store, pool, catalog, FUSE session and control server.

`run_mount` is blocking (it owns `trio.run`). The embedded pool is the
default; the store is locked with flock so two mounts can never share one.
SIGTERM/SIGINT flush everything, then unmount; `umount`/`fusermount3 -u`
ends the FUSE loop and the same flush runs on the way out.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from typing import IO

import trio

from vdifs.client import cache
from vdifs.client.catalog import WRITE_BEHIND, Catalog
from vdifs.client.local import open_embedded
from vdifs.client.remote import REPLICA_WAIT, ClusterAccess
from vdifs.control.caller import CONTROL_SOCKET
from vdifs.control.mounts import SOURCE_PREFIX
from vdifs.control.server import ControlServer
from vdifs.errors import VdifsError
from vdifs.fsutil import store_id
from vdifs.fuse import session
from vdifs.fuse.metrics import PoolSpaceCache, mount_metrics
from vdifs.fuse.ops import ROOT, SNAPSHOTS, VdifsOperations
from vdifs.metrics.http import check_address, serve_metrics
from vdifs.model.directory import Directory
from vdifs.nbd.server import NbdServer, group_id
from vdifs.notify import Notifier

NBD_SOCKET = "nbd.sock"  # in the store, unless --nbd says where
UNIX_PATH_MAX = 108  # bytes of a unix socket's path, with its NUL

log = logging.getLogger(__name__)

def default_store() -> str:
    if os.geteuid() == 0:
        return "/var/lib/vdifs"
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(base, "vdifs")


def check_mountpoint(mountpoint: str) -> None:
    if os.path.ismount(mountpoint):
        raise VdifsError(f"{mountpoint} is already a mount point", code=errno.EBUSY)
    if os.path.exists(mountpoint) and not os.path.isdir(mountpoint):
        raise VdifsError(f"{mountpoint} is not a directory", code=errno.ENOTDIR)
    os.makedirs(mountpoint, exist_ok=True)


def fuse_options(allow_other: bool) -> list[str]:
    """The FUSE mount options: the kernel checks permissions from the modes."""
    return ["default_permissions"] + (["allow_other"] if allow_other else [])


class Mount:
    """One mount: the embedded pool on `store`, or a cluster's pool when
    `cluster` lists peer addresses (then `store` only holds the lock, the
    control socket and the log)."""

    def __init__(self, mountpoint: str, store: str, *, allow_other: bool = False,
                 cluster: list[str] | None = None, secret_file: str | None = None,
                 copies: int | None = None, lease_term: float | None = None, io_wait: float = REPLICA_WAIT,
                 write_behind: int = WRITE_BEHIND, encrypt: bool = False, cache_dir: str | None = None,
                 cache_size: int | None = None, cache_ttl: float = cache.TTL, nbd: str | None = "",
                 nbd_group: str | None = None, metrics: str | None = None) -> None:
        """`lease_term`: None is the default term of leases; `write_behind`:
        the window of each VDI in bytes (0: off); the local object cache of a
        cluster mount: `cache_dir` (None: `cache` in the store) of
        `cache_size` bytes (None: `cache.default_size`, 0: no cache); `nbd`:
        the NBD server's socket ("": NBD_SOCKET in the store; None: none),
        owned by group `nbd_group` (None: ours); `metrics`: HOST:PORT of the
        metrics endpoint (None: none)."""
        self.mountpoint = os.path.abspath(mountpoint)
        self.store_path = os.path.abspath(store)
        self.allow_other = allow_other
        self.cluster = cluster
        cache_dir = os.path.abspath(cache_dir or os.path.join(self.store_path, "cache"))
        if cache_size is None:
            cache_size = cache.default_size(cache_dir)
            if cache_size < cache.MIN_DEFAULT_SIZE:
                cache_size = 0  # said in the log once logging is set up (`_open_catalog`)
        self.cache_dir, self.cache_size = cache_dir, cache_size
        self.access = (ClusterAccess.load(cluster, secret_file, lease_term=lease_term, io_wait=io_wait,
                                          encrypt=encrypt, cache_dir=cache_dir, cache_size=cache_size,
                                          cache_ttl=cache_ttl)
                       if cluster else None)
        self.copies = copies
        self.write_behind = write_behind
        self.control_path = os.path.join(self.store_path, CONTROL_SOCKET)
        self.nbd_path = None if nbd is None else os.path.abspath(nbd or os.path.join(self.store_path, NBD_SOCKET))
        self.nbd_group = nbd_group
        self.metrics = metrics
        if metrics is not None:
            check_address(metrics)  # a malformed address is said before anything starts
        if nbd_group is not None:
            group_id(nbd_group)  # an unknown group is said before anything starts
        if self.nbd_path is not None and len(self.nbd_path.encode()) >= UNIX_PATH_MAX:
            raise VdifsError(f"NBD socket path {self.nbd_path} is longer than a unix socket's "
                             f"{UNIX_PATH_MAX - 1} bytes: choose a shorter one with --nbd")
        self.catalog: Catalog | None = None
        self.session: session.Session | None = None
        self.notifier = Notifier()

    async def _open_catalog(self, nursery: trio.Nursery) -> Catalog:
        if self.access is not None and self.cache_size == 0:
            log.warning("no local object cache (--cache-size 0, or too little free space on the file system "
                        "of %s)", self.cache_dir)
        if self.access is not None:
            catalog = await self.access.open_catalog(nursery, self.mountpoint,
                                                     await trio.to_thread.run_sync(store_id, self.store_path))
        else:
            catalog = await open_embedded(self.store_path, nursery)
        if self.copies is not None:
            catalog.override_copies(self.copies)
        catalog.write_behind = self.write_behind
        return catalog

    def _forget_name(self, parent: int, name: str) -> None:
        if self.session is not None:
            self.session.invalidate_entry(parent, name.encode())

    def _forget_inode(self, ino: int, *, attr_only: bool = False) -> None:
        if self.session is not None:
            try:
                self.session.invalidate_inode(ino, attr_only=attr_only)
            except OSError:
                pass  # the kernel never saw this inode

    async def _drop_pages(self, vid: int) -> None:
        """Drop the kernel's cached pages of a VDI (changed past FUSE, by NBD)."""
        if self.session is not None:
            await self.session.drop_pages(vid + 1)

    async def invalidate(self, event: str, vid: int, names: list[str]) -> None:
        """Drop what the kernel cached after a change made through the
        control socket; returns once the inode's pages are gone."""
        for name in names:
            self._forget_name(SNAPSHOTS if "@" in name else ROOT, name)
        if vid:
            self._forget_inode(vid + 1, attr_only=True)
            await self._drop_pages(vid)

    def directory_changed(self, before: Directory, after: Directory) -> None:
        """Another mount changed the namespace: forget stale names and sizes.
        Only the records that changed are looked at (`changes_since`): with
        10,000 VDIs, comparing them all took milliseconds per change."""
        changes = after.changes_since(before)
        old_by_vid = {was.vid: was for _, was, _ in changes if was is not None}
        for name, was, now in changes:
            if was is not None and (now is None or now.vid != was.vid):
                self._forget_name(ROOT, name)
            old = old_by_vid.get(now.vid) if now is not None else None
            if now is not None and old is not None and old != now:  # size, times or mode changed elsewhere
                # A new data vid with the old one deleted is a rollback; a new
                # mtime, writes by another mount: cached pages go too (the
                # kernel drops them by itself only when the size changed).
                content = old.mtime != now.mtime or (old.data_vid != now.data_vid and old.data_vid in after.deleting)
                self._forget_inode(now.vid + 1, attr_only=not content)
            if was is not None:
                for snap in set(was.snapshots) - set(now.snapshots if now is not None else {}):
                    self._forget_name(SNAPSHOTS, f"{name}@{snap}")

    async def run(self, ready: IO[bytes] | None = None) -> None:
        async with trio.open_nursery() as nursery:
            self.catalog = catalog = await self._open_catalog(nursery)
            await catalog.start(nursery)
            ops = VdifsOperations(catalog)
            control = ControlServer(catalog, self.control_path,
                                    {"mountpoint": self.mountpoint, "store": self.store_path,
                                     "cluster": ",".join(self.cluster or []), "fuse": ops.stats,
                                     "nbd": self.nbd_path or ""},
                                    self.invalidate)
            await nursery.start(control.serve)
            if self.metrics is not None:
                space_cache = PoolSpaceCache()
                await nursery.start(serve_metrics, self.metrics, lambda: mount_metrics(catalog, ops.stats, space_cache))
            nbd = NbdServer(catalog, self.nbd_path, self.nbd_group, self._drop_pages) if self.nbd_path else None
            if nbd is not None:
                await nursery.start(nbd.serve)
            # mount(2), or fusermount3 as a child process: off the event loop (the control server runs)
            fd = await trio.to_thread.run_sync(session.mount, self.mountpoint, SOURCE_PREFIX + self.store_path,
                                               fuse_options(self.allow_other))
            self.session = fuse = session.Session(fd, ops)
            try:
                nursery.start_soon(self._signals)
                nursery.start_soon(self.notifier.keep_alive)
                nursery.start_soon(self._tell_ready)
                if catalog.shared:
                    nursery.start_soon(catalog.watch, self.directory_changed)
                else:
                    nursery.start_soon(catalog.reconcile_all)
                log.info("mounted %s (%s)", self.mountpoint,
                         f"cluster {','.join(self.cluster)}" if self.cluster else f"embedded pool in {self.store_path}")
                if ready is not None:
                    ready.write(b"ok\n")
                    ready.close()
                await fuse.serve()
            finally:
                self.notifier.stopping()
                with trio.CancelScope(shield=True):
                    try:
                        try:
                            if nbd is not None:
                                await nbd.stop()  # its clients' exports flushed and given back first
                            await catalog.flush_all()
                        finally:
                            await catalog.release_all_leases()
                    finally:  # unmounted even when the flush failed: no dead mount point left behind
                        self.session = None
                        await trio.to_thread.run_sync(session.unmount, self.mountpoint)
                        os.close(fd)
                        log.info("unmounted %s", self.mountpoint)
            nursery.cancel_scope.cancel()
        await catalog.pool.aclose()

    async def _tell_ready(self) -> None:
        """READY=1 once the mount answers: the root's getattr, through the
        kernel and our own loop (from a thread: the loop must be free to answer)."""
        await trio.to_thread.run_sync(os.stat, self.mountpoint)
        self.notifier.ready(f"serving {self.mountpoint} ("
                            + (f"cluster {','.join(self.cluster)}" if self.cluster else "embedded pool") + ")")

    async def _signals(self) -> None:
        assert self.catalog is not None
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("%s: flushing and unmounting", signal.Signals(signum).name)
                self.notifier.stopping()
                await self.catalog.flush_all()
                if self.session is not None:
                    self.session.stop()
                return
