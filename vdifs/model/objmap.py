"""The object map: for every object index of a VDI, where its data is.

Entries are u32: NON_EXISTENT (0) is a hole that reads as zeros without any
I/O; a vid means the data lives in object (vid, index) (the VDI's current
data vid, or an older data vid of its family whose object it still shares
with a snapshot); PENDING_DELETE marks an object that is being
freed, so a crash half-way through freeing it is finished on the next mount.

On disk the map is stored little-endian in map objects of 4 MiB (1 Mi
entries each). In memory it is kept sparse, as 4 KiB pages of 1024 entries
that exist only where some entry is non-zero, so a 16 PiB VDI that is
almost empty costs almost nothing.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterator

NON_EXISTENT = 0
PENDING_DELETE = 0xFFFFFFFF

ENTRY_BYTES = 4
PAGE_ENTRIES = 1024
PAGE_BYTES = PAGE_ENTRIES * ENTRY_BYTES
CHUNK_ENTRIES = 1 << 20  # entries per map object
CHUNK_BYTES = CHUNK_ENTRIES * ENTRY_BYTES
PAGES_PER_CHUNK = CHUNK_ENTRIES // PAGE_ENTRIES

_ZERO_PAGE = bytes(PAGE_BYTES)
_SWAP = sys.byteorder != "little"
assert array("I").itemsize == ENTRY_BYTES


def map_chunks(size: int, object_size: int) -> list[tuple[int, int]]:
    """(chunk, bytes stored) of every map object a VDI of `size` bytes needs:
    whole chunks, then the part of the last one its entries cover."""
    entries = -(-size // object_size)
    return [(chunk, min(CHUNK_BYTES, (entries - chunk * CHUNK_ENTRIES) * ENTRY_BYTES))
            for chunk in range(-(-entries // CHUNK_ENTRIES))]


def is_allocated(entry: int) -> bool:
    return entry != NON_EXISTENT and entry != PENDING_DELETE


def entry_location(index: int) -> tuple[int, int]:
    """(map chunk number, byte offset inside that map object) of entry `index`."""
    chunk, inner = divmod(index, CHUNK_ENTRIES)
    return chunk, inner * ENTRY_BYTES


def decode_entry(raw: bytes | bytearray) -> int:
    """One stored entry; a map object too short to hold it (never written
    that far) reads as a hole."""
    return int.from_bytes(raw, "little") if len(raw) == ENTRY_BYTES else NON_EXISTENT


def page_location(page: int) -> tuple[int, int]:
    """(map chunk number, byte offset inside that map object) of a page."""
    chunk, inner = divmod(page, PAGES_PER_CHUNK)
    return chunk, inner * PAGE_BYTES


def _decode_page(raw: bytes | bytearray) -> array:
    page = array("I")
    page.frombytes(raw)
    if _SWAP:
        page.byteswap()
    return page


class ObjectMap:
    """A sparse, paged u32 array with dirty-page and allocation tracking."""

    def __init__(self) -> None:
        self._pages: dict[int, array] = {}
        self._dirty: set[int] = set()
        self.allocated = 0  # entries that point at data

    def get(self, index: int) -> int:
        page = self._pages.get(index // PAGE_ENTRIES)
        return NON_EXISTENT if page is None else page[index % PAGE_ENTRIES]

    def set(self, index: int, value: int) -> int:
        """Set one entry, return the old value, and mark its page dirty."""
        if not 0 <= value <= PENDING_DELETE:
            raise ValueError(f"map entry {value} is not a u32")
        pno = index // PAGE_ENTRIES
        page = self._pages.get(pno)
        if page is None:
            if value == NON_EXISTENT:
                return NON_EXISTENT
            page = self._pages[pno] = array("I", bytes(PAGE_BYTES))
        old = page[index % PAGE_ENTRIES]
        page[index % PAGE_ENTRIES] = value
        self.allocated += is_allocated(value) - is_allocated(old)
        self._dirty.add(pno)
        return old

    def load_chunk(self, chunk: int, raw: bytes | bytearray) -> None:
        """Fill pages from the bytes of one map object (may be short)."""
        base = chunk * PAGES_PER_CHUNK
        for i in range(0, len(raw), PAGE_BYTES):
            piece = raw[i : i + PAGE_BYTES]
            if piece == _ZERO_PAGE[: len(piece)]:
                continue
            if len(piece) < PAGE_BYTES:
                piece = piece + bytes(PAGE_BYTES - len(piece))
            page = _decode_page(piece)
            pno = base + i // PAGE_BYTES
            old = self._pages.get(pno)
            if old is not None:
                self.allocated -= sum(map(is_allocated, old))
            self._pages[pno] = page
            self.allocated += sum(map(is_allocated, page))

    def page_bytes(self, pno: int) -> bytes:
        page = self._pages.get(pno)
        if page is None:
            return _ZERO_PAGE
        if _SWAP:
            page = array("I", page)
            page.byteswap()
        return page.tobytes()

    def chunk_bytes(self, chunk: int, length: int) -> bytearray:
        """The first `length` bytes of map object `chunk`, as stored."""
        out = bytearray(length)
        base = chunk * PAGES_PER_CHUNK
        for pno in sorted(p for p in self._pages if base <= p < base + PAGES_PER_CHUNK):
            at = (pno - base) * PAGE_BYTES
            if at < length:
                out[at:at + PAGE_BYTES] = self.page_bytes(pno)[:length - at]
        return out

    def take_dirty(self) -> list[int]:
        """Return the dirty page numbers (sorted) and forget them."""
        dirty = sorted(self._dirty)
        self._dirty.clear()
        return dirty

    def mark_clean(self, pno: int) -> None:
        """The page is about to be written as it is now."""
        self._dirty.discard(pno)

    def mark_dirty(self, pages: list[int]) -> None:
        """Put pages back after a failed persist, so the next flush retries."""
        self._dirty.update(pages)

    @property
    def dirty(self) -> bool:
        return bool(self._dirty)

    @property
    def page_count(self) -> int:
        """Pages held in memory (the map's memory is proportional to it)."""
        return len(self._pages)

    def entries(self, start: int = 0) -> Iterator[tuple[int, int]]:
        """(index, entry) of every non-zero entry at or after `start`, in order."""
        for pno in sorted(self._pages):
            if (pno + 1) * PAGE_ENTRIES <= start:
                continue
            page = self._pages[pno]
            base = pno * PAGE_ENTRIES
            for i, v in enumerate(page):
                if v and base + i >= start:
                    yield base + i, v

    def drop_empty_pages(self) -> None:
        """Release memory of clean pages that became all zero."""
        for pno in [p for p, page in self._pages.items() if p not in self._dirty and not any(page)]:
            del self._pages[pno]
