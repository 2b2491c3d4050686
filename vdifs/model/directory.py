"""The directory ("super object"): every VDI's name and record.

The directory is one value kept in a register (a local file in the embedded
pool, a CASPaxos register in a cluster). It is small, so every change rewrites it whole:
callers read it, apply one of the pure operations below to a copy, and
compare-and-set it back. The operations check everything first and only
then change the copy, so a refused operation changes nothing.

Snapshots and clones. A VDI keeps its `vid` for life (its inode, its
lease); its own objects and object map live under `data_vid`. Cutting a
snapshot freezes the current data vid as the snapshot and gives the VDI a
new data vid whose map starts as a copy of the frozen one: entries keep
pointing at the frozen objects until a write copies them up. A clone is a
new VDI whose map starts as a copy of a snapshot's. So an object (v, i) is
referenced only by maps of the same family, and only through
their entry i. A deleted snapshot's vid is `retired`: its objects stay
until no live map of the family points at them. A vid being prepared (its
map copied before the directory names it) is `reserved`.

Parts (design change 55). A directory may be split into `parts` registers
so that a change rewrites one part, not every record: a `Directory` is then
one part (`part` k of `parts`), holding the VDIs whose name hashes to k
(`part_of`), the tombstones, retired vids and reservations its operations
made, and its own vid counter, which hands out the vids = k (mod parts).
Readers see `Directory.merged(parts)`. The operations below are each one
part's: only a rename or a clone whose two names hash to different parts
takes two, as an intent in the source part (`begin_rename`,
`begin_clone`), a decision in the target part (`arrive`) and the intent's
end (`settle` or `abandon`); `meta.directory_service` runs those steps and
finishes any intent it meets. A record with an intent pending is frozen:
`get` and `by_vid` of it raise `IntentPending` in a draft, so nothing
changes it before the intent is done. A directory that is not split
(`parts` 1) is stored exactly as before parts existed (format 1).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import mmh3
import msgpack

from vdifs.errors import InvalidArgument, NoSpace, TooLarge, VdiExists, VdifsError, VdiNotFound
from vdifs.model.ids import MAX_VDI_SIZE, MAX_VID, OBJECT_ORDER
from vdifs.model import xattrs
from vdifs.model.names import validate_name

#: A whole directory in one register.
FORMAT_VERSION = 1
#: One part of a split directory (and the root register that names the parts).
PART_FORMAT = 2
#: Parts of a new directory: at 10,000 VDIs about 160 records per part.
DEFAULT_PARTS = 64
#: How long a part remembers what it decided about an arriving record
#: (`Directory.arrive`): far longer than any mount takes to finish an intent
#: (mounts finish intents older than `meta.directory_service.INTENT_AGE`).
ARRIVALS_KEPT = 7 * 24 * 3600.0


def part_of(name: str, parts: int) -> int:
    """The part a VDI's name lives in."""
    return mmh3.hash(name.encode(), 0, False) % parts if parts > 1 else 0


class NeedsOtherParts(VdifsError):
    """A part whose vid counter wrapped must know every other part's vids in
    use before it hands one out: read them (consistently) and run the change
    again with `Directory.others_in_use` set."""

    errno = errno.EAGAIN


class IntentPending(VdifsError):
    """The record is being renamed or a clone of it is being committed
    across parts: finish that intent (`key`, in part `part`) first."""

    errno = errno.EAGAIN

    def __init__(self, message: str, *, part: int, key: str) -> None:
        super().__init__(message)
        self.part = part
        self.key = key

_Record = TypeVar("_Record", "SnapshotRecord", "VdiRecord")


@dataclass
class SnapshotRecord:
    """A frozen point in time of a VDI: the map and objects of data vid `vid`."""

    vid: int
    size: int
    ctime: float
    copies: int = 1
    object_order: int = OBJECT_ORDER
    #: who this point in time is, across clusters: an import-diff gives the
    #: snapshot it creates the id of the source's, so the next incremental
    #: diff can prove it applies to the same base.
    id: str = ""

    @property
    def object_size(self) -> int:
        return 1 << self.object_order

    def to_dict(self) -> dict[str, Any]:
        own = self.__dict__
        return {name: own[name] for name in _SNAPSHOT_FIELDS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SnapshotRecord:
        return _from_stored(cls, d, _SNAPSHOT_DEFAULTS)


@dataclass
class VdiRecord:
    vid: int
    size: int
    ctime: float
    mtime: float
    copies: int = 1
    object_order: int = OBJECT_ORDER
    shared: bool = False
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    atime: float = 0.0
    #: As stored (key "data_vid"): where its own objects and map live; 0: the vid itself.
    stored_data_vid: int = 0
    #: As stored (key "family"): shared with its snapshots and clones; 0: the vid itself.
    stored_family: int = 0
    parent_vid: int = 0  # a clone: the snapshot's data vid it started from
    snapshots: dict[str, SnapshotRecord] = field(default_factory=dict)
    #: security.* and trusted.* extended attributes (`model/xattrs.py`)
    xattrs: dict[str, bytes] = field(default_factory=dict)

    @property
    def object_size(self) -> int:
        return 1 << self.object_order

    @property
    def data_vid(self) -> int:
        """The vid its current objects and map are stored under."""
        return self.stored_data_vid or self.vid

    @data_vid.setter
    def data_vid(self, value: int) -> None:
        self.stored_data_vid = value

    @property
    def family(self) -> int:
        """The family (the first VDI's vid) of every VDI and snapshot that may
        share its objects: collection looks at the maps of one family."""
        return self.stored_family or self.vid

    def to_dict(self) -> dict[str, Any]:
        """As stored; no "xattrs" key when there are none (most VDIs: the
        directory is rewritten whole on every change). Written out field by
        field: `dataclasses.asdict` took 230 ms for 10,000 records."""
        own = self.__dict__
        out = {key: own[name] for name, key in _VDI_KEYS}
        out["snapshots"] = {n: s.to_dict() for n, s in self.snapshots.items()}
        if self.xattrs:
            out["xattrs"] = self.xattrs
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VdiRecord:
        rec = _from_stored(cls, d, _VDI_DEFAULTS, _VDI_RENAMED)
        rec.snapshots = {n: SnapshotRecord.from_dict(s) if isinstance(s, dict) else s
                         for n, s in (rec.snapshots or {}).items()}
        if rec.xattrs is None:
            rec.xattrs = {}
        return rec

    def copy(self) -> VdiRecord:
        """A copy that changes to either leave the other alone: its own
        snapshot and xattr tables. The snapshot records themselves are shared:
        nothing changes one in place (a snapshot is replaced or removed whole)."""
        new = object.__new__(VdiRecord)
        new.__dict__.update(self.__dict__)
        new.snapshots = dict(self.snapshots)
        new.xattrs = dict(self.xattrs)
        return new


#: Fields whose stored key differs from the attribute (the attribute name is
#: taken by the resolved property).
_STORED_KEYS = {"stored_data_vid": "data_vid", "stored_family": "family"}
_REQUIRED = object()  # a field the stored record must have


def _defaults(cls: type) -> dict[str, Any]:
    """Field -> its default, in field order (`_REQUIRED` for fields with none;
    None for a table, which each record gets fresh)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        else:
            out[f.name] = None if f.default_factory is not dataclasses.MISSING else _REQUIRED
    return out


def _from_stored(cls: type[_Record], d: dict[str, Any], defaults: dict[str, Any],
                 renamed: tuple[tuple[str, str], ...] = ()) -> _Record:
    """A record from its stored dict: keys it does not know are ignored (a
    newer writer's), missing ones take their defaults, a missing required one
    is an error. Fills the instance's fields directly: going through
    `__init__` made decoding 10,000 records take 110 ms."""
    values = {**defaults, **d}
    for key, name in renamed:
        if key in values:
            values[name] = values.pop(key)
    if len(values) != len(defaults):  # keys a newer writer added: ignored
        for key in [k for k in values if k not in defaults]:
            del values[key]
    if _REQUIRED in values.values():
        missing = [name for name, value in values.items() if value is _REQUIRED]
        raise ValueError(f"stored {cls.__name__} lacks {', '.join(missing)}")
    rec = object.__new__(cls)
    rec.__dict__.update(values)
    return rec


_SNAPSHOT_FIELDS = tuple(f.name for f in dataclasses.fields(SnapshotRecord))
_SNAPSHOT_DEFAULTS = _defaults(SnapshotRecord)
#: (attribute, stored key) of a VDI record's plain fields, in stored order.
_VDI_KEYS = tuple((f.name, _STORED_KEYS.get(f.name, f.name)) for f in dataclasses.fields(VdiRecord)
                  if f.name not in ("snapshots", "xattrs"))
_VDI_DEFAULTS = _defaults(VdiRecord)
_VDI_RENAMED = tuple((key, name) for name, key in _STORED_KEYS.items())


def check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool):
        raise InvalidArgument(f"size must be an integer, not {type(size).__name__}")
    if size < 0:
        raise InvalidArgument(f"size {size} is negative")
    if size > MAX_VDI_SIZE:
        raise TooLarge(f"size {size} exceeds the 16 PiB limit of a VDI")


@dataclass
class Directory:
    vdis: dict[str, VdiRecord] = field(default_factory=dict)
    next_vid: int = 1
    #: vids whose objects are being freed (tombstones): never reused, never recovered.
    deleting: set[int] = field(default_factory=set)
    #: data vids of deleted snapshots -> [family, copies]: objects freed once no
    #: live map of the family points at them.
    retired: dict[int, list[int]] = field(default_factory=dict)
    #: vids being prepared -> {"for": what, "source": data vid copied from, "at": time}.
    reserved: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: Which part this is, of how many (a directory that is not split: 0 of 1).
    part: int = 0
    parts: int = 1
    #: Renames and clones to another part, begun here (`begin_rename`), by key.
    intents: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: What this part decided about records arriving from other parts:
    #: token -> [taken, when, errno, why] (`arrive`).
    arrivals: dict[str, list[Any]] = field(default_factory=dict)
    #: The vid counter went past MAX_VID once: from then on a vid this part
    #: hands out may be in use in another part (`others_in_use`).
    wrapped: bool = False
    #: An image written by a split of the format-1 directory of that root
    #: version, not yet used (`meta.directory_service`); a draft drops it.
    upgrade_of: int = 0

    def __post_init__(self) -> None:
        #: In a draft (`clone`): the names whose records it still shares with
        #: the directory it was cloned from; `get` and `by_vid` give it its own
        #: copy first. None: not a draft, every record its own.
        self._shared: set[str] | None = None
        #: Set by whoever changes a wrapped part: the vids in use in every
        #: other part, read consistently (`meta.directory_service`).
        self.others_in_use: Callable[[], set[int]] | None = None
        #: A stored value (`commit`) or a merged view: never changed again,
        #: so it may keep indexes of itself (`_indexes`).
        self._frozen = False
        self._index_cache: tuple[dict[int, str], dict[int, dict[int, int]]] | None = None
        #: A merged view's parts (`merged`).
        self._parts: list[Directory] | None = None

    # -- queries ---------------------------------------------------------

    def get(self, name: str) -> VdiRecord:
        """A VDI's record; in a draft, its own copy, free to change."""
        try:
            rec = self.vdis[name]
        except KeyError:
            raise VdiNotFound(f"no VDI named {name!r}") from None
        if self._shared is not None:
            self._check_not_pending(name)
            if name in self._shared:
                rec = self.vdis[name] = rec.copy()
                self._shared.discard(name)
        return rec

    def by_vid(self, vid: int) -> tuple[str, VdiRecord] | None:
        """(name, record) of a VDI by vid; in a draft, its own copy of the record."""
        if self._frozen:  # through each part's index: no scan of 10,000 records
            for p in self._parts or [self]:
                name = p._indexes()[0].get(vid)
                if name is not None and self.vdis.get(name) is p.vdis[name]:
                    return name, p.vdis[name]
            return None
        for name, rec in self.vdis.items():
            if rec.vid == vid:
                return name, self.get(name)
        return None

    def _indexes(self) -> tuple[dict[int, str], dict[int, dict[int, int]]]:
        """(vid -> name, family -> copies_in_family) of a frozen directory,
        made once: a merged view asks each part, and a change replaces one part."""
        if self._index_cache is None:
            names: dict[int, str] = {}
            families: dict[int, dict[int, int]] = {}
            for vid, (fam, copies) in self.retired.items():
                families.setdefault(fam, {})[vid] = copies
            for name, rec in self.vdis.items():
                names[rec.vid] = name
                copies_of = families.setdefault(rec.family, {})
                copies_of[rec.data_vid] = rec.copies
                for s in rec.snapshots.values():
                    copies_of[s.vid] = s.copies
            self._index_cache = (names, families)
        return self._index_cache

    def _check_not_pending(self, name: str) -> None:
        for key, intent in self.intents.items():
            if intent["source"] == name:
                raise IntentPending(f"VDI {name!r} is being {'renamed' if intent['kind'] == 'rename' else 'cloned'}"
                                    f" to {intent['target']!r}", part=self.part, key=key)

    def vids_in_use(self) -> set[int]:
        used = set(self.deleting) | set(self.retired) | set(self.reserved)
        for r in self.vdis.values():
            used.add(r.vid)
            used.add(r.data_vid)
            used.update(s.vid for s in r.snapshots.values())
        return used

    def snapshot_of(self, name: str, snap: str) -> SnapshotRecord:
        rec = self.get(name)
        try:
            return rec.snapshots[snap]
        except KeyError:
            raise VdiNotFound(f"VDI {name!r} has no snapshot {snap!r}") from None

    def find_snapshot(self, data_vid: int) -> tuple[str, str, SnapshotRecord] | None:
        """(VDI name, snapshot name, record) of a snapshot by its data vid."""
        for name, rec in self.vdis.items():
            for snap, s in rec.snapshots.items():
                if s.vid == data_vid:
                    return name, snap, s
        return None

    def live_maps(self, family: int) -> list[tuple[int, int]]:
        """(data vid, size) of every map of a family that may still be read:
        the VDIs' own maps and their snapshots'."""
        out = []
        for rec in self.vdis.values():
            if rec.family == family:
                out.append((rec.data_vid, rec.size))
                out.extend((s.vid, s.size) for s in rec.snapshots.values())
        return out

    def maps_that_may_point_at(self, data_vid: int) -> list[tuple[int, int, int]]:
        """(map's data vid, size, object size) of every live map that may
        point at an object stored under `data_vid`: the live maps of its
        family (the module docstring says why no other map can). Empty when
        the directory keeps nothing under `data_vid` (deleted or unknown)."""
        family = self.retired[data_vid][0] if data_vid in self.retired else None
        for rec in self.vdis.values():
            if rec.data_vid == data_vid or any(s.vid == data_vid for s in rec.snapshots.values()):
                family = rec.family
        if family is None:
            return []
        return [(vid, size, self.object_size_of(vid)) for vid, size in self.live_maps(family)]

    def object_size_of(self, data_vid: int) -> int:
        """The object size of the map stored under `data_vid` (a VDI's or a
        snapshot's)."""
        for rec in self.vdis.values():
            if rec.data_vid == data_vid:
                return rec.object_size
            for s in rec.snapshots.values():
                if s.vid == data_vid:
                    return s.object_size
        raise VdiNotFound(f"no map with data vid {data_vid}")

    def retired_of(self, family: int) -> list[int]:
        return sorted(v for v, (f, _) in self.retired.items() if f == family)

    def data_vids(self) -> list[tuple[str, int, int]]:
        """(label, data vid, copies) of every data vid whose objects must be
        kept, recovered and checked: VDIs (NAME), snapshots (NAME@SNAP) and
        retired snapshots whose objects clones still read."""
        out = []
        for name, rec in sorted(self.vdis.items()):
            out.append((name, rec.data_vid, rec.copies))
            out.extend((f"{name}@{sn}", s.vid, s.copies) for sn, s in sorted(rec.snapshots.items()))
        out.extend((f"(deleted snapshot {v})", v, copies) for v, (_, copies) in sorted(self.retired.items()))
        return out

    def cacheable_data_vids(self) -> dict[int, tuple[int, bool]]:
        """data vid -> (object size, immutable) of the objects a mount's local
        cache may keep: snapshots' and retired snapshots' (they never change)
        and unshared VDIs' own (mutable: only with their lease). Shared VDIs'
        are missing: any mount may write them."""
        out: dict[int, tuple[int, bool]] = {}
        for rec in self.vdis.values():
            if not rec.shared:
                out[rec.data_vid] = (rec.object_size, False)
            for s in rec.snapshots.values():
                out[s.vid] = (s.object_size, True)
        for vid, (family, _) in self.retired.items():
            size = next((r.object_size for r in self.vdis.values() if r.family == family), None)
            if size is not None:
                out[vid] = (size, True)
        return out

    def copies_in_family(self, family: int) -> dict[int, int]:
        """`copies_by_data_vid` for the data vids of one family: all that a
        map of that family may point at (the module docstring says why)."""
        if self._frozen:
            found: dict[int, int] = {}
            for p in self._parts or [self]:
                found.update(p._indexes()[1].get(family, {}))
            return found
        out = {vid: copies for vid, (fam, copies) in self.retired.items() if fam == family}
        for rec in self.vdis.values():
            if rec.family == family:
                out[rec.data_vid] = rec.copies
                for s in rec.snapshots.values():
                    out[s.vid] = s.copies
        return out

    def copies_by_data_vid(self) -> dict[int, int]:
        """Copies of the objects under every data vid a map may point at (a
        clone's ancestors may keep fewer or more copies than the clone)."""
        return {vid: copies for _, vid, copies in self.data_vids()}

    # -- operations (mutate self; call them on a copy) ---------------------

    def create(self, name: str, size: int, *, copies: int = 1, mode: int = 0o644,
               uid: int = 0, gid: int = 0, shared: bool = False,
               now: float | None = None) -> VdiRecord:
        validate_name(name)
        check_size(size)
        self._check_home(name)
        if name in self.vdis:
            raise VdiExists(f"a VDI named {name!r} already exists")
        if copies < 1:
            raise InvalidArgument("copies must be at least 1")
        vid = self._allocate_vid()
        now = time.time() if now is None else now
        rec = VdiRecord(vid=vid, size=size, ctime=now, mtime=now, atime=now, copies=copies,
                        mode=mode & 0o7777, uid=uid, gid=gid, shared=shared)
        self.vdis[name] = rec
        return rec

    def _check_home(self, name: str) -> None:
        if part_of(name, self.parts) != self.part:
            raise InvalidArgument(f"VDI name {name!r} belongs in part {part_of(name, self.parts)}, "
                                  f"not {self.part}")

    def _first_vid(self) -> int:
        """The smallest vid this part hands out (vids = part mod parts, never 0)."""
        return self.part if self.part > 0 else self.parts

    def _allocate_vid(self) -> int:
        """The next free vid of this part's counter. Before the counter first
        wraps, no other part holds a vid it hands out (they only hold ones
        it handed out before: a rename or a clone carried them over); after,
        every allocation also skips the other parts' vids in use."""
        step = self.parts
        vid = self.next_vid
        if vid < 1 or vid % step != self.part % step:
            vid = self._first_vid() + max(0, (vid - self._first_vid() + step - 1) // step) * step
        in_use = self.vids_in_use()
        others: set[int] | None = None
        for _ in range(MAX_VID // step + 2):
            if vid > MAX_VID:
                vid = self._first_vid()
                self.wrapped = True
            if self.wrapped and others is None:
                if self.parts > 1 and self.others_in_use is None:
                    raise NeedsOtherParts(f"directory part {self.part} wrapped: the other parts' vids are needed")
                others = self.others_in_use() if self.others_in_use is not None else set()
            if vid not in in_use and (others is None or vid not in others):
                self.next_vid = vid + step
                return vid
            vid += step
        raise NoSpace("all 16 million VDI ids are in use" if step == 1
                      else f"all VDI ids of directory part {self.part} are in use")

    def delete(self, name: str, *, with_snapshots: bool = False) -> int:
        """Remove a name and tombstone its own objects; returns the data vid to
        purge. Its snapshots go with it only if asked (they are backups); their
        objects are retired, since clones may still read them."""
        rec = self.get(name)
        if rec.snapshots and not with_snapshots:
            raise VdifsError(f"VDI {name!r} has {len(rec.snapshots)} snapshot(s): delete them first, "
                             f"or delete with --snapshots", code=errno.EBUSY)
        for snap in list(rec.snapshots):
            self._check_no_reservation_from(rec.snapshots[snap].vid, f"{name}@{snap}")
        for s in rec.snapshots.values():
            self.retired[s.vid] = [rec.family, s.copies]
        del self.vdis[name]
        self.deleting.add(rec.data_vid)
        return rec.data_vid

    # -- snapshots and clones (each a reserve, a map copy, then one of these) -----

    def reserve(self, purpose: str, source: int, now: float | None = None) -> int:
        """Set a fresh vid aside while its map is copied from `source` (in the
        part of the VDI whose map that is)."""
        vid = self._allocate_vid()
        self.reserved[vid] = {"for": purpose, "source": source, "at": time.time() if now is None else now}
        return vid

    def release(self, vid: int) -> bool:
        """Give up a reservation (its copied map objects must be purged);
        False if `vid` was not reserved (then nothing may be purged: a clone
        whose commit another mount finished uses it)."""
        self._check_no_clone_of(vid)
        if self.reserved.pop(vid, None) is None:
            return False
        self.deleting.add(vid)
        return True

    def _take_reservation(self, vid: int) -> None:
        if vid not in self.reserved:
            raise InvalidArgument(f"vid {vid} is not reserved (it was released meanwhile)")
        self._check_no_clone_of(vid)
        del self.reserved[vid]

    def _check_no_clone_of(self, vid: int) -> None:
        key = f"clone {vid}"
        if self._shared is not None and key in self.intents:
            raise IntentPending(f"reserved vid {vid} is being committed as clone "
                                f"{self.intents[key]['target']!r}", part=self.part, key=key)

    def _check_no_reservation_from(self, data_vid: int, what: str) -> None:
        for r in self.reserved.values():
            if r["source"] == data_vid:
                raise VdifsError(f"{what} is being copied ({r['for']}); try again in a moment",
                                 code=errno.EBUSY)

    def snapshot(self, name: str, snap: str, new_data_vid: int, size: int,
                 now: float | None = None, snapshot_id: str = "") -> SnapshotRecord:
        """Freeze the VDI's current data vid as snapshot `snap`; the VDI goes on
        under `new_data_vid` (reserved, its map already a copy of the frozen one)."""
        rec = self.get(name)
        validate_name(snap)
        if snap in rec.snapshots:
            raise VdiExists(f"VDI {name!r} already has a snapshot {snap!r}")
        check_size(size)
        self._take_reservation(new_data_vid)
        s = SnapshotRecord(vid=rec.data_vid, size=size, ctime=time.time() if now is None else now,
                           copies=rec.copies, object_order=rec.object_order, id=snapshot_id)
        rec.snapshots[snap] = s
        rec.data_vid = new_data_vid
        rec.stored_family = rec.family  # pinned before the data vid moves on
        rec.size = size
        return s

    def _clone_record(self, name: str, snap: str, new_name: str, new_vid: int, copies: int | None,
                      now: float | None) -> VdiRecord:
        src = self.get(name)
        s = self.snapshot_of(name, snap)
        validate_name(new_name)
        if new_vid not in self.reserved:
            raise InvalidArgument(f"vid {new_vid} is not reserved (it was released meanwhile)")
        now = time.time() if now is None else now
        return VdiRecord(vid=new_vid, size=s.size, ctime=now, mtime=now, atime=now,
                         copies=s.copies if copies is None else copies, object_order=s.object_order,
                         mode=src.mode, uid=src.uid, gid=src.gid, stored_family=src.family, parent_vid=s.vid)

    def clone_snapshot(self, name: str, snap: str, new_name: str, new_vid: int, *, copies: int | None = None,
                       now: float | None = None) -> VdiRecord:
        """A new VDI starting as snapshot NAME@SNAP (its map copied to `new_vid`),
        when both names live in this part (else `begin_clone`)."""
        rec = self._clone_record(name, snap, new_name, new_vid, copies, now)
        self._check_home(new_name)
        if new_name in self.vdis:
            raise VdiExists(f"a VDI named {new_name!r} already exists")
        self._take_reservation(new_vid)
        self.vdis[new_name] = rec
        return rec

    def rollback(self, name: str, snap: str, new_data_vid: int) -> int:
        """The VDI becomes snapshot `snap` again, under `new_data_vid` (a copy of
        the snapshot's map); returns the old data vid to purge."""
        rec = self.get(name)
        s = self.snapshot_of(name, snap)
        self._take_reservation(new_data_vid)
        old = rec.data_vid
        rec.data_vid = new_data_vid
        rec.size = s.size
        self.deleting.add(old)
        return old

    def delete_snapshot(self, name: str, snap: str) -> int:
        """Drop a snapshot; returns its data vid, now retired."""
        rec = self.get(name)
        s = self.snapshot_of(name, snap)
        self._check_no_reservation_from(s.vid, f"{name}@{snap}")
        del rec.snapshots[snap]
        self.retired[s.vid] = [rec.family, s.copies]
        return s.vid

    def finish_retired(self, vid: int) -> None:
        self.retired.pop(vid, None)

    def rename(self, old: str, new: str, *, replace: bool = True) -> int | None:
        """Rename atomically, when both names live in this part (else
        `begin_rename`); returns the vid of a replaced target, if any."""
        rec = self.get(old)
        validate_name(new)
        if old == new:
            return None
        self._check_home(new)
        replaced = None
        if new in self.vdis:
            if not replace:
                raise VdiExists(f"a VDI named {new!r} already exists")
            replaced = self.delete(new)
        del self.vdis[old]
        self.vdis[new] = rec
        return replaced

    def finish_delete(self, vid: int) -> None:
        self.deleting.discard(vid)

    def set_xattr(self, vid: int, name: str, value: bytes, flags: int = 0) -> None:
        """setxattr(2) on a VDI, by vid (a rename meanwhile does not matter)."""
        xattrs.set_in(self._by_vid_or_raise(vid).xattrs, name, value, flags)

    def remove_xattr(self, vid: int, name: str) -> None:
        xattrs.remove_from(self._by_vid_or_raise(vid).xattrs, name)

    def _by_vid_or_raise(self, vid: int) -> VdiRecord:
        found = self.by_vid(vid)
        if found is None:
            raise VdiNotFound(f"no VDI with vid {vid}")
        return found[1]

    # -- across parts: an intent here, a decision there, the intent's end here ----

    def begin_rename(self, old: str, new: str, *, replace: bool = True, now: float | None = None) -> str:
        """Step 1 of a rename to a name of another part: the intent, holding
        the record as it is (frozen until the intent ends). Returns its key."""
        rec = self.get(old)
        validate_name(new)
        if part_of(new, self.parts) == self.part:
            raise InvalidArgument(f"{old!r} and {new!r} live in the same part: rename them in one change")
        for vid in [rec.data_vid, *(s.vid for s in rec.snapshots.values())]:
            self._check_no_reservation_from(vid, f"VDI {old!r}")  # the copy's commit looks for it here
        key = f"rename {old}"
        self.intents[key] = {"kind": "rename", "source": old, "target": new, "replace": replace,
                             "record": rec.to_dict(), "token": os.urandom(12).hex(),
                             "at": time.time() if now is None else now}
        return key

    def begin_clone(self, name: str, snap: str, new_name: str, new_vid: int, *, copies: int | None = None,
                    now: float | None = None) -> str:
        """Step 1 of a clone named in another part: the intent, holding the
        new record; the reservation stays (so the snapshot stays) until the
        intent ends. Returns its key."""
        if part_of(new_name, self.parts) == self.part:
            raise InvalidArgument(f"{name!r} and {new_name!r} live in the same part: clone in one change")
        rec = self._clone_record(name, snap, new_name, new_vid, copies, now)
        self._check_no_clone_of(new_vid)
        key = f"clone {new_vid}"
        self.intents[key] = {"kind": "clone", "source": name, "target": new_name, "replace": False,
                             "record": rec.to_dict(), "token": os.urandom(12).hex(),
                             "at": rec.ctime}
        return key

    def arrive(self, intent: dict[str, Any], now: float | None = None) -> tuple[bool, int | None]:
        """Step 2, in the target's part: take the record of `intent` under its
        target name, or refuse it; the first decision about an intent is
        kept (`arrivals`) and every later ask gets it again, so two mounts
        finishing one intent cannot decide differently. Returns (taken,
        vid of a replaced VDI)."""
        now = time.time() if now is None else now
        for token in [t for t, (_, when, *_rest) in self.arrivals.items() if when < now - ARRIVALS_KEPT]:
            del self.arrivals[token]
        decided = self.arrivals.get(intent["token"])
        if decided is not None:
            return bool(decided[0]), None
        name = intent["target"]
        here = self.vdis.get(name)
        if here is not None and here.vid == intent["record"]["vid"]:  # taken, and its decision forgotten
            self.arrivals[intent["token"]] = [True, now, 0, ""]
            return True, None
        try:
            self._check_home(name)
            if name in self.vdis:
                self._check_not_pending(name)
                if not intent["replace"]:
                    raise VdiExists(f"a VDI named {name!r} already exists")
            replaced = self.delete(name) if name in self.vdis else None
        except VdifsError as e:
            code = errno.EBUSY if isinstance(e, IntentPending) else e.errno
            self.arrivals[intent["token"]] = [False, now, code, str(e)]
            return False, None
        self.vdis[name] = VdiRecord.from_dict(intent["record"])
        self.arrivals[intent["token"]] = [True, now, 0, ""]
        return True, replaced

    def settle(self, key: str, token: str) -> None:
        """Step 3 after the target took the record: the source name goes
        (a rename), or the reservation is used (a clone)."""
        intent = self._pop_intent(key, token)
        if intent is None:
            return  # settled or abandoned already (another mount finished it)
        if intent["kind"] == "rename":
            here = self.vdis.get(intent["source"])
            if here is not None and here.vid == intent["record"]["vid"]:
                del self.vdis[intent["source"]]
        else:
            self.reserved.pop(intent["record"]["vid"], None)

    def abandon(self, key: str, token: str) -> None:
        """Step 3 after the target refused: the rename did not happen; a
        clone's reservation is released (its copied map is purged)."""
        intent = self._pop_intent(key, token)
        if intent is not None and intent["kind"] == "clone":
            self.release(intent["record"]["vid"])

    def _pop_intent(self, key: str, token: str) -> dict[str, Any] | None:
        """The intent `key` if it is still the one of `token` (a later rename
        of the same name has the same key)."""
        intent = self.intents.get(key)
        if intent is None or intent["token"] != token:
            return None
        return self.intents.pop(key)

    def commit(self) -> Directory:
        """This draft (or decoded value) is now the stored value: no longer
        a draft (its records are its own; `get` stops copying them), and
        never changed again (it may keep indexes of itself)."""
        self._shared = None
        self._frozen = True
        return self

    # -- parts -------------------------------------------------------------

    @classmethod
    def merged(cls, parts: Iterable[Directory], previous: Directory | None = None) -> Directory:
        """What readers see of a split directory: every part's records and
        entries in one (read-only) directory. A record whose rename's target
        part already took it shows only under its new name. `previous`: the
        view this one follows; the records of the parts that did not change
        are taken from it in one copy, not part by part."""
        parts = list(parts)
        view = cls()
        view._parts = parts
        prior = previous._parts if previous is not None else None
        if prior is not None and len(prior) == len(parts) and not previous.intents:  # type: ignore[union-attr]
            view.vdis = dict(previous.vdis)  # type: ignore[union-attr]
            for old, new in zip(prior, parts):
                if old is not new:
                    for name in old.vdis:
                        del view.vdis[name]
                    view.vdis.update(new.vdis)
        else:
            for p in parts:
                view.vdis.update(p.vdis)
        moved: list[tuple[str, int, str, str]] = []
        for p in parts:
            if p.deleting:
                view.deleting |= p.deleting
            if p.retired:
                view.retired.update(p.retired)
            if p.reserved:
                view.reserved.update(p.reserved)
            if p.intents:
                view.intents.update((f"{p.part}:{k}", i) for k, i in p.intents.items())
                moved.extend((i["source"], i["record"]["vid"], i["target"], i["token"])
                             for i in p.intents.values() if i["kind"] == "rename")
        for name, vid, target, token in moved:
            took = parts[part_of(target, len(parts))].arrivals.get(token)
            there = view.vdis.get(target)
            if (took is not None and took[0]) or (there is not None and there.vid == vid):
                view.vdis.pop(name, None)  # the target took it: the rename happened
        view._frozen = True
        return view

    def changes_since(self, before: Directory) -> list[tuple[str, VdiRecord | None, VdiRecord | None]]:
        """(name, record before, record now) of every name whose record is
        not the same object in both views: between two merged views, only
        the names of the parts that changed (and of intents, which can hide
        a name of a part that did not) are looked at."""
        if self._parts is not None and before._parts is not None and len(self._parts) == len(before._parts):
            names: set[str] = set()
            for old, new in zip(before._parts, self._parts):
                if old is not new:
                    names.update(old.vdis, new.vdis)
            for view in (before, self):
                for intent in view.intents.values():
                    names.update((intent["source"], intent["target"]))
        else:
            names = set(before.vdis) | set(self.vdis)
        out = []
        for name in sorted(names):
            was, now = before.vdis.get(name), self.vdis.get(name)
            if was is not now:
                out.append((name, was, now))
        return out

    def split(self, parts: int) -> list[Directory]:
        """This (format 1, not split) directory as `parts` parts: records by
        name, entries by vid. Every part's counter starts above every vid
        handed out so far, or counts as wrapped if this one had."""
        out = [Directory(part=k, parts=parts) for k in range(parts)]
        for name, rec in self.vdis.items():
            out[part_of(name, parts)].vdis[name] = rec
        for vid in self.deleting:
            out[vid % parts].deleting.add(vid)
        for vid, fc in self.retired.items():
            out[vid % parts].retired[vid] = list(fc)
        owner = {v: part_of(name, parts) for name, rec in self.vdis.items()
                 for v in (rec.data_vid, *(s.vid for s in rec.snapshots.values()))}
        for vid, r in self.reserved.items():  # beside the VDI whose map is copied, where its deletes look
            out[owner.get(int(r.get("source", 0)), vid % parts)].reserved[vid] = dict(r)
        wrapped = self.wrapped or any(v >= self.next_vid for v in self.vids_in_use())
        for p in out:
            p.next_vid = p._first_vid() + max(0, (self.next_vid - p._first_vid() + parts - 1) // parts) * parts
            p.wrapped = wrapped
        return out

    # -- codec -----------------------------------------------------------

    def encode(self) -> bytes:
        out: dict[str, Any] = {
            "format": FORMAT_VERSION if self.parts == 1 else PART_FORMAT,
            "next_vid": self.next_vid,
            "vdis": {n: r.to_dict() for n, r in self.vdis.items()},
            "deleting": sorted(self.deleting),
            "retired": sorted(self.retired.items()),  # pairs: msgpack maps take only str keys here
            "reserved": sorted(self.reserved.items()),
        }
        if self.parts > 1:
            out.update(part=self.part, parts=self.parts, intents=self.intents, arrivals=self.arrivals)
        if self.wrapped:
            out["wrapped"] = True
        if self.upgrade_of:
            out["upgrade_of"] = self.upgrade_of
        return msgpack.packb(out)

    @classmethod
    def decode(cls, raw: bytes, *, part: int = 0, parts: int = 1) -> Directory:
        """A stored directory (format 1) or part (format 2); b'' is an empty
        one (part `part` of `parts`, for a part never written)."""
        if not raw:
            empty = cls(part=part, parts=parts)
            empty.next_vid = empty._first_vid()
            return empty
        d = msgpack.unpackb(raw)
        fmt = d.get("format")
        if fmt not in (FORMAT_VERSION, PART_FORMAT) or (fmt == PART_FORMAT and "vdis" not in d):
            raise ValueError(f"unknown directory format {fmt!r}")
        if fmt == FORMAT_VERSION and parts != 1:
            raise ValueError(f"a whole (format 1) directory read as part {part} of {parts}")
        if fmt == PART_FORMAT and (d.get("part"), d.get("parts")) != (part, parts):
            raise ValueError(f"directory part {d.get('part')} of {d.get('parts')} read as part {part} of {parts}")
        return cls(
            vdis={n: VdiRecord.from_dict(r) for n, r in d["vdis"].items()},
            next_vid=d["next_vid"],
            deleting=set(d["deleting"]),
            retired={v: list(fc) for v, fc in d.get("retired", [])},
            reserved=dict(d.get("reserved", [])),
            part=part, parts=parts,
            intents=d.get("intents", {}),
            arrivals=d.get("arrivals", {}),
            wrapped=bool(d.get("wrapped", False)),
            upgrade_of=int(d.get("upgrade_of", 0)),
        )

    def clone(self) -> Directory:
        """A copy to change (a draft): changes to it leave this one alone.

        Copy on write: the draft shares every record with this directory
        until `get` or `by_vid` hands it out, which copies it first (one
        change touches one or two records; copying all 10,000 took 13 ms,
        `copy.deepcopy` 190 ms, and left that much garbage per change). So in
        a draft, change a record only as `get` or `by_vid` gave it, or
        replace it whole; never one reached through `vdis` directly."""
        draft = Directory(vdis=dict(self.vdis), next_vid=self.next_vid, deleting=set(self.deleting),
                          retired={v: list(fc) for v, fc in self.retired.items()},
                          reserved={v: dict(r) for v, r in self.reserved.items()},
                          part=self.part, parts=self.parts, intents=dict(self.intents),
                          arrivals=dict(self.arrivals), wrapped=self.wrapped)
        draft._shared = set(self.vdis)
        return draft
