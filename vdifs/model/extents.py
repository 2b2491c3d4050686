"""Splitting byte ranges of a VDI at object boundaries."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Extent:
    """The part of a byte range that falls into one object."""

    index: int  # object index within the VDI
    offset: int  # offset inside the object
    length: int
    buf_offset: int  # where this extent starts in the caller's buffer


def split_extents(offset: int, length: int, object_size: int) -> list[Extent]:
    """Cut [offset, offset+length) into per-object extents, in order."""
    if offset < 0 or length < 0:
        raise ValueError("offset and length must not be negative")
    extents = []
    pos, end = offset, offset + length
    while pos < end:
        index, inner = divmod(pos, object_size)
        n = min(object_size - inner, end - pos)
        extents.append(Extent(index, inner, n, pos - offset))
        pos += n
    return extents


def objects_for_size(size: int, object_size: int) -> int:
    """How many objects a VDI of `size` bytes spans."""
    return -(-size // object_size)
