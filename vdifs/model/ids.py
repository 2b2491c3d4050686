"""Object identifiers.

An object id is 64 bits: kind (8) | vid (24) | index (32). The kind keeps
data, object-map and system objects of one VDI apart; the vid names the VDI;
the index is the object's position inside the VDI (for map objects: the
map chunk number). Ids are plain ints everywhere; logs print them as 16 hex
digits.
"""

from __future__ import annotations

import enum

OBJECT_ORDER = 22
OBJECT_SIZE = 1 << OBJECT_ORDER  # 4 MiB, the default and (for now) only object size
MAX_VID = (1 << 24) - 1
MAX_INDEX = (1 << 32) - 1
#: Largest VDI: 2^32 objects of 4 MiB = 16 PiB.
MAX_VDI_SIZE = (MAX_INDEX + 1) * OBJECT_SIZE


class ObjectKind(enum.IntEnum):
    DATA = 0
    MAP = 1
    SYSTEM = 2


def pack_oid(kind: int, vid: int, index: int) -> int:
    if not 0 <= kind <= 0xFF:
        raise ValueError(f"object kind {kind} out of range")
    if not 0 < vid <= MAX_VID:
        raise ValueError(f"vid {vid} out of range 1..{MAX_VID}")
    if not 0 <= index <= MAX_INDEX:
        raise ValueError(f"object index {index} out of range")
    return (kind << 56) | (vid << 32) | index


def unpack_oid(oid: int) -> tuple[int, int, int]:
    if not 0 <= oid < 1 << 64:
        raise ValueError(f"object id {oid} is not a 64-bit value")
    return oid >> 56, (oid >> 32) & MAX_VID, oid & MAX_INDEX


def vid_of(oid: int) -> int:
    """The vid of an object id (the hot-path form of `unpack_oid(oid)[1]`)."""
    return (oid >> 32) & MAX_VID


def data_oid(vid: int, index: int) -> int:
    return pack_oid(ObjectKind.DATA, vid, index)


def map_oid(vid: int, chunk: int) -> int:
    return pack_oid(ObjectKind.MAP, vid, chunk)
