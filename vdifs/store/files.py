"""Blocking helpers on open object files, run in worker threads (or, where
they never wait, on the event loop). Short reads and writes are completed
here so callers see whole buffers."""

from __future__ import annotations

import errno
import mmap
import os
import threading

from vdifs.errors import ChecksumError, NoSpace, PoolError
from vdifs.store import checksums
from vdifs.store.checksums import BLOCK, CLEAN, XATTR


#: Writes of at least this many bytes, aligned to `DIRECT_ALIGN`, may go past
#: the page cache (O_DIRECT): a buffered write of new data costs the kernel a
#: fresh page-cache page per 4 KiB (allocation, charge, copy, writeback),
#: 1.5-2 ms of CPU per MiB on the machine measured against 0.15 ms direct.
DIRECT_MIN = 256 << 10
DIRECT_ALIGN = 4096


class _AlignedBuffer(threading.local):
    """Per worker thread, one page-aligned buffer that direct writes copy
    through (received data lies anywhere in memory; O_DIRECT needs aligned
    memory). Kept, so its pages stay mapped."""
    buf: mmap.mmap | None = None

    def get(self, n: int) -> mmap.mmap:
        if self.buf is None or len(self.buf) < n:
            self.buf = mmap.mmap(-1, max(n, 1 << 20))
        return self.buf


_aligned = _AlignedBuffer()


def direct_works(folder: str) -> bool:
    """Whether files in `folder` take O_DIRECT writes (tmpfs before Linux 6.6
    refuses the open, some file systems the transfer)."""
    probe = os.path.join(folder, ".direct-probe")
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    dfd = _open_direct(fd)
    try:
        if dfd is None:
            return False
        os.ftruncate(fd, DIRECT_ALIGN)
        _pwrite_direct(dfd, fd, 0, b"\xa5" * DIRECT_ALIGN)
        return os.pread(fd, DIRECT_ALIGN, 0) == b"\xa5" * DIRECT_ALIGN
    except OSError:
        return False
    finally:
        if dfd is not None:
            os.close(dfd)
        os.close(fd)
        os.unlink(probe)


def direct_ok(offset: int, length: int) -> bool:
    return length >= DIRECT_MIN and not (offset | length) % DIRECT_ALIGN


def _open_direct(fd: int) -> int | None:
    """Another descriptor of fd's inode, for writing with O_DIRECT (its own
    file status flags: reads through fd stay cached); None where it cannot
    be had (no /proc, a file system that refuses O_DIRECT)."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return None


def _pwrite_direct(dfd: int, fd: int, offset: int, data: bytes | bytearray | memoryview) -> None:
    """Write aligned `data` at `offset` through dfd, fd's O_DIRECT twin."""
    n = len(data)
    view = memoryview(_aligned.get(n))
    try:
        view[:n] = data
        done = 0
        while done < n:
            if done % DIRECT_ALIGN:  # a short write left the rest unaligned: finish it cached
                pwrite_full(fd, offset + done, view[done:n])
                return
            done += os.pwrite(dfd, view[done:n], offset + done)
    finally:
        view.release()


def pread_full(fd: int, offset: int, length: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) < length:  # sparse tail or short file: the rest reads as zeros
        more = [data]
        got = len(data)
        while got < length:
            chunk = os.pread(fd, length - got, offset + got)
            if not chunk:
                more.append(bytes(length - got))
                break
            more.append(chunk)
            got += len(chunk)
        data = b"".join(more)
    return data


def data_ranges(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The parts of [start, end) that hold data, from the file system's map
    (SEEK_DATA, SEEK_HOLE): the rest are holes, or past the end, and read as
    zeros. Written pages not yet allocated count as data (ext4, XFS and
    btrfs look at the page cache); a file system that keeps no map reports
    the whole file as data."""
    ranges: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        try:
            pos = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data from here to the end
                break
            raise
        if pos >= end:
            break
        hole = os.lseek(fd, pos, os.SEEK_HOLE)
        ranges.append((pos, min(hole, end)))
        pos = hole
    return ranges


#: Reads of at least this many bytes ask the file system where the holes are
#: first (two lseeks, a few us): a read of a hole, even NOWAIT, makes the
#: kernel allocate and clear page-cache pages for it.
SPARSE_MIN = 64 << 10


def pread_sparse(fd: int, offset: int, length: int, *, nowait: bool = False,
                 ranges: list[tuple[int, int]] | None = None) -> bytearray | None:
    """`length` bytes at `offset`, reading only the file's data: holes come
    back as zeros without the kernel filling page-cache pages with zeros for
    them. Reading a hole is not free: every page is allocated and cleared,
    which on a VM whose free memory goes back to the host costs as much as
    writing new data (a first read of a thinly written VDI ran at 160 MB/s,
    70% of the machine in the kernel's memset), and the zeros then take the
    page cache from data. `nowait`: from the page cache only, None if a data
    page is not there (NoWaitUnsupported where the file system cannot
    tell). `ranges`: `data_ranges` of the read, if known."""
    buf = bytearray(length)
    view = memoryview(buf)
    for a, b in data_ranges(fd, offset, offset + length) if ranges is None else ranges:
        if nowait:
            if _preadv_nowait(fd, view[a - offset:b - offset], a) != b - a:
                return None
            continue
        while a < b:
            n = os.preadv(fd, [view[a - offset:b - offset]], a)
            if n == 0:  # the file got shorter meanwhile: the rest reads as zeros
                break
            a += n
    return buf


def pread_all(fd: int) -> bytearray:  # whole objects, for copies and table rebuilds
    data = pread_sparse(fd, 0, os.fstat(fd).st_size)
    assert data is not None  # never None without nowait
    return data


#: The most one pwrite writes. One large write makes the page cache hold
#: the range as one large folio (kernels from 6.x on ext4), and every later
#: small write into it then walks all of the folio's block heads: a 4 KiB
#: overwrite cost 6.6 us in an object written whole, 1.8 us in one written
#: in 64 KiB pieces, and writing it whole was no faster (bench: docs/benchmarks.md).
WRITE_PIECE = 64 << 10


def pwrite_full(fd: int, offset: int, data: bytes | bytearray | memoryview, direct: bool = False) -> None:
    """Write all of `data` at `offset`; `direct`: past the page cache if it is
    large and aligned enough (`direct_ok`)."""
    if direct and direct_ok(offset, len(data)):
        dfd = _open_direct(fd)
        if dfd is not None:
            try:
                _pwrite_direct(dfd, fd, offset, data)
            finally:
                os.close(dfd)
            return
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view[:WRITE_PIECE], offset)
        view = view[n:]
        offset += n


class NoWaitUnsupported(Exception):
    """The file system cannot read NOWAIT (tmpfs, for one): use threads."""


def _preadv_nowait(fd: int, buf: bytearray | memoryview, offset: int) -> int | None:
    """Bytes read into `buf` from the page cache, None if a page is not
    there; never blocks. NoWaitUnsupported where the file system cannot tell."""
    try:
        return os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return None
    except OSError as e:
        if e.errno == errno.EOPNOTSUPP:
            raise NoWaitUnsupported() from None
        raise


def read_nowait(fd: int, offset: int, length: int) -> bytearray | None:
    """The bytes if the page cache has all of them, else None; never blocks.
    NoWaitUnsupported where the file system cannot tell."""
    buf = bytearray(length)
    return buf if _preadv_nowait(fd, buf, offset) == length else None


def load_table(fd: int) -> tuple[checksums.Table, bool]:
    """(table, clean_on_disk) of an open object. A missing, unreadable or DIRTY
    table is rebuilt from the data (see `checksums`)."""
    size = os.fstat(fd).st_size
    try:
        table, state = checksums.decode(os.getxattr(fd, XATTR), checksums.blocks_of(size))
        if state == CLEAN:
            return table, True
    except (OSError, checksums.BadTable):
        pass
    return checksums.table_of(pread_all(fd), size), False


def open_object(path: str) -> tuple[int, checksums.Table, bool]:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        table, clean = load_table(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd, table, clean


class NotCached(Exception):
    """A block a write must read around is not in the page cache."""


def write_block_crcs(fd: int, offset: int, data: bytes | bytearray | memoryview,
                     table: checksums.Table, mark_dirty: bytes | None, *, nowait: bool = False,
                     direct: bool = False, zero_crc_is_zeros: bool = False,
                     pieces: checksums.Pieces | None = None) -> checksums.Table:
    """Write `data` and return the CRCs of the blocks it touched. The old
    contents of partly written blocks are verified first: a write must not
    bless rotten bytes around it with a fresh checksum.

    `nowait`: read around only from the page cache, raising NotCached
    (before anything is written) when a block is not there.
    `zero_crc_is_zeros`: a block whose checksum is that of zeros is taken
    to hold zeros without reading it (a hole is never in the page cache, so
    a small write into one would need a thread). One CRC-32 in 2^32 of
    other bytes matches too; then the block's new checksum is wrong and
    its next read fails. Only for copies that have another source (the
    mount's cache), never for replicas.
    `pieces`: the object's known piece CRCs (`checksums.Pieces`). A write of
    whole pieces into known blocks reads nothing around it; the blocks a
    read-around or a direct write brought whole are learnt."""
    start, end = checksums.covering(offset, len(data))
    head, tail = offset - start, offset + len(data)
    if pieces is not None and (head or tail < end):
        crcs = pieces.write(offset, data)
        if crcs is not None:
            _mark_dirty(fd, mark_dirty)
            pwrite_full(fd, offset, data, direct)
            return crcs
    buf: bytes | bytearray | memoryview = data  # whole blocks: their CRCs are the data's
    if head or tail < end:
        buf = bytearray(end - start)
        for b0, b1 in {(start, start + BLOCK), (end - BLOCK, end)}:
            if (b0 < offset) or (b1 > tail):
                if zero_crc_is_zeros and b0 // BLOCK < len(table) and table[b0 // BLOCK] == checksums.ZERO_CRC:
                    buf[b0 - start:b1 - start] = bytes(BLOCK)
                    continue
                if nowait:
                    cached = read_nowait(fd, b0, BLOCK)
                    if cached is None:
                        raise NotCached()
                    old: bytes | bytearray = cached
                else:
                    old = pread_full(fd, b0, BLOCK)
                bad = checksums.first_mismatch(table, b0 // BLOCK, old)
                if bad is not None:
                    raise ChecksumError(f"block {bad} does not match its checksum")
                buf[b0 - start:b1 - start] = old
        buf[head:head + len(data)] = data
    if pieces is not None:
        if buf is not data or direct:
            pieces.learn(start // BLOCK, buf)
        else:  # a cached whole-block write is cheap to read around later: not worth its piece CRCs
            pieces.forget(start // BLOCK, len(buf) // BLOCK)
    _mark_dirty(fd, mark_dirty)  # only after the checks: a DIRTY table is rebuilt from the data
    pwrite_full(fd, offset, data, direct)
    return checksums.crcs_of(buf)


def _mark_dirty(fd: int, mark: bytes | None) -> None:
    if mark is not None:
        os.setxattr(fd, XATTR, mark)
        # Durable before the data changes: the file system may write an
        # overwritten block back before it commits the xattr, and a power
        # loss between the two would leave a CLEAN table that no longer
        # matches (false corruption). The file has no other dirty data (its
        # table was CLEAN), so this is one journal commit per object per sync.
        os.fsync(fd)


def same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)  # metadata of open files: never waits for the disk
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def os_error(e: OSError, what: str) -> Exception:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"store is full while {what}")
    return PoolError(f"{what}: {e.strerror}")


