"""The mount's NBD server: VDIs as block devices on a unix socket.

QEMU's NBD client carries what FUSE cannot: TRIM and WRITE_ZEROES free
objects, BLOCK_STATUS shows holes, and `reconnect-delay` holds a guest's
requests while the mount restarts. Exports are VDI names (read-write,
under the VDI's lease, like a writable open of the file) and `NAME@SNAP`
(a snapshot, read-only); they use the same volumes as the FUSE side, so
a VDI written here is the same file in the mount, byte for byte.

Per connection: the handshake (fixed newstyle; option haggling with
deadlines), then a loop that parses requests straight from a receive
buffer, answers at once what the volume can do without waiting (reads
from the page cache or the local cache, writes into the page cache or the
write-behind window; those replies leave together in one writev) and
starts a task for the rest, up to MAX_IN_FLIGHT requests and
MAX_IN_FLIGHT_BYTES of payload at once; replies go out as requests finish
(out of order), whole, one at a time (the send lock). A request the protocol allows but we cannot serve
gets an error reply and the connection goes on; a broken frame (bad
magic, a payload too large to skip) ends the connection, logged with its
reason. Nothing a client sends ends the server.

Writes follow the FUSE side's contract (docs/architecture.md,
"Write-behind"): a connection's writes are acknowledged from the VDI's
write-behind window only once it has sent a FLUSH (proof that it
flushes); FUA writes and FLUSH return when durable.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from vdifs.client.catalog import Catalog
from vdifs.client.volume import Volume
from vdifs.model.directory import VdiRecord
from vdifs.errors import VdifsError, as_vdifs_error
from vdifs.model.buffers import drop_sent
from vdifs.nbd import protocol as p
from vdifs.nbd.protocol import Cmd, Opt, ProtocolError, Rep, TransmissionFlag

log = logging.getLogger("vdifs.nbd")

HANDSHAKE_TIMEOUT = 30.0  # seconds a client has for the whole handshake
PAYLOAD_TIMEOUT = 60.0  # seconds for the rest of a request once part of it came
DRAIN_TIMEOUT = 30.0  # seconds the requests in flight get to finish after a disconnect
MAX_IN_FLIGHT = 64  # requests served at once per connection
MAX_IN_FLIGHT_BYTES = 64 << 20  # bytes of write payloads and read replies in flight per connection
SOCKET_MODE = 0o660
RECEIVE_SIZE = 256 << 10  # bytes asked of the socket at once
MAX_IOV = 512  # buffers per sendmsg (the kernel takes 1024)
BATCH_BYTES = 2 << 20  # read data held in a batch of replies before it is sent
ROUNDS_PER_CHECKPOINT = 16  # socket reads without a wait before the reader lets other tasks run
#: Plain writes up to this size that one parse of the receive buffer finds
#: are served together (`Volume.write_many`), up to WRITES_TOGETHER of them
#: and WRITES_TOGETHER_BYTES.
WRITE_TOGETHER_MAX = 64 << 10
WRITES_TOGETHER = 64
WRITES_TOGETHER_BYTES = 1 << 20

#: errno -> NBD error (what the protocol has; anything else is EIO)
NBD_ERRORS = {errno.EPERM: p.EPERM, errno.EROFS: p.EPERM, errno.EACCES: p.EPERM, errno.ENOMEM: p.ENOMEM,
              errno.EINVAL: p.EINVAL, errno.ENOSPC: p.ENOSPC, errno.EDQUOT: p.ENOSPC, errno.EFBIG: p.EINVAL,
              errno.EOVERFLOW: p.EOVERFLOW, errno.ENOTSUP: p.ENOTSUP, errno.ESHUTDOWN: p.ESHUTDOWN}


class Closed(Exception):
    """The client closed the connection (where that is allowed)."""


class Gone(Exception):
    """A reply could not be sent: the client went away."""


class Reader:
    """Exact-size reads from a stream for the handshake, with a buffer of
    what came early (`available`, `take`: what a client sent right after
    attaching goes on to the transmission loop, which reads the socket
    itself)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buf = bytearray()
        self._pos = 0

    def available(self) -> int:
        return len(self._buf) - self._pos

    def take(self, n: int) -> bytes:
        """`n` buffered bytes (the caller saw them `available`)."""
        out = bytes(self._buf[self._pos:self._pos + n])
        self._pos += n
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        return out

    async def fill(self, n: int) -> None:
        """Until `n` bytes are buffered; Closed at a clean end of the stream."""
        while self.available() < n:
            if self._pos:
                del self._buf[:self._pos]
                self._pos = 0
            chunk = await self.stream.receive_some(max(RECEIVE_SIZE, n - len(self._buf)))
            if not chunk:
                if self._buf:
                    raise ProtocolError(f"connection closed inside a frame ({len(self._buf)} of {n} bytes)")
                raise Closed()
            self._buf += chunk

    async def exactly(self, n: int) -> bytes:
        await self.fill(n)
        return self.take(n)


@dataclass
class Export:
    name: str
    volume: Volume
    read_only: bool  # a snapshot
    writable: bool  # a writable handle of the catalog (holds the lease): closed at the end

    @property
    def size(self) -> int:
        return self.volume.size


def transmission_flags(read_only: bool, structured: bool) -> int:
    """What an export offers; DF only with structured replies (the protocol's rule)."""
    f = (TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
         | TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES
         | TransmissionFlag.SEND_CACHE | TransmissionFlag.SEND_FAST_ZERO)
    if structured:
        f |= TransmissionFlag.SEND_DF
    if read_only:
        f |= TransmissionFlag.READ_ONLY
    return int(f)


class Exports:
    """Export names to the catalog's VDIs and snapshots."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def names(self) -> list[str]:
        out = []
        for name, rec in self.catalog.listing():
            out.append(name)
            out.extend(f"{name}@{snap}" for snap in sorted(rec.snapshots))
        return out

    async def _find(self, name: str) -> tuple[VdiRecord, str | None]:
        """The VDI an export name means, and the snapshot it names (if any).
        On a shared directory a name is called unknown only after reading
        the directory again through its register (it may have been made
        on another mount a moment ago)."""
        vdi, at, snap = name.partition("@")
        for again in (self.catalog.shared, False):
            try:  # the directory's record (a loaded volume's keeps the snapshots it was loaded with)
                rec: VdiRecord | None = self.catalog.current.get(vdi)
            except VdifsError:
                rec = None
            if rec is not None and (not at or snap in rec.snapshots):
                return rec, (snap if at else None)
            if not again:
                break
            await self.catalog.directory.refresh()
        raise VdifsError(f"no export {name!r}: not a VDI (or VDI@SNAPSHOT) of this cluster", code=errno.ENOENT)

    async def describe(self, name: str) -> tuple[int, bool]:
        """(size, read-only) of an export; VdifsError (ENOENT) if there is none."""
        rec, snap = await self._find(name)
        if snap is not None:
            return rec.snapshots[snap].size, True
        loaded = self.catalog.record_of(rec.vid)  # a loaded volume's size may be ahead of the directory
        return (loaded or rec).size, False

    async def open(self, name: str) -> Export:
        """The export's volume: a VDI opened writable (its lease taken, as by
        a writable open of its file), or a snapshot."""
        rec, snap = await self._find(name)
        if snap is not None:
            vol = await self.catalog.snapshot_volume(rec.snapshots[snap].vid)
            return Export(name, vol, read_only=True, writable=False)
        vol = await self.catalog.open(rec.vid, writable=True)
        return Export(name, vol, read_only=False, writable=True)

    async def close(self, export: Export) -> None:
        """Give the handle back (the last writer's close releases the lease
        after a flush, as a file's close does)."""
        if export.writable:
            try:
                await self.catalog.writer_closing(export.volume)
            finally:
                await self.catalog.close(export.volume, writable=True)


#: Drops the kernel's cached pages of a VDI (by vid) that FUSE read: the mount's.
DropPages = Callable[[int], Awaitable[None]]


class Connection:
    def __init__(self, stream: trio.SocketStream, exports: Exports, peer: str,
                 drop_pages: DropPages | None = None) -> None:
        self.stream = stream
        self.exports = exports
        self.peer = peer
        self.drop_pages = drop_pages
        self.reader = Reader(stream)
        self.send_lock = trio.Lock()
        self.structured = False
        self.contexts = False  # base:allocation selected
        self.no_zeroes = False
        self.flushed = False  # a FLUSH came: writes may be acknowledged from the window
        self.export: Export | None = None
        self._batch: list[bytes | bytearray | memoryview] = []  # replies answered at once, not yet sent
        self._writes: list[tuple[int, int, bytes]] = []  # plain writes parsed, to be served together
        self._writes_held = 0  # their bytes
        self._slots = trio.Semaphore(MAX_IN_FLIGHT)
        self._bytes = 0
        self._bytes_freed = trio.Event()

    async def run(self) -> None:
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await self._handshake()
            if self.export is not None:
                log.info("nbd: %s attached export %s (%s)", self.peer, self.export.name,
                         "read-only" if self.export.read_only else "read-write")
                await self._transmission()
        except Closed:
            pass
        except trio.TooSlowError:
            log.warning("nbd: %s: handshake not done within %.0f s: connection closed", self.peer,
                        HANDSHAKE_TIMEOUT)
        except ProtocolError as e:
            log.warning("nbd: %s%s: %s: connection closed", self.peer,
                        f" (export {self.export.name})" if self.export else "", e)
        except (Gone, trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass
        finally:
            with trio.CancelScope(shield=True):
                if self.export is not None:
                    try:
                        await self.exports.close(self.export)
                    except VdifsError as e:
                        log.warning("nbd: export %s: closing it failed: %s", self.export.name, e)
                    log.info("nbd: %s detached export %s", self.peer, self.export.name)
                await self.stream.aclose()

    # -- handshake ---------------------------------------------------------------------

    async def _handshake(self) -> None:
        await self.stream.send_all(p.GREETING)
        (client_flags,) = struct.unpack(">I", await self.reader.exactly(4))
        if client_flags & ~p.CLIENT_FLAGS_KNOWN:
            raise ProtocolError(f"unknown client flags {client_flags:#x}")
        if not client_flags & p.FLAG_FIXED_NEWSTYLE:
            raise ProtocolError("the client does not speak fixed newstyle")
        self.no_zeroes = bool(client_flags & p.FLAG_NO_ZEROES)
        while self.export is None:
            magic, option, length = p.OPTION_HEADER.unpack(await self.reader.exactly(p.OPTION_HEADER.size))
            if magic != p.IHAVEOPT:
                raise ProtocolError(f"bad option magic {magic:#x}")
            if length > p.MAX_OPTION_DATA:
                raise ProtocolError(f"option {option} carries {length} bytes (at most {p.MAX_OPTION_DATA})")
            data = bytes(await self.reader.exactly(length))
            if not await self._option(option, data):
                return

    async def _reply(self, option: int, reply: int, data: bytes = b"") -> None:
        await self.stream.send_all(p.option_reply(option, reply, data))

    async def _refuse(self, option: int, reply: Rep, message: str) -> None:
        log.info("nbd: %s: option %d refused: %s", self.peer, option, message)
        await self.stream.send_all(p.error_reply(option, reply, message))

    async def _option(self, option: int, data: bytes) -> bool:
        """Answer one option; False when the handshake ends without an export."""
        if option == Opt.EXPORT_NAME:
            name = data.decode("utf-8", "replace")
            try:
                self.export = await self.exports.open(name)
            except VdifsError as e:
                raise ProtocolError(f"export {name!r} cannot be attached: {e}") from None  # no way to say so
            await self.stream.send_all(p.export_name_reply(
                self.export.size, transmission_flags(self.export.read_only, self.structured), self.no_zeroes))
        elif option == Opt.ABORT:
            await self._reply(option, Rep.ACK)
            return False
        elif option == Opt.LIST:
            if data:
                await self._refuse(option, Rep.ERR_INVALID, "NBD_OPT_LIST takes no data")
                return True
            for name in self.exports.names():
                await self._reply(option, Rep.SERVER, p.server_entry(name))
            await self._reply(option, Rep.ACK)
        elif option == Opt.STRUCTURED_REPLY:
            if data or self.structured:
                await self._refuse(option, Rep.ERR_INVALID, "structured replies: no data, and only once")
                return True
            self.structured = True
            await self._reply(option, Rep.ACK)
        elif option in (Opt.INFO, Opt.GO):
            await self._info_or_go(option, data)
        elif option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            await self._meta(option, data)
        elif option == Opt.STARTTLS:
            await self._refuse(option, Rep.ERR_UNSUP, "no TLS on the mount's local socket")
        else:
            await self._refuse(option, Rep.ERR_UNSUP, f"option {option} is not supported")
        return True

    async def _info_or_go(self, option: int, data: bytes) -> None:
        try:
            req = p.parse_go(data)
        except ValueError as e:
            await self._refuse(option, Rep.ERR_INVALID, f"malformed request: {e}")
            return
        try:
            size, read_only = await self.exports.describe(req.name)
        except VdifsError as e:
            await self._refuse(option, Rep.ERR_UNKNOWN, str(e))
            return
        export = None
        if option == Opt.GO:
            try:
                export = await self.exports.open(req.name)
            except VdifsError as e:
                await self._refuse(option, Rep.ERR_POLICY if e.errno == errno.EBUSY else Rep.ERR_UNKNOWN,
                                   f"export {req.name}: {e}")
                return
            self.export = export  # given back by `run` however the handshake ends from here
            size = export.size
        await self._reply(option, Rep.INFO, p.info_export(size, transmission_flags(read_only, self.structured)))
        if p.Info.NAME in req.infos:
            await self._reply(option, Rep.INFO, p.info_name(req.name))
        if p.Info.DESCRIPTION in req.infos:
            await self._reply(option, Rep.INFO, p.info_description(
                f"vdifs {'snapshot' if read_only else 'VDI'} {req.name}"))
        if p.Info.BLOCK_SIZE in req.infos:
            await self._reply(option, Rep.INFO, p.info_block_size())
        await self._reply(option, Rep.ACK)

    async def _meta(self, option: int, data: bytes) -> None:
        try:
            req = p.parse_meta(data)
        except ValueError as e:
            await self._refuse(option, Rep.ERR_INVALID, f"malformed request: {e}")
            return
        if option == Opt.SET_META_CONTEXT and not self.structured:
            await self._refuse(option, Rep.ERR_INVALID, "structured replies first")
            return
        try:
            await self.exports.describe(req.name)
        except VdifsError as e:
            await self._refuse(option, Rep.ERR_UNKNOWN, str(e))
            return
        if option == Opt.LIST_META_CONTEXT:
            hit = not req.queries or any(q in (p.BASE_ALLOCATION, "base:") for q in req.queries)
        else:
            hit = p.BASE_ALLOCATION in req.queries
            self.contexts = hit
        if hit:
            await self._reply(option, Rep.META_CONTEXT, p.meta_context(p.BASE_ALLOCATION_ID, p.BASE_ALLOCATION))
        await self._reply(option, Rep.ACK)

    # -- transmission ------------------------------------------------------------------

    async def _transmission(self) -> None:
        """Requests until the client disconnects; what ends the connection is
        raised after the requests in flight are answered (outside the
        nursery, so it is not wrapped in an exception group)."""
        export = self.export
        assert export is not None
        ended: BaseException | None = None
        async with trio.open_nursery() as nursery:
            try:
                await self._requests(export, nursery)
            except (ProtocolError, Gone, trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError) as e:
                ended = e
                nursery.cancel_scope.cancel()  # nobody will read the replies of what is in flight
            else:  # DISC or the end of the stream: what is in flight is answered, for a while
                nursery.cancel_scope.deadline = trio.current_time() + DRAIN_TIMEOUT
        if ended is not None:
            raise ended

    async def _requests(self, export: Export, nursery: trio.Nursery) -> None:
        """The reader: requests parsed straight from a receive buffer, and
        answered at once, with no task and no await, when the volume can do
        them at once (`read_now`, `write_now`: the page cache, the cache,
        the write-behind window); those replies go out together in one
        writev when the buffer is parsed. Everything else is a task. The
        socket is read and written directly (it is non-blocking); the
        reader waits only when it has nothing to parse."""
        sock = self.stream.socket
        fd = sock.fileno()
        buf = bytearray(max(RECEIVE_SIZE, self.reader.available()))
        start, end = 0, self.reader.available()
        buf[:end] = self.reader.take(end)  # what came with the handshake
        vol, read_only = export.volume, export.read_only
        structured, contexts = self.structured, self.contexts
        header = p.REQUEST
        batch = self._batch
        batched = 0  # bytes of read data in the batch
        rounds = 0  # reads of the socket since the last scheduling pass
        while True:
            while end - start >= header.size:
                magic, flags, kind, cookie, offset, length = header.unpack_from(buf, start)
                if magic != p.REQUEST_MAGIC:
                    raise ProtocolError(f"bad request magic {magic:#x}")
                used = header.size
                payload = b""
                if kind == p.CMD_WRITE:
                    if length > p.MAX_BLOCK:  # too large to take, and skipping it is no better
                        raise ProtocolError(f"a write of {length} bytes (at most {p.MAX_BLOCK})")
                    if end - start < used + length:
                        if start + used + length > len(buf):  # make room for the payload
                            del buf[:start]
                            end -= start
                            start = 0
                            want = max(RECEIVE_SIZE, used + length)
                            if want > len(buf):
                                buf.extend(bytes(want - len(buf)))
                        break
                    payload = bytes(buf[start + used:start + used + length])
                    used += length
                elif kind == p.CMD_DISC:
                    if self._writes:
                        await self._start_writes(export, nursery)
                    await self._flush_batch()
                    return  # the nursery waits for what is in flight; then we close
                start += used
                # the size now, not at attach: a VDI shrunk meanwhile is never grown back by a write here
                error = p.check_request(flags, kind, offset, length, vol.size, read_only, structured, contexts)
                if error:
                    batch.append(self._error_reply(cookie, error, f"request refused (type {kind}, "
                                                   f"flags {flags:#x}, {length} bytes at {offset})"))
                    continue
                if kind == p.CMD_READ and not flags:
                    try:
                        data = vol.read_now(offset, length)
                    except Exception:
                        data = None  # the task meets whatever it was and says so
                    if data is not None and len(data) == length:
                        batch.append(self._data_header(cookie, offset, length))
                        batch.append(data)
                        batched += length
                        if batched > BATCH_BYTES:  # replies held for one writev stay bounded
                            await self._flush_batch()
                            batched = 0
                        continue
                elif kind == p.CMD_WRITE and not flags:
                    try:  # (pages FUSE read must be dropped before the reply: a task does it)
                        done = not vol.kernel_pages and vol.write_now(offset, payload, behind=self.flushed)
                    except Exception:
                        done = False
                    if done:
                        batch.append(self._ok_reply(cookie))
                        continue
                    if length <= WRITE_TOGETHER_MAX:
                        self._writes.append((cookie, offset, payload))
                        self._writes_held += length
                        if len(self._writes) >= WRITES_TOGETHER or self._writes_held >= WRITES_TOGETHER_BYTES:
                            await self._start_writes(export, nursery)
                        continue
                if self._writes:
                    await self._start_writes(export, nursery)  # tasks start in the order requests came
                held = length if kind in (p.CMD_READ, p.CMD_WRITE) else 0
                await self._admit_task(held)
                nursery.start_soon(self._serve, export, flags, kind, cookie, offset, length, payload, held)
            if self._writes:
                await self._start_writes(export, nursery)
            if batch:
                await self._flush_batch()
            batched = 0
            if start == end:
                start = end = 0
                if len(buf) != RECEIVE_SIZE:
                    buf = bytearray(RECEIVE_SIZE)  # a large write passed: give its room back
            elif start > len(buf) // 2:
                del buf[:start]
                buf.extend(bytes(start))
                end -= start
                start = 0
            rounds += 1
            if rounds >= ROUNDS_PER_CHECKPOINT:  # a client that never lets the socket run dry
                rounds = 0                        # does not keep the rest of the mount waiting
                await trio.lowlevel.checkpoint()
            try:
                n = os.readv(fd, [memoryview(buf)[end:]])
            except BlockingIOError:
                rounds = 0
                if start == end:
                    await trio.lowlevel.wait_readable(sock)
                else:  # part of a request came: the rest has PAYLOAD_TIMEOUT
                    with trio.move_on_after(PAYLOAD_TIMEOUT) as waited:
                        await trio.lowlevel.wait_readable(sock)
                    if waited.cancelled_caught:
                        raise ProtocolError(f"the rest of a request did not come within {PAYLOAD_TIMEOUT:.0f} s")
                continue
            if not n:
                if end > start:
                    raise ProtocolError(f"connection closed inside a request ({end - start} bytes of it came)")
                return
            end += n

    async def _start_writes(self, export: Export, nursery: trio.Nursery) -> None:
        """One task for the plain writes parsed so far (`_serve_writes`),
        admitted as one request of their total size."""
        writes, held = self._writes, self._writes_held
        self._writes, self._writes_held = [], 0
        await self._admit_task(held)
        if len(writes) == 1:
            cookie, offset, payload = writes[0]
            nursery.start_soon(self._serve, export, 0, p.CMD_WRITE, cookie, offset, len(payload), payload, held)
        else:
            nursery.start_soon(self._serve_writes, export, writes, held)

    async def _serve_writes(self, export: Export, writes: list[tuple[int, int, bytes]], held: int) -> None:
        """Plain writes a client sent together, made together
        (`Volume.write_many`), their replies sent together."""
        vol = export.volume
        try:
            try:
                results = await vol.write_many([(offset, payload) for _, offset, payload in writes],
                                               behind=self.flushed)
            except Exception as e:  # (one that concerns them all: a read-only or fenced VDI)
                results = [e] * len(writes)
            if any(r is None for r in results):
                await self._drop_kernel_pages(vol)
            replies: list[bytes | bytearray | memoryview] = [
                self._ok_reply(cookie) if error is None
                else self._failure_reply(export, p.CMD_WRITE, cookie, offset, len(payload), error)
                for (cookie, offset, payload), error in zip(writes, results)]
            with contextlib.suppress(Gone):
                await self._send(replies)
        finally:
            self._give_back(held)
            self._slots.release()

    async def _admit_task(self, held: int) -> None:
        """Room for a task holding `held` bytes, and its slot; the replies
        answered so far go out first if we may wait."""
        if self._batch and (not self._slots.value or self._bytes + held > MAX_IN_FLIGHT_BYTES):
            await self._flush_batch()
        await self._room(held)
        if self._slots.value:
            self._slots.acquire_nowait()  # no scheduling pass when a slot is free
        else:
            await self._slots.acquire()

    async def _room(self, n: int) -> None:
        """Wait until `n` more bytes may be in flight (one request is always let through)."""
        while self._bytes and self._bytes + n > MAX_IN_FLIGHT_BYTES:
            await self._bytes_freed.wait()
        self._bytes += n

    def _give_back(self, n: int) -> None:
        if n:
            self._bytes -= n
            self._bytes_freed.set()
            self._bytes_freed = trio.Event()

    async def _serve(self, export: Export, flags: int, kind: int, cookie: int, offset: int, length: int,
                     payload: bytes, held: int) -> None:
        try:
            try:
                await self._execute(export, flags, kind, cookie, offset, length, payload)
            except Gone:
                pass  # the client went away: the reader sees it too
            except Exception as e:
                with contextlib.suppress(Gone):
                    await self._send([self._failure_reply(export, kind, cookie, offset, length, e)])
        finally:
            self._give_back(held)
            self._slots.release()

    def _failure_reply(self, export: Export, kind: int, cookie: int, offset: int, length: int,
                       e: Exception) -> bytes:
        """The error reply to a request that failed with `e`, logged."""
        error = as_vdifs_error(e) or (VdifsError(str(e), code=e.errno or errno.EIO)
                                      if isinstance(e, OSError) else None)
        if error is None:  # a bug: the client gets EIO, the server goes on
            log.error("nbd: export %s: %s failed unexpectedly", export.name, Cmd(kind).name, exc_info=e)
            error = VdifsError(f"internal error: {e}")
        else:
            log.info("nbd: export %s: %s of %d bytes at %d failed: %s", export.name,
                     Cmd(kind).name, length, offset, error)
        return self._error_reply(cookie, NBD_ERRORS.get(error.errno, p.EIO), str(error))

    async def _execute(self, export: Export, flags: int, kind: int, cookie: int, offset: int, length: int,
                       payload: bytes) -> None:
        vol = export.volume
        if kind == Cmd.READ:
            data = await vol.read(offset, length)
            if len(data) < length:  # the VDI shrank meanwhile: zeros past its end
                data = bytes(data) + bytes(length - len(data))
            await self._send([self._data_header(cookie, offset, length), data])
            return
        if kind == Cmd.WRITE:
            fua = bool(flags & p.FLAG_FUA)
            await vol.write(offset, payload, behind=self.flushed and not fua)
            await self._drop_kernel_pages(vol)
            if fua:
                await vol.flush()
        elif kind == Cmd.FLUSH:
            await vol.flush()
            self.flushed = True
        elif kind in (Cmd.TRIM, Cmd.WRITE_ZEROES):
            await vol.discard(offset, length, provision=kind == Cmd.WRITE_ZEROES and bool(flags & p.FLAG_NO_HOLE))
            await self._drop_kernel_pages(vol)
            if flags & p.FLAG_FUA:
                await vol.flush()
        elif kind == Cmd.BLOCK_STATUS:
            allocated = vol.allocation(offset, length)
            extents = p.allocation_extents(offset, length, vol.object_size, allocated,
                                           bool(flags & p.FLAG_REQ_ONE))
            await self._send([p.block_status_reply(cookie, extents)])
            return
        # CACHE: nothing to do (reads are fast enough to need no warming)
        await self._send([self._ok_reply(cookie)])

    async def _drop_kernel_pages(self, vol: Volume) -> None:
        """After a change: if FUSE read the VDI since its pages were last
        dropped, drop them before the reply, so that no reader of the file
        is served the bytes this export just replaced (design change 62)."""
        if vol.kernel_pages and self.drop_pages is not None:
            vol.kernel_pages = False
            await self.drop_pages(vol.vid)

    async def _flush_batch(self) -> None:
        if self._batch:
            batch = self._batch[:]
            self._batch.clear()  # the reader holds this very list
            await self._send(batch)

    async def _send(self, parts: list[bytes | bytearray | memoryview]) -> None:
        """Replies out, whole and one after another: at once if nobody is
        sending and the socket takes them (no await), else under the send
        lock. Gone if the client went away."""
        try:
            await self._send_whole(parts)
        except (BrokenPipeError, ConnectionResetError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise Gone(str(e)) from None

    async def _send_whole(self, parts: list[bytes | bytearray | memoryview]) -> None:
        if not self.send_lock.locked():
            total = sum(len(x) for x in parts)
            try:
                sent = os.writev(self.stream.socket.fileno(), parts[:MAX_IOV]) if len(parts) > 1 else \
                    os.write(self.stream.socket.fileno(), parts[0])
            except BlockingIOError:
                sent = 0
            if sent == total:
                return
            self.send_lock.acquire_nowait()  # nobody else may send until the rest of these is out
            try:
                await self._send_rest(parts, sent)
            finally:
                self.send_lock.release()
            return
        async with self.send_lock:
            await self._send_rest(parts, 0)

    async def _send_rest(self, parts: list[bytes | bytearray | memoryview], sent: int) -> None:
        views = [memoryview(x) for x in parts]
        drop_sent(views, sent)
        while views:
            drop_sent(views, await self.stream.socket.sendmsg(views[:MAX_IOV]))

    def _ok_reply(self, cookie: int) -> bytes:
        return p.structured_done(cookie) if self.structured else p.simple_reply(cookie)

    def _error_reply(self, cookie: int, error: int, message: str) -> bytes:
        return p.structured_error(cookie, error, message) if self.structured else p.simple_reply(cookie, error)

    def _data_header(self, cookie: int, offset: int, length: int) -> bytes:
        return (p.structured_data_header(cookie, offset, length, True) if self.structured
                else p.simple_reply(cookie))


class NbdServer:
    def __init__(self, catalog: Catalog, path: str, group: str | None = None,
                 drop_pages: DropPages | None = None) -> None:
        """`group`: the socket's group (its members may connect: QEMU run
        as its own user, as libvirt does), else the process's. `drop_pages`:
        how a change drops the pages the kernel cached of a VDI FUSE read."""
        self.path = os.path.abspath(path)
        self.group = group
        self.drop_pages = drop_pages
        self.exports = Exports(catalog)
        self.connections = 0  # open now
        self.connections_total = 0
        self._scope: trio.CancelScope | None = None
        self._done = trio.Event()

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on the socket until `stop`; every connection is served in a
        task of its own, and is closed (its export given back) at the stop."""
        sock = await self._listen()
        try:
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    listener = trio.SocketListener(sock)
                    task_status.started()
                    log.info("nbd: serving VDIs at %s", self.path)
                    await trio.serve_listeners(self._handle, [listener], handler_nursery=nursery)
        finally:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self._done.set()

    async def _listen(self) -> trio.socket.SocketType:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        if os.path.lexists(self.path):
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise VdifsError(f"{self.path} exists and is not a socket: not serving NBD there",
                                 code=errno.EEXIST)
            if await _answers(self.path):
                raise VdifsError(f"another process serves NBD at {self.path}", code=errno.EADDRINUSE)
            os.unlink(self.path)  # left by a process that is gone
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(self.path)
            os.chmod(self.path, SOCKET_MODE)
            if self.group is not None:
                os.chown(self.path, -1, group_id(self.group))
            sock.listen(64)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        self.connections_total += 1
        peer = f"client {self.connections_total}"
        try:
            await Connection(stream, self.exports, peer, self.drop_pages).run()
        except Exception:  # a bug: this connection ends, the server and the others go on
            log.exception("nbd: %s: connection failed unexpectedly", peer)
        finally:
            self.connections -= 1

    async def stop(self) -> None:
        """Close every connection (each gives its export back) and the socket."""
        if self._scope is not None:
            self._scope.cancel()
            await self._done.wait()


def group_id(group: str) -> int:
    """A group's id, by name or number; VdifsError if there is no such group."""
    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise VdifsError(f"no group {group!r} for the NBD socket", code=errno.EINVAL) from None


async def _answers(path: str) -> bool:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with trio.move_on_after(2):
            await sock.connect(path)
            return True
        return False
    except OSError:
        return False
    finally:
        sock.close()

