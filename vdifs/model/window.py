"""The write-behind window: writes acknowledged but not yet in the pool.

Pure bookkeeping, no I/O. The volume puts acknowledged writes in, its
drainer takes them out one *round* at a time, and reads lay whatever is
still here over what the pool returns.

Entries are kept per object index, oldest first, in two stages: *pending*
(not taken yet) and *sending* (taken by the round under way). A round takes
every pending object and ends before the next one starts, so the writes of
one object reach the pool in the order they were acknowledged, and a round
sends each object's writes as few non-overlapping runs (`coalesce`).
"""

from __future__ import annotations

from collections.abc import Iterable

from vdifs.model.extents import split_extents

Data = bytes | memoryview
#: One acknowledged write inside one object: (offset in the object, bytes).
Entry = tuple[int, Data]


def coalesce(entries: Iterable[Entry]) -> list[Entry]:
    """Non-overlapping runs, in offset order, holding what `entries` (oldest
    first) leave behind: where they overlap the newest bytes win, and runs
    that touch are joined into one."""
    entries = list(entries)
    if len(entries) == 1:
        return entries
    spans: list[list[int]] = []
    for start, end in sorted((off, off + len(data)) for off, data in entries):
        if spans and start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], end)
        else:
            spans.append([start, end])
    runs: list[Entry] = []
    for start, end in spans:
        buf = bytearray(end - start)
        lay_over(buf, start, entries)  # only the entries inside this span touch it
        runs.append((start, bytes(buf)))
    return runs


def lay_over(buf: bytearray, base: int, layers: Iterable[Entry]) -> None:
    """Copy the parts of `layers` (absolute offsets, oldest first) that fall
    into buf, which holds the bytes from `base` on."""
    end = base + len(buf)
    for off, data in layers:
        lo, hi = max(off, base), min(off + len(data), end)
        if lo < hi:
            buf[lo - base:hi - base] = data[lo - off:hi - off]


class WriteWindow:
    """Acknowledged writes of one VDI on their way to the pool."""

    def __init__(self, object_size: int) -> None:
        self.object_size = object_size
        self._pending: dict[int, list[Entry]] = {}
        self._sending: dict[int, list[Entry]] = {}
        self.bytes = 0  # held in both stages: what the window's limit counts

    def __bool__(self) -> bool:
        return bool(self._pending or self._sending)

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def put(self, offset: int, data: Data) -> None:
        """Add one acknowledged write. `data` is kept, not copied: pass
        immutable bytes (pyfuse3 hands writes over as bytes)."""
        extents = split_extents(offset, len(data), self.object_size)
        view = memoryview(data) if len(extents) > 1 else None
        for e in extents:
            piece = data if view is None else view[e.buf_offset:e.buf_offset + e.length]
            entries = self._pending.get(e.index)
            if entries is None:
                self._pending[e.index] = [(e.offset, piece)]
            else:
                # Older pending writes this one covers whole would only be overwritten.
                end = e.offset + e.length
                kept = []
                for entry in entries:
                    if e.offset <= entry[0] and entry[0] + len(entry[1]) <= end:
                        self.bytes -= len(entry[1])
                    else:
                        kept.append(entry)
                kept.append((e.offset, piece))
                self._pending[e.index] = kept
            self.bytes += e.length

    def take(self) -> dict[int, list[Entry]]:
        """Start a round: every pending object moves to sending; returns each
        one's writes as coalesced runs. Call only between rounds."""
        if self._sending:
            raise RuntimeError("a write-behind round is still under way")
        self._sending, self._pending = self._pending, {}
        return {index: coalesce(entries) for index, entries in self._sending.items()}

    def done(self, index: int) -> None:
        """The round wrote this object's runs: forget them."""
        for _, data in self._sending.pop(index, ()):
            self.bytes -= len(data)

    def restore(self, index: int) -> None:
        """The round could not write this object: its writes go back, ahead
        of anything that arrived since, for the next round."""
        entries = self._sending.pop(index, None)
        if entries is not None:
            self._pending[index] = entries + self._pending.get(index, [])

    def drop(self) -> int:
        """Forget everything (the writes can never be sent); returns the bytes dropped."""
        dropped = self.bytes
        self._pending.clear()
        self._sending.clear()
        self.bytes = 0
        return dropped

    def layers(self, offset: int, length: int) -> list[Entry]:
        """The writes still held that touch [offset, offset+length), with
        absolute offsets, oldest first: what a read lays over the pool's bytes."""
        found: list[Entry] = []
        first, last = offset // self.object_size, (offset + length - 1) // self.object_size
        for index in range(first, last + 1):
            base = index * self.object_size
            for stage in (self._sending, self._pending):
                for off, data in stage.get(index, ()):
                    start = base + off
                    if start < offset + length and start + len(data) > offset:
                        found.append((start, data))
        return found
