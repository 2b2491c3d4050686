"""Ceiling probe: the fastest a trio + pyfuse3 file system can be when its data
lives in other processes reached over loopback TCP, as vdifs's does.

`serve PORT SIZE_MIB` runs a data server: a bytearray, and a loop that answers
read requests with the bytes and write requests with an ack. `mount MP
SIZE_MIB PORT,PORT,...` mounts one file, 'disk': a read is one round trip to
the first server, a write goes to every server in parallel and waits for all
acks (replication). Nothing else: no msgpack, no authentication, no
placement, no store, no object map. Whatever fio reaches on 'disk' is the
upper bound for any design of this shape (one FUSE process plus storage
processes, all in Python with trio) on the machine it runs on.

Frames: request = op (1 byte: r/w), id (4), offset (8), length (4), then the
data for a write; reply = id (4), length (4), then the data for a read.
"""

from __future__ import annotations

import errno
import stat
import struct
import sys

import pyfuse3
import trio

REQ = struct.Struct(">cIQI")
REP = struct.Struct(">II")


async def _read_exactly(stream: trio.SocketStream, buf: bytearray, n: int) -> bytes:
    while len(buf) < n:
        chunk = await stream.receive_some(1 << 20)
        if not chunk:
            raise EOFError
        buf += chunk
    out = bytes(buf[:n])
    del buf[:n]
    return out


async def serve(port: int, size: int) -> None:
    data = bytearray(size)

    async def handle(stream: trio.SocketStream) -> None:
        buf = bytearray()
        try:
            while True:
                op, rid, off, length = REQ.unpack(await _read_exactly(stream, buf, REQ.size))
                if op == b"w":
                    data[off:off + length] = await _read_exactly(stream, buf, length)
                    await stream.send_all(REP.pack(rid, 0))
                else:
                    await stream.send_all(REP.pack(rid, length) + data[off:off + length])
        except (EOFError, trio.BrokenResourceError):
            pass

    await trio.serve_tcp(handle, port, host="127.0.0.1")


class Connection:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.lock = trio.Lock()
        self.waiting: dict[int, tuple[trio.Event, list[bytes]]] = {}
        self.next_id = 0

    async def reader(self) -> None:
        buf = bytearray()
        while True:
            rid, length = REP.unpack(await _read_exactly(self.stream, buf, REP.size))
            payload = await _read_exactly(self.stream, buf, length) if length else b""
            event, box = self.waiting.pop(rid)
            box.append(payload)
            event.set()

    async def call(self, op: bytes, off: int, length: int, data: bytes = b"") -> bytes:
        self.next_id += 1
        rid = self.next_id
        event, box = trio.Event(), []
        self.waiting[rid] = (event, box)
        async with self.lock:
            await self.stream.send_all(REQ.pack(op, rid, off, length) + data)
        with trio.fail_after(30):
            await event.wait()
        return box[0]


class NetFS(pyfuse3.Operations):
    def __init__(self, size: int, conns: list[Connection]) -> None:
        super().__init__()
        self.size = size
        self.conns = conns

    async def getattr(self, inode, ctx=None):  # type: ignore[no-untyped-def]
        e = pyfuse3.EntryAttributes()
        if inode == pyfuse3.ROOT_INODE:
            e.st_mode = stat.S_IFDIR | 0o755
        elif inode == 2:
            e.st_mode = stat.S_IFREG | 0o644
            e.st_size = self.size
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        e.st_ino = inode
        e.attr_timeout = e.entry_timeout = 60
        return e

    async def lookup(self, parent, name, ctx=None):  # type: ignore[no-untyped-def]
        if parent != pyfuse3.ROOT_INODE or name != b"disk":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(2)

    async def opendir(self, inode, ctx):  # type: ignore[no-untyped-def]
        return inode

    async def readdir(self, fh, start_id, token):  # type: ignore[no-untyped-def]
        if start_id == 0:
            pyfuse3.readdir_reply(token, b"disk", await self.getattr(2), 1)

    async def open(self, inode, flags, ctx):  # type: ignore[no-untyped-def]
        return pyfuse3.FileInfo(fh=inode)

    async def setattr(self, inode, attr, fields, fh, ctx):  # type: ignore[no-untyped-def]
        return await self.getattr(inode)

    async def read(self, fh, off, size):  # type: ignore[no-untyped-def]
        size = max(0, min(size, self.size - off))
        return await self.conns[0].call(b"r", off, size)

    async def write(self, fh, off, data):  # type: ignore[no-untyped-def]
        async with trio.open_nursery() as n:
            for c in self.conns:
                n.start_soon(c.call, b"w", off, len(data), bytes(data))
        return len(data)

    async def fsync(self, fh, datasync):  # type: ignore[no-untyped-def]
        pass

    async def flush(self, fh):  # type: ignore[no-untyped-def]
        pass

    async def release(self, fh):  # type: ignore[no-untyped-def]
        pass


async def mount(mountpoint: str, size: int, ports: list[int]) -> None:
    async with trio.open_nursery() as nursery:
        conns = []
        for port in ports:
            c = Connection(await trio.open_tcp_stream("127.0.0.1", port))
            nursery.start_soon(c.reader)
            conns.append(c)
        pyfuse3.init(NetFS(size, conns), mountpoint, set(pyfuse3.default_options) | {"fsname=netfs"})
        try:
            await pyfuse3.main()
        finally:
            pyfuse3.close()
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        trio.run(serve, int(sys.argv[2]), int(sys.argv[3]) << 20)
    elif len(sys.argv) == 5 and sys.argv[1] == "mount":
        trio.run(mount, sys.argv[2], int(sys.argv[3]) << 20, [int(p) for p in sys.argv[4].split(",")])
    else:
        sys.exit(__doc__)
