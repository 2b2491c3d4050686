"""I/O on one VDI: its object map and the read/write/trim/flush paths.

Concurrency invariants (trio; a task can only be interrupted at an await):

- `_index_lock(i)` guards every state change of map entry i (allocation,
  freeing). A plain overwrite of an allocated object takes no lock: if the
  object vanished meanwhile (a concurrent free), the pool answers
  ObjectNotFound because `write` never creates, and the write retries
  through the locked path. So no write can ever resurrect a freed object.
- `_map_lock` serialises writing map pages to the pool. The page bytes are
  taken inside the lock, so the last write of a page to land is also the
  newest: the pool's copy never goes backwards.
- `_flush_lock` serialises flushes; writes go on during a flush, and what
  they dirty is left for the next one. Every change (write, trim,
  truncate, flatten copy) is counted in `_changes_done` when it ends,
  after what it changed is in the pool (dirty) or in the window. A sync
  reads that count when it begins, under the lock, then drains the window
  and takes the dirty sets: it covers every change counted by then. A
  flush needs the changes counted when it was called (every write
  acknowledged before it), so it returns at once when a sync that covers
  them has succeeded: flushes that arrive together, or with no write in
  between, share one sync (group commit).

Durability order on flush: data objects are synced, then dirty map pages
are written and synced, then the directory record (size, mtime) is
updated. A crash at any point leaves either the old or the new state of
every acknowledged-and-flushed write; `reconcile()` at load time cleans
what an interrupted allocation or free left behind. The whole write path,
its tasks and what a crash at each step leaves: docs/developer-notes/volume.md.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TypeVar

import trio

from vdifs.client.pool import ObjectPool
from vdifs.errors import InvalidArgument, NoSpace, ObjectExists, ObjectNotFound, PoolError, TooLarge, VdifsError
from vdifs.model.directory import VdiRecord, check_size
from vdifs.model.extents import Extent, objects_for_size, split_extents
from vdifs.model.ids import MAX_VDI_SIZE, ObjectKind, data_oid, map_oid, unpack_oid
from vdifs.model.iostats import IoStats
from vdifs.model.objmap import (
    CHUNK_ENTRIES, NON_EXISTENT, PAGE_BYTES, PENDING_DELETE, ObjectMap,
    is_allocated, map_chunks, page_location,
)
from vdifs.model.window import WriteWindow, lay_over
from vdifs.model.zeros import is_zero, zeros

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Concurrent object frees and discards (a shrink, a TRIM of a large range).
FREE_PARALLELISM = 16
ZERO_SEED = 4096  # bytes of zeros a zero object is created with (a create carries some data)

PersistMeta = Callable[["Volume"], Awaitable[None]]
#: Starts a background task (a nursery's `start_soon`): the write-behind drainer.
Spawn = Callable[[Callable[[], Awaitable[None]]], None]


async def load_map(pool: ObjectPool, data_vid: int, size: int, object_size: int) -> ObjectMap:
    """The stored object map of a data vid covering `size` bytes.

    Every map object the size covers is read rather than listed: a listing
    skips unreachable peers, and a map object missed that way would make
    allocated objects look like holes (a later write would replace them). A
    read says "not found" only when every replica did."""
    objmap = ObjectMap()
    for chunk, want in map_chunks(size, object_size):
        try:
            raw = await pool.read(map_oid(data_vid, chunk), 0, want)
        except ObjectNotFound:
            continue  # nothing allocated in this part of the VDI yet
        objmap.load_chunk(chunk, raw)
    return objmap


class Volume:
    def __init__(self, pool: ObjectPool, record: VdiRecord, persist_meta: PersistMeta) -> None:
        self.pool = pool
        self.vid = record.vid  # the VDI's identity (lease, inode)
        self.data_vid = record.data_vid  # where its own objects and map live
        self.record = record  # our copy; size/mtime here may be ahead of the directory
        self.object_size = record.object_size
        self.map = ObjectMap()
        self._persist_meta = persist_meta
        self._locks: dict[int, trio.Lock] = {}
        self._map_lock = trio.Lock()
        self._flush_lock = trio.Lock()
        self._changes_done = 0  # changes ended so far (`_change_done`, `write_now`)
        self._synced_changes = -1  # the `_changes_done` the last successful flush sync covers
        self.syncs = 0  # flushes that synced (the others were covered by one of these)
        self._dirty_data: set[int] = set()
        self._inflight: dict[int, int] = {}  # unlocked overwrites in flight, per index
        self._zero_checks: dict[int, bool] = {}  # index -> written during its zero check
        self._zero_check_after: set[int] = set()  # indexes to zero-check when their writes in flight end
        self._unsynced_chunks: set[int] = set()
        self.size_dirty = False  # size not yet in the directory: persisted by every flush
        self.times_dirty = False  # only times changed: persisted on close and unmount
        self.handles = 0
        self.writers = 0  # writable handles (a lease is held while > 0, in clusters)
        self.unlinked = False
        self.fenced: str | None = None  # why writes are refused (lease lost)
        self.read_only = False  # a snapshot
        self.copied_up = 0  # objects copied up from an ancestor (snapshot or clone parent)
        self._changes = 0  # writes and truncates running
        self._cutting: trio.Event | None = None  # set when a snapshot cut lets changes go on
        self._quiet: trio.Event | None = None  # set when the last running change ends
        # Write-behind (off until `enable_write_behind`): see "Write-behind" in the developer notes.
        self.window = WriteWindow(self.object_size)
        self.window_limit = 0
        self._spawn: Spawn | None = None
        self._draining = False  # the drainer task runs
        self._rounds_started = 0
        self._rounds_done = 0
        self._drain_failures = 0  # objects a round could not write (ever; flushes compare)
        self._drain_error: BaseException | None = None  # stops the drainer until the next flush
        self._window_moved: trio.Event | None = None  # set when a round ends or the window is dropped
        self.behind_writes = 0  # writes acknowledged from the window
        self.io = IoStats()  # what its clients asked, for `status` and the metrics
        #: FUSE read it since the kernel's pages of it were last dropped: a change
        #: made past the kernel (the NBD export's) must drop them (design change 62).
        self.kernel_pages = False

    # -- loading -----------------------------------------------------------

    @classmethod
    async def load(cls, pool: ObjectPool, record: VdiRecord, persist_meta: PersistMeta,
                   *, reconcile: bool = True) -> Volume:
        vol = cls(pool, record, persist_meta)
        vol.map = await load_map(pool, record.data_vid, record.size, vol.object_size)
        if reconcile:
            await vol.reconcile()
        return vol

    async def reload(self, record: VdiRecord) -> None:
        """Start over from the stored map of the record's data vid (after a
        rollback replaced it); call with nothing in flight and nothing dirty."""
        self.map = await load_map(self.pool, record.data_vid, record.size, self.object_size)
        self.switch_data_vid(record)

    async def reconcile(self) -> None:
        """Make the map and the pool agree after a crash.

        Finishes interrupted frees (PENDING_DELETE), frees objects beyond the
        size (a shrink or an unflushed extension that did not survive),
        deletes objects the map does not reference (an allocation whose map
        entry was lost), and forgets map entries whose object is gone.
        """
        entries = objects_for_size(self.record.size, self.object_size)
        present = {unpack_oid(o)[2] for o in await self.pool.list_objects(self.data_vid, ObjectKind.DATA)}
        fixed = 0
        for index, entry in list(self.map.entries()):
            if entry == PENDING_DELETE or index >= entries:
                if entry == PENDING_DELETE or index in present:
                    await self.pool.delete(data_oid(self.data_vid, index))  # never an ancestor's
                self.map.set(index, NON_EXISTENT)
                fixed += 1
            elif entry == self.data_vid and index not in present:
                log.warning("vid %d: object %d is in the map but not in the pool; it reads as zeros now",
                            self.vid, index)
                self.map.set(index, NON_EXISTENT)
                fixed += 1
            if entry == self.data_vid or entry == PENDING_DELETE or index >= entries:
                present.discard(index)
        # Left: our own objects the map does not point at (an allocation or a
        # copy-up whose map entry was lost).
        for index in sorted(present):
            await self.pool.delete(data_oid(self.data_vid, index))
            fixed += 1
        if fixed:
            log.info("vid %d: reconciled %d objects after an unclean stop", self.vid, fixed)
            await self._write_dirty_map()
            await self._sync_map()
        self.map.drop_empty_pages()

    # -- helpers -------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.record.size

    @property
    def allocated_bytes(self) -> int:
        return self.map.allocated * self.object_size

    def _index_lock(self, index: int) -> trio.Lock:
        lock = self._locks.get(index)
        if lock is None:
            lock = self._locks[index] = trio.Lock()
        return lock

    def _drop_index_lock(self, index: int, lock: trio.Lock) -> None:
        """Forget an index's lock once nobody holds or awaits it (every
        path that took `_index_lock` calls this, also on errors)."""
        if not lock.locked() and lock.statistics().tasks_waiting == 0:
            self._locks.pop(index, None)

    @property
    def locked_indexes(self) -> set[int]:
        """Indexes that have a lock now (taken, awaited, or not yet dropped)."""
        return set(self._locks)

    def touch(self) -> None:
        self.record.mtime = time.time()
        self.times_dirty = True

    # -- read ----------------------------------------------------------------

    def read_now(self, offset: int, length: int) -> bytes | bytearray | None:
        """`read`, when it needs no wait: within one object, nothing of it in
        the window, and the pool answers at once (`read_now`) or it is a hole
        of a VDI no other mount writes; else None, and nothing happened."""
        data = self._read_now(offset, length)
        if data is not None:
            self.io.read.add_at_once(len(data))
        return data

    def _read_now(self, offset: int, length: int) -> bytes | bytearray | None:
        if offset < 0 or length < 0:
            return None
        length = min(length, self.size - offset)
        if length <= 0:
            return b""
        if self.window and self.window.layers(offset, length):
            return None
        index, inner = divmod(offset, self.object_size)
        if inner + length > self.object_size:
            return None
        entry = self.map.get(index)
        if is_allocated(entry):
            return self.pool.read_now(data_oid(entry, index), inner, length)
        return None if self.record.shared else zeros(length)

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        started = time.perf_counter()
        self.io.in_flight += 1
        try:
            data = await self._read(offset, length)
        finally:
            self.io.in_flight -= 1
        self.io.read.add(len(data), time.perf_counter() - started)
        return data

    async def _read(self, offset: int, length: int) -> bytes | bytearray:
        if offset < 0 or length < 0:
            raise InvalidArgument("negative offset or length")
        data = self._read_now(offset, length)
        if data is not None:
            return data
        length = min(length, self.size - offset)
        if self.window:
            # Taken before the pool is read: a write drained meanwhile is still laid over.
            layers = self.window.layers(offset, length)
            if layers:
                return await self._read_under_window(offset, length, layers)
        index, inner = divmod(offset, self.object_size)
        if inner + length <= self.object_size:
            return await self._read_extent(Extent(index, inner, length, 0))
        return await self._read_pool(offset, length)

    async def _read_under_window(self, offset: int, length: int, layers: list[tuple[int, bytes | memoryview]]
                                 ) -> bytearray:
        """The pool's bytes with the window's writes over them, oldest first;
        no pool read when one write covers the whole range."""
        for k in range(len(layers) - 1, -1, -1):
            start, data = layers[k]
            if start <= offset and offset + length <= start + len(data):
                buf = bytearray(data[offset - start:offset - start + length])
                lay_over(buf, offset, layers[k + 1:])
                return buf
        buf = bytearray(await self._read_pool(offset, length))
        lay_over(buf, offset, layers)
        return buf

    async def _read_pool(self, offset: int, length: int) -> bytes | bytearray:
        extents = split_extents(offset, length, self.object_size)
        if len(extents) == 1:
            return await self._read_extent(extents[0])
        parts: list[bytes | bytearray] = [b""] * len(extents)

        async def one(i: int, e: Extent) -> None:
            parts[i] = await self._read_extent(e)

        async with trio.open_nursery() as nursery:
            for i, e in enumerate(extents):
                nursery.start_soon(one, i, e)
        return b"".join(parts)

    async def _read_extent(self, e: Extent) -> bytes | bytearray:
        entry = self.map.get(e.index)
        if not is_allocated(entry) and self.record.shared:
            entry = await self._refresh_entry(e.index)  # another mount may have written it
        if not is_allocated(entry):
            return zeros(e.length)
        try:
            return await self.pool.read(data_oid(entry, e.index), e.offset, e.length)
        except ObjectNotFound:
            now = self.map.get(e.index)
            if not is_allocated(now):
                return zeros(e.length)  # freed while we read: a hole now
            if now != entry:
                return await self._read_extent(e)  # copied up meanwhile: read our own copy
            log.error("vid %d: object %d (of data vid %d) is mapped but missing from the pool",
                      self.vid, e.index, entry)
            raise PoolError(f"object {e.index} of vid {entry} is missing") from None

    # -- write ---------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.read_only:
            raise VdifsError(f"vid {self.vid} is a snapshot: read-only", code=errno.EROFS)
        if self.fenced:
            raise PoolError(f"vid {self.vid}: {self.fenced}")

    async def _admit_change(self) -> None:
        """Count one change (write, truncate, flatten copy) in, unless a
        snapshot is being cut: then wait for the cut. `_change_done` counts it out."""
        while self._cutting is not None:
            await self._cutting.wait()
        self._changes += 1

    def _change_done(self) -> None:
        self._changes -= 1
        self._changes_done += 1
        if not self._changes and self._quiet is not None:
            self._quiet.set()

    @asynccontextmanager
    async def _changing(self) -> AsyncIterator[None]:
        """`_admit_change`/`_change_done` around a block (the rare changes;
        `write`, the hot path, calls them directly)."""
        await self._admit_change()
        try:
            yield
        finally:
            self._change_done()

    @asynccontextmanager
    async def quiesced(self) -> AsyncIterator[None]:
        """Hold new changes back and wait for running ones to end: what a
        crash-consistent snapshot is cut in (the guest sees its writes stall
        for that long, as at a disk's flush)."""
        while self._cutting is not None:
            await self._cutting.wait()
        self._cutting = gate = trio.Event()
        try:
            while self._changes:
                self._quiet = trio.Event()
                await self._quiet.wait()
            self._quiet = None
            yield
        finally:
            self._quiet = None
            self._cutting = None
            gate.set()

    def write_now(self, offset: int, data: bytes | bytearray | memoryview, *, behind: bool = False) -> bool:
        """`write`, when it needs no wait; False when nothing was done and
        `write` must run. Two cases: a write acknowledged from the window
        (`behind`) that has room and no failed write-back to report; a small
        write into an object of this VDI that the pool takes at once (the
        embedded pool's page cache) while no write is in the window. Neither
        while a snapshot is cut or the VDI cannot be written: `write` waits
        for the cut, or says why. No await: atomic for the other tasks."""
        if self._write_now(offset, data, behind):
            self._changes_done += 1
            self.io.write.add_at_once(len(data))
            return True
        return False

    def _write_now(self, offset: int, data: bytes | bytearray | memoryview, behind: bool) -> bool:
        if self.read_only or self.fenced or self._cutting is not None or offset < 0:
            return False
        n = len(data)
        if offset + n > MAX_VDI_SIZE or n == 0:
            return False
        if behind and self.accepts_behind:
            if self._drain_error is not None or not self._window_has_room(n):
                return False
            self._into_window(offset, data, behind=True)
            return True
        if self.window:
            return False
        index, inner = divmod(offset, self.object_size)
        if inner + n >= self.object_size or self.map.get(index) != self.data_vid:
            return False  # (a write to an object's end may leave it all zero: `write` checks)
        oid = data_oid(self.data_vid, index)
        if not self.pool.write_now(oid, inner, data):
            return False
        if index in self._zero_checks:
            self._zero_checks[index] = True  # a zero check of this object is now void
        self._dirty_data.add(oid)
        self._grown_to(offset + n)
        return True

    async def write(self, offset: int, data: bytes, *, behind: bool = False) -> int:
        """Write `data` at `offset`. With `behind` (the caller has shown it
        flushes) and write-behind on, the write is acknowledged once it is in
        the window; otherwise once the pool has it."""
        started = time.perf_counter()
        self._check_writable()
        self.io.in_flight += 1
        try:
            if self.window or (behind and self.accepts_behind):
                n = await self._write_windowed(offset, data, behind)
            else:
                await self._admit_change()
                try:
                    n = await self._write(offset, data)
                finally:
                    self._change_done()
        finally:
            self.io.in_flight -= 1
        self.io.write.add(n, time.perf_counter() - started)
        return n

    async def write_many(self, writes: list[tuple[int, bytes]], *, behind: bool = False) -> list[Exception | None]:
        """`write` for each of several writes a client sent together (what an
        NBD reader parsed from one read of its socket): one result per
        write, None or what it failed with. Those inside one object this VDI
        holds already, not reaching its end (the common case once a disk is
        written: `_write_extent`'s first branch) go to the pool together
        (`ObjectPool.write_many`); the others, and everything while the
        write-behind window holds writes or takes these, one by one, side by
        side. Writes sent together have no order among them (NBD: a client
        that needs one waits for the reply first)."""
        results: list[Exception | None] = [None] * len(writes)
        self._check_writable()
        alone = list(range(len(writes)))
        if not self.window and not (behind and self.accepts_behind):
            started = time.perf_counter()
            await self._admit_change()
            try:
                batch, alone = self._batchable(writes)  # (after the wait: a snapshot cut changes the map)
                self.io.in_flight += len(batch)
                try:
                    alone += await self._write_batch(writes, batch, results)
                finally:
                    self.io.in_flight -= len(batch)
            finally:
                self._change_done()
            took = time.perf_counter() - started
            again = set(alone)
            for i in batch:
                if results[i] is None and i not in again:
                    self.io.write.add(len(writes[i][1]), took)
        if alone:
            async def one(i: int) -> None:
                try:
                    await self.write(*writes[i], behind=behind)
                except Exception as e:
                    results[i] = e

            async with trio.open_nursery() as nursery:
                for i in alone:
                    nursery.start_soon(one, i)
        return results

    def _batchable(self, writes: list[tuple[int, bytes]]) -> tuple[list[int], list[int]]:
        """(the writes `_write_batch` can take, the others): by index."""
        batch, alone = [], []
        for i, (offset, data) in enumerate(writes):
            if offset >= 0 and self._overwrites_in_place(*divmod(offset, self.object_size), len(data)):
                batch.append(i)
            else:
                alone.append(i)
        return batch, alone

    async def _write_batch(self, writes: list[tuple[int, bytes]], batch: list[int],
                           results: list[Exception | None]) -> list[int]:
        """The writes `batch` names (`_batchable`) through `_overwrite_many`;
        returns those whose object was freed meanwhile (they take the locked path)."""
        extents: list[tuple[int, int, bytes | memoryview]] = [
            (*divmod(writes[i][0], self.object_size), writes[i][1]) for i in batch]
        freed = []
        for i, error in zip(batch, await self._overwrite_many(extents)):
            if error is None:
                self._grown_to(writes[i][0] + len(writes[i][1]))
            elif isinstance(error, ObjectNotFound):
                freed.append(i)
            else:
                results[i] = error
        return freed

    async def _overwrite_many(self, extents: list[tuple[int, int, bytes | memoryview]]) -> list[Exception | None]:
        """Writes (index, offset in the object, data) into objects this VDI
        holds, none reaching its object's end, through one `pool.write_many`,
        each as `_write_extent`'s first branch makes it: counted in flight
        per object, a zero check of its object voided. One result per write;
        ObjectNotFound where the object was freed meanwhile (the caller
        takes the locked path)."""
        if not extents:
            return []
        for index, _, _ in extents:
            self._overwrite_begins(index)
        try:
            errors = await self.pool.write_many([(data_oid(self.data_vid, index), inner, data)
                                                 for index, inner, data in extents])
        finally:
            for index, _, _ in extents:
                self._overwrite_ends(index)
        for (index, _, _), error in zip(extents, errors):
            if error is None:
                self._dirty_data.add(data_oid(self.data_vid, index))
        for index in {index for index, _, _ in extents}:
            await self._zero_check_if_last(index)  # (a write alone may have asked for one meanwhile)
        return errors

    @staticmethod
    def _check_range(offset: int, end: int) -> None:
        if offset < 0:
            raise InvalidArgument("negative offset")
        if end > MAX_VDI_SIZE:
            raise TooLarge(f"write ends at {end}, past the 16 PiB limit of a VDI")

    def _grown_to(self, end: int) -> None:
        if end > self.record.size:
            self.record.size = end
            self.size_dirty = True
        self.touch()

    async def _write(self, offset: int, data: bytes) -> int:
        end = offset + len(data)
        self._check_range(offset, end)
        extents = split_extents(offset, len(data), self.object_size)
        view = memoryview(data)
        if len(extents) == 1:
            await self._write_extent(extents[0], data)
        else:
            async with trio.open_nursery() as nursery:
                for e in extents:
                    nursery.start_soon(self._write_extent, e, view[e.buf_offset:e.buf_offset + e.length])
        self._grown_to(end)
        return len(data)

    # -- write-behind --------------------------------------------------------

    def enable_write_behind(self, spawn: Spawn, limit: int) -> None:
        """Let writes marked `behind` be acknowledged from a window of up to
        `limit` bytes that a task started with `spawn` drains."""
        self._spawn = spawn
        self.window_limit = limit

    @property
    def accepts_behind(self) -> bool:
        """Write-behind is on and allowed: never for a shared VDI, whose
        other writers must see each write in the pool when it is acknowledged."""
        return self._spawn is not None and self.window_limit > 0 and not self.record.shared

    async def _write_windowed(self, offset: int, data: bytes, behind: bool) -> int:
        """A write through the window: acknowledged at once if `behind`; else
        (a write-through handle while the window holds writes, which must
        not overtake them) once the round that takes it has written it."""
        end = offset + len(data)
        self._check_range(offset, end)
        if isinstance(self._drain_error, NoSpace):
            # The pool was full. QEMU paused the guest on that ENOSPC and sends
            # this write again on `cont`, with no flush first: try the window
            # again now (room may have been made); ENOSPC again if not.
            await self._drain_window()
        self._raise_if_drain_failed()  # a write-back failed: EIO until a flush gets it written
        await self._admit_change()
        try:
            while not self._window_has_room(len(data)):
                self._raise_if_drain_failed()
                self._kick()
                await self._window_event().wait()
                self._check_writable()  # the lease may have been lost meanwhile
            failures = self._drain_failures
            target = self._rounds_started + 1  # the round that takes it
            self._into_window(offset, data, behind)
            if not behind:
                await self._wait_rounds(target, failures)
            return len(data)
        finally:
            self._change_done()

    def _window_has_room(self, n: int) -> bool:
        """Whether a write of `n` bytes fits the window now (an empty window
        takes any one write, however large)."""
        return not self.window.bytes or self.window.bytes + n <= self.window_limit

    def _into_window(self, offset: int, data: bytes | bytearray | memoryview, behind: bool) -> None:
        """Put a write into the window (a copy unless it is bytes) and start
        the drainer; `behind`: it is acknowledged now."""
        self.window.put(offset, data if isinstance(data, bytes) else bytes(data))
        self._grown_to(offset + len(data))
        self._kick()
        if behind:
            self.behind_writes += 1

    def _window_event(self) -> trio.Event:
        if self._window_moved is None:
            self._window_moved = trio.Event()
        return self._window_moved

    def _notify_window(self) -> None:
        if self._window_moved is not None:
            self._window_moved.set()
            self._window_moved = None

    def _raise_if_drain_failed(self) -> None:
        if self._drain_error is not None:
            raise self._write_back_error(f"vid {self.vid}: acknowledged writes could not be written back "
                                         f"({self._drain_error}); a flush retries them")

    def _write_back_error(self, message: str) -> PoolError | NoSpace:
        """What a failed write-back makes the writer see: ENOSPC stays ENOSPC
        (QEMU pauses the guest on it, and resumes it when told), anything
        else is an I/O error."""
        return NoSpace(message) if isinstance(self._drain_error, NoSpace) else PoolError(message)

    def _kick(self) -> None:
        """Start the drainer unless it runs (or a failure stopped it until the next flush)."""
        if not self._draining and self._drain_error is None and self._spawn is not None:
            self._draining = True
            self._spawn(self._drain)

    async def _wait_rounds(self, target: int, failures: int) -> None:
        """Until round `target` has ended; PoolError if any object failed
        since `failures` was read (maybe not ours: a flush errs on the safe side)."""
        while self._rounds_done < target and self._drain_failures == failures:
            await self._window_event().wait()
        if self._drain_failures != failures:
            raise self._write_back_error(f"vid {self.vid}: acknowledged writes could not be written back"
                                         + (f" ({self._drain_error})" if self._drain_error else ""))

    async def _drain_window(self) -> None:
        """Write back everything the window held when called (retrying what
        a failed round put back); PoolError if some of it could not be."""
        failures = self._drain_failures
        self._drain_error = None
        target = self._rounds_started + (1 if self.window.has_pending else 0)
        self._kick()
        await self._wait_rounds(target, failures)

    async def _drain(self) -> None:
        """The drainer: rounds until nothing is pending. One round takes every
        pending object and writes each (a task per object) before the next
        round starts; what arrives meanwhile waits for the next, so writes
        to one object reach the pool in order, batched."""
        try:
            while self.window.has_pending and self._drain_error is None:
                batch = self.window.take()
                self._rounds_started += 1
                try:
                    await self._write_round(batch)
                finally:
                    self._rounds_done += 1
                    self._notify_window()
        finally:
            self._draining = False

    async def _write_round(self, batch: dict[int, list[tuple[int, bytes | memoryview]]]) -> None:
        """One round's write-back. The runs of objects this VDI holds, none
        reaching its object's end, go to the pool together
        (`_overwrite_many`: in a cluster one obj.writev per replica for the
        round, where each run cost a request per replica); every other
        object (a hole, inherited, written to its end, or freed meanwhile)
        is written back on its own, a task each. A round's runs never
        overlap within an object (`coalesce`) and objects are apart, so
        nothing in a round needs an order."""
        alone = dict(batch)
        together = {index: runs for index, runs in batch.items()
                    if all(self._overwrites_in_place(index, off, len(d)) for off, d in runs)}
        if sum(len(runs) for runs in together.values()) > 1:
            extents = [(index, off, d) for index, runs in together.items() for off, d in runs]
            try:
                errors = await self._overwrite_many(extents)
            except BaseException:
                for index in batch:  # every object of the round: none may stay taken
                    self.window.restore(index)
                raise
            failed: dict[int, Exception] = {}
            for (index, _, _), error in zip(extents, errors):
                if error is not None:
                    failed.setdefault(index, error)
            for index in together:
                error = failed.get(index)
                if error is None:
                    del alone[index]
                    self.window.done(index)
                elif not isinstance(error, ObjectNotFound):  # (freed: its runs take the locked path)
                    del alone[index]
                    self._write_back_failed(index, error)
        if len(alone) == 1:
            [(index, runs)] = alone.items()
            await self._write_back(index, runs)
        elif alone:
            async with trio.open_nursery() as nursery:
                for index, runs in alone.items():
                    nursery.start_soon(self._write_back, index, runs)

    async def _write_back(self, index: int, runs: list[tuple[int, bytes | memoryview]]) -> None:
        try:
            for offset, data in runs:
                await self._write_extent(Extent(index, offset, len(data), 0), data)
        except Exception as e:
            self._write_back_failed(index, e)
            return
        except BaseException:
            self.window.restore(index)
            raise
        self.window.done(index)

    def _write_back_failed(self, index: int, e: Exception) -> None:
        """An object's runs could not be written back: they go back into the
        window, and the next flush fails (and retries them)."""
        self.window.restore(index)
        self._drain_failures += 1
        self._drain_error = e
        log.warning("vid %d: could not write back object %d from the write-behind window (%s); "
                    "the next flush fails and retries it", self.vid, index, e)

    def fence(self, why: str) -> None:
        """The lease is lost: refuse writes and flushes from now on, and drop
        the window (its writes must never land after the next holder's)."""
        self.fenced = why
        dropped = self.window.drop()
        self._drain_error = None  # its failure goes with it: nothing is left to retry
        if dropped:
            self._drain_failures += 1
            log.warning("vid %d: %s; %d bytes acknowledged but not yet written back are dropped "
                        "(the next flush fails)", self.vid, why, dropped)
        self._notify_window()

    def _overwrite_begins(self, index: int) -> None:
        """An overwrite of our object `index` (no lock) starts: counted in
        flight, and a zero check of the object under way is void."""
        if index in self._zero_checks:
            self._zero_checks[index] = True
        self._inflight[index] = self._inflight.get(index, 0) + 1

    def _overwrite_ends(self, index: int) -> None:
        left = self._inflight[index] - 1
        if left:
            self._inflight[index] = left
        else:
            del self._inflight[index]

    async def _zero_check_if_last(self, index: int) -> None:
        """Run the zero check an all-zero write to the object's end asked
        for, if no other write to the object is in flight (the last one checks)."""
        if index in self._zero_check_after and not self._inflight.get(index):
            self._zero_check_after.discard(index)
            await self._free_if_zero(index)

    def _overwrites_in_place(self, index: int, offset: int, length: int) -> bool:
        """Whether a write into object `index` takes the unlocked overwrite
        path and cannot end in a zero check: the object is ours and the write
        stops short of its end. (Such writes can go to the pool together.)"""
        return length > 0 and offset + length < self.object_size and self.map.get(index) == self.data_vid

    async def _write_extent(self, e: Extent, data: bytes | memoryview) -> None:
        whole = e.length == self.object_size
        index = e.index
        if self.map.get(index) == self.data_vid and not whole:
            oid = data_oid(self.data_vid, index)
            self._overwrite_begins(index)
            try:
                await self.pool.write(oid, e.offset, data)
                written = True
            except ObjectNotFound:
                written = False  # freed under us: take the locked path, which re-reads the map
            finally:
                self._overwrite_ends(index)
            if written:
                self._dirty_data.add(oid)
                if e.offset + e.length == self.object_size and not self.record.shared and is_zero(data):
                    self._zero_check_after.add(index)
                await self._zero_check_if_last(index)
                return
        lock = self._index_lock(index)
        try:
            async with lock:
                await self._write_extent_locked(e, data, whole)
        finally:
            self._drop_index_lock(index, lock)

    async def _free_if_zero(self, index: int) -> None:
        """Free an object that zero writes (FUSE splits them) made all zero.

        Checked when an all-zero write ends at the object's end, as sequential
        zeroing (discard emulated by writing zeros) does, once no other write
        to the object is in flight: the kernel sends the pieces of one large
        write at once, and the last piece is often not the last to finish;
        the last to finish checks (`_zero_check_after`). Any write to the
        object while we read it voids the check, so no acknowledged data is
        ever freed.
        """
        lock = self._index_lock(index)
        try:
            async with lock:
                if self.map.get(index) != self.data_vid:
                    return
                if self._inflight.get(index):
                    self._zero_check_after.add(index)  # started meanwhile: it checks when it ends
                    return
                self._zero_checks[index] = False
                try:
                    content = await self.pool.read(data_oid(self.data_vid, index), 0, self.object_size)
                    voided = self._zero_checks[index] or bool(self._inflight.get(index))
                finally:
                    del self._zero_checks[index]
                if not voided and is_zero(content):
                    await self._free_locked(index)  # marks PENDING_DELETE before its first await
        finally:
            self._drop_index_lock(index, lock)

    async def _write_extent_locked(self, e: Extent, data: bytes | memoryview, whole: bool) -> None:
        entry = self.map.get(e.index)
        oid = data_oid(self.data_vid, e.index)
        shared = self.record.shared
        if shared and not is_allocated(entry):
            entry = await self._refresh_entry(e.index)
        if entry == self.data_vid:
            if whole and is_zero(data) and not shared:  # shared: never free under another writer
                await self._free_locked(e.index)
                return
            await self.pool.write(oid, e.offset, data)
            self._dirty_data.add(oid)
            return
        if entry not in (NON_EXISTENT, PENDING_DELETE):
            await self._copy_up(e, data, entry)
            return
        if is_zero(data):
            return  # zeros on a hole: nothing to allocate
        # CREATE: the object is written whole (zeros around `data`), replacing
        # any stale copy; only then does the map point at it. Shared VDIs create
        # exclusively: if another mount was first, write into its object.
        if shared:
            try:
                await self.pool.create(oid, e.offset, data, self.object_size, exclusive=True)
            except ObjectExists:
                await self.pool.write(oid, e.offset, data)
        else:
            await self.pool.create(oid, e.offset, data, self.object_size)
        self._dirty_data.add(oid)
        self.map.set(e.index, self.data_vid)
        await self._write_map_page(e.index)

    async def _copy_up(self, e: Extent, data: bytes | memoryview, ancestor: int) -> None:
        """First write to an object inherited from a snapshot: our own copy is
        the ancestor's bytes with `data` over them, created whole; only then
        does the map point at it (the ancestor's object is never written)."""
        oid = data_oid(self.data_vid, e.index)
        if e.length == self.object_size:
            if is_zero(data):
                self.map.set(e.index, NON_EXISTENT)  # zeros over it: just stop inheriting
                await self._write_map_page(e.index)
                return
            body: bytes | bytearray | memoryview = data
        else:
            body = bytearray(await self.pool.read(data_oid(ancestor, e.index), 0, self.object_size))
            body.extend(bytes(self.object_size - len(body)))
            body[e.offset:e.offset + e.length] = data
        await self.pool.create(oid, 0, body, self.object_size)
        self._dirty_data.add(oid)
        self.copied_up += 1
        self.map.set(e.index, self.data_vid)
        await self._write_map_page(e.index)

    def inherited(self, own: set[int]) -> list[int]:
        """Indexes whose object lives under a data vid not in `own`."""
        return [i for i, e in self.map.entries() if is_allocated(e) and e != self.data_vid and e not in own]

    async def flatten_object(self, index: int, own: set[int]) -> bool:
        """Copy one inherited object into our own data vid (flatten), under
        the index lock, so a write to it meanwhile lands after (or on) our
        copy. False if it is no longer inherited."""
        self._check_writable()
        async with self._changing():
            lock = self._index_lock(index)
            try:
                async with lock:
                    entry = self.map.get(index)
                    copied = is_allocated(entry) and entry != self.data_vid and entry not in own
                    if copied:
                        body = await self.pool.read(data_oid(entry, index), 0, self.object_size)
                        oid = data_oid(self.data_vid, index)
                        await self.pool.create(oid, 0, body, self.object_size)
                        self._dirty_data.add(oid)
                        self.copied_up += 1
                        self.map.set(index, self.data_vid)
                        await self._write_map_page(index)
            finally:
                self._drop_index_lock(index, lock)
        return copied

    async def _free_locked(self, index: int) -> None:
        if self.map.get(index) not in (self.data_vid, PENDING_DELETE):
            self.map.set(index, NON_EXISTENT)  # inherited: drop our reference, never their object
            await self._write_map_page(index)
            return
        oid = data_oid(self.data_vid, index)
        self.map.set(index, PENDING_DELETE)
        await self._write_map_page(index)
        await self.pool.delete(oid)
        self._dirty_data.discard(oid)
        self.map.set(index, NON_EXISTENT)
        await self._write_map_page(index)

    async def free_object(self, index: int) -> None:
        lock = self._index_lock(index)
        try:
            async with lock:
                if is_allocated(self.map.get(index)) or self.map.get(index) == PENDING_DELETE:
                    await self._free_locked(index)
        finally:
            self._drop_index_lock(index, lock)

    # -- object map persistence ----------------------------------------------

    async def _write_pages(self, pages: list[int]) -> None:
        """Write map pages to their map objects (page cache; synced on flush)."""
        async with self._map_lock:
            for pno in pages:
                chunk, offset = page_location(pno)
                self.map.mark_clean(pno)
                raw = self.map.page_bytes(pno)
                try:
                    await self._write_map_bytes(chunk, offset, raw)
                except BaseException:
                    self.map.mark_dirty([pno])
                    raise

    async def _write_map_page(self, index: int) -> None:
        # Write-through: a kill -9 of the mount loses no allocation.
        if self.record.shared:
            await self._write_entry(index)
        else:
            await self._write_pages([index // (PAGE_BYTES // 4)])

    async def _write_entry(self, index: int) -> None:
        """Write one 4-byte entry (shared VDIs: other mounts write other entries of the
        same page, so whole pages would undo each other's allocations)."""
        chunk, inner = divmod(index, CHUNK_ENTRIES)
        await self._write_map_bytes(chunk, inner * 4, self.map.get(index).to_bytes(4, "little"))
        self.map.mark_clean(index // (PAGE_BYTES // 4))

    async def _write_map_bytes(self, chunk: int, offset: int, raw: bytes) -> None:
        """Write into a map object, creating it if it does not exist yet.

        Never a replacing create: a map object holds a million entries, and a
        create that replaced one we failed to list (or one another mount just
        made) would wipe them all. So: write; if missing, create exclusively;
        if someone created it meanwhile, write into theirs."""
        oid = map_oid(self.data_vid, chunk)
        try:
            await self.pool.write(oid, offset, raw)
        except ObjectNotFound:
            try:
                await self.pool.create(oid, offset, raw, offset + len(raw), exclusive=True)
            except ObjectExists:
                await self.pool.write(oid, offset, raw)
        self._unsynced_chunks.add(chunk)

    async def _refresh_entry(self, index: int) -> int:
        """Re-read one map entry from the pool (shared VDIs keep no trusted map)."""
        chunk, inner = divmod(index, CHUNK_ENTRIES)
        try:
            raw = await self.pool.read(map_oid(self.data_vid, chunk), inner * 4, 4)
        except ObjectNotFound:
            return NON_EXISTENT
        value = int.from_bytes(raw, "little")
        if value != self.map.get(index):
            self.map.set(index, value)
            self.map.mark_clean(index // (PAGE_BYTES // 4))  # learnt, not ours to write
        return value

    async def _write_dirty_map(self) -> None:
        pages = self.map.take_dirty()
        if self.record.shared:
            return  # shared VDIs write every entry through, one by one
        try:
            await self._write_pages(pages)
        except BaseException:
            self.map.mark_dirty(pages)  # unwritten ones stay dirty for the next flush
            raise

    async def _sync_map(self) -> None:
        chunks, self._unsynced_chunks = self._unsynced_chunks, set()
        if not chunks:
            return
        try:
            await self.pool.sync(map_oid(self.data_vid, c) for c in chunks)
        except BaseException:
            self._unsynced_chunks |= chunks
            raise

    async def copy_map_to(self, data_vid: int) -> None:
        """Store this volume's map (as it is in memory) as the map of
        `data_vid`, durably: a snapshot's or clone's starting point. Call
        quiesced and flushed, so no entry is mid-change."""
        written = []
        for chunk, length in map_chunks(self.record.size, self.object_size):
            raw = self.map.chunk_bytes(chunk, length)
            if is_zero(raw):
                continue  # a missing map object reads as holes
            oid = map_oid(data_vid, chunk)
            await self.pool.create(oid, 0, raw, length)
            written.append(oid)
        await self.pool.sync(written)

    def switch_data_vid(self, record: VdiRecord) -> None:
        """Go on under the record's (new) data vid after a snapshot or rollback
        was stored; the map in memory is already the new map's content."""
        self.record = record
        self.data_vid = record.data_vid
        self._synced_changes = -1  # the next flush syncs, whatever was counted

    # -- flush / truncate ------------------------------------------------------

    @property
    def dirty(self) -> bool:
        return bool(self._dirty_data or self._unsynced_chunks or self.map.dirty or self.size_dirty
                    or self.times_dirty or self.window)

    async def flush(self, *, times: bool = False) -> None:
        """Make every write acknowledged so far durable, with its map and size.

        The directory is rewritten only when the size changed (or `times`
        asks for mtime too): guests flush often, and a directory update
        costs two fsyncs and a rename.
        """
        started = time.perf_counter()
        self.io.in_flight += 1
        try:
            await self._flush(times)
        finally:
            self.io.in_flight -= 1
        self.io.flush.add(0, time.perf_counter() - started)

    async def _flush(self, times: bool) -> None:
        if self.fenced:
            raise PoolError(f"vid {self.vid}: {self.fenced}; nothing more is written")
        need = self._changes_done  # every write acknowledged before this call is counted here
        async with self._flush_lock:
            if (self._synced_changes >= need and not (self.map.dirty or self._unsynced_chunks or self.size_dirty)
                    and not (times and self.times_dirty)):
                return  # a sync that covers them all succeeded meanwhile, and no map change waits
            covers = self._changes_done  # each in the pool (dirty) or in the window
            if self.window:
                await self._drain_window()
            data, self._dirty_data = self._dirty_data, set()
            try:
                if data:  # nothing written: nothing to ask of the pool
                    await self.pool.sync(data)
            except BaseException:
                self._dirty_data |= data
                raise
            await self._write_dirty_map()
            await self._sync_map()
            if (self.size_dirty or (times and self.times_dirty)) and not self.unlinked:
                size_dirty, times_dirty = self.size_dirty, self.times_dirty
                self.size_dirty = self.times_dirty = False
                try:
                    await self._persist_meta(self)
                except BaseException:
                    self.size_dirty |= size_dirty
                    self.times_dirty |= times_dirty
                    raise
            self._synced_changes = covers
            self.syncs += 1

    def allocation(self, offset: int, length: int) -> list[bool]:
        """For each object [offset, offset + length) touches, from the first:
        whether it may hold data. False only where the map says hole and no
        write in the window lies in it; a shared VDI's map may be behind
        another mount's writes, so every object of one may hold data."""
        first, last = offset // self.object_size, (offset + max(length, 1) - 1) // self.object_size
        out = []
        for index in range(first, last + 1):
            held = self.record.shared or is_allocated(self.map.get(index))
            if not held and self.window:
                held = bool(self.window.layers(index * self.object_size, self.object_size))
            out.append(held)
        return out

    async def discard(self, offset: int, length: int, *, provision: bool = False) -> None:
        """The range reads as zeros from now on (TRIM, WRITE_ZEROES). Objects
        it covers whole are freed (their space given back); the rest of the
        range is written as zeros, which allocates nothing where there is a
        hole. `provision`: free nothing and leave no hole in the range
        (zero objects are created where there were none). Writes
        acknowledged before are written back first, so none lands after. A
        shared VDI's objects are never freed (another mount may be writing
        them): zeros are written instead."""
        self._check_writable()
        end = min(offset + length, self.size)
        if offset < 0 or offset >= end:
            return
        started = time.perf_counter()
        await self._discard(offset, end, provision)
        self.io.discard.add(end - offset, time.perf_counter() - started)

    async def _discard(self, offset: int, end: int, provision: bool) -> None:
        async with self._changing():
            if self.window:
                await self._drain_window()

            async def one(e: Extent) -> None:
                if provision:
                    await self._zero_provisioned(e)
                elif e.length == self.object_size and not self.record.shared:
                    await self.free_object(e.index)
                else:
                    await self._write_extent(e, zeros(e.length))

            # Holes need nothing (a shared VDI's map may be behind: all of it
            # is done). What was acknowledged before is in the map by now.
            await self._each(one, (e for e in split_extents(offset, end - offset, self.object_size)
                                   if provision or self.record.shared or self.map.get(e.index) != NON_EXISTENT))
            self.touch()

    async def _each(self, fn: Callable[[T], Awaitable[None]], items: Iterable[T]) -> None:
        """`fn` of every item, FREE_PARALLELISM at a time (a task per worker,
        not per item: a range of a million objects starts sixteen tasks)."""
        pending = iter(items)

        async def worker() -> None:
            for item in pending:  # shared: each item is taken by one worker
                await fn(item)

        async with trio.open_nursery() as nursery:
            for _ in range(FREE_PARALLELISM):
                nursery.start_soon(worker)

    async def _zero_provisioned(self, e: Extent) -> None:
        """Zeros over the extent, leaving its object allocated (never freed,
        created if it was a hole)."""
        lock = self._index_lock(e.index)
        try:
            async with lock:
                entry = self.map.get(e.index)
                if self.record.shared and not is_allocated(entry):
                    entry = await self._refresh_entry(e.index)
                oid = data_oid(self.data_vid, e.index)
                if entry == self.data_vid:
                    await self.pool.write(oid, e.offset, zeros(e.length))
                elif is_allocated(entry) and e.length < self.object_size:
                    await self._copy_up(e, zeros(e.length), entry)
                    return
                else:  # a hole, or an inherited object zeroed whole: a zero object of our own
                    first = zeros(min(ZERO_SEED, self.object_size))  # an object of zeros
                    if self.record.shared:
                        try:
                            await self.pool.create(oid, 0, first, self.object_size, exclusive=True)
                        except ObjectExists:
                            await self.pool.write(oid, e.offset, zeros(e.length))
                    else:
                        await self.pool.create(oid, 0, first, self.object_size)
                    self.map.set(e.index, self.data_vid)
                    await self._write_map_page(e.index)
                self._dirty_data.add(oid)
        finally:
            self._drop_index_lock(e.index, lock)

    async def truncate(self, size: int) -> None:
        """Resize; shrinking zeroes the tail of the last object and frees the rest."""
        check_size(size)
        self._check_writable()
        async with self._changing():
            await self._truncate(size)

    async def _truncate(self, size: int) -> None:
        old = self.record.size
        if size < old:
            if self.window:
                await self._drain_window()  # nothing may land past the new size after it
            keep = objects_for_size(size, self.object_size)
            tail = size % self.object_size
            if tail and is_allocated(self.map.get(keep - 1)):
                # Zero what lies past the new end, so growing again reads zeros.
                await self._write_extent(Extent(keep - 1, tail, self.object_size - tail, 0),
                                         zeros(self.object_size - tail))
            self.record.size = size
            self.size_dirty = True
            self.touch()
            await self.flush()  # the new size is durable before objects go
            doomed = [i for i, _ in self.map.entries(keep)]
            await self._each(self.free_object, doomed)
            await self.flush()
            self.map.drop_empty_pages()
        elif size > old:
            self.record.size = size
            self.size_dirty = True
            self.touch()
            await self.flush()
