"""The export-diff stream: a VDI snapshot, or what changed between two
snapshots, as one self-checking byte stream (pure codec, no I/O policy).

Layout (all integers big-endian), documented for other tools in
docs/diff-format.md:

    magic    b"VDIFS-DIFF\\n" then the format version, 1 byte (1)
    header   u32 length, then a msgpack map: name, size, object_size,
             from (snapshot name or nil), from_id, to, to_id, created
    records  in increasing offset order, not overlapping, inside `size`:
             b"D" u64 offset u32 length, then `length` bytes (<= 4 MiB)
             b"Z" u64 offset u64 length          (these bytes are zeros)
    end      b"E" then the sha256 of every byte before this b"E"

A reader checks everything as it goes (bounds, order, lengths) and the
digest at the end, and refuses bytes after the end record, so a truncated,
corrupted or concatenated stream is always an error; the caller decides
what to undo. Memory stays bounded by one data record.
"""

from __future__ import annotations

import errno
import hashlib
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import IO, Any

import msgpack

from vdifs.errors import VdifsError
from vdifs.model.ids import MAX_VDI_SIZE
from vdifs.model.names import InvalidName, validate_name

MAGIC = b"VDIFS-DIFF\n"
VERSION = 1
MAX_HEADER = 64 << 10
MAX_DATA = 4 << 20
_DATA = struct.Struct(">QI")
_ZERO = struct.Struct(">QQ")
_LEN = struct.Struct(">I")


class DiffFormatError(VdifsError):
    """The stream is not a valid vdifs diff (corrupt, truncated, misordered)."""

    errno = errno.EBADMSG


@dataclass
class DiffHeader:
    name: str
    size: int
    object_size: int
    to: str
    to_id: str
    created: float
    from_: str | None = None
    from_id: str | None = None

    def encode(self) -> bytes:
        fields = asdict(self)
        fields["from"] = fields.pop("from_")
        body = msgpack.packb(fields)
        return MAGIC + bytes([VERSION]) + _LEN.pack(len(body)) + body

    @classmethod
    def from_fields(cls, d: Any) -> DiffHeader:
        if not isinstance(d, dict):
            raise DiffFormatError("diff header is not a map")
        try:
            h = cls(name=d["name"], size=d["size"], object_size=d["object_size"], to=d["to"],
                    to_id=d["to_id"], created=d["created"], from_=d.get("from"), from_id=d.get("from_id"))
        except KeyError as e:
            raise DiffFormatError(f"diff header lacks {e.args[0]!r}") from None
        for key, kind in (("name", str), ("to", str), ("to_id", str), ("size", int), ("object_size", int),
                          ("created", (int, float))):
            if not isinstance(getattr(h, key), kind) or isinstance(getattr(h, key), bool):
                raise DiffFormatError(f"diff header field {key!r} has the wrong type")
        if (h.from_ is None) != (h.from_id is None) or not isinstance(h.from_ or "", str) \
                or not isinstance(h.from_id or "", str):
            raise DiffFormatError("diff header: 'from' and 'from_id' must both be strings or both be nil")
        if not 0 <= h.size <= MAX_VDI_SIZE or h.object_size <= 0 or h.object_size & (h.object_size - 1):
            raise DiffFormatError(f"diff header: size {h.size} or object size {h.object_size} is impossible")
        try:
            for n in (h.name, h.to, *(() if h.from_ is None else (h.from_,))):
                validate_name(n)
        except InvalidName as e:
            raise DiffFormatError(f"diff header: {e}") from None
        return h


def data_record(offset: int, length: int) -> bytes:
    """The head of a data record; `length` bytes of data follow it."""
    return b"D" + _DATA.pack(offset, length)


def zero_record(offset: int, length: int) -> bytes:
    return b"Z" + _ZERO.pack(offset, length)


class DiffWriter:
    """Writes a stream to a binary file object, hashing as it goes."""

    def __init__(self, out: IO[bytes], header: DiffHeader) -> None:
        self.out = out
        self.sha = hashlib.sha256()
        self.written = 0
        self._put(header.encode())

    def _put(self, raw: bytes | bytearray | memoryview) -> None:
        self.sha.update(raw)
        self.out.write(raw)
        self.written += len(raw)

    def data(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if not 0 < len(data) <= MAX_DATA:
            raise ValueError("a data record holds 1 byte to 4 MiB")
        self._put(data_record(offset, len(data)))
        self._put(data)

    def zero(self, offset: int, length: int) -> None:
        self._put(zero_record(offset, length))

    def finish(self) -> None:
        self.out.write(b"E" + self.sha.digest())
        self.written += 33
        self.out.flush()


class DiffReader:
    """Parses a stream from a binary file object and checks it as it goes."""

    def __init__(self, source: IO[bytes]) -> None:
        self.source = source
        self.sha = hashlib.sha256()
        self.pos = 0
        self.header: DiffHeader | None = None

    def _read(self, n: int, *, hashed: bool = True) -> bytes:
        chunks, left = [], n
        while left:
            chunk = self.source.read(left)
            if not chunk:
                raise DiffFormatError(f"the diff stream ends early, at byte {self.pos + n - left} "
                                      f"(truncated?)")
            chunks.append(chunk)
            left -= len(chunk)
        raw = b"".join(chunks)
        if hashed:
            self.sha.update(raw)
        self.pos += n
        return raw

    def read_header(self) -> DiffHeader:
        if self._read(len(MAGIC)) != MAGIC:
            raise DiffFormatError("not a vdifs diff stream (bad magic)")
        version = self._read(1)[0]
        if version != VERSION:
            raise DiffFormatError(f"diff format version {version} is not supported (this vdifs reads {VERSION})")
        (length,) = _LEN.unpack(self._read(4))
        if length > MAX_HEADER:
            raise DiffFormatError(f"diff header of {length} bytes is too long")
        try:
            fields = msgpack.unpackb(self._read(length))
        except Exception as e:
            raise DiffFormatError(f"diff header is not msgpack ({e})") from None
        self.header = DiffHeader.from_fields(fields)
        return self.header

    def records(self) -> Iterator[tuple[str, int, bytes | int]]:
        """("D", offset, data) and ("Z", offset, length) in order; returns after
        the end record once its digest matched and nothing follows it."""
        h = self.header if self.header is not None else self.read_header()
        end = 0
        while True:
            kind = self._read(1, hashed=False)
            if kind == b"E":
                digest = self._read(32, hashed=False)
                if digest != self.sha.digest():
                    raise DiffFormatError("the diff stream is corrupt (its checksum does not match)")
                if self.source.read(1):
                    raise DiffFormatError(f"bytes follow the end of the diff stream at byte {self.pos}")
                return
            self.sha.update(kind)
            if kind == b"D":
                offset, length = _DATA.unpack(self._read(_DATA.size))
                if not 0 < length <= MAX_DATA:
                    raise DiffFormatError(f"data record of {length} bytes at byte {self.pos}")
            elif kind == b"Z":
                offset, length = _ZERO.unpack(self._read(_ZERO.size))
                if length <= 0:
                    raise DiffFormatError(f"empty zero record at byte {self.pos}")
            else:
                raise DiffFormatError(f"unknown record type {kind!r} at byte {self.pos - 1}")
            if offset < end or offset + length > h.size:
                raise DiffFormatError(f"record [{offset}, +{length}) at byte {self.pos} is out of order or "
                                      f"past the size {h.size}")
            end = offset + length
            if kind == b"D":
                yield "D", offset, self._read(length)
            else:
                yield "Z", offset, length
