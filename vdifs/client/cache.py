"""The mount's local object cache: copies of objects on the hypervisor's disk.

What may be cached (`cached_pool` decides): objects of snapshots, which
never change, and objects of VDIs this mount holds the lease on, which
only this mount changes (write-through). Files live in an `ObjectStore`
under `DIR/objects` (so every read is verified against block checksums,
as on a peer); the states of `model.cache_index` are recorded in an
append-only journal, `DIR/journal`, of msgpack records:

    ["vdifs-cache", 1, cluster id]      first record
    [FILL, oid]                         a fill starts
    [READY, oid, bytes, mutable]        its file is complete (and, if immutable, durable)
    [EVICT, oid]                        its file is about to be removed
    [GONE, oid]                         it was removed

What a crash leaves, and what `open` makes of it: an object whose last
record is READY and not mutable is kept (its file was synced and its
checksum table stored CLEAN before the record was written; its checksums
are checked on every read); every other
file is deleted: FILLING ones may be half-written, EVICTING ones were
being thrown out, mutable ones may be older than what the replicas hold
(the write that changed the replicas may not have reached the cache), and
files without a record were never complete. The journal is not fsynced:
a lost record only makes `open` throw away more. A journal of another
cluster, or one it cannot read, empties the cache.

Concurrency: the index is only touched from the trio thread, between
awaits; file I/O runs in the store's worker threads.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import msgpack
import trio

from vdifs.errors import ChecksumError, ObjectNotFound, VdifsError
from vdifs.model.cache_index import CacheIndex, State
from vdifs.model.ids import ObjectKind, unpack_oid
from vdifs.store.objects import ObjectStore

log = logging.getLogger("vdifs.cache")

FILL, READY, EVICT, GONE = 0, 1, 2, 3
MAGIC = "vdifs-cache"
FORMAT = 1
FILL_PIECE = 1 << 20  # bytes per read of a fill (a frame's limit)
TTL = 7 * 24 * 3600.0  # seconds an unused object is kept (default)
EXPIRY_INTERVAL = 60.0  # seconds between looks for expired objects
MIN_DEFAULT_SIZE = 256 << 20  # a default size below this is no cache at all
JOURNAL_LIMIT = 16 << 20  # bytes of records appended before the journal is rewritten whole

Buffer = bytes | bytearray | memoryview


def default_size(directory: str) -> int:
    """`size_leaving_room` for the file system `directory` is (or will be) on."""
    while not os.path.isdir(directory):  # not made yet: the file system it will be on
        directory = os.path.dirname(directory) or "/"
    st = os.statvfs(directory)
    return size_leaving_room(st.f_blocks, st.f_bfree, st.f_bavail, st.f_frsize)


def size_leaving_room(blocks: int, free: int, available: int, block_size: int) -> int:
    """A size that leaves the disk room: a tenth of the file system, and no
    more than what keeps a fifth of it free. The file system is what the
    mount can use, as `df` counts it (used plus available): blocks reserved
    for another user (ext4 keeps 5% for root, some hosts far more) are
    neither room nor part of what a fifth is of."""
    capacity = (blocks - free + available) * block_size
    return max(0, min(capacity // 10, available * block_size - capacity // 5))


class ObjectCache:
    def __init__(self, root: str, capacity: int, *, ttl: float = TTL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.root = os.path.abspath(root)
        self.index = CacheIndex(capacity)
        self.ttl = ttl
        self.clock = clock
        # A wrong checksum only drops a copy here (the peers have the object):
        # small writes into a cached object's holes need no thread.
        self.store = ObjectStore(os.path.join(self.root, "objects"), reserve=0, zero_crc_is_zeros=True)
        self._journal_path = os.path.join(self.root, "journal")
        self._journal: int = -1
        self._journal_bytes = 0  # appended since the journal was last written whole
        self._head: list[Any] = []
        self._evicting: set[int] = set()
        self._unpersisted: set[int] = set()  # READY immutable objects not yet durable nor journaled READY

    # -- start -----------------------------------------------------------------------

    async def open(self, cluster_id: str) -> None:
        """Take over what an earlier run left (see the module docstring)."""
        states = await trio.to_thread.run_sync(self._read_journal, cluster_id)
        if states is None:
            await trio.to_thread.run_sync(functools.partial(shutil.rmtree, self.store.root, ignore_errors=True))
            states = {}
        await trio.to_thread.run_sync(self.store.open)
        now = self.clock()
        for vid in await self.store.list_vids():
            for oid in await self.store.list_objects(vid):
                state, charged, mutable = states.get(oid, (GONE, 0, False))
                if state == READY and not mutable and self.index.committed + charged <= self.index.capacity:
                    self.index.adopt(oid, charged, now)
                else:
                    await self.store.delete(oid)
        await trio.to_thread.run_sync(self._new_journal, cluster_id)
        self._append([READY, oid, e.charged, False] for oid, e in self.index.entries.items())
        log.info("cache %s: %d objects (%.1f MiB) kept from the last run, capacity %.1f MiB",
                 self.root, len(self.index.entries), self.index.used / 2**20, self.index.capacity / 2**20)

    def _new_journal(self, cluster_id: str) -> None:
        tmp = self._journal_path + ".new"
        self._head = [MAGIC, FORMAT, cluster_id]
        with open(tmp, "wb") as f:
            f.write(msgpack.packb(self._head))
            os.fsync(f.fileno())
        os.replace(tmp, self._journal_path)
        self._journal = os.open(self._journal_path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    def _read_journal(self, cluster_id: str) -> dict[int, tuple[int, int, bool]] | None:
        """oid -> (last state, bytes, mutable); None: not this cluster's, or unreadable."""
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        try:
            with open(self._journal_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return {}
        states: dict[int, tuple[int, int, bool]] = {}
        unpacker = msgpack.Unpacker()
        unpacker.feed(raw)
        try:
            head = next(unpacker)
            if head != [MAGIC, FORMAT, cluster_id]:
                log.warning("cache %s: made for another cluster or format: emptied", self.root)
                return None
            for rec in unpacker:
                if isinstance(rec, list) and len(rec) >= 2 and isinstance(rec[1], int):
                    size = rec[2] if rec[0] == READY and len(rec) >= 4 and isinstance(rec[2], int) else 0
                    states[rec[1]] = (rec[0], size, bool(rec[3]) if rec[0] == READY and len(rec) >= 4 else False)
        except (StopIteration, ValueError, msgpack.UnpackException) as e:
            if not states:
                log.warning("cache %s: journal unreadable (%s): emptied", self.root, e)
                return None
            # A record cut short by a crash ends the journal; what came before stands.
        return states

    def _append(self, records: Any) -> None:
        """Journal records: small appends on the event loop (no fsync: see the
        module docstring). A journal grown past JOURNAL_LIMIT is rewritten
        with what `open` would keep (READY immutable objects), also without
        a fsync: a crash then may empty the cache, never mislead it."""
        raw = b"".join(msgpack.packb(r) for r in records)
        if not raw or self._journal < 0:
            return
        os.write(self._journal, raw)
        self._journal_bytes += len(raw)
        if self._journal_bytes > JOURNAL_LIMIT:
            kept = [[READY, oid, e.charged, False] for oid, e in self.index.entries.items()
                    if e.state == State.READY and not e.mutable]
            tmp = self._journal_path + ".new"
            with open(tmp, "wb") as f:
                f.write(msgpack.packb(self._head) + b"".join(msgpack.packb(r) for r in kept))
            os.replace(tmp, self._journal_path)
            os.close(self._journal)
            self._journal = os.open(self._journal_path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            self._journal_bytes = 0

    # -- reads -----------------------------------------------------------------------

    def ready(self, oid: int) -> bool:
        e = self.index.get(oid)
        return e is not None and e.state == State.READY and not e.doomed

    def read_now(self, oid: int, offset: int, length: int) -> bytes | bytearray | None:
        """A cached object's bytes if they can be had without waiting
        (verified, in the page cache); else None."""
        data = self.store.read_now(oid, offset, length)
        if data is not None:
            self.index.touch(oid, self.clock())
            self.index.stats.hits += 1
            self.index.stats.bytes_saved += len(data)
        return data

    async def read(self, oid: int, offset: int, length: int) -> bytes | bytearray | None:
        """A cached object's bytes, or None if it could not serve them (it
        was dropped meanwhile, or failed its checksums and is dropped now)."""
        self.index.acquire(oid)
        try:
            data = await self.store.read(oid, offset, length)
        except (ChecksumError, ObjectNotFound, VdifsError, OSError) as e:
            log.warning("cache: object %016x cannot be served from the cache (%s): dropped, read from the peers",
                        oid, e)
            self._release(oid)
            await self.drop(oid)
            return None
        except BaseException:
            self._release(oid)
            raise
        self._release(oid)
        self.index.touch(oid, self.clock())
        self.index.stats.hits += 1
        self.index.stats.bytes_saved += len(data)
        return data

    def _release(self, oid: int) -> None:
        if self.index.release(oid):
            self._evict_soon([oid])

    # -- fills and changes -----------------------------------------------------------

    def begin_fill(self, oid: int, size: int, mutable: bool, generation: int | None) -> int | None:
        """Reserve room for a fill of `oid`; its version to compare at the end,
        or None if it cannot start (already cached or filling, or no room)."""
        victims = self.index.begin_fill(oid, size, mutable, generation, self.clock())
        if victims is None:
            return None
        self._evict_soon(victims)
        self._append([[FILL, oid]])
        return self.index.entries[oid].version

    async def finish_fill(self, oid: int, version: int, data: bytes | bytearray) -> bool:
        """Store the fetched bytes of a fill begun at `version`; False if it
        was overtaken (a write or a drop meanwhile) and nothing is kept. The
        copy is served at once; an immutable one is made durable (data, then
        its table marked CLEAN) and journaled READY by `run` shortly after,
        so only then does it survive a crash."""
        e = self.index.get(oid)
        assert e is not None and e.state == State.FILLING
        if e.version != version:
            self.index.fill_failed(oid)
            self._append([[GONE, oid]])
            return False
        try:
            await self.store.create(oid, 0, data, len(data))
        except (VdifsError, OSError) as ex:
            log.warning("cache: could not store object %016x (%s)", oid, ex)
            await self._discard_fill(oid)
            return False
        if e.version != version:  # overtaken while it was written
            await self._discard_fill(oid)
            return False
        self.index.fill_done(oid, len(data))
        if e.mutable:
            self._append([[READY, oid, len(data), True]])
        else:
            self._unpersisted.add(oid)
            self._wake()
        return True

    async def persist(self) -> None:
        """Make the immutable copies filled since the last call durable and
        journal them READY (`run` calls it soon after fills; so does an
        orderly stop)."""
        oids, self._unpersisted = sorted(self._unpersisted), set()
        try:
            clean = await self.store.sync_clean(oids)
        except (VdifsError, OSError) as ex:
            log.warning("cache: could not make %d filled objects durable (%s); they will not outlive a restart",
                        len(oids), ex)
            return
        self._append([READY, oid, entry.charged, False] for oid in clean
                     if (entry := self.index.get(oid)) is not None and entry.state == State.READY
                     and not entry.mutable)

    async def finish_create(self, oid: int, version: int, offset: int, data: Buffer, size: int) -> bool:
        """A fill begun at `version` for an object this mount just created
        on the replicas: `size` bytes, zero except `data` at `offset`. Not
        made durable: only mutable objects are created this way, and those
        never outlive the process."""
        e = self.index.get(oid)
        assert e is not None and e.state == State.FILLING and e.mutable
        if e.version == version:
            try:
                await self.store.create(oid, offset, data, size)
            except (VdifsError, OSError) as ex:
                log.warning("cache: could not store object %016x (%s)", oid, ex)
                await self._discard_fill(oid)
                return False
            if e.version == version:
                self.index.fill_done(oid, size)
                self._append([[READY, oid, size, True]])
                return True
        await self._discard_fill(oid)
        return False

    async def abandon_fill(self, oid: int) -> None:
        """A fill that could not fetch its object."""
        await self._discard_fill(oid)

    async def _discard_fill(self, oid: int) -> None:
        with trio.CancelScope(shield=True):
            with contextlib.suppress(VdifsError, OSError):
                await self.store.delete(oid)
        self.index.fill_failed(oid)
        self._append([[GONE, oid]])

    def changing(self, oid: int) -> None:
        """A write to `oid` starts (fills under way are overtaken)."""
        self.index.changed(oid)

    async def write_through(self, oid: int, offset: int, data: Buffer) -> bool:
        """Apply a write the replicas took to a READY cached copy: in the page
        cache at once if it can (a small write), else through a worker
        thread. False if the copy did not take it (not READY, or the write
        failed: then it is dropped)."""
        e = self.index.get(oid)
        if e is None or e.state != State.READY or e.doomed:
            return False
        if offset + len(data) > e.charged:  # cached objects are whole: only a bug gets here
            self.drop_soon(oid)
            return False
        if self.store.write_now(oid, offset, data):
            return True
        self.index.acquire(oid)
        try:
            await self.store.write(oid, offset, data)
        except (VdifsError, OSError) as ex:
            log.warning("cache: write to cached object %016x failed (%s): dropped", oid, ex)
            self._release(oid)
            self.drop_soon(oid)
            return False
        except BaseException:  # cancelled: whether the copy has the write is unknown
            self._release(oid)
            self.drop_soon(oid)
            raise
        self._release(oid)
        return True

    async def drop(self, oid: int) -> None:
        """Throw `oid` out: it may be out of date."""
        if self.index.drop(oid):
            await self._evict(oid)

    def drop_soon(self, oid: int) -> None:
        """`drop`, with the file removed in the background."""
        if self.index.drop(oid):
            self._evict_soon([oid])

    def drop_where(self, stale: Callable[[int, Any], bool]) -> None:
        """Throw out (in the background) every object for which `stale(oid, entry)` holds."""
        victims = [oid for oid, e in self.index.entries.items() if stale(oid, e) and self.index.drop(oid)]
        self._evict_soon(victims)

    # -- eviction ----------------------------------------------------------------------

    def _evict_soon(self, oids: list[int]) -> None:
        self._evicting.update(oids)
        if oids:
            self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    _wakeup: trio.Event | None = None

    async def _evict(self, oid: int) -> None:
        self._append([[EVICT, oid]])
        with trio.CancelScope(shield=True):
            try:
                await self.store.delete(oid)
            except (VdifsError, OSError) as e:
                log.warning("cache: could not remove object %016x (%s)", oid, e)
        self.index.evicted(oid)
        self._append([[GONE, oid]])

    async def run(self) -> None:
        """Makes filled objects durable, removes evicted ones and, every
        EXPIRY_INTERVAL, the ones unused for the TTL."""
        next_expiry = self.clock() + min(EXPIRY_INTERVAL, self.ttl)
        while True:
            self._wakeup = trio.Event()
            if not self._evicting and not self._unpersisted:
                # `clock` need not be trio's (whose time has its own origin): wait a duration.
                with trio.move_on_after(max(0.0, next_expiry - self.clock())):
                    await self._wakeup.wait()
            if self._unpersisted:
                await self.persist()
            if self.clock() >= next_expiry:
                self._evicting.update(self.index.expired(self.clock(), self.ttl))
                next_expiry = self.clock() + min(EXPIRY_INTERVAL, self.ttl)
            while self._evicting:
                await self._evict(self._evicting.pop())

    def status(self) -> dict[str, Any]:
        return {"root": self.root, "size": self.index.capacity, "used": self.index.used,
                "reserved": self.index.reserved, "objects": self.index.by_state(), "ttl": self.ttl,
                **self.index.stats.as_dict(), "io": self.store.io_stats()}

    def close(self) -> None:
        self.store.close()
        if self._journal >= 0:
            os.close(self._journal)
            self._journal = -1


def cacheable_kind(oid: int) -> bool:
    return unpack_oid(oid)[0] == ObjectKind.DATA

