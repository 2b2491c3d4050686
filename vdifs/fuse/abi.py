"""The FUSE kernel protocol, as far as vdifs speaks it: pure encoding and
decoding, no I/O (the channel in `session.py` does that).

vdifs talks to /dev/fuse itself instead of through libfuse and pyfuse3
(design change 43): pyfuse3's dispatch cost ~18 us of Python per request
here (a lock, a wait per request, a worker task), more than a whole request
of this codec and loop. Every layout below is the kernel's (linux/fuse.h)
at protocol 7.31, which `negotiate` asks for; the kernel speaks any newer
minor as 7.31 when told so. Requests arrive as a 40-byte header and an
op-specific body; replies are a 16-byte header and a body.
"""

from __future__ import annotations

import errno
import stat
import struct
from dataclasses import dataclass, field

# -- opcodes (linux/fuse.h, enum fuse_opcode) ---------------------------------------

LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
READLINK, SYMLINK, MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK = 5, 6, 8, 9, 10, 11, 12, 13
OPEN, READ, WRITE, STATFS, RELEASE, FSYNC = 14, 15, 16, 17, 18, 20
SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR, FLUSH, INIT = 21, 22, 23, 24, 25, 26
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR, ACCESS, CREATE, INTERRUPT = 27, 28, 29, 30, 34, 35, 36
DESTROY, BATCH_FORGET, READDIRPLUS, RENAME2 = 38, 42, 44, 45

#: Requests the kernel sends without waiting for any reply.
NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT})

# -- structures ------------------------------------------------------------------------

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, total_extlen, pad
OUT_HEADER = struct.Struct("<IiQ")  # len, error (negative errno, or a notify code), unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr: ino size blocks atime mtime ctime (+nsec) mode ...
ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid, generation, entry_valid, attr_valid (+nsec); then ATTR
ATTR_OUT = struct.Struct("<QII")  # attr_valid, attr_valid_nsec, dummy; then ATTR
OPEN_OUT = struct.Struct("<QII")  # fh, open_flags, padding
WRITE_OUT = struct.Struct("<II")  # size, padding
GETXATTR_OUT = struct.Struct("<II")  # size, padding
STATFS_OUT = struct.Struct("<QQQQQIII28x")  # blocks bfree bavail files ffree bsize namelen frsize
INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
READ_IN = struct.Struct("<QQII")  # fh, offset, size, read_flags (lock_owner, flags follow)
WRITE_IN = struct.Struct("<QQIIQII")  # fh, offset, size, write_flags, lock_owner, flags, padding
WRITE_IN_SIZE = WRITE_IN.size
OPEN_IN = struct.Struct("<II")  # flags, open_flags
CREATE_IN = struct.Struct("<IIII")  # flags, mode, umask, open_flags
MKNOD_IN = struct.Struct("<IIII")  # mode, rdev, umask, padding
MKDIR_IN = struct.Struct("<II")  # mode, umask
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
RELEASE_IN = struct.Struct("<QII")  # fh, flags, release_flags
FLUSH_IN = struct.Struct("<Q")  # fh
FSYNC_IN = struct.Struct("<QI")  # fh, fsync_flags
RENAME_IN = struct.Struct("<Q")  # newdir
RENAME2_IN = struct.Struct("<QII")  # newdir, flags, padding
LINK_IN = struct.Struct("<Q")  # oldnodeid
SETXATTR_IN = struct.Struct("<II")  # size, flags
GETXATTR_IN = struct.Struct("<II")  # size, padding
DIRENT = struct.Struct("<QQII")  # ino, off, namelen, type

MAJOR, MINOR = 7, 31
MAX_WRITE = 1 << 20  # the largest READ or WRITE the kernel sends (max_pages 256)
MAX_PAGES = MAX_WRITE // 4096
#: The request buffer: the largest WRITE and its headers (the kernel refuses
#: to queue a request into a smaller read).
BUFFER_SIZE = MAX_WRITE + 4096
#: The kernel's queue of background requests (async reads, direct I/O) per
#: connection; its default 12 caps a client's queue depth (GlusterFS asks 64/48).
MAX_BACKGROUND, CONGESTION_THRESHOLD = 64, 48

# INIT flags (fuse_init_in.flags)
ASYNC_READ = 1 << 0
BIG_WRITES = 1 << 5
DO_READDIRPLUS = 1 << 13
ASYNC_DIO = 1 << 15
PARALLEL_DIROPS = 1 << 18
FLAG_MAX_PAGES = 1 << 22
HANDLE_KILLPRIV_V2 = 1 << 28
#: What vdifs asks for: concurrent reads and direct I/O (a client's queue
#: reaches us whole), 1 MiB requests, attributes with directory listings,
#: and the dropping of privileges on write left to us (we keep none to drop),
#: so the kernel does not ask for security.capability before every write.
#: Not AUTO_INVAL_DATA: with it the kernel asks for the attributes before
#: every read that follows a write (its write invalidates them), a round trip
#: the reader waits for in io_submit; the mount drops cached pages itself
#: when another mount changed a VDI (design change 61).
WANTED = (ASYNC_READ | BIG_WRITES | DO_READDIRPLUS | ASYNC_DIO | PARALLEL_DIROPS
          | FLAG_MAX_PAGES | HANDLE_KILLPRIV_V2)

# open_flags of OPEN_OUT
FOPEN_DIRECT_IO, FOPEN_KEEP_CACHE = 1 << 0, 1 << 1

# SETATTR valid bits
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE, FATTR_ATIME, FATTR_MTIME, FATTR_FH = 1, 2, 4, 8, 16, 32, 64
FATTR_ATIME_NOW, FATTR_MTIME_NOW = 1 << 7, 1 << 8

# notifications (written with unique 0 and the code in the error field)
NOTIFY_INVAL_INODE, NOTIFY_INVAL_ENTRY = 2, 3
INVAL_INODE = struct.Struct("<Qqq")  # ino, off, len
INVAL_ENTRY = struct.Struct("<QII")  # parent, namelen, flags

ROOT_INODE = 1
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
ENOATTR = errno.ENODATA


class ProtocolError(Exception):
    """A request that does not parse: answered EINVAL (or EPROTO at INIT),
    never a reason to stop serving."""


class FUSEError(Exception):
    """Raised by an operation: the request is answered with this errno."""

    def __init__(self, errno_: int) -> None:
        super().__init__(errno_)
        self.errno = errno_


@dataclass(slots=True)
class EntryAttributes:
    """A file's attributes, and how long the kernel may cache them and its name."""
    st_ino: int = 0
    generation: int = 0
    entry_timeout: float = 0.0
    attr_timeout: float = 0.0
    st_mode: int = 0
    st_nlink: int = 0
    st_uid: int = 0
    st_gid: int = 0
    st_rdev: int = 0
    st_size: int = 0
    st_blksize: int = 4096
    st_blocks: int = 0
    st_atime_ns: int = 0
    st_mtime_ns: int = 0
    st_ctime_ns: int = 0


@dataclass(slots=True)
class FileInfo:
    fh: int
    keep_cache: bool = False
    direct_io: bool = False


@dataclass(slots=True)
class StatvfsData:
    f_bsize: int = 4096
    f_frsize: int = 4096
    f_blocks: int = 0
    f_bfree: int = 0
    f_bavail: int = 0
    f_files: int = 0
    f_ffree: int = 0
    f_favail: int = 0
    f_namemax: int = 255


@dataclass(slots=True)
class SetattrFields:
    """Which attributes a SETATTR changes (their values are in its EntryAttributes)."""
    update_size: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_atime: bool = False
    update_mtime: bool = False


@dataclass(slots=True, frozen=True)
class RequestContext:
    uid: int = 0
    gid: int = 0
    pid: int = 0
    umask: int = 0


@dataclass(slots=True)
class Header:
    length: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int


def body_struct(st: struct.Struct, body: bytes | bytearray | memoryview) -> tuple:  # type: ignore[type-arg]
    if len(body) < st.size:
        raise ProtocolError(f"a request body of {len(body)} bytes, {st.size} expected")
    return st.unpack_from(body)


def names(body: bytes | bytearray | memoryview, count: int) -> list[bytes]:
    """`count` NUL-terminated names at the start of `body`."""
    out = []
    rest = bytes(body)
    for _ in range(count):
        end = rest.find(b"\0")
        if end < 0:
            raise ProtocolError("a name without its terminating NUL")
        out.append(rest[:end])
        rest = rest[end + 1:]
    return out


# -- replies ------------------------------------------------------------------------

def out_header(unique: int, body_length: int, error: int = 0) -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size + body_length, -error, unique)


def _seconds(t: float) -> tuple[int, int]:
    whole = int(t)
    return whole, int((t - whole) * 1e9)


def _split_ns(ns: int) -> tuple[int, int]:
    return ns // 1_000_000_000, ns % 1_000_000_000


def pack_attr(a: EntryAttributes) -> bytes:
    at, atn = _split_ns(a.st_atime_ns)
    mt, mtn = _split_ns(a.st_mtime_ns)
    ct, ctn = _split_ns(a.st_ctime_ns)
    return ATTR.pack(a.st_ino, a.st_size, a.st_blocks, at, mt, ct, atn, mtn, ctn, a.st_mode, a.st_nlink,
                     a.st_uid, a.st_gid, a.st_rdev, a.st_blksize, 0)


def entry_out(a: EntryAttributes) -> bytes:
    ev, evn = _seconds(a.entry_timeout)
    av, avn = _seconds(a.attr_timeout)
    return ENTRY_OUT.pack(a.st_ino, a.generation, ev, av, evn, avn) + pack_attr(a)


def attr_out(a: EntryAttributes) -> bytes:
    av, avn = _seconds(a.attr_timeout)
    return ATTR_OUT.pack(av, avn, 0) + pack_attr(a)


def open_out(info: FileInfo) -> bytes:
    flags = (FOPEN_DIRECT_IO if info.direct_io else 0) | (FOPEN_KEEP_CACHE if info.keep_cache else 0)
    return OPEN_OUT.pack(info.fh, flags, 0)


def statfs_out(s: StatvfsData) -> bytes:
    return STATFS_OUT.pack(s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_bsize, s.f_namemax,
                           s.f_frsize)


def dirent(name: bytes, attrs: EntryAttributes, next_offset: int) -> bytes:
    """One READDIR entry, padded to 8 bytes."""
    d = DIRENT.pack(attrs.st_ino, next_offset, len(name), stat.S_IFMT(attrs.st_mode) >> 12) + name
    return d + b"\0" * (-len(d) % 8)


def direntplus(name: bytes, attrs: EntryAttributes, next_offset: int) -> bytes:
    """One READDIRPLUS entry: its lookup reply, then its dirent."""
    return entry_out(attrs) + dirent(name, attrs, next_offset)


@dataclass(slots=True)
class DirectoryReply:
    """The entries of one READDIR(PLUS) reply, up to the kernel's buffer size
    (what pyfuse3 called a token): `add` says False when one more would not fit."""
    size: int
    plus: bool
    parts: list[bytes] = field(default_factory=list)
    used: int = 0

    def add(self, name: bytes, attrs: EntryAttributes, next_offset: int) -> bool:
        entry = (direntplus if self.plus else dirent)(name, attrs, next_offset)
        if self.used + len(entry) > self.size:
            return False
        self.parts.append(entry)
        self.used += len(entry)
        return True


def negotiate(body: bytes | bytearray | memoryview) -> tuple[bytes, int]:
    """The INIT reply to the kernel's INIT body, and the flags agreed.
    Protocol 7.31 or newer is required (Linux 5.4+)."""
    major, minor, max_readahead, flags = body_struct(INIT_IN, body)
    if major != MAJOR or minor < MINOR:
        raise ProtocolError(f"the kernel speaks FUSE {major}.{minor}; vdifs needs {MAJOR}.{MINOR} or newer")
    agreed = flags & WANTED
    reply = INIT_OUT.pack(MAJOR, MINOR, max_readahead, agreed, MAX_BACKGROUND, CONGESTION_THRESHOLD,
                          MAX_WRITE, 1, MAX_PAGES, 0, 0, 0)
    return reply, agreed


def setattr_request(body: bytes | bytearray | memoryview) -> tuple[EntryAttributes, SetattrFields, int | None]:
    """A SETATTR body as the attributes to set, which of them, and the handle."""
    (valid, _, fh, size, _, atime, mtime, _, atimensec, mtimensec, _, mode, _, uid, gid, _
     ) = body_struct(SETATTR_IN, body)
    a = EntryAttributes(st_size=size, st_mode=mode, st_uid=uid, st_gid=gid,
                        st_atime_ns=atime * 1_000_000_000 + atimensec, st_mtime_ns=mtime * 1_000_000_000 + mtimensec)
    fields = SetattrFields(update_size=bool(valid & FATTR_SIZE), update_mode=bool(valid & FATTR_MODE),
                           update_uid=bool(valid & FATTR_UID), update_gid=bool(valid & FATTR_GID),
                           update_atime=bool(valid & (FATTR_ATIME | FATTR_ATIME_NOW)),
                           update_mtime=bool(valid & (FATTR_MTIME | FATTR_MTIME_NOW)))
    return a, fields, fh if valid & FATTR_FH else None


def inval_inode(ino: int, offset: int = 0, length: int = 0) -> bytes:
    """Notification: drop the inode's cached attributes, and its cached pages
    from `offset` for `length` bytes (0: to the end; offset -1: attributes only)."""
    body = INVAL_INODE.pack(ino, offset, length)
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), NOTIFY_INVAL_INODE, 0) + body


def inval_entry(parent: int, name: bytes) -> bytes:
    """Notification: forget the name `name` in directory `parent`."""
    body = INVAL_ENTRY.pack(parent, len(name), 0) + name + b"\0"
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), NOTIFY_INVAL_ENTRY, 0) + body
