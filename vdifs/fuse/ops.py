"""FUSE operations: the file-system calls mapped onto the catalog.

Inodes: 1 is the root; a VDI's inode is its vid + 1, so it is stable across
mounts and renames. `.snapshots` (a directory that `ls` of the root does not
list, like ZFS's `.zfs`) holds every snapshot as a read-only file
`NAME@SNAP` with inode 2^32 + its data vid. Every handler turns a VdifsError into its errno and any
unexpected exception into EIO with a logged traceback: the mount never dies
because of what a caller sent.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar


from vdifs.client.catalog import Catalog
from vdifs.client.volume import Volume
from vdifs.errors import InvalidArgument, VdiNotFound, VdifsError, as_vdifs_error
from vdifs.fuse import abi
from vdifs.model.ids import MAX_VID
from vdifs.model.names import MAX_NAME_BYTES, SNAPSHOT_DIR, InvalidName, ReservedName, validate_name

log = logging.getLogger(__name__)

ROOT = abi.ROOT_INODE
SNAPSHOTS = MAX_VID + 2  # the .snapshots directory
SNAPSHOT_BASE = 1 << 32  # a snapshot's inode: this + its data vid
ATTR_TIMEOUT = 1.0  # names, directories, and VDIs that other mounts write (shared)
#: A VDI's or snapshot's attributes (design change 27). While the mount asked
#: for auto_inval_data (until design change 61), every time they expired with
#: O_DIRECT I/O in flight each read asked for them again (GETATTR) and each
#: answer was thrown away because a read completed meanwhile: a storm of one
#: GETATTR per read. Reads no longer ask; stat, lookups and reads past the end
#: still do. What changes them is either seen by the kernel (this mount's
#: writes and truncates) or invalidated explicitly (resizes and rollbacks
#: through the control socket, another mount's changes).
FILE_ATTR_TIMEOUT = 3600.0
XATTR_PREFIX = b"user.vdifs."
SETTABLE_XATTRS = (b"copies", b"shared")  # set only: what they show is in `vdi info`
READ_ONLY_XATTRS = (b"vid", b"allocated", b"object_size", b"control", b"store", b"pid")  # once readable
#: A VDI is never run: it keeps no set-user-ID or set-group-ID bit, so no
#: write has privileges to drop (FUSE_HANDLE_KILLPRIV_V2, design change 49).
SETID_BITS = stat.S_ISUID | stat.S_ISGID


def file_mode(mode: int) -> int:
    """The permission bits a VDI keeps of a requested mode."""
    return stat.S_IMODE(mode) & ~SETID_BITS

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def fuse_errors(fn: F) -> F:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except abi.FUSEError:
            raise
        except Exception as e:
            error = as_vdifs_error(e)  # also of parallel pieces (an exception group)
            if error is None:
                log.exception("%s failed unexpectedly", fn.__name__)
                raise abi.FUSEError(errno.EIO) from None
            if error.errno not in (errno.ENOENT, errno.EEXIST):
                log.info("%s: %s", fn.__name__, error)
            raise abi.FUSEError(error.errno) from None

    return wrapper  # type: ignore[return-value]


def vid_of(inode: int) -> int:
    vid = inode - 1
    if not 1 <= vid <= MAX_VID:
        raise abi.FUSEError(errno.ENOENT)
    return vid


def is_snapshot(inode: int) -> bool:
    return inode > SNAPSHOT_BASE


def read_only() -> abi.FUSEError:
    return abi.FUSEError(errno.EROFS)


def xattr_name(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise InvalidArgument(f"extended attribute name {raw!r} is not UTF-8") from None


def parse_name(raw: bytes, *, for_create: bool) -> str:
    """Turn a FUSE name into a VDI name; lookups of impossible names are ENOENT."""
    if len(raw) > MAX_NAME_BYTES:
        raise abi.FUSEError(errno.ENAMETOOLONG)
    try:
        return validate_name(raw)
    except ReservedName as e:
        if not for_create:
            raise abi.FUSEError(errno.ENOENT) from None
        log.info("refused name %r: %s", raw, e)
        raise abi.FUSEError(errno.EPERM) from None
    except InvalidName as e:
        if not for_create:
            raise abi.FUSEError(errno.ENOENT) from None
        log.info("refused name %r: %s", raw, e)
        raise abi.FUSEError(errno.EINVAL) from None


class VdifsOperations:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._handles: dict[int, Volume] = {}
        self._writable: set[int] = set()  # file handles opened for writing
        self._next_fh = 1
        self._dir_handles: dict[int, list[tuple[str, int]]] = {}  # (name, inode)
        self._snapshot_handles: set[int] = set()  # file handles on snapshots (read-only, not counted)
        self._mounted_at = time.time_ns()
        #: Counters shown by `status` (the control socket): fsync requests and
        #: writes synced because their handle is O_DSYNC; getxattr requests
        #: (after the first ENOSYS the kernel sends none); getattr requests (a
        #: storm of them is what FILE_ATTR_TIMEOUT prevents); writes
        #: acknowledged from a write-behind window.
        self.stats = {"syncs": 0, "getxattrs": 0, "getattrs": 0, "behind_writes": 0}
        #: Handles opened O_DSYNC/O_SYNC: never write-behind; on a shared VDI's
        #: uncached handle every write is also synced here (the kernel does not ask).
        self._synchronous: set[int] = set()
        #: Handles that have sent an fsync: proof their client flushes, so
        #: their writes may be acknowledged from the VDI's write-behind window.
        self._behind: set[int] = set()

    # -- attributes --------------------------------------------------------------

    def _root_attrs(self, inode: int = ROOT) -> abi.EntryAttributes:
        e = abi.EntryAttributes()
        e.st_ino = inode
        e.st_mode = stat.S_IFDIR | (0o755 if inode == ROOT else 0o555)
        e.st_nlink = 2
        e.st_uid = e.st_gid = 0
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = self._mounted_at
        e.attr_timeout = e.entry_timeout = ATTR_TIMEOUT
        e.st_blksize = 4096
        return e

    async def _attrs(self, vid: int) -> abi.EntryAttributes:
        vol = await self.catalog.volume(vid)
        rec = vol.record
        e = abi.EntryAttributes()
        e.st_ino = vid + 1
        e.st_mode = stat.S_IFREG | file_mode(rec.mode)
        e.st_nlink = 0 if vol.unlinked else 1
        e.st_uid, e.st_gid = rec.uid, rec.gid
        e.st_size = rec.size
        e.st_blocks = vol.allocated_bytes // 512
        e.st_blksize = 4096
        e.st_atime_ns = int(rec.atime * 1e9)
        e.st_mtime_ns = int(rec.mtime * 1e9)
        e.st_ctime_ns = int(max(rec.ctime, rec.mtime) * 1e9)
        e.entry_timeout = ATTR_TIMEOUT
        e.attr_timeout = ATTR_TIMEOUT if rec.shared else FILE_ATTR_TIMEOUT
        return e

    async def _snapshot_attrs(self, inode: int) -> abi.EntryAttributes:
        vol = await self.catalog.snapshot_volume(inode - SNAPSHOT_BASE)
        rec = vol.record
        e = abi.EntryAttributes()
        e.st_ino = inode
        e.st_mode = stat.S_IFREG | (rec.mode & 0o555)
        e.st_nlink = 1
        e.st_uid, e.st_gid = rec.uid, rec.gid
        e.st_size = rec.size
        e.st_blocks = vol.allocated_bytes // 512
        e.st_blksize = 4096
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = int(rec.ctime * 1e9)
        e.entry_timeout = ATTR_TIMEOUT
        e.attr_timeout = FILE_ATTR_TIMEOUT
        return e

    @fuse_errors
    async def getattr(self, inode: int, ctx: abi.RequestContext | None = None) -> abi.EntryAttributes:
        self.stats["getattrs"] += 1
        if inode in (ROOT, SNAPSHOTS):
            return self._root_attrs(inode)
        if is_snapshot(inode):
            return await self._snapshot_attrs(inode)
        return await self._attrs(vid_of(inode))

    @fuse_errors
    async def lookup(self, parent: int, name: bytes, ctx: abi.RequestContext | None = None
                     ) -> abi.EntryAttributes:
        if parent == SNAPSHOTS:
            if name in (b".", b".."):
                return self._root_attrs(SNAPSHOTS if name == b"." else ROOT)
            vdi, _, snap = name.decode("utf-8", "surrogateescape").partition("@")
            found = self.catalog.current.vdis.get(vdi)
            if found is None or snap not in found.snapshots:
                raise abi.FUSEError(errno.ENOENT)
            return await self._snapshot_attrs(SNAPSHOT_BASE + found.snapshots[snap].vid)
        if parent != ROOT:
            raise abi.FUSEError(errno.ENOENT)
        if name in (b".", b".."):
            return self._root_attrs()
        if name == SNAPSHOT_DIR.encode():
            return self._root_attrs(SNAPSHOTS)
        rec = await self.catalog.find(parse_name(name, for_create=False))
        return await self._attrs(rec.vid)

    @fuse_errors
    async def setattr(self, inode: int, attr: abi.EntryAttributes, fields: abi.SetattrFields,
                      fh: int | None, ctx: abi.RequestContext) -> abi.EntryAttributes:
        if inode == ROOT:
            raise abi.FUSEError(errno.EPERM)
        if inode == SNAPSHOTS or is_snapshot(inode):
            raise read_only()
        async with self.catalog.using(vid_of(inode)) as vol:
            return await self._setattr(vol, attr, fields)

    async def _setattr(self, vol: Volume, attr: abi.EntryAttributes, fields: abi.SetattrFields
                       ) -> abi.EntryAttributes:
        rec = vol.record
        if fields.update_size:
            await vol.truncate(attr.st_size)
        changed = False
        if fields.update_mode:
            rec.mode = file_mode(attr.st_mode)
            changed = True
        if fields.update_uid:
            rec.uid = attr.st_uid
            changed = True
        if fields.update_gid:
            rec.gid = attr.st_gid
            changed = True
        if fields.update_atime:
            rec.atime = attr.st_atime_ns / 1e9
            changed = True
        if fields.update_mtime:
            rec.mtime = attr.st_mtime_ns / 1e9
            changed = True
        if changed and not vol.unlinked:
            await self.catalog.persist_meta(vol)
        return await self._attrs(vol.vid)

    # -- directory ---------------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode: int, ctx: abi.RequestContext) -> int:
        if inode == SNAPSHOTS:
            listing = [(name, SNAPSHOT_BASE + s.vid) for name, s in self.catalog.snapshot_listing()]
        elif inode == ROOT:
            listing = [(name, rec.vid + 1) for name, rec in self.catalog.listing()]
        else:
            raise abi.FUSEError(errno.ENOTDIR)
        fh = self._next_fh
        self._next_fh += 1
        self._dir_handles[fh] = listing
        return fh

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: abi.DirectoryReply) -> None:
        entries = self._dir_handles.get(fh, [])
        for i in range(start_id, len(entries)):
            name, inode = entries[i]
            try:
                attrs = await (self._snapshot_attrs(inode) if is_snapshot(inode) else self._attrs(inode - 1))
            except (abi.FUSEError, VdiNotFound):
                continue  # deleted since opendir
            if not token.add(name.encode(), attrs, i + 1):
                break

    async def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(fh, None)

    # -- files -------------------------------------------------------------------

    def _new_handle(self, vol: Volume, writable: bool) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = vol
        if writable:
            self._writable.add(fh)
        return fh

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: abi.RequestContext) -> abi.FileInfo:
        if inode in (ROOT, SNAPSHOTS):
            raise abi.FUSEError(errno.EISDIR)
        if is_snapshot(inode):
            if (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC:
                raise read_only()
            fh = self._new_handle(await self.catalog.snapshot_volume(inode - SNAPSHOT_BASE), False)
            self._snapshot_handles.add(fh)
            return abi.FileInfo(fh=fh, keep_cache=True)
        vid = vid_of(inode)
        if self.catalog.record_of(vid) is None:
            raise abi.FUSEError(errno.ENOENT)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        vol = await self.catalog.open(vid, writable=writable)
        # Shared VDIs are served uncached (other mounts write them too). Not
        # O_DIRECT opens in general: on an uncached handle the kernel does not
        # follow O_DSYNC/O_SYNC or RWF_DSYNC writes (FUA, which QEMU 9 issues
        # as RWF_DSYNC) with an fsync, so `write` syncs them itself from the
        # write's flags; the cached path stays the faster one (design change 18).
        fh = self._new_handle(vol, writable)
        if writable and flags & os.O_DSYNC:  # O_SYNC includes the O_DSYNC bit
            self._synchronous.add(fh)
        # With other mounts on the same pool, cached pages may be stale: drop them on open.
        return abi.FileInfo(fh=fh, keep_cache=not self.catalog.shared, direct_io=vol.record.shared)

    @fuse_errors
    async def create(self, parent: int, name: bytes, mode: int, flags: int, ctx: abi.RequestContext
                     ) -> tuple[abi.FileInfo, abi.EntryAttributes]:
        if parent == SNAPSHOTS:
            raise read_only()
        if parent != ROOT:
            raise abi.FUSEError(errno.ENOENT)
        if not stat.S_ISREG(mode):
            raise abi.FUSEError(errno.EPERM)
        rec = await self.catalog.create(parse_name(name, for_create=True), 0, mode=file_mode(mode),
                                        uid=ctx.uid, gid=ctx.gid)
        vol = await self.catalog.open(rec.vid, writable=True)
        fh = self._new_handle(vol, True)
        if flags & os.O_DSYNC:
            self._synchronous.add(fh)
        return (abi.FileInfo(fh=fh, keep_cache=not self.catalog.shared), await self._attrs(rec.vid))

    @fuse_errors
    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int, ctx: abi.RequestContext
                    ) -> abi.EntryAttributes:
        if parent == SNAPSHOTS:
            raise read_only()
        if parent != ROOT or not stat.S_ISREG(mode):
            raise abi.FUSEError(errno.EPERM)
        rec = await self.catalog.create(parse_name(name, for_create=True), 0, mode=file_mode(mode),
                                        uid=ctx.uid, gid=ctx.gid)
        return await self._attrs(rec.vid)

    def read_now(self, fh: int, off: int, size: int) -> bytes | bytearray | None:
        """A read answered with no wait (the session's inline path), or None:
        then `read` runs as a task. Never raises: `read` meets what it was and says so."""
        vol = self._handles.get(fh)
        if vol is None:
            return None
        vol.kernel_pages = True
        try:
            return vol.read_now(off, size)
        except Exception:
            return None

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray:
        vol = self._handles[fh]
        vol.kernel_pages = True
        return await vol.read(off, size)

    def write_now(self, fh: int, off: int, buf: bytes | memoryview) -> bool:
        """A write done with no wait (the session's inline path), or False:
        then `write` runs as a task. Never raises."""
        vol = self._handles.get(fh)
        if vol is None or (vol.record.shared and fh in self._synchronous):
            return False
        vol.kernel_pages = True  # a buffered write leaves its pages cached
        before = vol.behind_writes
        try:
            done = vol.write_now(off, buf, behind=fh in self._behind)
        except Exception:
            return False
        self.stats["behind_writes"] += vol.behind_writes - before
        return done

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes, synchronous: bool = False) -> int:
        """`synchronous`: this write must be durable when it returns (an
        O_DSYNC handle's, or one made with RWF_DSYNC, as QEMU passes a
        guest's FUA)."""
        vol = self._handles[fh]
        vol.kernel_pages = True
        before = vol.behind_writes
        n = await vol.write(off, buf, behind=fh in self._behind and not synchronous)
        self.stats["behind_writes"] += vol.behind_writes - before
        if vol.record.shared and (synchronous or fh in self._synchronous):
            # uncached: the kernel sends no fsync after it, so we sync here
            self.stats["syncs"] += 1
            await vol.flush()
        return n

    @fuse_errors
    async def flush(self, fh: int) -> None:
        """Sent on every close() of a file descriptor, before close returns
        (the release comes later, asynchronously)."""
        vol = self._handles[fh]
        await vol.flush()
        if fh in self._writable:
            await self.catalog.writer_closing(vol)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        self.stats["syncs"] += 1
        await self._handles[fh].flush()
        if fh in self._writable and fh not in self._synchronous:
            self._behind.add(fh)  # write-behind from now on (the contract: docs/architecture.md)

    @fuse_errors
    async def release(self, fh: int) -> None:
        vol = self._handles.pop(fh)
        self._synchronous.discard(fh)
        self._behind.discard(fh)
        if fh in self._snapshot_handles:
            self._snapshot_handles.discard(fh)
            return
        writable = fh in self._writable
        self._writable.discard(fh)
        await self.catalog.close(vol, writable=writable)

    # -- namespace -----------------------------------------------------------------

    @fuse_errors
    async def unlink(self, parent: int, name: bytes, ctx: abi.RequestContext) -> None:
        if parent == SNAPSHOTS:
            raise read_only()
        if parent != ROOT:
            raise abi.FUSEError(errno.ENOENT)
        await self.catalog.delete(parse_name(name, for_create=False))

    @fuse_errors
    async def rename(self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes,
                     flags: int, ctx: abi.RequestContext) -> None:
        if SNAPSHOTS in (parent_old, parent_new):
            raise read_only()
        if parent_old != ROOT or parent_new != ROOT:
            raise abi.FUSEError(errno.ENOENT)
        if flags & abi.RENAME_EXCHANGE:
            raise abi.FUSEError(errno.EINVAL)
        old = parse_name(name_old, for_create=False)
        new = parse_name(name_new, for_create=True)
        await self.catalog.rename(old, new, replace_target=not flags & abi.RENAME_NOREPLACE)

    async def mkdir(self, parent: int, name: bytes, mode: int, ctx: abi.RequestContext) -> abi.EntryAttributes:
        log.info("refused mkdir %r: vdifs holds VDIs only, no directories", name)
        raise abi.FUSEError(errno.EPERM)

    async def rmdir(self, parent: int, name: bytes, ctx: abi.RequestContext) -> None:
        try:
            self.catalog.lookup(name.decode("utf-8", "replace"))
        except VdiNotFound:
            raise abi.FUSEError(errno.ENOENT) from None
        raise abi.FUSEError(errno.ENOTDIR)

    async def symlink(self, parent: int, name: bytes, target: bytes, ctx: abi.RequestContext) -> abi.EntryAttributes:
        raise abi.FUSEError(errno.EPERM)

    async def link(self, inode: int, new_parent: int, new_name: bytes, ctx: abi.RequestContext) -> abi.EntryAttributes:
        raise abi.FUSEError(errno.EPERM)

    async def readlink(self, inode: int, ctx: abi.RequestContext) -> bytes:
        raise abi.FUSEError(errno.EINVAL)

    @fuse_errors
    async def statfs(self, ctx: abi.RequestContext) -> abi.StatvfsData:
        space = await self.catalog.pool.space()
        s = abi.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = space.total // 4096
        s.f_bfree = s.f_bavail = space.free // 4096
        used = len(self.catalog.current.vdis)
        s.f_files = MAX_VID
        s.f_ffree = s.f_favail = MAX_VID - used
        s.f_namemax = MAX_NAME_BYTES
        return s

    # -- extended attributes -----------------------------------------------------------

    def _xattrs(self, inode: int) -> dict[str, bytes]:
        """The extended attributes of a VDI (the directory's record); the
        root, `.snapshots` and snapshots have none."""
        if inode == ROOT or inode == SNAPSHOTS or is_snapshot(inode):
            return {}
        return self.catalog.xattrs_of(vid_of(inode))

    def getxattr_now(self, inode: int, name: bytes) -> bytes:
        """A VDI's `security.*` and `trusted.*` attributes; ENODATA for any
        other name. Answered in the session's loop (in memory, no task). The
        kernel does not ask before every write for `security.capability`
        (design change 24's cost): the session asks for
        FUSE_HANDLE_KILLPRIV_V2 (design change 49)."""
        self.stats["getxattrs"] += 1
        try:
            value = self._xattrs(inode).get(xattr_name(name))
        except VdifsError as e:
            raise abi.FUSEError(e.errno) from None
        if value is None:
            raise abi.FUSEError(abi.ENOATTR)
        return value

    async def getxattr(self, inode: int, name: bytes, ctx: abi.RequestContext) -> bytes:
        return self.getxattr_now(inode, name)

    @fuse_errors
    async def listxattr(self, inode: int, ctx: abi.RequestContext) -> list[bytes]:
        return [n.encode() for n in sorted(self._xattrs(inode))]

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, flags: int, ctx: abi.RequestContext) -> None:
        if name.startswith(XATTR_PREFIX):
            await self._set_vdifs_xattr(inode, name[len(XATTR_PREFIX):], value)
            return
        if inode == SNAPSHOTS or is_snapshot(inode):
            raise read_only()
        if inode == ROOT:
            raise abi.FUSEError(errno.EOPNOTSUPP)
        await self.catalog.set_xattr(vid_of(inode), xattr_name(name), value, flags)

    async def _set_vdifs_xattr(self, inode: int, key: bytes, value: bytes) -> None:
        if inode == ROOT or key not in SETTABLE_XATTRS:
            raise abi.FUSEError(errno.EPERM if inode == ROOT or key in READ_ONLY_XATTRS else errno.ENOTSUP)
        if key == b"shared":
            if value.strip() not in (b"0", b"1"):
                raise InvalidArgument(f"user.vdifs.shared must be 0 or 1, not {value!r}")
            await self.catalog.set_shared(vid_of(inode), value.strip() == b"1")
            return
        try:
            copies = int(value.decode())
        except (UnicodeDecodeError, ValueError):
            raise InvalidArgument(f"user.vdifs.copies must be a number, not {value!r}") from None
        await self.catalog.set_copies(vid_of(inode), copies)

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: abi.RequestContext) -> None:
        if name.startswith(XATTR_PREFIX):
            raise abi.FUSEError(errno.EPERM)
        if inode == SNAPSHOTS or is_snapshot(inode):
            raise read_only()
        if inode == ROOT:
            raise abi.FUSEError(abi.ENOATTR)
        await self.catalog.remove_xattr(vid_of(inode), xattr_name(name))
