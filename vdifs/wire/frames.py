"""Length-prefixed msgpack frames over a trio stream.

A frame is a 4-byte big-endian length followed by that many bytes of
msgpack. Requests are `[id, op, args]`, replies `[id, status, result]`
where status 0 is success and anything else is an errno with `result` the
message. A frame longer than the limit, or one that does not decode to the
expected shape, is a ProtocolError: the connection is closed, nothing else.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import trio

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 1 << 20


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame; drop the connection."""


class ConnectionClosed(Exception):
    """The other side closed the connection between frames."""


def encode_frame(obj: Any, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    payload = msgpack.packb(obj, use_bin_type=True)
    if len(payload) > max_frame:
        raise ProtocolError(f"frame of {len(payload)} bytes exceeds the {max_frame} byte limit")
    return HEADER.pack(len(payload)) + payload


def decode_payload(payload: bytes) -> Any:
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

    async def _read_exactly(self, n: int, *, at_boundary: bool) -> bytes:
        while len(self._buf) < n:
            chunk = await self.stream.receive_some(max(65536, n - len(self._buf)))
            if not chunk:
                if at_boundary and not self._buf:
                    raise ConnectionClosed()
                raise ProtocolError("connection closed in the middle of a frame")
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def receive(self) -> Any:
        (length,) = HEADER.unpack(await self._read_exactly(HEADER.size, at_boundary=True))
        if length > self.max_frame:
            raise ProtocolError(f"frame length {length} exceeds the {self.max_frame} byte limit")
        return decode_payload(await self._read_exactly(length, at_boundary=False))

    async def send(self, obj: Any) -> None:
        data = encode_frame(obj, self.max_frame)
        async with self._send_lock:
            await self.stream.send_all(data)

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
