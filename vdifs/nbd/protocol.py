"""The NBD wire protocol (fixed newstyle handshake, structured replies),
as pure encoders and decoders: no I/O here, so every frame can be tested
on its own. Numbers are from the protocol's specification (doc/proto.md
of the NBD project); integers are big-endian."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": client option, and the server's greeting
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) and client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FLAGS_KNOWN = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES

MAX_OPTION_DATA = 64 << 10  # option payloads we read at most (names are short)
MAX_NAME = 4096  # bytes of an export name (the protocol's own limit)
MIN_BLOCK = 1
PREFERRED_BLOCK = 4096
MAX_BLOCK = 32 << 20  # the largest read or write payload we take (as qemu-nbd)
BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1  # our id of the one metadata context we have


class Opt(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Rep(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_PLATFORM = (1 << 31) + 4
    ERR_TLS_REQD = (1 << 31) + 5
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_SHUTDOWN = (1 << 31) + 7
    ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
    ERR_TOO_BIG = (1 << 31) + 9


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = range(8)
CHANGING = frozenset({CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES})

#: The command flags each command may carry; any other is EINVAL.
#: FUA is allowed on every command once SEND_FUA is offered (the protocol's
#: rule); where it means nothing it is ignored.
ALLOWED_FLAGS = {
    Cmd.READ: CmdFlag.FUA | CmdFlag.DF,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.DISC: CmdFlag.FUA,
    Cmd.FLUSH: CmdFlag.FUA,
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: CmdFlag.FUA,
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.FUA | CmdFlag.REQ_ONE,
}
ALLOWED_FLAGS_BY_TYPE = {int(k): int(v) for k, v in ALLOWED_FLAGS.items()}
#: The flags as plain integers, for the per-request path: `flags & CmdFlag.DF`
#: makes an IntFlag each time (about a microsecond; three of them made
#: `check_request` 3.9 us, half the mount's cost of an NBD read from its cache).
FLAG_FUA, FLAG_NO_HOLE, FLAG_DF = int(CmdFlag.FUA), int(CmdFlag.NO_HOLE), int(CmdFlag.DF)
FLAG_REQ_ONE, FLAG_FAST_ZERO = int(CmdFlag.REQ_ONE), int(CmdFlag.FAST_ZERO)


class ReplyType(IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


REPLY_FLAG_DONE = 1
EXTENT_MAX = (1 << 32) - 1
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# NBD's error numbers (its own, though they match Linux's)
EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = 1, 5, 12, 22, 28, 75, 95, 108

GREETING = struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
OPTION_HEADER = struct.Struct(">QII")  # magic, option, length
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
STRUCTURED_REPLY = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length


class ProtocolError(Exception):
    """The peer broke the protocol: the connection ends (with this reason logged)."""


def check_request(flags: int, kind: int, offset: int, length: int, size: int, read_only: bool,
                  structured: bool, contexts: bool) -> int:
    """0 if a request may be served, else the NBD error to answer it with
    (the connection goes on). Its payload, if any, has been read already.
    Plain integers throughout: this runs for every request."""
    allowed = ALLOWED_FLAGS_BY_TYPE.get(kind)
    if allowed is None or flags & ~allowed:
        return EINVAL
    if read_only and kind in CHANGING:
        return EPERM
    if kind == CMD_FLUSH:
        return EINVAL if offset or length else 0
    if kind == CMD_BLOCK_STATUS and not (structured and contexts):
        return EINVAL
    if flags & FLAG_DF and not structured:
        return EINVAL
    if length > MAX_BLOCK and kind in (CMD_READ, CMD_WRITE):
        return EOVERFLOW if kind == CMD_READ else EINVAL
    if offset + length > size:
        return ENOSPC if kind in (CMD_WRITE, CMD_WRITE_ZEROES) else EINVAL
    if length == 0 and kind != CMD_CACHE:
        return EINVAL  # the protocol leaves zero-length requests undefined: refuse them
    if flags & FLAG_FAST_ZERO and flags & FLAG_NO_HOLE:
        return ENOTSUP  # zeros written out are no faster than the client's own
    return 0


def utf8_prefix(text: str, limit: int = 4096) -> bytes:
    """At most `limit` bytes of `text` as UTF-8, never cutting a character
    (messages on the wire must be valid UTF-8)."""
    return text.encode()[:limit].decode("utf-8", "ignore").encode()


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def error_reply(option: int, reply: Rep, message: str) -> bytes:
    """An option refused, with a message for people (clients print it)."""
    return option_reply(option, reply, utf8_prefix(message))


def server_entry(name: str) -> bytes:
    """NBD_REP_SERVER's payload: one export's name."""
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw


def info_export(size: int, flags: int) -> bytes:
    return struct.pack(">HQH", Info.EXPORT, size, flags)


def info_block_size() -> bytes:
    return struct.pack(">HIII", Info.BLOCK_SIZE, MIN_BLOCK, PREFERRED_BLOCK, MAX_BLOCK)


def info_name(name: str) -> bytes:
    return struct.pack(">H", Info.NAME) + name.encode()


def info_description(text: str) -> bytes:
    return struct.pack(">H", Info.DESCRIPTION) + text.encode()


def meta_context(context_id: int, name: str) -> bytes:
    return struct.pack(">I", context_id) + name.encode()


def export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    """What NBD_OPT_EXPORT_NAME gets (no option reply header)."""
    return struct.pack(">QH", size, flags) + (b"" if no_zeroes else bytes(124))


@dataclass(frozen=True)
class GoRequest:
    name: str
    infos: tuple[int, ...]


def _name(data: bytes, at: int) -> tuple[str, int]:
    """A 32-bit length and that many bytes of UTF-8, from `at`; the name and where it ends."""
    if len(data) < at + 4:
        raise ValueError("short name length")
    (n,) = struct.unpack_from(">I", data, at)
    if n > MAX_NAME or len(data) < at + 4 + n:
        raise ValueError("name longer than its option")
    try:
        return data[at + 4:at + 4 + n].decode("utf-8"), at + 4 + n
    except UnicodeDecodeError:
        raise ValueError("name is not UTF-8") from None


def parse_go(data: bytes) -> GoRequest:
    """NBD_OPT_INFO's and NBD_OPT_GO's payload; ValueError if malformed."""
    name, at = _name(data, 0)
    if len(data) < at + 2:
        raise ValueError("no information request count")
    (count,) = struct.unpack_from(">H", data, at)
    at += 2
    if len(data) != at + 2 * count:
        raise ValueError("information requests do not fill the option")
    return GoRequest(name, struct.unpack_from(f">{count}H", data, at))


@dataclass(frozen=True)
class MetaRequest:
    name: str
    queries: tuple[str, ...]


def parse_meta(data: bytes) -> MetaRequest:
    """NBD_OPT_LIST_META_CONTEXT's and NBD_OPT_SET_META_CONTEXT's payload."""
    name, at = _name(data, 0)
    if len(data) < at + 4:
        raise ValueError("no query count")
    (count,) = struct.unpack_from(">I", data, at)
    at += 4
    queries = []
    for _ in range(count):
        query, at = _name(data, at)
        queries.append(query)
    if at != len(data):
        raise ValueError("bytes after the last query")
    return MetaRequest(name, tuple(queries))


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def structured_header(cookie: int, kind: int, length: int, done: bool) -> bytes:
    return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, kind, cookie, length)


_OFFSET_DATA = struct.Struct(">IHHQIQ")  # an OFFSET_DATA chunk's header and its offset
_NONE, _DATA = int(ReplyType.NONE), int(ReplyType.OFFSET_DATA)


def structured_done(cookie: int) -> bytes:
    """A reply's only chunk, empty (every plain write's answer)."""
    return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, _NONE, cookie, 0)


def structured_data_header(cookie: int, offset: int, length: int, done: bool) -> bytes:
    """The header of an OFFSET_DATA chunk of `length` bytes (they follow)."""
    return _OFFSET_DATA.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, _DATA, cookie, 8 + length,
                             offset)


def structured_hole(cookie: int, offset: int, length: int, done: bool) -> bytes:
    return structured_header(cookie, ReplyType.OFFSET_HOLE, 12, done) + struct.pack(">QI", offset, length)


def structured_error(cookie: int, error: int, message: str) -> bytes:
    raw = utf8_prefix(message)
    return structured_header(cookie, ReplyType.ERROR, 6 + len(raw), True) + struct.pack(">IH", error, len(raw)) + raw


def block_status_reply(cookie: int, extents: list[tuple[int, int]]) -> bytes:
    """One BLOCK_STATUS chunk for base:allocation: (length, flags) extents."""
    body = struct.pack(">I", BASE_ALLOCATION_ID) + b"".join(struct.pack(">II", n, f) for n, f in extents)
    return structured_header(cookie, ReplyType.BLOCK_STATUS, len(body), True) + body


def allocation_extents(offset: int, length: int, object_size: int, allocated: list[bool],
                       req_one: bool) -> list[tuple[int, int]]:
    """base:allocation of [offset, offset + length): `allocated[i]` for
    each object the range touches, from the first; neighbours alike are
    merged; one extent if `req_one`. An extent's length has 32 bits: the
    reply may then cover less than asked (clients ask again), never more."""
    out: list[tuple[int, int]] = []
    pos, end = offset, offset + length
    first = offset // object_size
    while pos < end:
        stop = min(end, (pos // object_size + 1) * object_size)
        flags = 0 if allocated[pos // object_size - first] else STATE_HOLE | STATE_ZERO
        if out and out[-1][1] == flags:
            if out[-1][0] + stop - pos > EXTENT_MAX:
                break
            out[-1] = (out[-1][0] + stop - pos, flags)
        elif out and req_one:
            break
        else:
            out.append((stop - pos, flags))
        pos = stop
    return out
