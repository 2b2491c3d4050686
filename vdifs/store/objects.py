"""Objects as sparse files on one local file system.

Layout: `STORE/obj/<vid:06x>/<oid:016x>`. Grouping by vid (the design brief
had `obj/xx/`) makes listing and purging one VDI's objects proportional to
that VDI, not to the store.

Writes go to the page cache with pwrite; `sync` makes the named objects and
the directory entries created or removed since the last sync durable
(fdatasync, then fsync of the directories) before it returns.

Concurrency: every call that can block runs in a worker thread, batched
(`BatchRunner`) so one thread hop serves all requests queued meanwhile.
Reads first try `preadv(RWF_NOWAIT)` on the event loop: the kernel answers
from the page cache or says EAGAIN, it never waits, so only reads that need
the disk pay for a thread (`read_now`, the fast path of the embedded mount
and of a peer, does it in native code: `verified`). Open file
descriptors are cached; the cache is only touched from the trio thread, and
a descriptor is closed only when no operation is using it (reference count),
so a worker thread never sees its fd closed or reused under it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import resource
import shutil
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import trio

from vdifs.errors import ChecksumError, NoSpace, ObjectExists, ObjectNotFound, PoolError
from vdifs.fsutil import fsync_dir, machine_dirty_bytes, open_files_limit, syncfs
from vdifs.model.ids import ObjectKind, unpack_oid, vid_of
from vdifs.store import checksums, files
from vdifs.store.batch import BatchRunner
from vdifs.store.checksums import BLOCK, CLEAN, DIRTY, XATTR
from vdifs.store.reserve import SpaceReserve
from vdifs.store.verified import read_verified

log = logging.getLogger("vdifs.store")

#: Objects a store keeps open at most (descriptor and checksum table, about
#: 1.5 KiB each: 12 MiB at the limit). An object not open cannot be read
#: without a thread hop (the open and the table's load), so this is the hot
#: set of a peer: 32 GiB of 4 MiB objects. At 512 a 2 GiB VDI on three peers
#: no longer fit, and every sequential read met each object closed
#: (docs/benchmarks.md, "Open objects").
MAX_OPEN_FILES = 8192
#: Open objects whose piece CRCs are kept (4 KiB each for a 4 MiB object:
#: 4 MiB in all), the ones written last, so that small writes into blocks
#: the store wrote whole, or read around once, need not read them again
#: (`checksums.Pieces`).
PIECES_KEPT = 1024
#: The share of the process's open-files limit the store may hold: the rest
#: is for connections (a peer serves every mount of the cluster).
OPEN_FILES_SHARE = 4
MIN_OPEN_FILES = 64
PART = ".part"  # suffix of an object being installed (never 16 hex digits: never listed)
SYNC_PARALLELISM = 8
SYNCFS_MIN = 4  # objects: a sync of this many or more may be one syncfs ...
SYNCFS_DIRTY_MAX = 16 << 20  # ... while the machine has no more than this to write back
INLINE_WRITE_MAX = 64 << 10  # writes up to this size may run on the event loop
INLINE_GUARD = 0.002  # seconds: an inline write slower than this that slept ...
INLINE_BACKOFF = 1.0  # ... sends writes through threads for this long


def voluntary_switches() -> int:
    """How often this thread has gone to sleep (blocked) so far: a slow
    write that did not add to it was preempted, not blocked (0.4 us)."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw


class _Handle:
    """An open object file and its block checksums.

    `table` always matches the file's bytes while this process lives (it is
    changed only under `lock`, after the data). `clean_on_disk`: the stored
    table is marked CLEAN, so the first write after it must mark it DIRTY
    first. `writes` counts writes started and `inflight` those not finished:
    a read that overlaps one cannot be verified against the table.
    `synced_writes`: `writes` as of the last completed sync (so the table
    may be marked CLEAN without another sync if it still equals `writes`).
    `passed_writes`: `writes` as of the last periodic `sync_dirty` pass (an
    object written since is still being written: it is not marked CLEAN)."""

    __slots__ = ("fd", "refs", "doomed", "table", "clean_on_disk", "writes", "inflight", "lock",
                 "synced_writes", "passed_writes", "pieces")

    def __init__(self, fd: int, table: checksums.Table, clean_on_disk: bool) -> None:
        self.fd = fd
        self.refs = 0
        self.doomed = False
        self.table = table
        self.clean_on_disk = clean_on_disk
        self.writes = 0
        self.inflight = 0
        self.synced_writes = -1  # never synced by this process
        self.passed_writes = -1  # not seen by a periodic pass yet
        self.lock = trio.Lock()  # one write (or create, or sync's marking) at a time
        self.pieces: checksums.Pieces | None = None  # see `ObjectStore._pieces_of`


class ObjectStore:
    def __init__(self, root: str, reserve: int | None = None, direct: bool = False,
                 zero_crc_is_zeros: bool = False, max_open: int | None = None) -> None:
        """`reserve`: bytes of the file system that data writes leave free
        (None: the default for its size, see `store.reserve`). `direct`: writes
        made with `cache=False` go past the page cache when they are large and
        aligned (`files.DIRECT_MIN`) and the file system can.
        `zero_crc_is_zeros`: see `files.write_block_crcs` (the mount's cache only).
        `max_open`: objects kept open (None: MAX_OPEN_FILES, or less if the
        process's open-files limit is low: see `fsutil.raise_open_files_limit`)."""
        self.root = os.path.abspath(root)
        self.max_open = max_open if max_open is not None else max(
            MIN_OPEN_FILES, min(MAX_OPEN_FILES, open_files_limit() // OPEN_FILES_SHARE))
        self.opens = 0  # object files opened (a read of a closed object waits for one)
        self.zero_crc_is_zeros = zero_crc_is_zeros
        self._reserve_setting = reserve
        self.reserve: SpaceReserve | None = None  # set by open()
        self.space_refusals = 0  # data writes refused for the reserve
        self.obj_root = os.path.join(self.root, "obj")
        self._handles: OrderedDict[int, _Handle] = OrderedDict()
        self._with_pieces: OrderedDict[_Handle, None] = OrderedDict()  # open objects with pieces, last written last
        self._dirty_dirs: set[str] = set()
        self._io = BatchRunner()
        self._nowait = hasattr(os, "RWF_NOWAIT")
        self.nowait_reads = 0
        self.inline_writes = 0
        self.whole_fs_syncs = 0
        #: threads that run one sync's fdatasyncs side by side, made at the first
        #: sync of several objects and joined by `close` (a thread hop each cost more)
        self._syncers: ThreadPoolExecutor | None = None
        self._inline_paused_until = 0.0
        self.direct = direct  # False after open() on a file system without O_DIRECT
        self.direct_writes = 0
        self.checksums = True  # False on a file system without user xattrs
        self.checksum_errors = 0
        self._moving = 0  # renames of object files in progress
        self._moves = 0  # bumped when one starts and when it ends
        self._moves_done = trio.Event()

    def open(self) -> None:
        os.makedirs(self.obj_root, exist_ok=True)
        self.reserve = SpaceReserve(self.obj_root, self._reserve_setting)
        for name in os.listdir(self.obj_root):  # installs a crash interrupted
            d = os.path.join(self.obj_root, name)
            for leftover in os.listdir(d) if os.path.isdir(d) else []:
                if leftover.endswith(PART):
                    os.unlink(os.path.join(d, leftover))
        try:
            os.setxattr(self.obj_root, XATTR, b"probe")
            os.removexattr(self.obj_root, XATTR)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            self.checksums = False
            log.warning("store %s: the file system has no user extended attributes: "
                        "replicas are stored without checksums", self.root)
        if self.direct and not files.direct_works(self.root):
            self.direct = False
            log.info("store %s: the file system cannot do O_DIRECT: large transfers stay in the page cache",
                     self.root)

    # -- paths -------------------------------------------------------------

    def vid_dir(self, vid: int) -> str:
        return os.path.join(self.obj_root, f"{vid:06x}")

    def path(self, oid: int) -> str:
        return os.path.join(self.obj_root, f"{vid_of(oid):06x}", f"{oid:016x}")

    # -- descriptor cache (trio thread only) -------------------------------

    async def _acquire(self, oid: int) -> _Handle:
        h = self._handles.get(oid)
        while h is None:
            moves = self._moves
            try:
                if self.checksums:
                    fd, table, clean = await self._io.run(files.open_object, self.path(oid))
                else:
                    fd, table, clean = await self._io.run(os.open, self.path(oid), os.O_RDWR | os.O_CLOEXEC), checksums.zero_table(0), False
            except FileNotFoundError:
                raise ObjectNotFound(f"object {oid:016x} does not exist") from None
            except OSError as e:
                raise files.os_error(e, f"opening object {oid:016x}") from None
            self.opens += 1
            if self._moving or self._moves != moves:
                # Files were moved while we opened: ours may be one that left
                # the path. Open again once the moves are done.
                os.close(fd)
                if self._moving:
                    await self._moves_done.wait()
                h = self._handles.get(oid)
                continue
            h = self._handles.get(oid)
            if h is None:
                h = self._handles[oid] = _Handle(fd, table, clean)
                self._evict()
            else:  # another task opened it meanwhile
                os.close(fd)
            break
        else:
            self._handles.move_to_end(oid)
        h.refs += 1
        return h

    @contextlib.asynccontextmanager
    async def _moving_files(self, oids: Iterable[int] | None) -> AsyncIterator[None]:
        """Around any rename of object files (None: all of them): their cached
        descriptors are dropped first, and an open that overlaps the move is
        redone after it (see `_acquire`), so no descriptor ever names a file
        that left its path."""
        self._moving += 1
        self._moves += 1
        if oids is None:
            self.close()
        else:
            for oid in oids:
                self._forget(oid)
        try:
            yield
        finally:
            self._moving -= 1
            self._moves += 1
            if not self._moving:
                self._moves_done.set()
                self._moves_done = trio.Event()

    def _release(self, h: _Handle) -> None:
        h.refs -= 1
        if h.doomed and h.refs == 0:
            os.close(h.fd)

    def _pieces_of(self, h: _Handle) -> checksums.Pieces | None:
        """The piece CRCs kept for an open object (`checksums.Pieces`), made
        on its first write; the object written least recently gives its
        up beyond PIECES_KEPT."""
        if not self.checksums or not h.table:
            return None
        if h.pieces is None:
            self._keep_pieces(h, checksums.Pieces(len(h.table)))
        else:
            self._with_pieces.move_to_end(h)
        return h.pieces

    def _keep_pieces(self, h: _Handle, pieces: checksums.Pieces) -> None:
        self._drop_pieces(h)
        h.pieces = pieces
        self._with_pieces[h] = None
        if len(self._with_pieces) > PIECES_KEPT:
            # (a worker thread may still be writing with the victim's: it is then simply not kept)
            self._drop_pieces(next(iter(self._with_pieces)))

    def _drop_pieces(self, h: _Handle) -> None:
        """Forget what was known of an object's pieces (it changed by another
        way than a write, or another object needs the room)."""
        if h.pieces is not None:
            h.pieces = None
            del self._with_pieces[h]

    def _forget(self, oid: int) -> None:
        h = self._handles.pop(oid, None)
        if h is not None:
            self._drop_pieces(h)
            h.doomed = True
            if h.refs == 0:
                os.close(h.fd)

    def _evict(self) -> None:
        """Close the least recently used objects beyond `max_open` (one, as
        a rule: this runs after each open). Objects in use are skipped; the
        scan stops at the first one that is not."""
        while len(self._handles) > self.max_open:
            victim = next((oid for oid, h in self._handles.items() if h.refs == 0), None)
            if victim is None:
                return
            self._forget(victim)

    # -- object operations ---------------------------------------------------

    async def read(self, oid: int, offset: int, length: int) -> bytes | bytearray:
        """`length` bytes at `offset`; the blocks they lie in are verified
        against their checksums first (ChecksumError if rotten)."""
        h = await self._acquire(oid)
        try:
            if not self.checksums:
                return await self._pread(h, offset, length)
            start, end = checksums.covering(offset, length)
            writes, busy = h.writes, h.inflight
            data = await self._pread(h, start, end - start)
            if not busy and not h.inflight and h.writes == writes:  # else a write overlapped: cannot tell
                self._verify(oid, h, start, data)
            if start == offset and end - start == length:
                return data
            return data[offset - start:offset - start + length]
        except OSError as e:
            raise files.os_error(e, f"reading object {oid:016x}") from None
        finally:
            self._release(h)

    async def _pread(self, h: _Handle, offset: int, length: int) -> bytearray | bytes:
        if self._nowait:
            try:
                if length >= files.SPARSE_MIN:
                    # lseek takes the inode's lock, which a write in a worker
                    # thread holds (and keeps while the kernel throttles it):
                    # then the thread reads, not the event loop
                    data = None if h.inflight else files.pread_sparse(h.fd, offset, length, nowait=True)
                else:
                    data = files.read_nowait(h.fd, offset, length)
            except files.NoWaitUnsupported:
                self._nowait = False  # this file system cannot: always use threads
                data = None
            if data is not None:
                self.nowait_reads += 1
                return data
        return await self._io.run(files.pread_sparse, h.fd, offset, length)

    def _verify(self, oid: int, h: _Handle, start: int, data: bytes | bytearray) -> None:
        bad = checksums.first_mismatch(h.table, start // BLOCK, data)
        if bad is not None:
            self.checksum_errors += 1
            raise ChecksumError(f"object {oid:016x}: block {bad} (bytes {bad * BLOCK}..{(bad + 1) * BLOCK}) "
                                f"does not match its checksum")

    async def read_all(self, oid: int) -> bytes | bytearray:
        """The whole object, as long as it is (for copying it to another peer),
        verified like any read."""
        h = await self._acquire(oid)
        try:
            writes, busy = h.writes, h.inflight
            data = await self._io.run(files.pread_all, h.fd)
            if self.checksums and not busy and not h.inflight and h.writes == writes:
                self._verify(oid, h, 0, data)
            return data
        except OSError as e:
            raise files.os_error(e, f"reading object {oid:016x}") from None
        finally:
            self._release(h)

    async def exists(self, oid: int) -> bool:
        return await self._io.run(os.path.exists, self.path(oid))

    def _data_fits(self, oid: int, nbytes: int) -> bool:
        """A write of VDI data must leave the reserve free (counted if it
        does); maps and system objects may use it: they record what data
        went where."""
        return oid >> 56 != ObjectKind.DATA or self.reserve is None or self.reserve.admit(nbytes)

    def _admit_data(self, oid: int, nbytes: int) -> None:
        """NoSpace for a write of VDI data that would dip into the reserve."""
        if not self._data_fits(oid, nbytes):
            self.space_refusals += 1
            reserve = self.reserve.reserve if self.reserve is not None else 0
            raise NoSpace(f"store {self.root} is at its reserve ({reserve >> 20} MiB left for "
                          f"metadata): object {oid:016x} not written")

    async def write(self, oid: int, offset: int, data: bytes | bytearray | memoryview, cache: bool = True) -> None:
        """Write into an existing object; ObjectNotFound if it does not exist.
        `cache=False`: no one is expected to read the data from here soon."""
        direct = self._direct(offset, data, cache)
        self._admit_data(oid, len(data))
        h = await self._acquire(oid)
        try:
            if len(data) <= INLINE_WRITE_MAX and self._write_inline(oid, h, offset, data):
                return
            if not self.checksums:
                h.inflight += 1  # also tells reads not to lseek on the loop (see `_pread`)
                try:
                    await self._io.run(files.pwrite_full, h.fd, offset, data, direct)
                finally:
                    h.inflight -= 1
                return
            async with h.lock:  # the table follows the data in the order the writes happened
                mark = checksums.encode(h.table, DIRTY) if h.clean_on_disk else None
                h.writes += 1
                h.inflight += 1
                try:
                    crcs = await self._io.run(
                        functools.partial(files.write_block_crcs, direct=direct,
                                          zero_crc_is_zeros=self.zero_crc_is_zeros, pieces=self._pieces_of(h)),
                        h.fd, offset, data, h.table, mark)
                except ChecksumError:
                    raise  # nothing written; the rotten replica keeps its table (never rebuilt from rot)
                except BaseException:
                    self._forget(oid)  # the table may be behind the data: rebuild it on the next open
                    raise
                finally:
                    h.inflight -= 1
                h.clean_on_disk = False
                self._take_crcs(h, offset, crcs)
        except ChecksumError as e:
            self.checksum_errors += 1
            raise ChecksumError(f"object {oid:016x}: {e}") from None
        except OSError as e:
            raise files.os_error(e, f"writing object {oid:016x}") from None
        finally:
            self._release(h)

    def _direct(self, offset: int, data: bytes | bytearray | memoryview, cache: bool) -> bool:
        """Whether a write goes past the page cache (counted if so)."""
        if cache or not self.direct or not files.direct_ok(offset, len(data)):
            return False
        self.direct_writes += 1
        return True

    def _cached_handle(self, oid: int) -> _Handle | None:
        """The open handle of an object, if one is cached and usable without
        waiting (no move of files under way)."""
        h = self._handles.get(oid)
        if h is None or h.doomed or self._moving:
            return None
        self._handles.move_to_end(oid)
        return h

    def read_now(self, oid: int, offset: int, length: int) -> bytes | bytearray | None:
        """`read`, when it needs no wait: the object's handle is cached, the
        bytes are in the page cache and no write is in flight; else None (and
        nothing happened). Blocks that fail their checksums give None too:
        `read` then raises, so the caller's repair runs."""
        h = self._cached_handle(oid)
        if h is None or h.inflight or not self._nowait:
            return None
        if length >= files.SPARSE_MIN:
            data = self._read_sparse_now(h, offset, length)
        else:
            data = read_verified(h.fd, offset, length, h.table if self.checksums else None)
        if data is not None:  # else `read` meets whatever it was again and reports it
            self.nowait_reads += 1
        return data

    def _read_sparse_now(self, h: _Handle, offset: int, length: int) -> bytearray | None:
        """`read_now` of a large range, reading only what holds data (see
        `files.pread_sparse`), or None as `read_verified` gives it."""
        start, end = checksums.covering(offset, length) if self.checksums else (offset, offset + length)
        try:
            ranges = files.data_ranges(h.fd, start, end)
            if ranges == [(start, end)]:  # no hole: the native read, which verifies as it goes
                return read_verified(h.fd, offset, length, h.table if self.checksums else None)
            data = files.pread_sparse(h.fd, start, end - start, nowait=True, ranges=ranges)
        except (OSError, files.NoWaitUnsupported):
            return None
        if data is None or (self.checksums and checksums.first_mismatch(h.table, start // BLOCK, data) is not None):
            return None
        if start == offset and end - start == length:
            return data
        return data[offset - start:offset - start + length]

    def write_now(self, oid: int, offset: int, data: bytes | bytearray | memoryview) -> bool:
        """`write`, when it needs no wait (see `_write_inline`); False when
        nothing was written and `write` must do it."""
        h = self._cached_handle(oid)
        if h is None or len(data) > INLINE_WRITE_MAX:
            return False
        if not self._data_fits(oid, len(data)):
            return False  # `write` refuses it and says why
        try:
            if self._write_inline(oid, h, offset, data):
                return True
        except (ChecksumError, OSError):
            pass  # nothing written, or the handle dropped: `write` meets it and reports it
        if oid >> 56 == ObjectKind.DATA and self.reserve is not None:
            self.reserve.give_back(len(data))  # `write` counts it again (no await since: no measure between)
        return False

    @staticmethod
    def _take_crcs(h: _Handle, offset: int, crcs: checksums.Table) -> None:
        first = offset // BLOCK
        if first + len(crcs) > len(h.table):  # the write made the object longer
            h.table.extend(checksums.zero_table(first + len(crcs) - len(h.table)))
        h.table[first:first + len(crcs)] = crcs

    def _write_inline(self, oid: int, h: _Handle, offset: int, data: bytes | bytearray | memoryview) -> bool:
        """Write a small piece on the event loop, without a thread hop, when
        nothing in it can wait for the disk; False (nothing written) when it
        must go through a worker thread after all.

        A thread hop costs ~140 us here, a 4 KiB pwrite into the page cache
        10-35 us. The pwrite cannot be issued NOWAIT on ext4, but it only
        waits on dirty-page throttling; the read-around is NOWAIT, and the
        DIRTY mark (an fsync) always goes to a thread. A write that took
        longer than INLINE_GUARD all the same turns inline writes off for
        INLINE_BACKOFF, so a throttled disk stalls the loop once, not on
        every write. Runs with no await: atomic for the other tasks, so it
        needs no handle lock, only that no locked write is under way."""
        if h.lock.locked() or not self._nowait or (self.checksums and h.clean_on_disk):
            return False
        now = time.monotonic()
        if now < self._inline_paused_until:
            return False
        sleeps = voluntary_switches()
        h.writes += 1  # a read that overlaps us must not verify
        try:
            if self.checksums:
                self._take_crcs(h, offset, files.write_block_crcs(
                    h.fd, offset, data, h.table, None, nowait=True, zero_crc_is_zeros=self.zero_crc_is_zeros,
                    pieces=self._pieces_of(h)))
            else:
                files.pwrite_full(h.fd, offset, data)
        except files.NotCached:
            return False
        except files.NoWaitUnsupported:  # raised by the read-around, before anything was written
            self._nowait = False  # this file system cannot: always use threads
            return False
        except ChecksumError:
            raise
        except BaseException:
            self._forget(oid)  # the table may be behind the data: rebuild it on the next open
            raise
        self.inline_writes += 1
        took = time.monotonic() - now
        # Slow because it slept (dirty-page throttling), not because the CPU
        # was given to another process meanwhile (a busy machine): only then
        # is the disk to blame, and only then do writes go to threads.
        if took > INLINE_GUARD and voluntary_switches() != sleeps:
            self._inline_paused_until = time.monotonic() + INLINE_BACKOFF
            log.info("store %s: a small write waited %.1f ms on the event loop: through worker threads "
                     "for %.0f s", self.root, took * 1e3, INLINE_BACKOFF)
        return True

    def _create(self, oid: int, offset: int, data: bytes | bytearray | memoryview, size: int,
                exclusive: bool, direct: bool) -> tuple[int, bool, checksums.Table, checksums.Pieces | None]:
        """(fd, made_dir, table, pieces): `pieces` only for a direct create
        of an object of whole blocks (its bytes leave no page cache to read
        around later), made here, off the event loop."""
        path = self.path(oid)
        made_dir = False
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else 0)
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            made_dir = True
            fd = os.open(path, flags, 0o600)
        table = checksums.zero_table(0)
        pieces = None
        try:
            if self.checksums:
                # The new table, marked DIRTY, before any byte changes: a crash
                # anywhere below leaves a table that is rebuilt, never trusted.
                start, end = checksums.covering(offset, len(data))
                whole = start == offset and end == offset + len(data) <= size
                if whole:  # whole blocks: no copy
                    crcs = checksums.crcs_of(data)
                else:
                    region = bytearray(end - start)
                    region[offset - start:offset - start + len(data)] = data
                    crcs = checksums.crcs_of(memoryview(region)[:max(0, min(end, size) - start)])
                table = checksums.zero_table(checksums.blocks_of(size))
                table[start // BLOCK:start // BLOCK + len(crcs)] = crcs
                os.setxattr(fd, XATTR, checksums.encode(table, DIRTY))
                if direct and size % BLOCK == 0:  # (`direct`: large and aligned, see `_direct`)
                    pieces = checksums.Pieces.of_zeros(len(table))
                    pieces.learn(start // BLOCK, data if whole else region)
            os.ftruncate(fd, 0)
            os.ftruncate(fd, size)
            files.pwrite_full(fd, offset, data, direct)
        except BaseException:
            os.close(fd)
            raise
        return fd, made_dir, table, pieces

    async def create(self, oid: int, offset: int, data: bytes | bytearray | memoryview, size: int,
                     exclusive: bool = False, cache: bool = True) -> None:
        """Create or replace an object: `size` bytes, zero except `data` at `offset`.

        `exclusive`: fail with ObjectExists instead of replacing (shared VDIs,
        where another mount may have created it a moment ago). `cache`: as in `write`."""
        self._admit_data(oid, len(data))
        old = self._handles.get(oid)
        if old is not None:
            old.refs += 1
        try:
            async with old.lock if old is not None else contextlib.nullcontext():
                if old is not None:
                    old.writes += 1
                    old.inflight += 1  # reads meanwhile cannot be verified
                try:
                    fd, made_dir, table, pieces = await self._io.run(self._create, oid, offset, data, size,
                                                                   exclusive, self._direct(offset, data, cache))
                except FileExistsError:
                    raise ObjectExists(f"object {oid:016x} exists") from None
                except OSError as e:
                    if old is not None:
                        self._forget(oid)  # half replaced: rebuild the table on the next open
                    raise files.os_error(e, f"creating object {oid:016x}") from None
                finally:
                    if old is not None:
                        old.inflight -= 1
                if made_dir:
                    self._dirty_dirs.add(self.obj_root)
                self._dirty_dirs.add(os.path.dirname(self.path(oid)))
                # Creating keeps the inode at the path (no O_TRUNC), so a cached
                # handle of that inode stays the one handle (one lock, one table).
                # One of another inode (moved away meanwhile) is dropped.
                h = self._handles.get(oid)
                if h is not None and not h.doomed and files.same_file(h.fd, fd):
                    os.close(fd)
                    h.table, h.clean_on_disk = table, False
                    self._drop_pieces(h)
                else:
                    self._forget(oid)
                    h = self._handles[oid] = _Handle(fd, table, False)
                    self._evict()
                if pieces is not None and not h.doomed:
                    self._keep_pieces(h, pieces)
        finally:
            if old is not None:
                self._release(old)

    def _install(self, oid: int, data: bytes | bytearray) -> tuple[int, checksums.Table]:
        path = self.path(oid)
        part = path + PART
        made_dir = not os.path.isdir(os.path.dirname(path))
        if made_dir:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            files.pwrite_full(fd, 0, data)
            table = checksums.table_of(data, len(data)) if self.checksums else checksums.zero_table(0)
            if self.checksums:
                os.setxattr(fd, XATTR, checksums.encode(table, CLEAN))
            os.fsync(fd)  # data and table durable before the name points at them
            os.rename(part, path)
            fsync_dir(os.path.dirname(path))
            if made_dir:
                fsync_dir(self.obj_root)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(part)
            raise
        return fd, table

    async def install(self, oid: int, data: bytes | bytearray) -> None:
        """Put a whole, verified copy of an object in place, durably and
        atomically (recovery, repair): written and fsynced under a temporary
        name, then renamed over the path. A crash leaves the old state or the
        new one, never a half-written replica that would pass for whole."""
        try:
            async with self._moving_files([oid]):
                fd, table = await self._io.run(self._install, oid, data)
        except OSError as e:
            raise files.os_error(e, f"installing object {oid:016x}") from None
        self._forget(oid)
        self._handles[oid] = _Handle(fd, table, self.checksums)
        self._evict()

    async def delete(self, oid: int) -> None:
        """Remove an object; deleting a missing object is not an error. Like a
        rename, the unlink runs inside `_moving_files`: an open that overlaps
        it is redone afterwards, so no handle to the unlinked file is cached
        (reads of it would be served, writes to it lost)."""
        path = self.path(oid)
        async with self._moving_files([oid]):
            try:
                if not await self._io.run(self._unlink_all_copies, oid):
                    return
            except OSError as e:
                raise files.os_error(e, f"deleting object {oid:016x}") from None
        self._dirty_dirs.add(os.path.dirname(path))

    async def collect(self, oid: int, older_than: float) -> bool:
        """Delete a leaked object (one no map points at, says the caller)
        unless it changed within the last `older_than` seconds; True if it
        was deleted. Its vid's folder goes too once empty (a stray vid).

        A writer that starts using such an object creates it first (a map
        gains an entry only after its object was written), which makes it
        young. The age is checked under the cached handle's lock, if there
        is one: a create waiting for it runs after the unlink, opens the
        path anew and makes a new file, so no acknowledged write lands in
        the unlinked one."""
        h = self._handles.get(oid)
        if h is not None:
            h.refs += 1
        try:
            async with h.lock if h is not None else contextlib.nullcontext(), self._moving_files([oid]):
                try:
                    gone, dir_left = await self._io.run(self._unlink_if_old, oid, older_than)
                except OSError as e:
                    raise files.os_error(e, f"deleting object {oid:016x}") from None
        finally:
            if h is not None:
                self._release(h)
        if gone:
            self._dirty_dirs.add(os.path.dirname(self.path(oid)) if dir_left else self.obj_root)
        return gone

    def _unlink_if_old(self, oid: int, older_than: float) -> tuple[bool, bool]:
        """(deleted, its vid's folder still there): `collect`'s blocking part."""
        path = self.path(oid)
        try:
            if time.time() - os.stat(path).st_mtime < older_than:
                return False, True
        except FileNotFoundError:
            return False, True
        gone = self._unlink_all_copies(oid)
        try:
            os.rmdir(os.path.dirname(path))
        except OSError:  # not empty: others are still there
            return gone, True
        return gone, False

    def _unlink_all_copies(self, oid: int) -> bool:
        """Unlink our set-aside copies of an object (stale, handed off), then
        the one we serve: True if we served one. Set-aside copies first, so
        a `take_stale` racing with a delete ends with no copy either way:
        it finds none, or renames one into place before it is unlinked."""
        for root in (self.stale_root, self.handoff_root):
            for copy in self._copies(root, oid):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(copy)
        try:
            os.unlink(self.path(oid))
        except FileNotFoundError:
            return False
        return True

    def _remove_vid_handoff(self, vid: int) -> None:
        for e in self._labels(self.handoff_root):
            shutil.rmtree(os.path.join(self.handoff_root, e, f"{vid:06x}"), ignore_errors=True)

    async def remove_vid_dir(self, vid: int) -> None:
        """The last step of purging a deleted VDI: its (empty) directory, and any
        copies of its objects handed off to other peers earlier."""
        await self._io.run(self._remove_vid_handoff, vid)
        try:
            await trio.to_thread.run_sync(os.rmdir, self.vid_dir(vid))
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.ENOTEMPTY:
                raise files.os_error(e, f"removing directory of vid {vid}") from None
            return
        self._dirty_dirs.discard(self.vid_dir(vid))
        self._dirty_dirs.add(self.obj_root)

    async def _mark_clean(self, h: _Handle, writes: int) -> None:
        """After a sync: the stored table matches durable data, unless a write
        came in since the sync started (then the next sync marks it)."""
        if not self.checksums or h.clean_on_disk or h.writes != writes or h.inflight:
            return
        async with h.lock:
            if h.writes != writes or h.inflight or h.doomed:
                return
            await self._io.run(os.setxattr, h.fd, XATTR, checksums.encode(h.table, CLEAN))
            h.clean_on_disk = True

    async def sync_dirty(self, *, settled_only: bool = False) -> int:
        """Store CLEAN the table of every open object whose stored table is
        DIRTY, syncing those written since their last sync first, so their
        checksums are trusted after a crash too. Returns how many.

        Only this marks tables CLEAN, not every `sync`: a CLEAN table makes
        the next write to the object mark it DIRTY and fsync that first, and
        a guest that flushes every few writes would pay that fsync on nearly
        every write (design change 22). `settled_only` (the periodic pass):
        only objects not written since the pass before, for the same reason
        at a larger scale: a VM writing all over a large disk would
        otherwise pay that fsync once per object and pass, up to one per
        open object (8,192) every 30 s (design change 58)."""
        if not self.checksums:
            return 0
        dirty = [(oid, h) for oid, h in self._handles.items() if not h.clean_on_disk and not h.doomed]
        if settled_only:
            settled = [(oid, h) for oid, h in dirty if h.passed_writes == h.writes]
            for _, h in dirty:
                h.passed_writes = h.writes
            dirty = settled
        unsynced = [oid for oid, h in dirty if h.synced_writes != h.writes or h.inflight]
        if unsynced:
            await self.sync(unsynced)
        for _, h in dirty:
            # A handle dropped during the sync (a delete, a move) may have had
            # its descriptor closed already: taking a reference now would
            # close it a second time, maybe someone else's by then.
            if h.synced_writes == h.writes and not h.doomed:
                h.refs += 1
                try:
                    await self._mark_clean(h, h.writes)
                finally:
                    self._release(h)
        return len(dirty)

    async def sync_clean(self, oids: Iterable[int]) -> list[int]:
        """`sync` the objects, then store their tables CLEAN (trusted after a
        crash); returns those that are now clean (not one whose descriptor
        is no longer cached, or that was written meanwhile)."""
        oids = list(oids)
        await self.sync(oids)
        clean = []
        for oid in oids:
            h = self._handles.get(oid)
            if h is None or h.doomed or h.synced_writes != h.writes:
                continue
            h.refs += 1
            try:
                await self._mark_clean(h, h.writes)
            finally:
                self._release(h)
            if h.clean_on_disk:
                clean.append(oid)
        return clean

    async def close_cleanly(self) -> None:
        """At an orderly stop: `sync_dirty`, so the next start trusts every
        table (a failure only leaves tables to rebuild: logged, not raised)."""
        try:
            await self.sync_dirty()
        except (PoolError, NoSpace) as e:
            log.warning("store %s: could not store checksum tables clean at stop: %s", self.root, e)

    async def keep_checksums_durable(self, interval: float = 30.0) -> None:
        """Run by the store's owner: `sync_dirty` of the objects left alone
        for an interval, every `interval` seconds, so a crash leaves few
        tables to rebuild from (unverified) data: those of objects written
        in the last two or three intervals."""
        while True:
            await trio.sleep(interval)
            try:
                await self.sync_dirty(settled_only=True)
            except (PoolError, NoSpace) as e:
                log.warning("store %s: syncing written objects failed: %s", self.root, e)

    def _sync_one(self, fd_or_path: int | str) -> None:
        if isinstance(fd_or_path, int):
            os.fdatasync(fd_or_path)
            return
        try:
            fd = os.open(fd_or_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # deleted since it was written: nothing to make durable
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    async def sync(self, oids: Iterable[int]) -> None:
        """Make the objects' data and all pending directory changes durable:
        one syncfs, or one thread hop whose fdatasyncs run side by side on
        the store's sync threads (design change 48)."""
        oids = list(oids)
        if len(oids) >= SYNCFS_MIN and await self._sync_file_system(oids):
            return
        dirs, self._dirty_dirs = self._dirty_dirs, set()
        held: list[tuple[int, _Handle | None, int | None]] = []
        for oid in oids:
            h = self._handles.get(oid)
            if h is not None:
                h.refs += 1  # its descriptor stays open until we are done
            # A write still in flight now may land after the sync: then it covers less.
            held.append((oid, h, h.writes if h is not None and not h.inflight else None))
        if self._syncers is None and max(len(oids), len(dirs)) > 1:
            self._syncers = ThreadPoolExecutor(SYNC_PARALLELISM, thread_name_prefix="vdifs-sync")
        try:
            file_errors, dir_errors = await trio.to_thread.run_sync(
                self._sync_blocking, [h.fd if h is not None else self.path(oid) for oid, h, _ in held],
                sorted(dirs, key=len, reverse=True))
        finally:
            for _, h, _ in held:
                if h is not None:
                    self._release(h)
        failed: list[Exception] = []
        for (oid, h, covered), error in zip(held, file_errors):
            if error is not None:
                failed.append(files.os_error(error, f"syncing object {oid:016x}"))
            elif h is not None and covered is not None:
                h.synced_writes = max(h.synced_writes, covered)  # CLEAN later: sync_dirty
        failed += [files.os_error(e, f"syncing directory {d}") for d, e in dir_errors]
        if failed:
            self._dirty_dirs |= dirs
            raise failed[0]

    def _sync_blocking(self, targets: list[int | str], dirs: list[str]
                       ) -> tuple[list[OSError | None], list[tuple[str, OSError]]]:
        """`sync`'s blocking part: the objects side by side (concurrent
        fdatasyncs share the disk's cache flushes), then the directories:
        a name never outlives its data. The errors, in order."""
        file_errors = self._side_by_side(self._sync_one, targets)
        dir_errors = [(d, e) for d, e in zip(dirs, self._side_by_side(fsync_dir, dirs))
                      if e is not None and not isinstance(e, FileNotFoundError)]
        return file_errors, dir_errors

    def _side_by_side(self, fn: Callable[[Any], None], items: list[Any]) -> list[OSError | None]:
        def attempt(item: Any) -> OSError | None:
            try:
                fn(item)
            except OSError as e:
                return e
            return None

        syncers = self._syncers
        if len(items) > 1 and syncers is not None:
            try:
                return list(syncers.map(attempt, items))
            except RuntimeError:  # shut down by `close` meanwhile: one by one, here
                pass
        return [attempt(item) for item in items]

    async def _sync_file_system(self, oids: list[int]) -> bool:
        """`sync` as one syncfs of the store's file system; False (nothing
        done) when the machine has more than SYNCFS_DIRTY_MAX to write back,
        or the syncfs failed (each object's own fdatasync then says which).

        A guest that flushes every few writes has written to as many objects
        as writes: one syncfs instead of as many fdatasyncs is one journal
        commit and one cache flush, in one thread hop (design change 48:
        the hops, not the disk, were most of a flush's time). A syncfs
        writes back the whole file system, so it is
        taken only while what else there is to write is small: a stream
        into another VDI never makes this flush wait for its writeback."""
        covered = [(h, h.writes) for h in map(self._handles.get, oids) if h is not None and not h.inflight]
        dirs, self._dirty_dirs = self._dirty_dirs, set()
        if not await trio.to_thread.run_sync(self._syncfs_if_cheap):
            self._dirty_dirs |= dirs
            return False
        self.whole_fs_syncs += 1
        for h, writes in covered:
            h.synced_writes = max(h.synced_writes, writes)  # CLEAN later: sync_dirty
        return True

    def _syncfs_if_cheap(self) -> bool:
        if machine_dirty_bytes() > SYNCFS_DIRTY_MAX:
            return False
        try:
            syncfs(self.obj_root)
        except OSError as e:
            log.warning("store %s: syncfs failed (%s): syncing object by object", self.root, e)
            return False
        return True

    # -- listing and space -----------------------------------------------------

    def _list_vids(self) -> list[int]:
        out = []
        for name in os.listdir(self.obj_root):
            try:
                out.append(int(name, 16))
            except ValueError:
                continue
        return sorted(out)

    async def list_vids(self) -> list[int]:
        return await trio.to_thread.run_sync(self._list_vids)

    def _list_objects(self, vid: int, kind: int | None) -> list[int]:
        try:
            names = os.listdir(self.vid_dir(vid))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            if len(name) != 16:
                continue
            try:
                oid = int(name, 16)
            except ValueError:
                continue
            if kind is None or unpack_oid(oid)[0] == kind:
                out.append(oid)
        return sorted(out)

    async def list_objects(self, vid: int, kind: int | None = None) -> list[int]:
        return await trio.to_thread.run_sync(self._list_objects, vid, kind)

    async def list_objects_of(self, vids: list[int], kind: int | None = None, *,
                              handoff: bool = False) -> list[int]:
        """The objects of many vids (and, with `handoff`, their handed-off
        copies), sorted: one thread hop for all of them, not one per vid (a
        recovery pass asks for every live VDI at once)."""
        found = set(await trio.to_thread.run_sync(
            lambda: [oid for vid in vids for oid in self._list_objects(vid, kind)]))
        if handoff:  # in the I/O queue, ordered with the moves that hand objects off
            found.update(await self._io.run(
                lambda: [oid for vid in vids for oid in self._list_tree(self.handoff_root, vid)]))
        return sorted(found)

    async def space(self) -> tuple[int, int]:
        """(total, available) bytes of the file system holding the store,
        available being what VDI data may still take (the reserve left out)."""
        st = await trio.to_thread.run_sync(os.statvfs, self.root)
        reserve = self.reserve.reserve if self.reserve is not None else 0
        return st.f_blocks * st.f_frsize, max(0, st.f_bavail * st.f_frsize - reserve)

    def cached_objects(self) -> frozenset[int]:
        """Ids of the objects whose file descriptors are cached now."""
        return frozenset(self._handles)

    def io_stats(self) -> dict[str, int]:
        return {"nowait_reads": self.nowait_reads, "inline_writes": self.inline_writes,
                "checksum_errors": self.checksum_errors, "direct_writes": self.direct_writes,
                "whole_fs_syncs": self.whole_fs_syncs,
                "thread_calls": self._io.calls,
                "thread_hops": self._io.hops, "open_files": len(self._handles), "opens": self.opens}

    # -- objects out of service: rotten, handed off, stale --------------------------
    #
    # Each lives in a tree STORE/<kind>/<label>/<vid>/<oid> (label: a time, an
    # epoch, a label of the return); the newest label is the newest copy.

    @property
    def corrupt_root(self) -> str:
        return os.path.join(self.root, "corrupt")

    @property
    def handoff_root(self) -> str:
        return os.path.join(self.root, "handoff")

    @property
    def stale_root(self) -> str:
        return os.path.join(self.root, "stale")

    def _rel(self, oid: int) -> str:
        return os.path.relpath(self.path(oid), self.obj_root)

    def _move_out(self, oids: list[int], tree: str) -> None:
        dirs: set[str] = set()
        for oid in oids:
            dest = os.path.join(tree, self._rel(oid))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            try:
                os.rename(self.path(oid), dest)
            except FileNotFoundError:
                continue  # deleted meanwhile
            dirs.update((os.path.dirname(dest), os.path.dirname(self.path(oid))))
        for d in dirs:
            fsync_dir(d)

    async def _take_out(self, oids: list[int], tree: str) -> None:
        async with self._moving_files(oids):
            await self._io.run(self._move_out, oids, tree)

    def _labels(self, root: str) -> list[str]:
        try:
            return sorted(os.listdir(root), reverse=True)  # newest first
        except FileNotFoundError:
            return []

    def _copies(self, root: str, oid: int) -> list[str]:
        """Paths of the copies of `oid` under `root`, newest first."""
        found = (os.path.join(root, label, self._rel(oid)) for label in self._labels(root))
        return [p for p in found if os.path.exists(p)]

    def _list_tree(self, root: str, vid: int) -> list[int]:
        out: set[int] = set()
        for label in self._labels(root):
            try:
                out.update(int(n, 16) for n in os.listdir(os.path.join(root, label, f"{vid:06x}")) if len(n) == 16)
            except FileNotFoundError:
                continue
        return sorted(out)

    async def set_aside(self, oid: int) -> str:
        """Move a replica that failed its checksums to STORE/corrupt (kept for
        inspection, never served); the object then counts as missing here."""
        tree = os.path.join(self.corrupt_root, str(time.time_ns()))
        await self._take_out([oid], tree)
        return os.path.join(tree, self._rel(oid))

    async def hand_off(self, oids: list[int], epoch: int) -> None:
        """Stop serving objects that placement gave to other peers at `epoch`,
        but keep them (STORE/handoff/<epoch>) as a source for those peers until
        the whole cluster has recovered that epoch. A copy left in place could
        be served again, stale, when placement hands the object back later."""
        await self._take_out(oids, os.path.join(self.handoff_root, f"{epoch:012d}"))

    def _read_handoff(self, oid: int, younger_than: float | None) -> bytes | bytearray | None:
        for path in self._copies(self.handoff_root, oid):
            try:
                fd, table, clean = files.open_object(path)
            except FileNotFoundError:
                continue
            try:
                if younger_than is not None and time.time() - os.fstat(fd).st_mtime > younger_than:
                    continue
                data = files.pread_all(fd)
            finally:
                os.close(fd)
            if self.checksums and clean and checksums.first_mismatch(table, 0, data) is not None:
                continue  # rotten: not a source
            return data
        return None

    async def read_handoff(self, oid: int, younger_than: float | None = None) -> bytes | bytearray:
        """The newest handed-off copy of an object (verified), for recovery;
        only one changed within `younger_than` seconds if that is given."""
        data = await self._io.run(self._read_handoff, oid, younger_than)
        if data is None:
            raise ObjectNotFound(f"object {oid:016x}: no handed-off copy here")
        return data

    async def drop_handoff(self, upto_epoch: int) -> int:
        """Delete the copies handed off at epochs <= `upto_epoch`; how many dirs."""
        gone = [e for e in self._labels(self.handoff_root) if int(e) <= upto_epoch]
        for e in gone:
            await trio.to_thread.run_sync(shutil.rmtree, os.path.join(self.handoff_root, e))
        return len(gone)

    def _quarantine(self, label: str) -> str:
        os.makedirs(self.stale_root, exist_ok=True)
        dest = os.path.join(self.stale_root, label)
        os.rename(self.obj_root, dest)
        os.makedirs(self.obj_root)
        fsync_dir(self.stale_root)
        fsync_dir(self.root)
        return dest

    async def quarantine(self, label: str) -> str:
        """Move every object aside: it may be stale (writes went around us)."""
        self._dirty_dirs.clear()
        async with self._moving_files(None):
            return await self._io.run(self._quarantine, label)

    async def set_aside_stale(self, oids: list[int], label: str) -> None:
        """Move just these objects aside as stale (delta resync: they changed
        elsewhere while this peer was away)."""
        await self._take_out(oids, os.path.join(self.stale_root, label))

    def _take_stale(self, oid: int) -> bool:
        copies = self._copies(self.stale_root, oid)
        if not copies:
            return False
        os.makedirs(os.path.dirname(self.path(oid)), exist_ok=True)
        try:
            os.rename(copies[0], self.path(oid))
        except FileNotFoundError:
            return False  # a delete of the object unlinked it meanwhile
        return True

    async def take_stale(self, oid: int) -> bool:
        """Put our own old copy back (the last resort when no other peer has it)."""
        async with self._moving_files([oid]):
            taken = await self._io.run(self._take_stale, oid)
        if taken:
            self._dirty_dirs.add(os.path.dirname(self.path(oid)))
        return taken

    async def stale_of(self, vids: list[int]) -> dict[int, list[int]]:
        """`list_stale` of many vids in one trip through the I/O queue."""
        return await self._io.run(lambda: {vid: self._list_tree(self.stale_root, vid) for vid in vids})

    async def list_stale(self, vid: int) -> list[int]:
        return await self._io.run(self._list_tree, self.stale_root, vid)

    async def drop_stale(self) -> None:
        if os.path.isdir(self.stale_root):
            await trio.to_thread.run_sync(shutil.rmtree, self.stale_root)

    def close(self) -> None:
        for oid in list(self._handles):
            self._forget(oid)
        if self._syncers is not None:
            self._syncers.shutdown()
            self._syncers = None
