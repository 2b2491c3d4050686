"""The cluster's pool with the mount's local object cache in front of it.

Which objects are cached (data objects only, never maps):

- objects of snapshots and retired snapshots (a clone's parents): they
  never change, so a cached copy is valid as long as the vid is in the
  directory, and it is kept across restarts;
- objects of an unshared VDI whose lease this mount holds: only this mount
  writes them, so the copy is kept up to date by this mount's own writes
  of any size (write-through, after every replica acknowledged), and an
  object this mount creates with a small write is cached as it is created
  (write-allocate; a stream's creates are not: see WRITE_ALLOCATE_MAX).
  The copy belongs to
  the lease generation it was made under and is served only while that
  same generation is held: a lease lost, released or taken over by another
  mount and back (A -> B -> A) means a new generation, and the copy is
  dropped, never served. One exception keeps a VM's disk warm across its
  own close and reopen: a lease released at generation g and taken again
  by this mount at g + 1 was held by nobody in between (every acquisition
  adds one, by compare-and-swap on the lease register), so the copies of
  g are taken over by g + 1. While the lease is released they are kept
  but not served.

A read of a cached object is served from the cache (verified by its block
checksums; a bad one is dropped and read from the peers). A read of a
snapshot's object that is not cached starts a fill (and READ_AHEAD more)
and is served from it; a small read of a writable VDI's object goes to the
peers and starts a fill in the background (at most MAX_FILLS at once), if
space can be reserved, and so does a large one (a stream) that reads bytes
of the object a stream read before: a disk read through once (a backup, a
copy) brings nothing in, one read again (a scan a guest repeats) does. A
fill that a write overtakes throws away what it fetched. A write that
fails, or that overlapped another write to the same bytes in flight (the
replicas may then hold either, and the copy either), drops the cached
copy: replicas and cache can never disagree about what a read returns.

Concurrency: everything runs on the trio thread; `read_now` and the
checks before an await are atomic for the other tasks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from vdifs.client.cache import FILL_PIECE, ObjectCache, cacheable_kind
from vdifs.client.pool import ObjectPool, PoolSpace, Write
from vdifs.model.cache_index import CacheEntry
from vdifs.errors import ObjectNotFound, leaf_errors
from vdifs.model.cluster import ClusterMap
from vdifs.model.ids import MAX_INDEX, vid_of
from vdifs.model.iostats import OpStats

log = logging.getLogger("vdifs.cache")

MAX_FILLS = 4  # fills running at once
READ_AHEAD = 2  # objects fetched ahead of a read that waits for a snapshot's object
#: A read miss this large of a writable VDI's object starts no fill unless
#: it reads again what an earlier one read: a stream read once would fetch
#: each object a second time for nothing.
STREAM_READ = 128 << 10
STREAM_SLOT = 128 << 10  # the grain in which the bytes streams read are remembered
STREAMS_REMEMBERED = 4096  # objects whose streamed bytes are remembered (the least recent forgotten)
#: Creates up to this size are cached as they are made (a guest's first small
#: write into an object, which it reads back); larger ones (a disk being
#: filled, an image copied in) are not: a fourth page-cache copy of a
#: stream made sequential writes 0.71x GlusterFS here (docs/benchmarks.md).
WRITE_ALLOCATE_MAX = 64 << 10
SWEEP_INTERVAL = 2.0  # seconds between looks for cached objects that lost their right to be kept

#: (object size, immutable) of a data vid the cache may keep, or None (`Catalog.cache_facts`).
Facts = Callable[[int], "tuple[int, bool] | None"]
#: The lease generation this mount holds on a VDI's lease vid, or None.
Generation = Callable[[int], "int | None"]


class CachingPool:
    def __init__(self, pool: ObjectPool, cache: ObjectCache) -> None:
        self.pool = pool
        self.cache = cache
        self._facts: Facts = lambda vid: None
        self._generation: Generation = lambda vid: None
        self._lease_of: dict[int, int] = {}  # data vid -> the VDI vid whose lease guards it
        self._held: dict[int, int] = {}  # lease vid -> the generation the catalog last set
        self._released: dict[int, int] = {}  # lease vid -> the generation it was released at
        self._writing: dict[int, list[list[int]]] = {}  # oid -> [start, end, overlapped] of writes in flight
        self._filling: dict[int, trio.Event] = {}  # oid -> set when its fill ends (len: fills running)
        self._streamed: dict[int, int] = {}  # oid -> bit mask of the STREAM_SLOTs large reads took, oldest first
        self._nursery: trio.Nursery | None = None
        # What the cache has nothing to do with goes straight through.
        self.sync = pool.sync
        self.list_vids = pool.list_vids
        self.list_objects = pool.list_objects
        self.finish_vid = pool.finish_vid
        self.fence = pool.fence

    def attach(self, facts: Facts, generation: Generation) -> None:
        """What may be cached, and which leases this mount holds (the catalog's)."""
        self._facts = facts
        self._generation = generation

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fills, evictions and the sweep of objects no longer cacheable."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.cache.run)
            task_status.started()
            while True:
                await trio.sleep(SWEEP_INTERVAL)
                self.cache.drop_where(lambda oid, e: not self._valid(oid, e, serving=False))

    # -- the ObjectPool interface ------------------------------------------------------------

    @property
    def max_copies(self) -> int:
        return self.pool.max_copies

    @property
    def default_copies(self) -> int:
        return self.pool.default_copies

    def register_vdi(self, vid: int, copies: int, lease_vid: int | None = None) -> None:
        self.pool.register_vdi(vid, copies, lease_vid)
        if lease_vid is not None:
            self._lease_of[vid] = lease_vid

    def set_generation(self, vid: int, generation: int | None) -> None:
        self.pool.set_generation(vid, generation)
        before = self._held.pop(vid, None)
        if generation is None:
            if before is not None:
                self._released[vid] = before
            return
        self._held[vid] = generation
        if self._released.pop(vid, None) == generation - 1:  # nobody held it in between
            for oid, e in self.cache.index.entries.items():
                d = vid_of(oid)
                if e.mutable and e.generation == generation - 1 and self._lease_of.get(d, d) == vid:
                    e.generation = generation

    def _valid(self, oid: int, e: CacheEntry, *, serving: bool = True) -> bool:
        """Whether a cached object may be served (`serving`), or kept for a
        lease this mount may take again without anyone in between."""
        vid = vid_of(oid)
        facts = self._facts(vid)
        if facts is None:
            return False
        lease_vid = self._lease_of.get(vid, vid)
        held = self._generation(lease_vid)
        if facts[1] and e.mutable:
            # The VDI's objects became a snapshot's. Copies kept up to date
            # under the lease we still hold are the snapshot's bytes (a cut
            # lets every running write finish first): they stay, as immutable
            # ones (not durable, so still thrown away at the next start).
            if held is None or held != e.generation:
                return False
            e.mutable, e.generation = False, None
            return True
        if not e.mutable:
            return facts[1]
        if held is not None or serving:
            return held == e.generation
        return self._released.get(lease_vid) == e.generation and lease_vid not in self._held

    def _serves(self, oid: int) -> bool:
        e = self.cache.index.get(oid)
        if e is None or not self.cache.ready(oid):
            return False
        if self._valid(oid, e):
            return True
        if not self._valid(oid, e, serving=False):
            self.cache.drop_soon(oid)
        return False

    def read_now(self, oid: int, offset: int, length: int) -> bytes | bytearray | None:
        if self._serves(oid):
            return self.cache.read_now(oid, offset, length)
        return None

    async def read(self, oid: int, offset: int, length: int) -> bytes | bytearray:
        if not self._serves(oid):
            filled = self._filling.get(oid)
            if filled is None:
                terms = self._terms(oid)
                if terms is not None and (length < STREAM_READ or terms[1] or self._read_again(oid, offset, length)):
                    filled = self._start_fill(oid, terms)
            if filled is not None and self._immutable(oid):
                # A snapshot's object comes in whole once and this read is served
                # from it (twenty clones booting fetch it once, not twenty times).
                # A writable VDI's is not waited for: its fills are overtaken by
                # writes, and a write-heavy guest would wait for nothing. The
                # next objects come in meanwhile: a booting guest reads on.
                for ahead in range(1, min(READ_AHEAD, MAX_INDEX - (oid & MAX_INDEX)) + 1):
                    if oid + ahead not in self._filling and self.cache.index.get(oid + ahead) is None:
                        self._start_fill(oid + ahead, self._terms(oid + ahead), miss=False)
                await filled.wait()
        if self._serves(oid):
            data = await self.cache.read(oid, offset, length)
            if data is not None:
                return data
        return await self.pool.read(oid, offset, length)

    def write_now(self, oid: int, offset: int, data: bytes | bytearray | memoryview) -> bool:
        return False  # every write waits for the replicas

    async def write(self, oid: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        mine = self._begin_write(oid, offset, len(data))
        try:
            await self.pool.write(oid, offset, data)
        except BaseException:
            await self._replicas_failed([(oid, mine)])
            raise
        await self._copy_follows(oid, offset, data, mine, True)

    async def write_many(self, writes: list[Write]) -> list[Exception | None]:
        """`write` for each, the replicas' part for all of them at once."""
        mine = [self._begin_write(oid, offset, len(data)) for oid, offset, data in writes]
        try:
            results = await self.pool.write_many(writes)
        except BaseException:
            await self._replicas_failed([(oid, m) for (oid, _, _), m in zip(writes, mine)])
            raise
        with trio.CancelScope(shield=True):  # (each ends its write: none may be left in flight)
            for (oid, offset, data), m, error in zip(writes, mine, results):
                await self._copy_follows(oid, offset, data, m, error is None)
        return results

    async def _replicas_failed(self, writes: list[tuple[int, list[int]]]) -> None:
        """Writes the replicas may have taken in part: over, their copies dropped."""
        for oid, mine in writes:
            self._end_write(oid, mine)
        with trio.CancelScope(shield=True):
            for oid in {oid for oid, _ in writes}:
                await self.cache.drop(oid)  # some replicas may have it, others not

    async def _copy_follows(self, oid: int, offset: int, data: bytes | bytearray | memoryview,
                            mine: list[int], written: bool) -> None:
        """The copy's part of a write the replicas answered (`written`: they
        took it). The write stays in flight until the copy has it too: a
        write to the same bytes that starts meanwhile drops the copy,
        whichever of the two reaches it last; so does a failed one."""
        kept = False
        try:
            if written and not mine[2] and self._serves(oid):
                kept = await self.cache.write_through(oid, offset, data)
        finally:
            if self._end_write(oid, mine) or not kept:
                with trio.CancelScope(shield=True):
                    await self.cache.drop(oid)

    async def create(self, oid: int, offset: int, data: bytes | bytearray | memoryview, size: int,
                     exclusive: bool = False) -> None:
        mine = self._begin_write(oid, 0, size)
        try:
            await self.pool.create(oid, offset, data, size, exclusive)
        except BaseException:
            self._end_write(oid, mine)
            with trio.CancelScope(shield=True):
                await self.cache.drop(oid)
            raise
        overlapped = self._end_write(oid, mine)
        if overlapped or self.cache.index.get(oid) is not None:
            await self.cache.drop(oid)  # replaced whole (a fill under way is overtaken)
            return
        # Write-allocate: a VDI this mount writes is read back by the same VM,
        # so the new object goes into the cache too, as the replicas have it.
        # No await since the replicas answered: no write of ours came between.
        terms = self._terms(oid) if len(data) <= WRITE_ALLOCATE_MAX else None
        if terms is not None and not terms[1]:
            version = self.cache.begin_fill(oid, size, True, terms[2])
            if version is not None:
                await self.cache.finish_create(oid, version, offset, data, size)

    async def delete(self, oid: int) -> None:
        self.cache.changing(oid)
        try:
            await self.pool.delete(oid)
        finally:
            with trio.CancelScope(shield=True):
                await self.cache.drop(oid)

    async def space(self) -> PoolSpace:
        return await self.pool.space()

    def io_stats(self) -> dict[str, int]:
        return self.pool.io_stats()

    def cache_status(self) -> dict[str, Any]:
        return self.cache.status()

    def cluster_map(self) -> ClusterMap | None:
        return self.pool.cluster_map()

    def round_trips(self) -> dict[str, OpStats]:
        return self.pool.round_trips()

    async def aclose(self) -> None:
        try:
            with trio.CancelScope(shield=True):
                await self.cache.persist()  # fills of this run outlive it
            await self.pool.aclose()
        finally:
            self.cache.close()

    # -- writes in flight --------------------------------------------------------------------

    def _begin_write(self, oid: int, start: int, length: int) -> list[int]:
        """Note a write in flight (a fill under way is overtaken by it); the
        token to give `_end_write`."""
        self.cache.changing(oid)
        mine = [start, start + length, 0]
        others = self._writing.setdefault(oid, [])
        for w in others:
            if w[0] < mine[1] and mine[0] < w[1]:
                w[2] = mine[2] = 1
        others.append(mine)
        return mine

    def _end_write(self, oid: int, mine: list[int]) -> bool:
        """The write is over; True if another write to the same bytes was in flight with it."""
        others = self._writing[oid]
        others.remove(mine)
        if not others:
            del self._writing[oid]
        return bool(mine[2])

    # -- fills ----------------------------------------------------------------------------------

    def _terms(self, oid: int) -> tuple[int, bool, int | None] | None:
        """(object size, immutable, lease generation) under which `oid` may be
        cached now, or None (not a data object, not cacheable, or a writable
        VDI's whose lease this mount does not hold)."""
        if not cacheable_kind(oid):
            return None
        vid = vid_of(oid)
        facts = self._facts(vid)
        if facts is None:
            return None
        size, immutable = facts
        if immutable:
            return size, True, None
        generation = self._generation(self._lease_of.get(vid, vid))
        return None if generation is None else (size, False, generation)

    def _read_again(self, oid: int, offset: int, length: int) -> bool:
        """Whether this large read takes bytes of `oid` that an earlier one
        took (remembered for the STREAMS_REMEMBERED objects read last)."""
        first, last = offset // STREAM_SLOT, (offset + length - 1) // STREAM_SLOT
        slots = ((1 << (last - first + 1)) - 1) << first
        seen = self._streamed.pop(oid, 0)
        self._streamed[oid] = seen | slots  # now the most recent
        if len(self._streamed) > STREAMS_REMEMBERED:
            del self._streamed[next(iter(self._streamed))]
        return bool(seen & slots)

    def _immutable(self, oid: int) -> bool:
        facts = self._facts(vid_of(oid))
        return facts is not None and facts[1]

    def _start_fill(self, oid: int, terms: tuple[int, bool, int | None] | None, *,
                    miss: bool = True) -> trio.Event | None:
        """Start bringing in a cacheable object under its `terms` (`_terms`,
        taken with no await since); the event its fill sets when it ends
        (whether or not it is READY then), or None if no fill started (not
        cacheable, too many fills, no room: the read goes to the peers)."""
        if terms is None or self._nursery is None:
            return None
        size, immutable, generation = terms
        self.cache.index.stats.misses += miss
        if len(self._filling) >= MAX_FILLS or self.cache.index.get(oid) is not None:
            return None
        version = self.cache.begin_fill(oid, size, not immutable, generation)
        if version is None:
            return None
        done = self._filling[oid] = trio.Event()
        self._nursery.start_soon(self._fill, oid, size, version, done)
        return done

    async def _fill(self, oid: int, size: int, version: int, done: trio.Event) -> None:
        buf = bytearray(size)

        async def piece(offset: int) -> None:
            data = await self.pool.read(oid, offset, min(FILL_PIECE, size - offset))
            buf[offset:offset + len(data)] = data

        try:
            async with trio.open_nursery() as nursery:  # the pieces at once
                for offset in range(0, size, FILL_PIECE):
                    nursery.start_soon(piece, offset)
        except BaseException as e:  # its readers go to the peers
            if isinstance(e, Exception) and not _only_not_found(e):  # a read-ahead past the last object finds none
                log.info("cache: could not fetch object %016x (%s)", oid, e)
            with trio.CancelScope(shield=True):  # cancelled too: its reservation goes back
                await self.cache.abandon_fill(oid)
            if not isinstance(e, Exception):
                raise
            return
        else:
            if await self.cache.finish_fill(oid, version, buf):
                log.debug("cache: object %016x cached", oid)
        finally:
            del self._filling[oid]
            done.set()


def _only_not_found(e: BaseException) -> bool:
    return all(isinstance(x, ObjectNotFound) for x in leaf_errors(e))
