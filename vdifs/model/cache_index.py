"""The bookkeeping of the mount's local object cache: pure logic, no I/O.

Every cached object is in one state:

- FILLING: space is reserved and its bytes are being fetched; nobody reads it.
- READY: complete and verified by its block checksums on every read.
- EVICTING: its file is being removed; nobody reads it, its space is still counted.

Space is counted twice over: `reserved` (what fills in progress may still
write) and `used` (what READY and EVICTING objects hold). A fill starts
only if it can reserve its object's size up front, evicting unreferenced
READY objects least recently used first to make room; if that is not
enough it does not start and nothing waits (the read goes to the peers).
A reader holds a reference while it reads from a cached file, and a
referenced object is never chosen for eviction: asked to drop it, the
index marks it doomed and hands it over for eviction when the last
reader lets go.

`version` of an entry is bumped by anything that makes what a fill is
fetching possibly out of date (a write to the object, a drop): a fill
compares it at the end and discards its bytes if it moved.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass, field


class State(enum.IntEnum):
    FILLING = 0
    READY = 1
    EVICTING = 2


@dataclass(slots=True)
class CacheEntry:
    state: State
    charged: int  # bytes counted against the capacity (reserved while FILLING, used after)
    mutable: bool  # an object of a VDI this mount holds the lease on (else immutable: a snapshot's)
    generation: int | None  # the lease generation a mutable object's bytes belong to
    refs: int = 0  # readers inside the cached file
    doomed: bool = False  # evict when the last reader lets go
    version: int = 0


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    fills: int = 0  # objects brought in
    fill_refusals: int = 0  # fills not started: no room, even after evicting
    evictions: int = 0
    expirations: int = 0  # evictions for the time-to-live
    drops: int = 0  # objects thrown out because they may be out of date or failed their checksums
    bytes_saved: int = 0  # bytes read from the cache instead of the peers

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class CacheIndex:
    capacity: int
    entries: OrderedDict[int, CacheEntry] = field(default_factory=OrderedDict)  # least recently used first
    last_used: dict[int, float] = field(default_factory=dict)
    used: int = 0
    reserved: int = 0
    stats: CacheStats = field(default_factory=CacheStats)

    @property
    def committed(self) -> int:
        return self.used + self.reserved

    def get(self, oid: int) -> CacheEntry | None:
        return self.entries.get(oid)

    def touch(self, oid: int, now: float) -> None:
        self.entries.move_to_end(oid)
        self.last_used[oid] = now

    def adopt(self, oid: int, charged: int, now: float) -> None:
        """A READY immutable object found at start (its checksums are checked on every read)."""
        self.entries[oid] = CacheEntry(State.READY, charged, False, None)
        self.last_used[oid] = now
        self.used += charged

    def begin_fill(self, oid: int, size: int, mutable: bool, generation: int | None,
                   now: float) -> list[int] | None:
        """Reserve `size` bytes for a new FILLING entry. Returns the objects
        to evict first to make room (now EVICTING), or None when even that
        is not enough: then nothing changed."""
        if oid in self.entries or size > self.capacity:
            return None
        need = self.committed + size - self.capacity
        victims: list[int] = []
        if need > 0:
            freed = 0
            for other, e in self.entries.items():
                if e.state == State.READY and e.refs == 0 and not e.doomed:
                    victims.append(other)
                    freed += e.charged
                    if freed >= need:
                        break
            if freed < need:
                self.stats.fill_refusals += 1
                return None
            for other in victims:
                self.entries[other].state = State.EVICTING
            self.stats.evictions += len(victims)
        self.entries[oid] = CacheEntry(State.FILLING, size, mutable, generation)
        self.last_used[oid] = now
        self.reserved += size
        return victims

    def fill_done(self, oid: int, charged: int) -> None:
        """The fill of `oid` wrote `charged` bytes (at most what it reserved): READY."""
        e = self.entries[oid]
        assert e.state == State.FILLING and charged <= e.charged
        self.reserved -= e.charged
        self.used += charged
        e.charged = charged
        e.state = State.READY
        self.stats.fills += 1

    def fill_failed(self, oid: int) -> None:
        """The fill of `oid` ended without a usable object (its file, if any, is gone)."""
        e = self.entries.pop(oid)
        self.last_used.pop(oid, None)
        assert e.state == State.FILLING
        self.reserved -= e.charged

    def recharge(self, oid: int, charged: int) -> bool:
        """A READY object grew or shrank to `charged` bytes (a write through
        it); False, and nothing changed, if the capacity cannot take it."""
        e = self.entries[oid]
        if charged > e.charged and self.committed + charged - e.charged > self.capacity:
            return False
        self.used += charged - e.charged
        e.charged = charged
        return True

    def drop(self, oid: int) -> bool:
        """`oid` may be out of date. True: it is now EVICTING and its file
        must be removed (`evicted` after). A FILLING entry only has its
        version bumped (its fill discards what it fetched); a referenced one
        is doomed (`release` hands it over)."""
        e = self.entries.get(oid)
        if e is None or e.state == State.EVICTING:
            return False
        e.version += 1
        if e.state == State.FILLING:
            return False
        self.stats.drops += 1
        if e.refs:
            e.doomed = True
            return False
        e.state = State.EVICTING
        return True

    def changed(self, oid: int) -> None:
        """A write to `oid` is starting: a fill under way may fetch older bytes."""
        e = self.entries.get(oid)
        if e is not None:
            e.version += 1

    def acquire(self, oid: int) -> None:
        self.entries[oid].refs += 1

    def release(self, oid: int) -> bool:
        """A reader let go; True if the object must now be evicted (it was doomed)."""
        e = self.entries[oid]
        e.refs -= 1
        if e.refs == 0 and e.doomed and e.state == State.READY:
            e.state = State.EVICTING
            return True
        return False

    def evicted(self, oid: int) -> None:
        """The file of an EVICTING object is gone."""
        e = self.entries.pop(oid)
        self.last_used.pop(oid, None)
        assert e.state == State.EVICTING
        self.used -= e.charged

    def expired(self, now: float, ttl: float) -> list[int]:
        """Unreferenced READY objects unused for `ttl` seconds, now EVICTING."""
        out = []
        for oid, e in self.entries.items():  # least recently used first: stop at the first fresh one
            if self.last_used.get(oid, now) > now - ttl:
                break
            if e.state == State.READY and e.refs == 0 and not e.doomed:
                e.state = State.EVICTING
                out.append(oid)
        self.stats.expirations += len(out)
        self.stats.evictions += len(out)
        return out

    def by_state(self) -> dict[str, int]:
        counts = {s.name.lower(): 0 for s in State}
        for e in self.entries.values():
            counts[e.state.name.lower()] += 1
        return counts
