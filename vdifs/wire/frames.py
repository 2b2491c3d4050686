"""Length-prefixed msgpack frames over a trio stream, with an optional raw blob.

A frame is a 4-byte big-endian length N, a 4-byte length M, M bytes of
msgpack (the message) and N - 4 - M raw bytes (the blob: object data, sent
and received without passing through msgpack, so a 4 MiB object is copied
as little as possible). Requests are `[id, op, args]`, replies
`[id, status, result]` where status 0 is success and anything else is an
errno with `result` the message. A frame longer than the limit, or one that
does not decode to the expected shape, is a ProtocolError: the connection
is closed, nothing else.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import trio

HEADER = struct.Struct(">II")
DEFAULT_MAX_FRAME = 1 << 20
Blob = bytes | bytearray | memoryview


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame; drop the connection."""


class ConnectionClosed(Exception):
    """The other side closed the connection between frames."""


def encode_frame(obj: Any, max_frame: int = DEFAULT_MAX_FRAME, blob: Blob | None = None) -> list[Blob]:
    """The frame as buffers to send in order (the blob is not copied)."""
    meta = msgpack.packb(obj, use_bin_type=True)
    blob_len = 0 if blob is None else len(blob)
    total = 4 + len(meta) + blob_len
    if total > max_frame:
        raise ProtocolError(f"frame of {total} bytes exceeds the {max_frame} byte limit")
    head = HEADER.pack(total, len(meta)) + meta
    return [head] if not blob_len else [head, blob]  # type: ignore[list-item]


def decode_payload(payload: Blob) -> Any:
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types
        raise ProtocolError(f"undecodable frame: {e}") from None


class FrameStream:
    """Reads and writes whole frames on a trio stream; one reader, one writer."""

    def __init__(self, stream: trio.abc.Stream, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.stream = stream
        self.max_frame = max_frame
        self._buf = bytearray()
        self._send_lock = trio.Lock()

    async def _fill(self, out: bytearray, *, at_boundary: bool) -> None:
        """Fill `out` completely from the buffered bytes and the stream."""
        n = len(out)
        pos = min(n, len(self._buf))
        out[:pos] = self._buf[:pos]
        del self._buf[:pos]
        while pos < n:
            chunk = await self.stream.receive_some(max(65536, n - pos))
            if not chunk:
                if at_boundary and pos == 0:
                    raise ConnectionClosed()
                raise ProtocolError("connection closed in the middle of a frame")
            take = min(len(chunk), n - pos)
            out[pos:pos + take] = chunk[:take] if take < len(chunk) else chunk
            if take < len(chunk):
                self._buf += chunk[take:]  # the start of the next frame
            pos += take

    async def receive_frame(self) -> tuple[Any, bytearray | None]:
        """The next (message, blob); blob is None when the frame has none."""
        head = bytearray(HEADER.size)
        await self._fill(head, at_boundary=True)
        total, meta_len = HEADER.unpack(head)
        if total > self.max_frame:
            raise ProtocolError(f"frame length {total} exceeds the {self.max_frame} byte limit")
        if total < 4 or meta_len > total - 4:
            raise ProtocolError(f"frame header {total}/{meta_len} is inconsistent")
        meta = bytearray(meta_len)
        await self._fill(meta, at_boundary=False)
        blob = None
        if total - 4 - meta_len:
            blob = bytearray(total - 4 - meta_len)
            await self._fill(blob, at_boundary=False)
        return decode_payload(meta), blob

    async def receive(self) -> Any:
        """The next message of a frame that must not carry a blob."""
        msg, blob = await self.receive_frame()
        if blob is not None:
            raise ProtocolError("unexpected data attached to a frame")
        return msg

    async def send(self, obj: Any, blob: Blob | None = None) -> None:
        parts = encode_frame(obj, self.max_frame, blob)
        async with self._send_lock:
            for part in parts:
                await self.stream.send_all(part)

    async def aclose(self) -> None:
        await self.stream.aclose()


def check_request(msg: Any) -> tuple[int, str, dict[str, Any]]:
    """Validate the shape of a request frame: [int id, str op, dict args]."""
    if (not isinstance(msg, list) or len(msg) != 3 or not isinstance(msg[0], int)
            or not isinstance(msg[1], str) or not isinstance(msg[2], dict)):
        raise ProtocolError("request must be [id, op, args]")
    return msg[0], msg[1], msg[2]


def check_reply(msg: Any) -> tuple[int, int, Any]:
    if (not isinstance(msg, list) or len(msg) != 3 or not isinstance(msg[0], int)
            or not isinstance(msg[1], int)):
        raise ProtocolError("reply must be [id, status, result]")
    return msg[0], msg[1], msg[2]
