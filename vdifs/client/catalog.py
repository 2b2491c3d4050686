"""VDIs by name: the directory, the loaded volumes, and background purges.

Everything the FUSE layer and the control channel do to a VDI goes through
here, so both see one consistent state. Directory changes are durable when
the call returns (the register's CAS is). Deleting a VDI tombstones its vid
in the directory first and frees its objects afterwards in the background;
a vid whose VDI is still open is purged when its last handle closes.

Snapshots, clones and rollbacks copy a map to a freshly reserved data vid
first and name it in the directory second (see `model.directory`); a
crash between leaves a reservation, which is purged. Objects of deleted
snapshots are freed by a family collection: load every live map of the
family, free what none of them points at.
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import trio

from vdifs.client.pool import ObjectPool
from vdifs.client.volume import Volume, load_map
from vdifs.errors import InvalidArgument, VdifsError, VdiNotFound
from vdifs.meta.directory_service import DirectoryService
from vdifs.meta.lease import Lease, LeaseBusy, LeaseManager
from vdifs.model.directory import Directory, SnapshotRecord, VdiRecord
from vdifs.model.extents import objects_for_size
from vdifs.model.ids import ObjectKind, unpack_oid
from vdifs.model.objmap import ObjectMap, is_allocated
from vdifs.model.names import validate_name
from vdifs.model.sizes import format_size

log = logging.getLogger(__name__)

#: Closed volumes kept loaded (their maps answer getattr without I/O).
IDLE_VOLUMES = 256
PURGE_PARALLELISM = 16
PURGE_RETRY_SECONDS = 5.0
#: Default pace of `flatten` (bytes/s), so a VM on the clone keeps its I/O.
FLATTEN_RATE = 64 << 20
#: A reservation older than this in a shared pool was left by a crashed mount.
RESERVATION_TTL = 3600.0


class Catalog:
    def __init__(self, pool: ObjectPool, directory: DirectoryService, *, shared: bool = False,
                 leases: LeaseManager | None = None) -> None:
        """`shared`: other mounts use the same pool and directory (a cluster).

        Then a VDI's map is re-read when it is opened, objects the map does not
        reference are left alone (another mount may be allocating them), and
        leftovers of unknown vids are not purged.
        """
        self.pool = pool
        self.directory = directory
        self.shared = shared
        self.leases = leases
        self._lease_users: dict[int, int] = {}  # writable opens that need (or wait for) each lease
        if leases is not None:
            leases.on_lost = self._lease_lost
        self._volumes: OrderedDict[int, Volume] = OrderedDict()
        self._load_locks: dict[int, trio.Lock] = {}
        self._snapshots: OrderedDict[int, Volume] = OrderedDict()  # read-only, by data vid
        # ("vid", data vid): free all its objects; ("family", family vid): free what no map points at
        self._purge_send, self._purge_recv = trio.open_memory_channel[tuple[str, int]](math.inf)
        self._purging: set[tuple[str, int]] = set()
        self.purges_done = 0
        self.copies_override: int | None = None  # `vdifs mount --copies`
        self.jobs: dict[str, dict[str, object]] = {}  # long operations in progress, by VDI name

    @property
    def default_copies(self) -> int:
        return self.copies_override or self.pool.default_copies

    # -- life cycle ------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        """Read the directory, resume interrupted deletes, start the purger."""
        d = await self.directory.refresh()
        nursery.start_soon(self._purger)
        stale = [v for v, r in d.reserved.items()
                 if not self.shared or time.time() - float(r.get("at", 0)) > RESERVATION_TTL]
        if stale:
            log.warning("releasing %d reservation(s) left by an interrupted snapshot, clone or rollback", len(stale))

            def release(d: Directory) -> None:
                for v in stale:
                    d.release(v)

            await self.directory.update(release)
            d = self.current
        for vid in sorted(d.deleting):
            self._schedule_purge(vid)
        for family in sorted({f for f, _ in d.retired.values()}):
            self._schedule_collect(family)
        if not self.shared:
            in_use = d.vids_in_use()
            for vid in await self.pool.list_vids():
                if vid not in in_use:
                    log.warning("vid %d has objects but no VDI record: freeing them", vid)
                    self._schedule_purge(vid)
        log.info("directory: %d VDIs, %d being deleted", len(d.vdis), len(d.deleting))

    async def reconcile_all(self) -> None:
        """Load (and so reconcile) every VDI once; run in the background after start."""
        for rec in list(self.directory.current.vdis.values()):
            try:
                await self.volume(rec.vid)
            except VdiNotFound:
                continue

    async def flush_all(self) -> None:
        for vol in list(self._volumes.values()):
            if vol.dirty:
                await vol.flush(times=True)

    # -- lookups ---------------------------------------------------------------

    @property
    def current(self) -> Directory:
        return self.directory.current

    async def watch(self, on_change: Callable[[Directory, Directory], None], interval: float = 0.5) -> None:
        """Follow the directory changes other mounts make (shared pools)."""
        while True:
            await trio.sleep(interval)
            before = self.current
            try:
                changed = await self.directory.refresh_hint()
            except VdifsError as e:
                log.debug("directory watch: %s", e)
                continue
            if changed:
                after = self.current
                for vid in after.deleting - before.deleting:
                    self._tombstoned(vid)
                self._forget_stale(after)
                on_change(before, after)

    def _forget_stale(self, directory: Directory) -> None:
        """Drop idle volumes whose record another mount changed (reloaded on use)."""
        records = {r.vid: r for r in directory.vdis.values()}
        for vid, vol in list(self._volumes.items()):
            rec = records.get(vid)
            if vol.handles == 0 and not vol.dirty and rec is not None and rec != vol.record:
                del self._volumes[vid]

    async def find(self, name: str) -> VdiRecord:
        """Like lookup, but a miss re-reads the directory first when it is shared."""
        try:
            return self.lookup(name)
        except VdiNotFound:
            if not self.shared:
                raise
        await self.directory.refresh_hint()
        return self.lookup(name)

    def lookup(self, name: str) -> VdiRecord:
        rec = self.current.get(name)
        vol = self._volumes.get(rec.vid)
        return vol.record if vol is not None else rec

    def record_of(self, vid: int) -> VdiRecord | None:
        vol = self._volumes.get(vid)
        if vol is not None:
            return vol.record
        found = self.current.by_vid(vid)
        return found[1] if found else None

    def listing(self) -> list[tuple[str, VdiRecord]]:
        return sorted((n, self.record_of(r.vid) or r) for n, r in self.current.vdis.items())

    async def volume(self, vid: int) -> Volume:
        """The loaded volume of a vid (loading and reconciling it if needed)."""
        vol = self._volumes.get(vid)
        if vol is not None:
            self._volumes.move_to_end(vid)
            return vol
        lock = self._load_locks.setdefault(vid, trio.Lock())
        async with lock:
            vol = self._volumes.get(vid)
            if vol is None:
                found = self.current.by_vid(vid)
                if found is None:
                    raise VdiNotFound(f"no VDI with vid {vid}")
                self._register(found[1])
                vol = await Volume.load(self.pool, replace(found[1]), self.persist_meta,
                                        reconcile=not self.shared)
                self._evict_idle()  # before inserting: the caller has not pinned it yet
                self._volumes[vid] = vol
        self._load_locks.pop(vid, None)
        return vol

    def _register(self, rec: VdiRecord) -> None:
        """Tell the pool the copies of every data vid a map may point at, and
        which lease guards the VDI's own objects."""
        for vid, copies in self.current.copies_by_data_vid().items():
            self.pool.register_vdi(vid, copies)
        self.pool.register_vdi(rec.data_vid, rec.copies, lease_vid=rec.vid)

    def _evict_idle(self) -> None:
        if len(self._volumes) <= IDLE_VOLUMES:
            return
        for vid, vol in list(self._volumes.items()):
            if len(self._volumes) <= IDLE_VOLUMES:
                break
            if vol.handles == 0 and not vol.dirty:
                del self._volumes[vid]

    # -- open files ------------------------------------------------------------

    def _needs_lease(self, vid: int) -> bool:
        rec = self.record_of(vid)
        return self.leases is not None and rec is not None and not rec.shared

    async def open(self, vid: int, *, writable: bool = False) -> Volume:
        """A handle on a VDI; a writable one holds its lease (in a cluster).

        The lease is taken before the map is read, so the map we load is the
        previous writer's last word."""
        took = False
        if writable and self._needs_lease(vid):
            assert self.leases is not None
            # Counted before acquiring: a release running meanwhile sees us and keeps it.
            self._lease_users[vid] = self._lease_users.get(vid, 0) + 1
            had = self.leases.holds(vid)
            try:
                generation = await self.leases.acquire(vid)  # serialised with release
            except BaseException:
                self._drop_lease_user(vid)
                raise
            self.pool.set_generation(vid, generation)
            took = not had
        try:
            if self.shared:
                idle = self._volumes.get(vid)
                if idle is not None and (took or (idle.handles == 0 and not idle.dirty)):
                    del self._volumes[vid]  # another mount may have written it: re-read the map
            vol = await self.volume(vid)
        except BaseException:
            if writable and self._needs_lease(vid):
                self._drop_lease_user(vid)
                await self._release_lease(vid)
            raise
        if took:
            vol.fenced = None
        vol.handles += 1
        vol.writers += writable
        return vol

    def _drop_lease_user(self, vid: int) -> None:
        left = self._lease_users.get(vid, 0) - 1
        if left > 0:
            self._lease_users[vid] = left
        else:
            self._lease_users.pop(vid, None)

    async def close(self, vol: Volume, *, writable: bool = False) -> None:
        vol.handles -= 1
        vol.writers -= writable
        if writable and vol.vid in self._lease_users:
            self._drop_lease_user(vol.vid)
        if writable and vol.writers == 0 and self.leases is not None and self.leases.holds(vol.vid):
            try:
                if vol.dirty and not vol.unlinked:
                    await vol.flush(times=True)
            finally:
                await self._release_lease(vol.vid)
        if vol.handles == 0:
            if vol.unlinked:
                self._volumes.pop(vol.vid, None)
                self._schedule_purge(vol.data_vid)
                self._schedule_collect(vol.record.family)
            elif vol.dirty and not vol.fenced:
                await vol.flush(times=True)

    async def _release_lease(self, vid: int) -> None:
        assert self.leases is not None
        with trio.CancelScope(shield=True):
            try:
                await self.leases.release(vid, lambda: vid not in self._lease_users)
            except VdifsError as e:
                log.warning("vid %d: could not release the lease (%s); it expires by itself", vid, e)
            if not self.leases.holds(vid):
                self.pool.set_generation(vid, None)

    def _lease_lost(self, vid: int, why: str) -> None:
        vol = self._volumes.get(vid)
        if vol is not None:
            vol.fenced = f"lease lost: {why}"

    async def release_all_leases(self) -> None:
        """At unmount: give back every lease, whoever still has the file open."""
        if self.leases is not None:
            self._lease_users.clear()
            for vid in list(self.leases.held):
                await self._release_lease(vid)

    @asynccontextmanager
    async def using(self, vid: int, *, writable: bool = True) -> AsyncIterator[Volume]:
        """The volume, pinned (not evicted, not purged) for the duration; by
        default writable, i.e. under the VDI's lease in a cluster."""
        vol = await self.open(vid, writable=writable)
        try:
            yield vol
        finally:
            await self.close(vol, writable=writable)

    async def _refuse_if_leased_elsewhere(self, name: str) -> None:
        """Maintenance must not race the writer of a VDI on another mount."""
        if self.leases is None:
            return
        rec = self.current.get(name)
        if rec.shared or self.leases.holds(rec.vid):
            return
        lease = await self.leases.info(rec.vid)
        if lease.holder is not None and not self.leases.is_ours(lease):
            raise LeaseBusy(f"VDI {name!r} is in use by {lease.describe()}")

    async def lock_info(self, name: str) -> Lease:
        if self.leases is None:
            raise InvalidArgument("the embedded pool has one mount and no leases")
        return await self.leases.info(self.current.get(name).vid)

    async def break_lock(self, name: str) -> Lease:
        if self.leases is None:
            raise InvalidArgument("the embedded pool has one mount and no leases")
        rec = self.current.get(name)
        before = await self.leases.break_lock(rec.vid)
        self._lease_lost(rec.vid, "the lock was broken")
        return before

    async def persist_meta(self, vol: Volume) -> None:
        """Write a volume's size, times and ownership into the directory."""
        rec = vol.record

        def apply(d: Directory) -> None:
            found = d.by_vid(rec.vid)
            if found is not None and found[1].data_vid == vol.data_vid:
                # Only what the volume owns: snapshots and the data vid change
                # through the directory (another mount may have changed them).
                size = max(rec.size, found[1].size) if rec.shared else rec.size  # several writers: grows only
                d.vdis[found[0]] = replace(found[1], size=size, mtime=rec.mtime, atime=rec.atime, mode=rec.mode,
                                           uid=rec.uid, gid=rec.gid, shared=rec.shared, copies=rec.copies)

        await self.directory.update(apply)
        found = self.current.by_vid(rec.vid)
        if found is not None and found[1].data_vid != vol.data_vid:
            log.warning("vid %d: not stored: the VDI moved to data vid %d elsewhere (rolled back?) while "
                        "this mount had it open under data vid %d", rec.vid, found[1].data_vid, vol.data_vid)

    # -- VDI operations ----------------------------------------------------------

    async def create(self, name: str, size: int, *, copies: int | None = None, mode: int = 0o644,
                     uid: int = 0, gid: int = 0, shared: bool = False) -> VdiRecord:
        copies = self.default_copies if copies is None else copies
        if not 1 <= copies <= self.pool.max_copies:
            raise InvalidArgument(f"copies must be between 1 and {self.pool.max_copies} in this pool")
        rec = await self.directory.update(
            lambda d: d.create(name, size, copies=copies, mode=mode, uid=uid, gid=gid, shared=shared))
        self._register(rec)
        log.info("created VDI %r (vid %d, %s)", name, rec.vid, format_size(size))
        return rec

    async def delete(self, name: str, *, with_snapshots: bool = False) -> int:
        await self._refuse_if_leased_elsewhere(name)
        rec = self.current.get(name)
        data_vid = await self.directory.update(lambda d: d.delete(name, with_snapshots=with_snapshots))
        log.info("deleted VDI %r (vid %d%s); freeing its objects", name, rec.vid,
                 f" and {len(rec.snapshots)} snapshots" if rec.snapshots else "")
        for s in rec.snapshots.values():
            self._snapshots.pop(s.vid, None)
        self._tombstoned(data_vid)
        self._schedule_collect(rec.family)
        return rec.vid

    async def rename(self, old: str, new: str, *, replace_target: bool = True) -> None:
        await self._refuse_if_leased_elsewhere(old)
        if new in self.current.vdis:
            await self._refuse_if_leased_elsewhere(new)
        victim = self.current.vdis.get(new)
        replaced = await self.directory.update(lambda d: d.rename(old, new, replace=replace_target))
        log.info("renamed VDI %r to %r", old, new)
        if replaced is not None:
            log.info("rename replaced the old VDI %r (data vid %d); freeing its objects", new, replaced)
            self._tombstoned(replaced)
            if victim is not None:
                self._schedule_collect(victim.family)

    async def resize(self, name: str, size: int) -> VdiRecord:
        rec = self.current.get(name)
        async with self.using(rec.vid) as vol:
            old = vol.size
            await vol.truncate(size)
        log.info("resized VDI %r (vid %d) from %s to %s", name, rec.vid, format_size(old), format_size(size))
        return vol.record

    async def set_shared(self, vid: int, shared: bool) -> None:
        """Flag a VDI shared (any number of writers, no lease) or back; only while
        nobody holds its lease."""
        rec = self.record_of(vid)
        if rec is None:
            raise VdiNotFound(f"no VDI with vid {vid}")
        if self.leases is not None:
            lease = await self.leases.info(vid)
            if lease.holder is not None:
                raise LeaseBusy(f"the shared flag can only change while nobody writes; "
                                f"the VDI is in use by {lease.describe()}")
        vol = await self.volume(vid)
        if vol.writers:
            raise LeaseBusy("the shared flag can only change while nobody writes (open for writing here)")
        if shared and (self.current.get(self._name_of(vid)).snapshots
                       or any(e != vol.data_vid for _, e in vol.map.entries())):
            raise InvalidArgument("a VDI with snapshots, or sharing objects with a snapshot (a clone), "
                                  "cannot be shared: several writers could copy up the same object")
        vol.record.shared = shared
        await self.persist_meta(vol)
        log.info("vid %d is now %s", vid, "shared: any number of writers, no lease" if shared else "exclusive")

    async def set_copies(self, vid: int, copies: int) -> None:
        if not 1 <= copies <= self.pool.max_copies:
            raise InvalidArgument(f"copies must be between 1 and {self.pool.max_copies} in this pool")
        async with self.using(vid) as vol:
            if vol.map.allocated:
                raise InvalidArgument("copies can only be set on a VDI that holds no data yet")
            vol.record.copies = copies
            self.pool.register_vdi(vid, copies)
            await self.persist_meta(vol)

    # -- snapshots, clones, rollback ---------------------------------------------------

    def _name_of(self, vid: int) -> str:
        found = self.current.by_vid(vid)
        if found is None:
            raise VdiNotFound(f"no VDI with vid {vid}")
        return found[0]

    async def _reserve_and_copy(self, purpose: str, source: Volume, copies: int,
                                lease_vid: int | None = None) -> int:
        """A fresh data vid whose map is a durable copy of `source`'s map, its
        objects kept in `copies` copies (the pool must know before the first
        create, or it would put the map on every peer)."""
        new = await self.directory.update(lambda d: d.reserve(purpose, source.data_vid))
        self.pool.register_vdi(new, copies, lease_vid=lease_vid)
        try:
            await source.copy_map_to(new)
        except BaseException:
            await self._release(new)
            raise
        return new

    async def _release(self, vid: int) -> None:
        with trio.CancelScope(shield=True):
            try:
                await self.directory.update(lambda d: d.release(vid))
                self._schedule_purge(vid)
            except VdifsError as e:
                log.warning("could not release reserved vid %d (%s); the next mount start does", vid, e)

    async def snapshot(self, name: str, snap: str, snapshot_id: str | None = None) -> SnapshotRecord:
        """Cut a crash-consistent snapshot: with the VDI's lease (shared with a
        VM writing through this mount), hold its writes back, flush, copy the
        map to a new data vid and switch to it in one directory update."""
        validate_name(snap)
        ident = snapshot_id or secrets.token_hex(8)
        rec = self.current.get(name)
        if rec.shared:
            raise InvalidArgument(f"VDI {name!r} is shared (several writers, no lease): it cannot be snapshotted")
        if snap in rec.snapshots:
            raise VdifsError(f"VDI {name!r} already has a snapshot {snap!r}", code=errno.EEXIST)
        async with self.using(rec.vid) as vol:
            async with vol.quiesced():
                await vol.flush()
                new = await self._reserve_and_copy(f"snapshot {name}@{snap}", vol, vol.record.copies,
                                                   lease_vid=rec.vid)
                try:
                    def cut(d: Directory) -> tuple[SnapshotRecord, VdiRecord]:
                        now_name = self._name_of_in(d, rec.vid)
                        s = d.snapshot(now_name, snap, new, vol.size, snapshot_id=ident)
                        return s, d.get(now_name)
                    s, after = await self.directory.update(cut)
                except BaseException:
                    await self._release(new)
                    raise
                vol.switch_data_vid(replace(after, mtime=vol.record.mtime, atime=vol.record.atime))
                self._register(after)
        log.info("snapshot %s@%s: data vid %d frozen (%s); the VDI goes on under data vid %d",
                 name, snap, s.vid, format_size(s.size), new)
        return s

    @staticmethod
    def _name_of_in(d: Directory, vid: int) -> str:
        found = d.by_vid(vid)
        if found is None:
            raise VdiNotFound(f"the VDI with vid {vid} was deleted meanwhile")
        return found[0]

    async def snapshot_volume(self, data_vid: int) -> Volume:
        """A snapshot, read-only, by its data vid."""
        vol = self._snapshots.get(data_vid)
        if vol is not None:
            self._snapshots.move_to_end(data_vid)
            return vol
        found = self.current.find_snapshot(data_vid)
        if found is None:
            raise VdiNotFound(f"no snapshot with data vid {data_vid}")
        name, _, s = found
        rec = VdiRecord(vid=data_vid, size=s.size, ctime=s.ctime, mtime=s.ctime, atime=s.ctime,
                        copies=s.copies, object_order=s.object_order, mode=self.current.get(name).mode & 0o7555,
                        uid=self.current.get(name).uid, gid=self.current.get(name).gid)
        for vid, copies in self.current.copies_by_data_vid().items():
            self.pool.register_vdi(vid, copies)
        vol = await Volume.load(self.pool, rec, self.persist_meta, reconcile=False)
        vol.read_only = True
        self._snapshots[data_vid] = vol
        while len(self._snapshots) > IDLE_VOLUMES:
            self._snapshots.popitem(last=False)
        return vol

    def snapshot_listing(self) -> list[tuple[str, SnapshotRecord]]:
        """("NAME@SNAP", record) of every snapshot, sorted."""
        return sorted((f"{n}@{sn}", s) for n, r in self.current.vdis.items() for sn, s in r.snapshots.items())

    async def clone(self, name: str, snap: str, new_name: str, *, copies: int | None = None) -> VdiRecord:
        """A new VDI that starts as NAME@SNAP and shares its objects until written."""
        validate_name(new_name)
        s = self.current.snapshot_of(name, snap)
        if copies is not None and not 1 <= copies <= self.pool.max_copies:
            raise InvalidArgument(f"copies must be between 1 and {self.pool.max_copies} in this pool")
        if new_name in self.current.vdis:
            raise VdifsError(f"a VDI named {new_name!r} already exists", code=errno.EEXIST)
        src = await self.snapshot_volume(s.vid)
        new = await self._reserve_and_copy(f"clone {new_name} of {name}@{snap}", src,
                                           s.copies if copies is None else copies)
        try:
            rec = await self.directory.update(
                lambda d: d.clone_snapshot(name, snap, new_name, new, copies=copies))
        except BaseException:
            await self._release(new)
            raise
        self._register(rec)
        log.info("cloned %s@%s as VDI %r (vid %d, %d objects shared)", name, snap, new_name, rec.vid,
                 src.map.allocated)
        return rec

    async def rollback(self, name: str, snap: str) -> VdiRecord:
        """Make the VDI the snapshot's content again (refused while anyone writes it)."""
        await self._refuse_if_leased_elsewhere(name)
        rec = self.current.get(name)
        s = self.current.snapshot_of(name, snap)
        async with self.using(rec.vid) as vol:
            if vol.writers > 1:
                raise VdifsError(f"VDI {name!r} is open for writing: stop its VM before a rollback",
                                 code=errno.EBUSY)
            await vol.flush()
            src = await self.snapshot_volume(s.vid)
            new = await self._reserve_and_copy(f"rollback {name}@{snap}", src, vol.record.copies,
                                               lease_vid=rec.vid)
            try:
                old = await self.directory.update(lambda d: d.rollback(self._name_of_in(d, rec.vid), snap, new))
            except BaseException:
                await self._release(new)
                raise
            after = self.current.get(self._name_of(rec.vid))
            await vol.reload(replace(after))
            self._register(after)
        self._schedule_purge(old)
        self._schedule_collect(after.family)
        log.info("rolled VDI %r back to snapshot %r (%s); freeing its data vid %d", name, snap,
                 format_size(s.size), old)
        return after

    async def flatten(self, name: str, *, rate: int = FLATTEN_RATE) -> int:
        """Copy every object the VDI shares with a parent snapshot into its own
        data vid, at most `rate` bytes/s, while it stays in use; returns the
        objects copied. Objects shared with its own snapshots stay shared."""
        if rate <= 0:
            raise InvalidArgument("the flatten rate must be positive")
        rec = self.current.get(name)
        own = {s.vid for s in rec.snapshots.values()}
        async with self.using(rec.vid) as vol:
            todo = vol.inherited(own)
            job: dict[str, object] = {"op": "flatten", "done": 0, "total": len(todo)}
            if name in self.jobs:
                raise VdifsError(f"VDI {name!r} is already being flattened", code=errno.EBUSY)
            self.jobs[name] = job
            log.info("flattening VDI %r: %d objects to copy from its parent", name, len(todo))
            copied = 0
            try:
                started = trio.current_time()
                for n, index in enumerate(todo, start=1):
                    copied += await vol.flatten_object(index, own)
                    job["done"] = n
                    ahead = copied * vol.object_size / rate - (trio.current_time() - started)
                    if ahead > 0:
                        await trio.sleep(ahead)
                await vol.flush()
            finally:
                del self.jobs[name]
            # Independent now, unless one of its snapshots still reads the parent.
            still = False
            for s in rec.snapshots.values():
                snapvol = await self.snapshot_volume(s.vid)
                still |= any(e not in own for _, e in snapvol.map.entries())
            if not still and rec.parent_vid:
                def detach(d: Directory) -> None:
                    d.get(self._name_of_in(d, rec.vid)).parent_vid = 0
                await self.directory.update(detach)
                vol.record.parent_vid = 0
        self._schedule_collect(rec.family)
        log.info("flattened VDI %r: %d objects copied%s", name, copied,
                 "" if not still else "; its snapshots still share objects with the parent")
        return copied

    async def _stored_map(self, vid: int) -> ObjectMap:
        """The map of a live VDI: ours if we hold it (or nobody else can write
        it), else re-read from the pool (another mount's writes)."""
        vol = await self.volume(vid)
        if not self.shared or (self.leases is not None and self.leases.holds(vid)):
            return vol.map
        return await load_map(self.pool, vol.data_vid, vol.size, vol.object_size)

    async def diff(self, name: str, snap: str | None = None, since: str | None = None) -> dict[str, Any]:
        """What changed in NAME (or NAME@SNAP) since snapshot `since` of the same
        VDI (or since empty), from the object maps alone: an object changed
        when the two maps point at different data vids. Whole objects:
        extents [offset, length, "data" | "zero"] in order."""
        rec = self.current.get(name)
        if snap is not None:
            s = self.current.snapshot_of(name, snap)
            target, size, object_size = (await self.snapshot_volume(s.vid)).map, s.size, s.object_size
        else:
            vol = await self.volume(rec.vid)
            target, size, object_size = await self._stored_map(rec.vid), vol.size, vol.object_size
        base = ObjectMap()
        if since is not None:
            base = (await self.snapshot_volume(self.current.snapshot_of(name, since).vid)).map
        count = objects_for_size(size, object_size)
        indexes = sorted({i for i, _ in target.entries()} | {i for i, _ in base.entries()})
        extents: list[list[Any]] = []
        for i in indexes:
            if i >= count:
                break
            t, b = target.get(i), base.get(i)
            t, b = (t if is_allocated(t) else 0), (b if is_allocated(b) else 0)
            if t == b:
                continue
            kind = "data" if t else "zero"
            start, length = i * object_size, min(object_size, size - i * object_size)
            if extents and extents[-1][2] == kind and extents[-1][0] + extents[-1][1] == start:
                extents[-1][1] += length
            else:
                extents.append([start, length, kind])
        return {"name": name, "snapshot": snap, "from": since, "size": size, "object_size": object_size,
                "extents": extents}

    async def usage(self, name: str) -> list[dict[str, Any]]:
        """Space of a VDI and each of its snapshots: allocated, and the part no
        other map of the family (snapshots, clones, the VDI) points at, which
        deleting just that one would free."""
        d = self.current
        rec = d.get(name)
        maps: dict[int, ObjectMap] = {}
        for data_vid, _size in d.live_maps(rec.family):
            found = d.find_snapshot(data_vid)
            if found is not None:
                maps[data_vid] = (await self.snapshot_volume(data_vid)).map
            else:
                owner = next(r for r in d.vdis.values() if r.data_vid == data_vid)
                maps[data_vid] = await self._stored_map(owner.vid)
        refs: dict[tuple[int, int], int] = {}
        for m in maps.values():
            for i, e in m.entries():
                if is_allocated(e):
                    refs[(e, i)] = refs.get((e, i), 0) + 1
        rows = []
        for label, data_vid, size in ([(f"{name}@{sn}", s.vid, s.size) for sn, s in
                                       sorted(rec.snapshots.items(), key=lambda kv: kv[1].ctime)]
                                      + [(name, rec.data_vid, rec.size)]):
            entries = [(e, i) for i, e in maps[data_vid].entries() if is_allocated(e)]
            exclusive = sum(1 for key in entries if refs[key] == 1)
            rows.append({"name": label, "size": size, "allocated": len(entries) * rec.object_size,
                         "exclusive": exclusive * rec.object_size,
                         "shared": (len(entries) - exclusive) * rec.object_size})
        return rows

    async def delete_snapshot(self, name: str, snap: str) -> int:
        data_vid = await self.directory.update(lambda d: d.delete_snapshot(name, snap))
        self._snapshots.pop(data_vid, None)
        family = self.current.get(name).family
        log.info("deleted snapshot %s@%s (data vid %d); freeing what no other map shares", name, snap, data_vid)
        self._schedule_collect(family)
        return data_vid

    def family_tree(self) -> list[dict[str, object]]:
        """Every VDI with its snapshots and where it was cloned from."""
        d = self.current
        out: list[dict[str, object]] = []
        for name, rec in sorted(d.vdis.items()):
            parent = None
            if rec.parent_vid:
                found = d.find_snapshot(rec.parent_vid)
                parent = f"{found[0]}@{found[1]}" if found else f"(deleted snapshot, data vid {rec.parent_vid})"
            out.append({"name": name, "vid": rec.vid, "data_vid": rec.data_vid, "size": rec.size,
                        "family": rec.family, "parent": parent,
                        "snapshots": [{"name": sn, "data_vid": s.vid, "size": s.size, "ctime": s.ctime,
                                       "id": s.id}
                                      for sn, s in sorted(rec.snapshots.items(), key=lambda kv: kv[1].ctime)]})
        return out

    # -- purging -----------------------------------------------------------------

    def _tombstoned(self, data_vid: int) -> None:
        """A data vid went into `deleting`: free its objects, unless a volume
        here still has it open (then on its last close)."""
        for vid, vol in list(self._volumes.items()):
            if vol.data_vid == data_vid:
                if vol.handles > 0:
                    vol.unlinked = True  # open files keep working; purge on last close
                    return
                del self._volumes[vid]
        self._schedule_purge(data_vid)

    def _schedule_purge(self, vid: int) -> None:
        self._schedule(("vid", vid))

    def _schedule_collect(self, family: int) -> None:
        if self.current.retired_of(family):
            self._schedule(("family", family))

    def _schedule(self, job: tuple[str, int]) -> None:
        if job not in self._purging:
            self._purging.add(job)
            self._purge_send.send_nowait(job)

    @property
    def pending_purges(self) -> int:
        return len(self._purging)

    async def _purger(self) -> None:
        async for job in self._purge_recv:
            kind, n = job
            try:
                if kind == "vid":
                    await self._purge(n)
                else:
                    await self._collect(n)
            except Exception as e:
                log.error("freeing the objects of %s %d failed (%s); retrying in %.0f s",
                          "vid" if kind == "vid" else "family", n, e, PURGE_RETRY_SECONDS)
                await trio.sleep(PURGE_RETRY_SECONDS)
                self._purge_send.send_nowait(job)
                continue
            self._purging.discard(job)
            self.purges_done += 1

    async def _delete_all(self, oids: list[int]) -> None:
        limiter = trio.CapacityLimiter(PURGE_PARALLELISM)

        async def drop(oid: int) -> None:
            async with limiter:
                await self.pool.delete(oid)

        async with trio.open_nursery() as nursery:
            for oid in oids:
                nursery.start_soon(drop, oid)

    async def _purge(self, vid: int) -> None:
        oids = await self.pool.list_objects(vid)
        await self._delete_all(oids)
        await self.pool.finish_vid(vid)
        await self.pool.sync([])  # the unlinks are durable before the tombstone goes
        await self.directory.update(lambda d: d.finish_delete(vid))
        log.info("freed %d objects of deleted vid %d", len(oids), vid)

    async def _collect(self, family: int) -> None:
        """Free the objects of a family's retired data vids that no live map
        points at any more; a retired vid with nothing left is forgotten.

        Safe against concurrent writers: maps gain references to a retired
        vid only by copying a live map that had them (snapshot, clone,
        rollback), and the stored maps read here never lag behind in that
        direction (copies are stored before the directory names them; a
        copy-up drops a reference in memory before in the pool)."""
        d = await self.directory.refresh()
        retired = d.retired_of(family)
        if not retired:
            return
        for vid, copies in d.copies_by_data_vid().items():
            self.pool.register_vdi(vid, copies)
        referenced: dict[int, set[int]] = {v: set() for v in retired}
        for data_vid, size in d.live_maps(family):
            objmap = await load_map(self.pool, data_vid, size, d.object_size_of(data_vid))
            for index, entry in objmap.entries():
                if entry in referenced:
                    referenced[entry].add(index)
        freed = 0
        for vid in retired:
            doomed = []
            for oid in await self.pool.list_objects(vid):
                kind, _, index = unpack_oid(oid)
                if kind != ObjectKind.DATA or index not in referenced[vid]:
                    doomed.append(oid)  # its map (nobody reads it now) or an object nobody points at
            await self._delete_all(doomed)
            freed += len(doomed)
            if not referenced[vid]:
                await self.pool.finish_vid(vid)
                await self.pool.sync([])
                await self.directory.update(functools.partial(Directory.finish_retired, vid=vid))
                log.info("retired data vid %d: nothing points at it any more; forgotten", vid)
        log.info("family %d: freed %d objects no map points at", family, freed)
