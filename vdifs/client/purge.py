"""Freeing objects nobody needs any more, in the background.

Two kinds of job, each queued at most once:

- ("vid", data vid): a deleted VDI's (or a released reservation's) data
  vid; every object of it goes, then its tombstone in the directory.
- ("family", family vid): deleted snapshots of a family (`retired` data
  vids); what no live map of the family points at goes, and a retired vid
  with nothing left is forgotten.

Deleting is idempotent, so a job interrupted by a crash is simply run again
by the next mount (`resume` finds the tombstones and retired vids in the
directory). A failed job is retried after a pause: the purger never gives up.
"""

from __future__ import annotations

import functools
import logging
import math
import time

import trio

from vdifs.client.pool import ObjectPool, register_data_vids
from vdifs.client.volume import load_map
from vdifs.meta.directory_service import DirectoryService
from vdifs.model.directory import Directory
from vdifs.model.ids import ObjectKind, unpack_oid

log = logging.getLogger(__name__)

PURGE_PARALLELISM = 16
PURGE_RETRY_SECONDS = 5.0
#: A reservation older than this in a shared pool was left by a crashed mount.
RESERVATION_TTL = 3600.0

Job = tuple[str, int]


class Purger:
    def __init__(self, pool: ObjectPool, directory: DirectoryService) -> None:
        self.pool = pool
        self.directory = directory
        self._send, self._receive = trio.open_memory_channel[Job](math.inf)
        self._queued: set[Job] = set()

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        return len(self._queued)

    def purge_vid(self, data_vid: int) -> None:
        """Free every object of a data vid nothing may use any more."""
        self._queue(("vid", data_vid))

    def collect_family(self, family: int) -> None:
        """Free what no live map of the family points at, if it has deleted snapshots."""
        if self.directory.current.retired_of(family):
            self._queue(("family", family))

    def _queue(self, job: Job) -> None:
        if job not in self._queued:
            self._queued.add(job)
            self._send.send_nowait(job)

    async def resume(self, *, shared: bool) -> None:
        """At mount start: release the reservations an interrupted snapshot,
        clone or rollback left (in a shared pool only those older than
        RESERVATION_TTL: another mount may be using a young one); a released
        vid is tombstoned, so queue every tombstone and every family with
        deleted snapshots. Alone on the pool (not `shared`), also free vids
        that have objects but no record at all."""
        d = self.directory.current
        stale = [v for v, r in d.reserved.items()
                 if not shared or time.time() - float(r.get("at", 0)) > RESERVATION_TTL]
        if stale:
            log.warning("releasing %d reservation(s) left by an interrupted snapshot, clone or rollback", len(stale))

            for v in stale:
                await self.directory.update_entry(v, functools.partial(Directory.release, vid=v))
            d = self.directory.current
        for vid in sorted(d.deleting):
            self.purge_vid(vid)
        for family in sorted({f for f, _ in d.retired.values()}):
            self.collect_family(family)
        if not shared:
            in_use = d.vids_in_use()
            for vid in await self.pool.list_vids():
                if vid not in in_use:
                    log.warning("vid %d has objects but no VDI record: freeing them", vid)
                    self.purge_vid(vid)

    async def run(self) -> None:
        """The purger task: one job at a time, each retried until it succeeds."""
        async for job in self._receive:
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
                self._send.send_nowait(job)
                continue
            self._queued.discard(job)

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
        await self.directory.update_entry(vid, functools.partial(Directory.finish_delete, vid=vid))
        log.info("freed %d objects of deleted vid %d", len(oids), vid)

    async def _collect(self, family: int) -> None:
        """Free the objects of a family's retired data vids that no live map
        points at any more; a retired vid with nothing left is forgotten.

        Safe against concurrent writers: maps gain references to a retired
        vid only by copying a live map that had them (snapshot, clone,
        rollback), and the stored maps read here never lag behind in that
        direction (copies are stored before the directory names them; a
        copy-up drops a reference in memory before in the pool)."""
        d = await self.directory.refresh(consistent=True)  # a clone's record may be moving between parts
        retired = d.retired_of(family)
        if not retired:
            return
        register_data_vids(self.pool, d, family)
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
                await self.directory.update_entry(vid, functools.partial(Directory.finish_retired, vid=vid))
                log.info("retired data vid %d: nothing points at it any more; forgotten", vid)
        log.info("family %d: freed %d objects no map points at", family, freed)
