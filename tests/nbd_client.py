"""A small blocking NBD client for protocol tests: every step of the
handshake and every reply by hand, so that a test can do what QEMU never
does (old-style EXPORT_NAME, simple replies, broken frames)."""

from __future__ import annotations

import socket
import struct

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 8, 9, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID, REP_ERR_UNKNOWN = (1 << 31) + 1, (1 << 31) + 2, (1 << 31) + 3, \
    (1 << 31) + 6
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = range(8)
FLAG_FUA, FLAG_NO_HOLE, FLAG_DF, FLAG_REQ_ONE, FLAG_FAST_ZERO = 1, 2, 4, 8, 16
REPLY_NONE, REPLY_OFFSET_DATA, REPLY_OFFSET_HOLE, REPLY_BLOCK_STATUS = 0, 1, 2, 5
REPLY_ERROR = (1 << 15) + 1
T_READ_ONLY = 1 << 1


class Client:
    def __init__(self, path: str, *, no_zeroes: bool = True, timeout: float = 30) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        magic, opt, hflags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (NBDMAGIC, IHAVEOPT) and hflags & 1, (hex(magic), hex(opt), hflags)
        self.no_zeroes = no_zeroes
        self.sock.sendall(struct.pack(">I", 1 | (2 if no_zeroes else 0)))
        self.structured = False
        self.size = 0
        self.tflags = 0
        self.cookie = 0

    def recv(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError(f"closed after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def closed_by_server(self) -> bool:
        """True if the server closed the connection (EOF within the timeout)."""
        try:
            return self.sock.recv(1) == b""
        except (ConnectionError, OSError):
            return True

    def close(self) -> None:
        self.sock.close()

    # -- options --------------------------------------------------------------

    def option(self, opt: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rep, n = struct.unpack(">QIII", self.recv(20))
        assert magic == OPTION_REPLY_MAGIC, hex(magic)
        return opt, rep, self.recv(n)

    def replies_until_ack(self, opt: int) -> list[tuple[int, bytes]]:
        """Every reply to `opt` up to and including the final ACK or error."""
        out = []
        while True:
            got, rep, data = self.option_reply()
            assert got == opt
            out.append((rep, data))
            if rep == REP_ACK or rep >= 1 << 31:
                return out

    def structured_replies(self) -> None:
        self.option(OPT_STRUCTURED_REPLY)
        assert self.replies_until_ack(OPT_STRUCTURED_REPLY) == [(REP_ACK, b"")]
        self.structured = True

    def list_exports(self) -> list[str]:
        self.option(OPT_LIST)
        names = []
        for rep, data in self.replies_until_ack(OPT_LIST):
            if rep == REP_SERVER:
                (n,) = struct.unpack(">I", data[:4])
                names.append(data[4:4 + n].decode())
            else:
                assert rep == REP_ACK, rep
        return names

    @staticmethod
    def name_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
        raw = name.encode()
        return struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos)) + struct.pack(
            f">{len(infos)}H", *infos)

    def go(self, name: str, infos: tuple[int, ...] = (), opt: int = OPT_GO) -> list[tuple[int, bytes]]:
        """NBD_OPT_GO (or INFO): its replies; on success the size and flags are kept."""
        self.option(opt, self.name_data(name, infos))
        replies = self.replies_until_ack(opt)
        for rep, data in replies:
            if rep == REP_INFO and struct.unpack(">H", data[:2])[0] == 0:
                _, self.size, self.tflags = struct.unpack(">HQH", data)
        return replies

    def meta(self, name: str, queries: list[str], opt: int = OPT_SET_META_CONTEXT) -> list[tuple[int, bytes]]:
        raw = name.encode()
        data = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
        for q in queries:
            data += struct.pack(">I", len(q.encode())) + q.encode()
        self.option(opt, data)
        return self.replies_until_ack(opt)

    def export_name(self, name: str) -> None:
        """The old way in: no option reply, the size and flags (and 124 zeros without NO_ZEROES)."""
        self.option(OPT_EXPORT_NAME, name.encode())
        self.size, self.tflags = struct.unpack(">QH", self.recv(10))
        if not self.no_zeroes:
            assert self.recv(124) == bytes(124)

    # -- transmission ---------------------------------------------------------

    def request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b"",
                magic: int = REQUEST_MAGIC) -> int:
        self.cookie += 1
        self.sock.sendall(struct.pack(">IHHQQI", magic, flags, cmd, self.cookie, offset, length) + payload)
        return self.cookie

    def reply(self, read_length: int = 0) -> tuple[int, int, bytes]:
        """(cookie, error, data) of the next reply; for structured replies the
        chunks up to DONE are gathered: data of a read (holes as zeros,
        placed by offset relative to the first chunk's), or a block status
        payload."""
        (magic,) = struct.unpack(">I", self.recv(4))
        if magic == SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv(12))
            return cookie, error, self.recv(read_length) if read_length and not error else b""
        assert magic == STRUCTURED_REPLY_MAGIC, hex(magic)
        chunks: list[tuple[int, bytes]] = []
        status = b""
        error = 0
        first = True
        while True:
            if not first:
                (magic,) = struct.unpack(">I", self.recv(4))
                assert magic == STRUCTURED_REPLY_MAGIC, hex(magic)
            first = False
            flags, kind, cookie, n = struct.unpack(">HHQI", self.recv(16))
            body = self.recv(n)
            if kind == REPLY_OFFSET_DATA:
                chunks.append((struct.unpack(">Q", body[:8])[0], body[8:]))
            elif kind == REPLY_OFFSET_HOLE:
                off, size = struct.unpack(">QI", body)
                chunks.append((off, bytes(size)))
            elif kind == REPLY_BLOCK_STATUS:
                status = body
            elif kind >= 1 << 15:
                error = struct.unpack(">I", body[:4])[0]
            if flags & 1:
                break
        if status:
            return cookie, error, status
        if not chunks:
            return cookie, error, b""
        base = min(off for off, _ in chunks)
        out = bytearray(max(off + len(d) for off, d in chunks) - base)
        for off, d in chunks:
            out[off - base:off - base + len(d)] = d
        return cookie, error, bytes(out)

    def read(self, offset: int, length: int) -> bytes:
        cookie = self.request(CMD_READ, offset, length)
        got, error, data = self.reply(length)
        assert got == cookie and error == 0, (got, cookie, error)
        return data

    def write(self, offset: int, data: bytes, flags: int = 0) -> int:
        cookie = self.request(CMD_WRITE, offset, len(data), flags, data)
        got, error, _ = self.reply()
        assert got == cookie
        return error

    def command(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0) -> tuple[int, bytes]:
        cookie = self.request(cmd, offset, length, flags)
        got, error, data = self.reply()
        assert got == cookie
        return error, data

    def block_status(self, offset: int, length: int, flags: int = 0) -> list[tuple[int, int]]:
        error, body = self.command(CMD_BLOCK_STATUS, offset, length, flags)
        assert error == 0, error
        (ctx,) = struct.unpack(">I", body[:4])
        return [struct.unpack(">II", body[i:i + 8]) for i in range(4, len(body), 8)]

    def disconnect(self) -> None:
        self.request(CMD_DISC)
        self.sock.close()
