"""The FUSE channel: mounting, the request loop on /dev/fuse, replies and
notifications (design change 43; the codec is `abi.py`).

One trio task reads requests from the non-blocking device until it is
empty, then waits for it once. A read the volume can answer from memory or
the page cache (`read_now`), and a write it can take at once (`write_now`:
into the write-behind window, or the embedded pool's page cache), are
answered inline, in that same task: one read(2), a struct unpack, the
lookup, one writev(2), no task, lock or cancel scope. Every other request runs as a task of the session's nursery,
so a slow one (a peer, a lease) never holds the others up. After
`FAIRNESS` requests in a row without the device running dry the loop
yields once, so those tasks (and the rest of the mount) get to run.

Concurrency: everything here runs on the trio thread; replies are written
with no await between a request's result and its writev. The exceptions
are the invalidations that wait for a lock a request we have yet to answer
may hold, written from a worker thread: a directory entry's (the kernel
takes the directory's lock, which a lookup may hold; pyfuse3 did the same)
and an inode's cached pages (the kernel locks each page, and a buffered
read or readahead holds its pages locked until we answer it).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import subprocess
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from vdifs.control.mounts import FSTYPE
from vdifs.errors import VdifsError
from vdifs.fuse import abi
from vdifs.fuse.abi import FUSEError, ProtocolError

log = logging.getLogger(__name__)

#: Requests handled in a row before the loop lets other tasks run.
FAIRNESS = 16
MS_NOSUID, MS_NODEV = 2, 4
MNT_DETACH = 2


# -- mounting -------------------------------------------------------------------------

_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    """This process's C library (mount(2), umount2(2)), loaded once."""
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def mount(mountpoint: str, source: str, options: list[str]) -> int:
    """Mount a FUSE file system at `mountpoint` and return its /dev/fuse
    descriptor (non-blocking). As root with mount(2); otherwise through
    fusermount3, which hands the descriptor back over a socket."""
    if os.geteuid() == 0:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        data = ",".join([f"fd={fd}", "rootmode=40000", f"user_id={os.getuid()}", f"group_id={os.getgid()}",
                         *options])
        if _libc().mount(source.encode(), mountpoint.encode(), FSTYPE.encode(), MS_NOSUID | MS_NODEV,
                         data.encode()) != 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise VdifsError(f"could not mount {mountpoint}: {os.strerror(err)}", code=err)
        return fd
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        proc = subprocess.run(["fusermount3", "-o", fusermount_options(source, options), "--", mountpoint], pass_fds=(theirs.fileno(),),
                              env={**os.environ, "_FUSE_COMMFD": str(theirs.fileno())},
                              stderr=subprocess.PIPE, text=True, check=False)
        theirs.close()
        if proc.returncode != 0:
            raise VdifsError(f"could not mount {mountpoint}: {proc.stderr.strip() or 'fusermount3 failed'}")
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    if not fds:
        raise VdifsError(f"could not mount {mountpoint}: fusermount3 sent no descriptor")
    os.set_blocking(fds[0], False)
    os.set_inheritable(fds[0], False)
    return fds[0]


def fusermount_options(source: str, options: list[str]) -> str:
    """fusermount3's -o: the source as `fsname=` (fusermount3 splits options
    at commas and unescapes backslashes) and the type `fuse.vdifs`."""
    escaped = source.replace("\\", "\\\\").replace(",", "\\,")
    return ",".join([f"fsname={escaped}", "subtype=vdifs", *options])


def unmount(mountpoint: str) -> None:
    """Detach the mount (lazily: open files keep it until they close)."""
    if os.geteuid() == 0:
        if _libc().umount2(mountpoint.encode(), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            if err not in (errno.EINVAL, errno.ENOENT):  # not mounted (any more)
                log.warning("could not unmount %s: %s", mountpoint, os.strerror(err))
        return
    subprocess.run(["fusermount3", "-u", "-q", "-z", "--", mountpoint], check=False)


# -- the session ----------------------------------------------------------------------

def _plain(result: object) -> bytes:
    return b""


class Session:
    """One mounted FUSE connection serving `ops`: an object with an async
    method per operation (`ops.VdifsOperations`: pyfuse3's names and
    arguments), `read_now(fh, offset, size)`, which answers a read at once
    or gives None (then `read` runs as a task), and `write_now(fh, offset,
    data)`, which does a write at once or says False (then `write` runs)."""

    def __init__(self, fd: int, ops: Any) -> None:
        self.fd = fd
        self.ops = ops
        self.agreed = 0  # the INIT flags agreed
        self._buf = bytearray(abi.BUFFER_SIZE)
        self._view = memoryview(self._buf)
        self._nursery: trio.Nursery | None = None
        self._loop_scope = trio.CancelScope()
        self._handlers: dict[int, Callable[[abi.Header, memoryview], None]] = {
            abi.LOOKUP: self._lookup, abi.GETATTR: self._getattr, abi.SETATTR: self._setattr,
            abi.OPEN: self._open, abi.CREATE: self._create, abi.MKNOD: self._mknod,
            abi.READ: self._read, abi.WRITE: self._write, abi.FLUSH: self._flush, abi.FSYNC: self._fsync,
            abi.RELEASE: self._release, abi.OPENDIR: self._opendir, abi.READDIR: self._readdir,
            abi.READDIRPLUS: self._readdir, abi.RELEASEDIR: self._releasedir, abi.UNLINK: self._unlink,
            abi.RENAME: self._rename, abi.RENAME2: self._rename, abi.MKDIR: self._mkdir, abi.RMDIR: self._rmdir,
            abi.SYMLINK: self._symlink, abi.LINK: self._link, abi.READLINK: self._readlink,
            abi.STATFS: self._statfs, abi.GETXATTR: self._getxattr, abi.LISTXATTR: self._listxattr,
            abi.SETXATTR: self._setxattr, abi.REMOVEXATTR: self._removexattr,
        }

    # -- replies -----------------------------------------------------------------

    def _send(self, parts: list[bytes | bytearray | memoryview]) -> None:
        try:
            os.writev(self.fd, parts)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV):  # interrupted and aborted; unmounted
                log.error("a FUSE reply was refused: %s", e)

    def reply(self, unique: int, body: bytes | bytearray | memoryview = b"") -> None:
        self._send([abi.out_header(unique, len(body)), body])

    def error(self, unique: int, err: int) -> None:
        self._send([abi.out_header(unique, 0, err)])

    # -- notifications -----------------------------------------------------------------

    def invalidate_inode(self, ino: int, *, attr_only: bool = False) -> None:
        """Drop what the kernel caches of an inode: its attributes at once,
        its pages too (unless `attr_only`) from a worker thread moments
        later (see the module's docstring). OSError ENOENT: the kernel does
        not know the inode."""
        os.write(self.fd, abi.inval_inode(ino, -1, 0))
        if not attr_only and self._nursery is not None:
            self._nursery.start_soon(self.drop_pages, ino)

    async def drop_pages(self, ino: int) -> None:
        """Drop the kernel's cached pages of an inode; returns once they are
        gone (from a worker thread, see the module's docstring)."""
        await trio.to_thread.run_sync(self._notify_blocking, abi.inval_inode(ino, 0, 0),
                                      f"the cached pages of inode {ino}")

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        """Have the kernel forget a name, from a worker thread (see the module's
        docstring); a name it does not know is not an error."""
        if self._nursery is None:
            return
        self._nursery.start_soon(trio.to_thread.run_sync, self._notify_blocking, abi.inval_entry(parent, name),
                                 f"the name {name!r}")

    def _notify_blocking(self, msg: bytes, what: str) -> None:
        """Write a notification that may wait for a kernel lock (in a worker
        thread); one about something the kernel no longer knows is no error."""
        try:
            os.write(self.fd, msg)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                log.warning("could not invalidate %s: %s", what, e)

    # -- the loop ---------------------------------------------------------------------

    def stop(self) -> None:
        """End `serve`: no request is read after this; those under way finish
        (the mount stays until `unmount`)."""
        self._loop_scope.cancel()

    async def serve(self) -> None:
        """Answer requests until the file system is unmounted or `stop` is
        called, then wait for the requests under way."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            with self._loop_scope:
                await self._loop()
        self._nursery = None

    async def _loop(self) -> None:
        fd, buf, view = self.fd, self._buf, self._view
        handlers = self._handlers
        read_now = self.ops.read_now
        write_now = self.ops.write_now
        unpack_header = abi.IN_HEADER.unpack_from
        unpack_read = abi.READ_IN.unpack_from
        unpack_write = abi.WRITE_IN.unpack_from
        scope = self._loop_scope
        pack_out = abi.OUT_HEADER.pack
        in_a_row = 0
        while not scope.cancel_called:  # (inline answers never await: this is where stop() is seen)
            try:
                n = os.readv(fd, [buf])
            except BlockingIOError:
                in_a_row = 0
                await trio.lowlevel.wait_readable(fd)
                continue
            except OSError as e:
                if e.errno == errno.ENODEV:
                    return  # unmounted
                if e.errno in (errno.ENOENT, errno.EINTR):
                    continue  # a request interrupted before we read it
                raise
            in_a_row += 1
            if in_a_row >= FAIRNESS:
                in_a_row = 0
                await trio.lowlevel.checkpoint()
            if n == 0:
                return  # end of file: the device has no more requests for us, ever
            if n < abi.IN_HEADER.size:
                log.error("a FUSE request of %d bytes, shorter than its header: ignored", n)
                continue
            length, opcode, unique, nodeid, uid, gid, pid, _, _ = unpack_header(buf)
            if length != n:
                log.error("a FUSE request says it has %d bytes, %d were read: refused", length, n)
                self.error(unique, errno.EINVAL)
                continue
            if opcode == abi.READ and n >= 80:
                fh, offset, size, _ = unpack_read(buf, 40)
                data = read_now(fh, offset, size)
                if data is not None:
                    self._send([pack_out(16 + len(data), 0, unique), data])
                    continue
            elif opcode == abi.WRITE and n >= 80:
                fh, offset, size, _, _, flags, _ = unpack_write(buf, 40)
                if n == 80 + size and not flags & os.O_DSYNC and write_now(fh, offset, view[80:n]):
                    self._send([pack_out(24, 0, unique), write_out(size)])
                    continue
            header = abi.Header(length, opcode, unique, nodeid, uid, gid, pid)
            body = view[abi.IN_HEADER.size:n]
            handler = handlers.get(opcode)
            try:
                if handler is not None:
                    handler(header, body)
                elif opcode in abi.NO_REPLY:
                    pass  # forgetting: every inode here lives as long as the mount; interrupts: ignored
                elif opcode == abi.INIT:
                    self._init(header, body)
                elif opcode == abi.DESTROY:
                    self.reply(unique)
                    return
                else:
                    self.error(unique, errno.ENOSYS)
            except ProtocolError as e:
                log.error("FUSE request %d (opcode %d) refused: %s", unique, opcode, e)
                self.error(unique, errno.EINVAL)
            except Exception:
                log.exception("FUSE request %d (opcode %d) failed unexpectedly", unique, opcode)
                self.error(unique, errno.EIO)

    def _init(self, h: abi.Header, body: memoryview) -> None:
        try:
            reply, self.agreed = abi.negotiate(body)
        except ProtocolError as e:
            self.error(h.unique, errno.EPROTO)
            raise VdifsError(str(e)) from None
        self.reply(h.unique, reply)

    # -- running operations -------------------------------------------------------------

    def _spawn(self, unique: int, encode: Callable[[Any], bytes | bytearray | memoryview],
               fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._run, unique, encode, fn, args)

    async def _run(self, unique: int, encode: Callable[[Any], bytes | bytearray | memoryview],
                   fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
        try:
            result = await fn(*args)
            body = encode(result)
        except FUSEError as e:
            self.error(unique, e.errno)
            return
        except Exception:
            log.exception("%s failed unexpectedly", getattr(fn, "__name__", fn))
            self.error(unique, errno.EIO)
            return
        self.reply(unique, body)

    @staticmethod
    def _ctx(h: abi.Header, umask: int = 0) -> abi.RequestContext:
        return abi.RequestContext(h.uid, h.gid, h.pid, umask)

    def _lookup(self, h: abi.Header, body: memoryview) -> None:
        (name,) = abi.names(body, 1)
        self._spawn(h.unique, abi.entry_out, self.ops.lookup, h.nodeid, name, self._ctx(h))

    def _getattr(self, h: abi.Header, body: memoryview) -> None:
        self._spawn(h.unique, abi.attr_out, self.ops.getattr, h.nodeid, self._ctx(h))

    def _setattr(self, h: abi.Header, body: memoryview) -> None:
        attrs, fields, fh = abi.setattr_request(body)
        self._spawn(h.unique, abi.attr_out, self.ops.setattr, h.nodeid, attrs, fields, fh, self._ctx(h))

    def _open(self, h: abi.Header, body: memoryview) -> None:
        flags, _ = abi.body_struct(abi.OPEN_IN, body)
        self._spawn(h.unique, abi.open_out, self.ops.open, h.nodeid, flags, self._ctx(h))

    def _create(self, h: abi.Header, body: memoryview) -> None:
        flags, mode, umask, _ = abi.body_struct(abi.CREATE_IN, body)
        (name,) = abi.names(body[abi.CREATE_IN.size:], 1)
        self._spawn(h.unique, lambda r: abi.entry_out(r[1]) + abi.open_out(r[0]), self.ops.create,
                    h.nodeid, name, mode, flags, self._ctx(h, umask))

    def _mknod(self, h: abi.Header, body: memoryview) -> None:
        mode, rdev, umask, _ = abi.body_struct(abi.MKNOD_IN, body)
        (name,) = abi.names(body[abi.MKNOD_IN.size:], 1)
        self._spawn(h.unique, abi.entry_out, self.ops.mknod, h.nodeid, name, mode, rdev, self._ctx(h, umask))

    def _read(self, h: abi.Header, body: memoryview) -> None:
        fh, offset, size, _ = abi.body_struct(abi.READ_IN, body)
        self._spawn(h.unique, bytes_of, self.ops.read, fh, offset, size)

    def _write(self, h: abi.Header, body: memoryview) -> None:
        fh, offset, size, _, _, flags, _ = abi.body_struct(abi.WRITE_IN, body)
        if len(body) != abi.WRITE_IN_SIZE + size:
            raise ProtocolError(f"a write of {size} bytes came with {len(body) - abi.WRITE_IN_SIZE}")
        data = bytes(body[abi.WRITE_IN_SIZE:])  # the buffer is read into again before the task runs
        # `flags`: the file's, with O_DSYNC added for a write the caller made synchronous (RWF_DSYNC)
        self._spawn(h.unique, write_out, self.ops.write, fh, offset, data, bool(flags & os.O_DSYNC))

    def _flush(self, h: abi.Header, body: memoryview) -> None:
        (fh,) = abi.body_struct(abi.FLUSH_IN, body)
        self._spawn(h.unique, _plain, self.ops.flush, fh)

    def _fsync(self, h: abi.Header, body: memoryview) -> None:
        fh, flags = abi.body_struct(abi.FSYNC_IN, body)
        self._spawn(h.unique, _plain, self.ops.fsync, fh, bool(flags & 1))

    def _release(self, h: abi.Header, body: memoryview) -> None:
        fh, _, _ = abi.body_struct(abi.RELEASE_IN, body)
        self._spawn(h.unique, _plain, self.ops.release, fh)

    def _opendir(self, h: abi.Header, body: memoryview) -> None:
        self._spawn(h.unique, lambda fh: abi.OPEN_OUT.pack(fh, 0, 0), self.ops.opendir, h.nodeid, self._ctx(h))

    def _readdir(self, h: abi.Header, body: memoryview) -> None:
        fh, offset, size, _ = abi.body_struct(abi.READ_IN, body)
        listing = abi.DirectoryReply(size, plus=h.opcode == abi.READDIRPLUS)
        self._spawn(h.unique, lambda _: b"".join(listing.parts), self.ops.readdir, fh, offset, listing)

    def _releasedir(self, h: abi.Header, body: memoryview) -> None:
        fh, _, _ = abi.body_struct(abi.RELEASE_IN, body)
        self._spawn(h.unique, _plain, self.ops.releasedir, fh)

    def _unlink(self, h: abi.Header, body: memoryview) -> None:
        (name,) = abi.names(body, 1)
        self._spawn(h.unique, _plain, self.ops.unlink, h.nodeid, name, self._ctx(h))

    def _rename(self, h: abi.Header, body: memoryview) -> None:
        if h.opcode == abi.RENAME2:
            newdir, flags, _ = abi.body_struct(abi.RENAME2_IN, body)
            rest = body[abi.RENAME2_IN.size:]
        else:
            (newdir,), flags, rest = abi.body_struct(abi.RENAME_IN, body), 0, body[abi.RENAME_IN.size:]
        old, new = abi.names(rest, 2)
        self._spawn(h.unique, _plain, self.ops.rename, h.nodeid, old, newdir, new, flags, self._ctx(h))

    def _mkdir(self, h: abi.Header, body: memoryview) -> None:
        mode, umask = abi.body_struct(abi.MKDIR_IN, body)
        (name,) = abi.names(body[abi.MKDIR_IN.size:], 1)
        self._spawn(h.unique, abi.entry_out, self.ops.mkdir, h.nodeid, name, mode, self._ctx(h, umask))

    def _rmdir(self, h: abi.Header, body: memoryview) -> None:
        (name,) = abi.names(body, 1)
        self._spawn(h.unique, _plain, self.ops.rmdir, h.nodeid, name, self._ctx(h))

    def _symlink(self, h: abi.Header, body: memoryview) -> None:
        name, target = abi.names(body, 2)
        self._spawn(h.unique, abi.entry_out, self.ops.symlink, h.nodeid, name, target, self._ctx(h))

    def _link(self, h: abi.Header, body: memoryview) -> None:
        (inode,) = abi.body_struct(abi.LINK_IN, body)
        (name,) = abi.names(body[abi.LINK_IN.size:], 1)
        self._spawn(h.unique, abi.entry_out, self.ops.link, inode, h.nodeid, name, self._ctx(h))

    def _readlink(self, h: abi.Header, body: memoryview) -> None:
        self._spawn(h.unique, bytes_of, self.ops.readlink, h.nodeid, self._ctx(h))

    def _statfs(self, h: abi.Header, body: memoryview) -> None:
        self._spawn(h.unique, abi.statfs_out, self.ops.statfs, self._ctx(h))

    def _getxattr(self, h: abi.Header, body: memoryview) -> None:
        size, _ = abi.body_struct(abi.GETXATTR_IN, body)
        (name,) = abi.names(body[abi.GETXATTR_IN.size:], 1)
        now = getattr(self.ops, "getxattr_now", None)
        if now is None:
            self._spawn(h.unique, lambda v: xattr_value(v, size), self.ops.getxattr, h.nodeid, name, self._ctx(h))
            return
        # In memory: answered here, no task (the kernel asks for
        # security.capability again after attributes change).
        try:
            self.reply(h.unique, xattr_value(now(h.nodeid, name), size))
        except FUSEError as e:
            self.error(h.unique, e.errno)

    def _listxattr(self, h: abi.Header, body: memoryview) -> None:
        size, _ = abi.body_struct(abi.GETXATTR_IN, body)
        self._spawn(h.unique, lambda names: xattr_value(b"".join(n + b"\0" for n in names), size),
                    self.ops.listxattr, h.nodeid, self._ctx(h))

    def _setxattr(self, h: abi.Header, body: memoryview) -> None:
        size, flags = abi.body_struct(abi.SETXATTR_IN, body)
        rest = bytes(body[abi.SETXATTR_IN.size:])
        end = rest.find(b"\0")
        if end < 0 or len(rest) - end - 1 < size:
            raise ProtocolError("a setxattr whose name or value is cut short")
        self._spawn(h.unique, _plain, self.ops.setxattr, h.nodeid, rest[:end], rest[end + 1:end + 1 + size],
                    flags, self._ctx(h))

    def _removexattr(self, h: abi.Header, body: memoryview) -> None:
        (name,) = abi.names(body, 1)
        self._spawn(h.unique, _plain, self.ops.removexattr, h.nodeid, name, self._ctx(h))


def bytes_of(data: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
    return data


def write_out(n: int) -> bytes:
    return abi.WRITE_OUT.pack(n, 0)


def xattr_value(value: bytes, size: int) -> bytes:
    """A GETXATTR/LISTXATTR answer: the length alone when asked with size 0."""
    if size == 0:
        return abi.GETXATTR_OUT.pack(len(value), 0)
    if len(value) > size:
        raise FUSEError(errno.ERANGE)
    return value
