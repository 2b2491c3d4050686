"""VDIs by name: the directory, the loaded volumes, open files and leases.

Everything the FUSE layer and the control channel do to a VDI goes through
here (snapshots and reports through `Snapshots` and `Reports`, which use
the catalog), so all see one consistent state. Directory changes are
durable when the call returns (the register's CAS is). Deleting a VDI
tombstones its data vid in the directory first; the `Purger` frees its
objects afterwards in the background, and a data vid whose VDI is still
open here is purged when its last handle closes.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace

import trio

from vdifs.client.pool import ObjectPool, register_data_vids
from vdifs.client.purge import Purger
from vdifs.client.volume import Spawn, Volume
from vdifs.errors import InvalidArgument, VdifsError, VdiNotFound
from vdifs.meta.directory_service import INTENT_AGE, DirectoryService
from vdifs.meta.lease import Lease, LeaseBusy, LeaseManager
from vdifs.model.directory import Directory, SnapshotRecord, VdiRecord
from vdifs.model.iostats import IoStats
from vdifs.model.sizes import format_size

log = logging.getLogger(__name__)

#: Closed volumes (and snapshots) kept loaded (their maps answer getattr without I/O).
IDLE_VOLUMES = 256
#: Default write-behind window of each VDI (`vdifs mount --write-behind`).
WRITE_BEHIND = 16 << 20


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
        self.purger = Purger(pool, directory)
        self._lease_users: dict[int, int] = {}  # writable opens that need (or wait for) each lease
        if leases is not None:
            leases.on_lost = self._lease_lost
        self._volumes: OrderedDict[int, Volume] = OrderedDict()
        self._io: dict[int, IoStats] = {}  # vid -> its clients' requests since this mount started
        self._load_locks: dict[int, trio.Lock] = {}
        self._snapshots: OrderedDict[int, Volume] = OrderedDict()  # read-only, by data vid
        self._copies_override: int | None = None  # `vdifs mount --copies`
        self.write_behind = WRITE_BEHIND  # window bytes per VDI; 0: every write goes through
        self._spawn: Spawn | None = None  # the mount's nursery, once started: drains windows
        self._cacheable: tuple[Directory | None, dict[int, tuple[int, bool]]] = (None, {})

    @property
    def default_copies(self) -> int:
        return self._copies_override or self.pool.default_copies

    def check_copies(self, copies: int, *, what: str = "copies") -> int:
        """`copies` if this pool can keep that many copies, else InvalidArgument."""
        if not 1 <= copies <= self.pool.max_copies:
            raise InvalidArgument(f"{what} must be between 1 and {self.pool.max_copies} in this pool")
        return copies

    def override_copies(self, copies: int) -> None:
        """`vdifs mount --copies`: the copies of VDIs created without a count."""
        self._copies_override = self.check_copies(copies, what=f"--copies {copies}:")

    # -- life cycle ------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        """Read the directory, start the purger and resume interrupted deletes."""
        await self.directory.refresh()
        # Renames and clones across directory parts a dead mount left half
        # done (in a cluster, not the young ones: their mounts are at it).
        await self.directory.finish_intents(INTENT_AGE if self.shared else 0.0)
        self._spawn = nursery.start_soon
        nursery.start_soon(self.purger.run)
        await self.purger.resume(shared=self.shared)
        d = self.current
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
        """Follow the directory changes other mounts make (shared pools), and
        finish the renames and clones across parts that their mounts left
        half done."""
        while True:
            await trio.sleep(interval)
            before = self.current
            try:
                if before.intents:
                    await self.directory.finish_intents()
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
        for vid, vol in list(self._volumes.items()):
            found = directory.by_vid(vid)
            rec = found[1] if found is not None else None
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

    def cache_facts(self, data_vid: int) -> tuple[int, bool] | None:
        """(object size, immutable) if the local cache may keep objects of
        `data_vid` (`Directory.cacheable_data_vids`); a mutable one only
        while this mount holds its lease, which the pool checks. Recomputed
        when the directory changes, not on every call (a read asks)."""
        d = self.current
        if self._cacheable[0] is not d:
            self._cacheable = (d, d.cacheable_data_vids())
        return self._cacheable[1].get(data_vid)

    def listing(self) -> list[tuple[str, VdiRecord]]:
        """(name, record) of every VDI, by name; a loaded volume's record (it
        may be newer than the directory's until its next flush)."""
        loaded = self._volumes
        return sorted((n, loaded[r.vid].record if r.vid in loaded else r) for n, r in self.current.vdis.items())

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
                self.register_with_pool(found[1])
                vol = await Volume.load(self.pool, replace(found[1]), self.persist_meta,
                                        reconcile=not self.shared)
                if self._spawn is not None and self.write_behind:
                    vol.enable_write_behind(self._spawn, self.write_behind)
                vol.io = self._io.setdefault(vid, IoStats())  # counted across reloads
                self._evict_idle()  # before inserting: the caller has not pinned it yet
                self._volumes[vid] = vol
        self._load_locks.pop(vid, None)
        return vol

    def loaded(self, vid: int) -> Volume | None:
        """The volume of a vid if it is loaded (no I/O, no loading)."""
        return self._volumes.get(vid)

    def register_with_pool(self, rec: VdiRecord) -> None:
        """Tell the pool the copies of every data vid the VDI's map may point
        at (its family's), and which lease guards the VDI's own objects."""
        register_data_vids(self.pool, self.current, rec.family)
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
            had = self.leases.generation_held(vid)
            try:
                generation = await self.leases.acquire(vid)  # serialised with release
            except BaseException:
                self._drop_lease_user(vid)
                raise
            self.pool.set_generation(vid, generation)
            took = generation != had  # a release may have run while we waited: then it is new
            if self.leases.closing(vid):  # our last writer was closing; now there is a new one
                await self.leases.mark_closing(vid, False)
        try:
            if took and self.shared:
                # The last writer's size (and all it changed) is in the directory;
                # the view watched every half second may not have it yet, and a
                # size grown from a stale one would be persisted over it.
                await self.directory.refresh_vid(vid)
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

    async def writer_closing(self, vol: Volume) -> None:
        """The synchronous part of a writable handle's close (FUSE flush): if
        it is this mount's last writer of the VDI, mark the lease closing, so
        that a writable open elsewhere waits for our release (sent later by
        the kernel) instead of failing with EBUSY (`meta.lease`)."""
        if vol.writers == 1 and self.leases is not None and self.leases.holds(vol.vid):
            try:
                await self.leases.mark_closing(vol.vid, True)
            except VdifsError as e:
                log.info("vid %d: could not mark the lease closing (%s)", vol.vid, e)

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
                self.purger.purge_vid(vol.data_vid)
                self.purger.collect_family(vol.record.family)
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
            vol.fence(f"lease lost: {why}")

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

    async def refuse_if_leased_elsewhere(self, name: str) -> None:
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

        await self.directory.update_vid(rec.vid, apply)
        found = self.current.by_vid(rec.vid)
        if found is not None and found[1].data_vid != vol.data_vid:
            log.warning("vid %d: not stored: the VDI moved to data vid %d elsewhere (rolled back?) while "
                        "this mount had it open under data vid %d", rec.vid, found[1].data_vid, vol.data_vid)

    # -- VDI operations ----------------------------------------------------------

    async def create(self, name: str, size: int, *, copies: int | None = None, mode: int = 0o644,
                     uid: int = 0, gid: int = 0, shared: bool = False) -> VdiRecord:
        copies = self.check_copies(self.default_copies if copies is None else copies)
        rec = await self.directory.update_name(name, 
            lambda d: d.create(name, size, copies=copies, mode=mode, uid=uid, gid=gid, shared=shared))
        self.register_with_pool(rec)
        log.info("created VDI %r (vid %d, %s)", name, rec.vid, format_size(size))
        return rec

    async def delete(self, name: str, *, with_snapshots: bool = False) -> int:
        await self.refuse_if_leased_elsewhere(name)
        rec = self.current.get(name)
        data_vid = await self.directory.update_name(name, lambda d: d.delete(name, with_snapshots=with_snapshots))
        log.info("deleted VDI %r (vid %d%s); freeing its objects", name, rec.vid,
                 f" and {len(rec.snapshots)} snapshots" if rec.snapshots else "")
        for s in rec.snapshots.values():
            self.forget_snapshot(s.vid)
        self._tombstoned(data_vid)
        self.purger.collect_family(rec.family)
        return rec.vid

    async def rename(self, old: str, new: str, *, replace_target: bool = True) -> None:
        await self.refuse_if_leased_elsewhere(old)
        if new in self.current.vdis:
            await self.refuse_if_leased_elsewhere(new)
        victim = self.current.vdis.get(new)
        replaced = await self.directory.rename(old, new, replace=replace_target)
        log.info("renamed VDI %r to %r", old, new)
        if replaced is not None:
            log.info("rename replaced the old VDI %r (data vid %d); freeing its objects", new, replaced)
            self._tombstoned(replaced)
            if victim is not None:
                self.purger.collect_family(victim.family)

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
        if vol.window:
            await vol.flush()  # a close whose flush failed left writes behind
        if shared and (self.current.get(self.name_of(vid)).snapshots
                       or any(e != vol.data_vid for _, e in vol.map.entries())):
            raise InvalidArgument("a VDI with snapshots, or sharing objects with a snapshot (a clone), "
                                  "cannot be shared: several writers could copy up the same object")
        vol.record.shared = shared
        await self.persist_meta(vol)
        log.info("vid %d is now %s", vid, "shared: any number of writers, no lease" if shared else "exclusive")

    async def set_copies(self, vid: int, copies: int) -> None:
        self.check_copies(copies)
        async with self.using(vid) as vol:
            if vol.map.allocated:
                raise InvalidArgument("copies can only be set on a VDI that holds no data yet")
            vol.record.copies = copies
            self.pool.register_vdi(vid, copies)
            await self.persist_meta(vol)

    def io_by_vdi(self) -> list[tuple[str, int, IoStats]]:
        """(name, vid, requests) of every VDI used through this mount since it
        started and still in the directory, by name (those of deleted VDIs
        are forgotten here)."""
        names = {r.vid: n for n, r in self.current.vdis.items()}
        for vid in [v for v in self._io if v not in names and v not in self._volumes]:
            del self._io[vid]
        return sorted((names[vid], vid, io) for vid, io in self._io.items() if vid in names)

    def xattrs_of(self, vid: int) -> dict[str, bytes]:
        """A VDI's extended attributes as the directory holds them (another
        mount's changes show with the directory's next change here). Asked
        in the FUSE loop: found through the directory's index by vid
        (`Directory.by_vid`), not a scan of 10,000 records."""
        found = self.current.by_vid(vid)
        if found is None:
            raise VdiNotFound(f"no VDI with vid {vid}")
        return found[1].xattrs

    async def set_xattr(self, vid: int, name: str, value: bytes, flags: int = 0) -> None:
        """Set an extended attribute (`model/xattrs.py`): a directory change,
        so it needs no lease: libvirt labels an image on the destination of
        a migration while the source still writes it."""
        await self.directory.update_vid(vid, lambda d: d.set_xattr(vid, name, value, flags))
        log.info("vid %d: extended attribute %s set (%d bytes)", vid, name, len(value))

    async def remove_xattr(self, vid: int, name: str) -> None:
        await self.directory.update_vid(vid, lambda d: d.remove_xattr(vid, name))
        log.info("vid %d: extended attribute %s removed", vid, name)

    def name_of(self, vid: int) -> str:
        found = self.current.by_vid(vid)
        if found is None:
            raise VdiNotFound(f"no VDI with vid {vid}")
        return found[0]

    # -- snapshots (read-only volumes) -------------------------------------------------

    def snapshot_listing(self) -> list[tuple[str, SnapshotRecord]]:
        """("NAME@SNAP", record) of every snapshot, sorted."""
        return sorted((f"{n}@{sn}", s) for n, r in self.current.vdis.items() for sn, s in r.snapshots.items())

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
        register_data_vids(self.pool, self.current, self.current.get(name).family)
        vol = await Volume.load(self.pool, rec, self.persist_meta, reconcile=False)
        vol.read_only = True
        self._snapshots[data_vid] = vol
        while len(self._snapshots) > IDLE_VOLUMES:
            self._snapshots.popitem(last=False)
        return vol

    def forget_snapshot(self, data_vid: int) -> None:
        """Drop a deleted snapshot's loaded volume."""
        self._snapshots.pop(data_vid, None)

    # -- deletes -------------------------------------------------------------------

    def _tombstoned(self, data_vid: int) -> None:
        """A data vid went into `deleting`: free its objects, unless a volume
        here still has it open (then on its last close)."""
        for vid, vol in list(self._volumes.items()):
            if vol.data_vid == data_vid:
                if vol.handles > 0:
                    vol.unlinked = True  # open files keep working; purge on last close
                    return
                del self._volumes[vid]
        self.purger.purge_vid(data_vid)
