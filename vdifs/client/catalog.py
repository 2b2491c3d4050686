"""VDIs by name: the directory, the loaded volumes, and background purges.

Everything the FUSE layer and the control channel do to a VDI goes through
here, so both see one consistent state. Directory changes are durable when
the call returns (the register's CAS is). Deleting a VDI tombstones its vid
in the directory first and frees its objects afterwards in the background;
a vid whose VDI is still open is purged when its last handle closes.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace

import trio

from vdifs.client.pool import ObjectPool
from vdifs.client.volume import Volume
from vdifs.errors import InvalidArgument, VdifsError, VdiNotFound
from vdifs.meta.directory import DirectoryService
from vdifs.meta.lease import Lease, LeaseBusy, LeaseManager
from vdifs.model.directory import Directory, VdiRecord
from vdifs.model.sizes import format_size

log = logging.getLogger(__name__)

#: Closed volumes kept loaded (their maps answer getattr without I/O).
IDLE_VOLUMES = 256
PURGE_PARALLELISM = 16
PURGE_RETRY_SECONDS = 5.0


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
        self._purge_send, self._purge_recv = trio.open_memory_channel[int](math.inf)
        self._purging: set[int] = set()
        self.purges_done = 0
        self.copies_override: int | None = None  # `vdifs mount --copies`

    @property
    def default_copies(self) -> int:
        return self.copies_override or self.pool.default_copies

    # -- life cycle ------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        """Read the directory, resume interrupted deletes, start the purger."""
        d = await self.directory.refresh()
        nursery.start_soon(self._purger)
        live = {r.vid for r in d.vdis.values()}
        for vid in sorted(d.deleting):
            self._schedule_purge(vid)
        if not self.shared:
            for vid in await self.pool.list_vids():
                if vid not in live and vid not in d.deleting:
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
                self.pool.register_vdi(vid, found[1].copies)
                vol = await Volume.load(self.pool, replace(found[1]), self.persist_meta,
                                        reconcile=not self.shared)
                self._evict_idle()  # before inserting: the caller has not pinned it yet
                self._volumes[vid] = vol
        self._load_locks.pop(vid, None)
        return vol

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
                self._schedule_purge(vol.vid)
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
            if found is not None:
                new = replace(rec)
                if rec.shared:  # several writers: a size only grows here
                    new.size = max(new.size, found[1].size)
                d.vdis[found[0]] = new

        await self.directory.update(apply)

    # -- VDI operations ----------------------------------------------------------

    async def create(self, name: str, size: int, *, copies: int | None = None, mode: int = 0o644,
                     uid: int = 0, gid: int = 0, shared: bool = False) -> VdiRecord:
        copies = self.default_copies if copies is None else copies
        if not 1 <= copies <= self.pool.max_copies:
            raise InvalidArgument(f"copies must be between 1 and {self.pool.max_copies} in this pool")
        rec = await self.directory.update(
            lambda d: d.create(name, size, copies=copies, mode=mode, uid=uid, gid=gid, shared=shared))
        self.pool.register_vdi(rec.vid, rec.copies)
        log.info("created VDI %r (vid %d, %s)", name, rec.vid, format_size(size))
        return rec

    async def delete(self, name: str) -> int:
        await self._refuse_if_leased_elsewhere(name)
        vid = await self.directory.update(lambda d: d.delete(name))
        log.info("deleted VDI %r (vid %d); freeing its objects", name, vid)
        self._tombstoned(vid)
        return vid

    async def rename(self, old: str, new: str, *, replace_target: bool = True) -> None:
        await self._refuse_if_leased_elsewhere(old)
        if new in self.current.vdis:
            await self._refuse_if_leased_elsewhere(new)
        replaced = await self.directory.update(lambda d: d.rename(old, new, replace=replace_target))
        log.info("renamed VDI %r to %r", old, new)
        if replaced is not None:
            log.info("rename replaced the old VDI %r (vid %d); freeing its objects", new, replaced)
            self._tombstoned(replaced)

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

    # -- purging -----------------------------------------------------------------

    def _tombstoned(self, vid: int) -> None:
        vol = self._volumes.get(vid)
        if vol is not None and vol.handles > 0:
            vol.unlinked = True  # open files keep working; purge on last close
            return
        self._volumes.pop(vid, None)
        self._schedule_purge(vid)

    def _schedule_purge(self, vid: int) -> None:
        if vid not in self._purging:
            self._purging.add(vid)
            self._purge_send.send_nowait(vid)

    @property
    def pending_purges(self) -> int:
        return len(self._purging)

    async def _purger(self) -> None:
        async for vid in self._purge_recv:
            try:
                await self._purge(vid)
            except Exception as e:
                log.error("freeing the objects of vid %d failed (%s); retrying in %.0f s",
                          vid, e, PURGE_RETRY_SECONDS)
                await trio.sleep(PURGE_RETRY_SECONDS)
                self._purge_send.send_nowait(vid)
                continue
            self._purging.discard(vid)
            self.purges_done += 1

    async def _purge(self, vid: int) -> None:
        oids = await self.pool.list_objects(vid)
        limiter = trio.CapacityLimiter(PURGE_PARALLELISM)

        async def drop(oid: int) -> None:
            async with limiter:
                await self.pool.delete(oid)

        async with trio.open_nursery() as nursery:
            for oid in oids:
                nursery.start_soon(drop, oid)
        await self.pool.finish_vid(vid)
        await self.pool.sync([])  # the unlinks are durable before the tombstone goes
        await self.directory.update(lambda d: d.finish_delete(vid))
        log.info("freed %d objects of deleted vid %d", len(oids), vid)
