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
the disk pay for a thread. Open file
descriptors are cached; the cache is only touched from the trio thread, and
a descriptor is closed only when no operation is using it (reference count),
so a worker thread never sees its fd closed or reused under it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from collections import OrderedDict
from collections.abc import Iterable
from typing import IO

import trio

from vdifs.errors import NoSpace, ObjectExists, ObjectNotFound, PoolError, StoreBusy
from vdifs.meta.atomic import fsync_dir
from vdifs.model.ids import unpack_oid
from vdifs.peer.batch import BatchRunner

MAX_OPEN_FILES = 512
SYNC_PARALLELISM = 8


def lock_store(store: str) -> IO[str]:
    """Take the store's lock for this process, or say who holds it."""
    os.makedirs(store, mode=0o700, exist_ok=True)
    f = open(os.path.join(store, "lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise StoreBusy(f"store {store} is in use by another vdifs process (pid {holder})") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


class _Handle:
    __slots__ = ("fd", "refs", "doomed")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.refs = 0
        self.doomed = False


def _pread_full(fd: int, offset: int, length: int) -> bytes:
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


def _pwrite_full(fd: int, offset: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _read_nowait(fd: int, offset: int, length: int) -> bytearray | None:
    """The bytes if the page cache has all of them, else None; never blocks."""
    buf = bytearray(length)
    try:
        n = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return None
    return buf if n == length else None


def _os_error(e: OSError, what: str) -> Exception:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"store is full while {what}")
    return PoolError(f"{what}: {e.strerror}")


class ObjectStore:
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.obj_root = os.path.join(self.root, "obj")
        self._handles: OrderedDict[int, _Handle] = OrderedDict()
        self._dirty_dirs: set[str] = set()
        self._io = BatchRunner()
        self._nowait = hasattr(os, "RWF_NOWAIT")
        self.nowait_reads = 0

    def open(self) -> None:
        os.makedirs(self.obj_root, exist_ok=True)

    # -- paths -------------------------------------------------------------

    def vid_dir(self, vid: int) -> str:
        return os.path.join(self.obj_root, f"{vid:06x}")

    def path(self, oid: int) -> str:
        return os.path.join(self.obj_root, f"{(oid >> 32) & 0xFFFFFF:06x}", f"{oid:016x}")

    # -- descriptor cache (trio thread only) -------------------------------

    async def _acquire(self, oid: int) -> _Handle:
        h = self._handles.get(oid)
        if h is None:
            try:
                fd = await self._io.run(os.open, self.path(oid), os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                raise ObjectNotFound(f"object {oid:016x} does not exist") from None
            except OSError as e:
                raise _os_error(e, f"opening object {oid:016x}") from None
            h = self._handles.get(oid)
            if h is None:
                h = self._handles[oid] = _Handle(fd)
                self._evict()
            else:  # another task opened it meanwhile
                os.close(fd)
        else:
            self._handles.move_to_end(oid)
        h.refs += 1
        return h

    def _release(self, h: _Handle) -> None:
        h.refs -= 1
        if h.doomed and h.refs == 0:
            os.close(h.fd)

    def _forget(self, oid: int) -> None:
        h = self._handles.pop(oid, None)
        if h is not None:
            h.doomed = True
            if h.refs == 0:
                os.close(h.fd)

    def _evict(self) -> None:
        if len(self._handles) <= MAX_OPEN_FILES:
            return
        for oid in list(self._handles):
            if len(self._handles) <= MAX_OPEN_FILES:
                break
            if self._handles[oid].refs == 0:
                self._forget(oid)

    # -- object operations ---------------------------------------------------

    async def read(self, oid: int, offset: int, length: int) -> bytes | bytearray:
        h = await self._acquire(oid)
        try:
            if self._nowait:
                try:
                    data = _read_nowait(h.fd, offset, length)
                except OSError as e:
                    if e.errno != errno.EOPNOTSUPP:
                        raise
                    self._nowait = False  # this file system cannot: always use threads
                    data = None
                if data is not None:
                    self.nowait_reads += 1
                    return data
            return await self._io.run(_pread_full, h.fd, offset, length)
        except OSError as e:
            raise _os_error(e, f"reading object {oid:016x}") from None
        finally:
            self._release(h)

    async def read_all(self, oid: int) -> bytes:
        """The whole object, as long as it is (for copying it to another peer)."""
        h = await self._acquire(oid)
        try:
            size = await self._io.run(lambda: os.fstat(h.fd).st_size)
            return await self._io.run(_pread_full, h.fd, 0, size)
        except OSError as e:
            raise _os_error(e, f"reading object {oid:016x}") from None
        finally:
            self._release(h)

    async def exists(self, oid: int) -> bool:
        return await self._io.run(os.path.exists, self.path(oid))

    async def write(self, oid: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write into an existing object; ObjectNotFound if it does not exist."""
        h = await self._acquire(oid)
        try:
            await self._io.run(_pwrite_full, h.fd, offset, data)
        except OSError as e:
            raise _os_error(e, f"writing object {oid:016x}") from None
        finally:
            self._release(h)

    def _create(self, oid: int, offset: int, data: bytes | bytearray | memoryview, size: int,
                exclusive: bool) -> tuple[int, bool]:
        path = self.path(oid)
        made_dir = False
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            made_dir = True
            fd = os.open(path, flags, 0o600)
        try:
            os.ftruncate(fd, size)
            _pwrite_full(fd, offset, data)
        except BaseException:
            os.close(fd)
            raise
        return fd, made_dir

    async def create(self, oid: int, offset: int, data: bytes | bytearray | memoryview, size: int,
                     exclusive: bool = False) -> None:
        """Create or replace an object: `size` bytes, zero except `data` at `offset`.

        `exclusive`: fail with ObjectExists instead of replacing (shared VDIs,
        where another mount may have created it a moment ago)."""
        try:
            fd, made_dir = await self._io.run(self._create, oid, offset, data, size, exclusive)
        except FileExistsError:
            raise ObjectExists(f"object {oid:016x} exists") from None
        except OSError as e:
            raise _os_error(e, f"creating object {oid:016x}") from None
        if made_dir:
            self._dirty_dirs.add(self.obj_root)
        self._dirty_dirs.add(os.path.dirname(self.path(oid)))
        if oid in self._handles:  # same path, same inode: keep the cached fd
            os.close(fd)
        else:
            self._handles[oid] = _Handle(fd)
            self._evict()

    async def delete(self, oid: int) -> None:
        """Remove an object; deleting a missing object is not an error."""
        self._forget(oid)
        path = self.path(oid)
        try:
            await self._io.run(os.unlink, path)
        except FileNotFoundError:
            return
        except OSError as e:
            raise _os_error(e, f"deleting object {oid:016x}") from None
        self._dirty_dirs.add(os.path.dirname(path))

    async def remove_vid_dir(self, vid: int) -> None:
        try:
            await trio.to_thread.run_sync(os.rmdir, self.vid_dir(vid))
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.ENOTEMPTY:
                raise _os_error(e, f"removing directory of vid {vid}") from None
            return
        self._dirty_dirs.discard(self.vid_dir(vid))
        self._dirty_dirs.add(self.obj_root)

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
        """Make the objects' data and all pending directory changes durable."""
        limiter = trio.CapacityLimiter(SYNC_PARALLELISM)
        dirs, self._dirty_dirs = self._dirty_dirs, set()
        failed: list[Exception] = []

        async def sync_oid(oid: int) -> None:
            async with limiter:
                h = self._handles.get(oid)
                if h is not None:
                    h.refs += 1
                try:
                    target = h.fd if h is not None else self.path(oid)
                    await trio.to_thread.run_sync(self._sync_one, target)  # parallel: commits coalesce
                except OSError as e:
                    failed.append(_os_error(e, f"syncing object {oid:016x}"))
                finally:
                    if h is not None:
                        self._release(h)

        async def sync_dir(path: str) -> None:
            async with limiter:
                try:
                    await trio.to_thread.run_sync(fsync_dir, path)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    failed.append(_os_error(e, f"syncing directory {path}"))

        async with trio.open_nursery() as nursery:
            for oid in oids:
                nursery.start_soon(sync_oid, oid)
        # Directory entries after the files: a name never outlives its data.
        async with trio.open_nursery() as nursery:
            for d in sorted(dirs, key=len, reverse=True):
                nursery.start_soon(sync_dir, d)
        if failed:
            self._dirty_dirs |= dirs
            raise failed[0]

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

    async def space(self) -> tuple[int, int]:
        """(total, available) bytes of the file system holding the store."""
        st = await trio.to_thread.run_sync(os.statvfs, self.root)
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize

    def io_stats(self) -> dict[str, int]:
        return {"nowait_reads": self.nowait_reads, "thread_calls": self._io.calls,
                "thread_hops": self._io.hops, "open_files": len(self._handles)}

    # -- stale copies (a peer that was declared down) -------------------------------

    @property
    def stale_root(self) -> str:
        return os.path.join(self.root, "stale")

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
        self.close()  # cached descriptors point at the moved files
        self._dirty_dirs.clear()
        return await trio.to_thread.run_sync(self._quarantine, label)

    def _stale_path(self, oid: int) -> str | None:
        if not os.path.isdir(self.stale_root):
            return None
        rel = os.path.relpath(self.path(oid), self.obj_root)
        for label in sorted(os.listdir(self.stale_root), reverse=True):
            candidate = os.path.join(self.stale_root, label, rel)
            if os.path.exists(candidate):
                return candidate
        return None

    def _take_stale(self, oid: int) -> bool:
        src = self._stale_path(oid)
        if src is None:
            return False
        os.makedirs(os.path.dirname(self.path(oid)), exist_ok=True)
        os.rename(src, self.path(oid))
        return True

    async def take_stale(self, oid: int) -> bool:
        """Put our own old copy back (the last resort when no other peer has it)."""
        taken = await trio.to_thread.run_sync(self._take_stale, oid)
        if taken:
            self._dirty_dirs.add(os.path.dirname(self.path(oid)))
        return taken

    def _list_stale(self, vid: int) -> list[int]:
        out: set[int] = set()
        if os.path.isdir(self.stale_root):
            for label in os.listdir(self.stale_root):
                d = os.path.join(self.stale_root, label, f"{vid:06x}")
                if os.path.isdir(d):
                    out.update(int(n, 16) for n in os.listdir(d) if len(n) == 16)
        return sorted(out)

    async def list_stale(self, vid: int) -> list[int]:
        return await trio.to_thread.run_sync(self._list_stale, vid)

    async def drop_stale(self) -> None:
        if os.path.isdir(self.stale_root):
            await trio.to_thread.run_sync(shutil.rmtree, self.stale_root)

    def close(self) -> None:
        for oid in list(self._handles):
            self._forget(oid)
