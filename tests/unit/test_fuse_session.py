"""The FUSE session's loop against a stand-in for /dev/fuse: a SOCK_SEQPACKET
socket pair keeps each request one message, as the device does. The file
system behind it is a small one-file memory store (the real one runs in the
FUSE end-to-end tests); what is tested is the dispatch: inline answers,
tasks, and malformed requests refused while the loop keeps serving."""

from __future__ import annotations

import errno
import os
import socket
import struct

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdifs.fuse import abi
from vdifs.fuse.abi import EntryAttributes, FileInfo, FUSEError
from vdifs.fuse.session import Session


class OneFile:
    """Inode 2 holds 64 KiB; reads of its first half are answered inline."""

    def __init__(self) -> None:
        self.data = bytearray(64 << 10)
        self.slow_reads = 0

    def read_now(self, fh: int, off: int, size: int) -> bytes | None:
        return bytes(self.data[off:off + size]) if off + size <= 32 << 10 else None

    def write_now(self, fh: int, off: int, buf: memoryview) -> bool:
        return False

    async def read(self, fh: int, off: int, size: int) -> bytes:
        self.slow_reads += 1
        await trio.sleep(0)
        return bytes(self.data[off:off + size])

    async def write(self, fh: int, off: int, buf: bytes, synchronous: bool = False) -> int:
        self.data[off:off + len(buf)] = buf
        return len(buf)

    async def getattr(self, inode: int, ctx: abi.RequestContext) -> EntryAttributes:
        if inode != 2:
            raise FUSEError(errno.ENOENT)
        return EntryAttributes(st_ino=2, st_mode=0o100644, st_size=len(self.data))

    async def lookup(self, parent: int, name: bytes, ctx: abi.RequestContext) -> EntryAttributes:
        if name == b"boom":
            raise RuntimeError("a bug in an operation")
        return await self.getattr(2 if name == b"disk" else 0, ctx)

    async def open(self, inode: int, flags: int, ctx: abi.RequestContext) -> FileInfo:
        return FileInfo(fh=1, keep_cache=True)


def request(opcode: int, unique: int, body: bytes = b"", nodeid: int = 2, length: int | None = None) -> bytes:
    n = abi.IN_HEADER.size + len(body)
    return abi.IN_HEADER.pack(n if length is None else length, opcode, unique, nodeid, 0, 0, 0, 0, 0) + body


def read_in(off: int, size: int) -> bytes:
    return abi.READ_IN.pack(1, off, size, 0) + bytes(16)


class Kernel:
    """The device's other end: sends requests, collects replies by unique."""

    def __init__(self) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        theirs.setblocking(False)
        self.theirs = theirs
        self.sock.setblocking(False)

    def send(self, msg: bytes) -> None:
        self.sock.send(msg)

    async def reply(self, timeout: float = 5) -> tuple[int, int, bytes]:
        with trio.fail_after(timeout):
            while True:
                try:
                    msg = self.sock.recv(1 << 21)
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self.sock)
        length, error, unique = abi.OUT_HEADER.unpack_from(msg)
        assert length == len(msg)
        return unique, error, msg[abi.OUT_HEADER.size:]

    async def no_reply(self) -> None:
        await trio.sleep(0.05)
        try:
            msg = self.sock.recv(1 << 21)
        except BlockingIOError:
            return
        raise AssertionError(f"unexpected reply {msg[:16]!r}")


async def serving(nursery: trio.Nursery, fs: OneFile) -> tuple[Kernel, Session]:
    k = Kernel()
    session = Session(k.theirs.fileno(), fs)
    nursery.start_soon(session.serve)
    k.send(request(abi.INIT, 1, abi.INIT_IN.pack(7, 40, 65536, abi.WANTED), nodeid=0))
    unique, error, body = await k.reply()
    assert (unique, error) == (1, 0) and abi.INIT_OUT.unpack(body)[:2] == (7, 31)
    return k, session


async def test_requests_are_answered_inline_or_by_tasks_and_bad_ones_refused():
    fs = OneFile()
    fs.data[:] = os.urandom(len(fs.data))
    async with trio.open_nursery() as nursery:
        k, session = await serving(nursery, fs)
        k.send(request(abi.READ, 2, read_in(4096, 4096)))  # inline
        assert await k.reply() == (2, 0, bytes(fs.data[4096:8192]))
        k.send(request(abi.READ, 3, read_in(40 << 10, 8192)))  # a task
        assert await k.reply() == (3, 0, bytes(fs.data[40 << 10:48 << 10]))
        assert fs.slow_reads == 1
        payload = os.urandom(1000)
        k.send(request(abi.WRITE, 4, abi.WRITE_IN.pack(1, 100, 1000, 0, 0, 0, 0) + payload))
        assert await k.reply() == (4, 0, abi.WRITE_OUT.pack(1000, 0))
        assert fs.data[100:1100] == payload
        k.send(request(abi.LOOKUP, 5, b"disk\0", nodeid=1))
        unique, error, body = await k.reply()
        assert (unique, error, abi.ENTRY_OUT.unpack_from(body)[0]) == (5, 0, 2)
        k.send(request(abi.LOOKUP, 6, b"none\0", nodeid=1))
        assert await k.reply() == (6, -errno.ENOENT, b"")
        # refused, and the loop goes on:
        k.send(request(abi.LOOKUP, 7, b"boom\0", nodeid=1))  # an operation's bug: EIO
        assert await k.reply() == (7, -errno.EIO, b"")
        k.send(request(abi.LOOKUP, 8, b"no-nul", nodeid=1))
        assert await k.reply() == (8, -errno.EINVAL, b"")
        k.send(request(abi.WRITE, 9, abi.WRITE_IN.pack(1, 0, 5000, 0, 0, 0, 0) + bytes(10)))  # says 5000, has 10
        assert await k.reply() == (9, -errno.EINVAL, b"")
        k.send(request(abi.GETATTR, 10, b"", length=999))  # a header that lies about its length
        assert await k.reply() == (10, -errno.EINVAL, b"")
        k.send(request(abi.READ, 11, b"\0" * 8))  # a body too short for its op
        assert await k.reply() == (11, -errno.EINVAL, b"")
        k.send(request(abi.SETATTR, 15, bytes(abi.SETATTR_IN.size)))  # an operation this file system lacks
        assert await k.reply() == (15, -errno.EIO, b"")
        k.send(b"\x01\x02")  # shorter than a header: nothing to answer
        k.send(request(abi.FORGET, 12, struct.pack("<Q", 1)))  # no reply by protocol
        await k.no_reply()
        k.send(request(200, 13))  # an opcode nobody knows
        assert await k.reply() == (13, -errno.ENOSYS, b"")
        k.send(request(abi.GETATTR, 14, bytes(16)))
        unique, error, body = await k.reply()
        assert (unique, error, len(body)) == (14, 0, abi.ATTR_OUT.size + abi.ATTR.size)
        session.stop()
    assert fs.data[100:1100] == payload


async def test_stop_lets_requests_under_way_finish_and_end_of_device_ends_the_loop():
    """`stop` reads nothing more but the request a task is serving still
    gets its answer; and a device that reports end of file (as a socket
    stand-in does where /dev/fuse says ENODEV) ends `serve` by itself."""
    fs = OneFile()
    fs.data[:] = os.urandom(len(fs.data))
    gate = trio.Event()
    real_read = fs.read

    async def held_read(fh: int, off: int, size: int) -> bytes:
        await gate.wait()
        return await real_read(fh, off, size)

    fs.read = held_read  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        k, session = await serving(nursery, fs)
        k.send(request(abi.READ, 2, read_in(40 << 10, 4096)))  # a task, held
        await trio.sleep(0.05)
        session.stop()
        k.send(request(abi.READ, 3, read_in(0, 4096)))  # after stop: never read
        gate.set()
        assert await k.reply() == (2, 0, bytes(fs.data[40 << 10:44 << 10]))
        await k.no_reply()
    k2_fs = OneFile()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            k2, _ = await serving(nursery, k2_fs)
            k2.sock.close()  # serve returns on its own; the nursery then exits


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from([abi.LOOKUP, abi.GETATTR, abi.READ, abi.WRITE, abi.OPEN, abi.SETATTR,
                                           abi.RENAME, abi.CREATE, abi.SETXATTR, abi.GETXATTR, 77]),
                          st.one_of(st.binary(max_size=120), st.binary(min_size=80, max_size=100)), st.booleans()), min_size=1, max_size=12))
def test_fuzzed_requests_never_stop_the_loop(reqs):
    async def main() -> None:
        fs = OneFile()
        async with trio.open_nursery() as nursery:
            k, session = await serving(nursery, fs)
            for i, (opcode, body, lie) in enumerate(reqs):
                k.send(request(opcode, 100 + i, body, length=len(body) + 41 if lie else None))
            answered = set()
            while len(answered) < len(reqs):
                unique, error, _ = await k.reply()
                assert unique not in answered
                answered.add(unique)
            k.send(request(abi.READ, 99, read_in(0, 16)))  # still serving
            assert (await k.reply())[:2] == (99, 0)
            session.stop()

    trio.run(main)
