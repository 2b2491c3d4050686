"""Snapshots, clones, rollbacks and flattening: the operations that copy maps.

Each copies a map to a freshly reserved data vid first and names it in the
directory second (see `model.directory`): a crash between leaves a
reservation, which the next mount releases and purges (`Purger.resume`).
Objects a deleted snapshot leaves behind are freed by a family collection
(`Purger.collect_family`): load every live map of the family, free what
none of them points at.
"""

from __future__ import annotations

import errno
import logging
import secrets
from dataclasses import replace

import trio

from vdifs.client.catalog import Catalog
from vdifs.client.volume import Volume
from vdifs.errors import InvalidArgument, VdifsError, VdiNotFound
from vdifs.model.directory import Directory, SnapshotRecord, VdiRecord
from vdifs.model.names import validate_name
from vdifs.model.sizes import format_size

log = logging.getLogger(__name__)

#: Default pace of `flatten` (bytes/s), so a VM on the clone keeps its I/O.
FLATTEN_RATE = 64 << 20


def _name_in(d: Directory, vid: int) -> str:
    """The name of a VDI inside a directory update (it may have been renamed meanwhile)."""
    found = d.by_vid(vid)
    if found is None:
        raise VdiNotFound(f"the VDI with vid {vid} was deleted meanwhile")
    return found[0]


class Snapshots:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.jobs: dict[str, dict[str, object]] = {}  # long operations in progress, by VDI name

    async def _reserve_and_copy(self, purpose: str, owner: int, source: Volume, copies: int,
                                lease_vid: int | None = None) -> int:
        """A fresh data vid whose map is a durable copy of `source`'s map, its
        objects kept in `copies` copies (the pool must know before the first
        create, or it would put the map on every peer). The reservation is
        kept beside VDI `owner`, whose map (or snapshot's) `source` is: a
        delete of that snapshot sees it there and waits."""
        new = await self.catalog.directory.update_vid(owner, lambda d: d.reserve(purpose, source.data_vid))
        self.catalog.pool.register_vdi(new, copies, lease_vid=lease_vid)
        try:
            await source.copy_map_to(new)
        except BaseException:
            await self._release(new)
            raise
        return new

    async def _release(self, vid: int) -> None:
        with trio.CancelScope(shield=True):
            try:
                # Purged only if released here: a clone whose commit another
                # mount (or this one, finishing the intent) completed uses it.
                if await self.catalog.directory.update_entry(vid, lambda d: d.release(vid)):
                    self.catalog.purger.purge_vid(vid)
            except VdifsError as e:
                log.warning("could not release reserved vid %d (%s); the next mount start does", vid, e)

    async def snapshot(self, name: str, snap: str, snapshot_id: str | None = None) -> SnapshotRecord:
        """Cut a crash-consistent snapshot: with the VDI's lease (shared with a
        VM writing through this mount), hold its writes back, flush, copy the
        map to a new data vid and switch to it in one directory update."""
        validate_name(snap)
        ident = snapshot_id or secrets.token_hex(8)
        rec = self.catalog.current.get(name)
        if rec.shared:
            raise InvalidArgument(f"VDI {name!r} is shared (several writers, no lease): it cannot be snapshotted")
        if snap in rec.snapshots:
            raise VdifsError(f"VDI {name!r} already has a snapshot {snap!r}", code=errno.EEXIST)
        async with self.catalog.using(rec.vid) as vol:
            async with vol.quiesced():
                await vol.flush()
                new = await self._reserve_and_copy(f"snapshot {name}@{snap}", rec.vid, vol, vol.record.copies,
                                                   lease_vid=rec.vid)
                try:
                    def cut(d: Directory) -> tuple[SnapshotRecord, VdiRecord]:
                        now_name = _name_in(d, rec.vid)
                        s = d.snapshot(now_name, snap, new, vol.size, snapshot_id=ident)
                        return s, d.get(now_name)
                    s, after = await self.catalog.directory.update_vid(rec.vid, cut)
                except BaseException:
                    await self._release(new)
                    raise
                vol.switch_data_vid(replace(after, mtime=vol.record.mtime, atime=vol.record.atime))
                self.catalog.register_with_pool(after)
        log.info("snapshot %s@%s: data vid %d frozen (%s); the VDI goes on under data vid %d",
                 name, snap, s.vid, format_size(s.size), new)
        return s

    async def clone(self, name: str, snap: str, new_name: str, *, copies: int | None = None) -> VdiRecord:
        """A new VDI that starts as NAME@SNAP and shares its objects until written."""
        validate_name(new_name)
        owner = self.catalog.current.get(name).vid
        s = self.catalog.current.snapshot_of(name, snap)
        if copies is not None:
            self.catalog.check_copies(copies)
        if new_name in self.catalog.current.vdis:
            raise VdifsError(f"a VDI named {new_name!r} already exists", code=errno.EEXIST)
        src = await self.catalog.snapshot_volume(s.vid)
        new = await self._reserve_and_copy(f"clone {new_name} of {name}@{snap}", owner, src,
                                           s.copies if copies is None else copies)
        try:
            rec = await self.catalog.directory.clone(name, snap, new_name, new, copies=copies)
        except BaseException:
            await self._release(new)
            raise
        self.catalog.register_with_pool(rec)
        log.info("cloned %s@%s as VDI %r (vid %d, %d objects shared)", name, snap, new_name, rec.vid,
                 src.map.allocated)
        return rec

    async def rollback(self, name: str, snap: str) -> VdiRecord:
        """Make the VDI the snapshot's content again (refused while anyone writes it)."""
        await self.catalog.refuse_if_leased_elsewhere(name)
        rec = self.catalog.current.get(name)
        s = self.catalog.current.snapshot_of(name, snap)
        async with self.catalog.using(rec.vid) as vol:
            if vol.writers > 1:
                raise VdifsError(f"VDI {name!r} is open for writing: stop its VM before a rollback",
                                 code=errno.EBUSY)
            await vol.flush()
            src = await self.catalog.snapshot_volume(s.vid)
            new = await self._reserve_and_copy(f"rollback {name}@{snap}", rec.vid, src, vol.record.copies,
                                               lease_vid=rec.vid)
            try:
                old = await self.catalog.directory.update_vid(
                    rec.vid, lambda d: d.rollback(_name_in(d, rec.vid), snap, new))
            except BaseException:
                await self._release(new)
                raise
            after = self.catalog.current.get(self.catalog.name_of(rec.vid))
            await vol.reload(replace(after))
            self.catalog.register_with_pool(after)
        self.catalog.purger.purge_vid(old)
        self.catalog.purger.collect_family(after.family)
        log.info("rolled VDI %r back to snapshot %r (%s); freeing its data vid %d", name, snap,
                 format_size(s.size), old)
        return after

    async def flatten(self, name: str, *, rate: int = FLATTEN_RATE) -> int:
        """Copy every object the VDI shares with a parent snapshot into its own
        data vid, at most `rate` bytes/s, while it stays in use; returns the
        objects copied. Objects shared with its own snapshots stay shared."""
        if rate <= 0:
            raise InvalidArgument("the flatten rate must be positive")
        rec = self.catalog.current.get(name)
        own = {s.vid for s in rec.snapshots.values()}
        async with self.catalog.using(rec.vid) as vol:
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
                snapvol = await self.catalog.snapshot_volume(s.vid)
                still |= any(e not in own for _, e in snapvol.map.entries())
            if not still and rec.parent_vid:
                def detach(d: Directory) -> None:
                    d.get(_name_in(d, rec.vid)).parent_vid = 0
                await self.catalog.directory.update_vid(rec.vid, detach)
                vol.record.parent_vid = 0
        self.catalog.purger.collect_family(rec.family)
        log.info("flattened VDI %r: %d objects copied%s", name, copied,
                 "" if not still else "; its snapshots still share objects with the parent")
        return copied

    async def delete_snapshot(self, name: str, snap: str) -> int:
        data_vid = await self.catalog.directory.update_name(name, lambda d: d.delete_snapshot(name, snap))
        self.catalog.forget_snapshot(data_vid)
        family = self.catalog.current.get(name).family
        log.info("deleted snapshot %s@%s (data vid %d); freeing what no other map shares", name, snap, data_vid)
        self.catalog.purger.collect_family(family)
        return data_vid

