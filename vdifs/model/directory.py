"""The directory ("super object"): every VDI's name and record.

The directory is one value kept in a register (a local file now, a CASPaxos
register in a cluster). It is small, so every change rewrites it whole:
callers read it, apply one of the pure operations below to a copy, and
compare-and-set it back. The operations check everything first and only
then change the copy, so a refused operation changes nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from vdifs.errors import InvalidArgument, NoSpace, TooLarge, VdiExists, VdiNotFound
from vdifs.model.ids import MAX_VDI_SIZE, MAX_VID, OBJECT_ORDER
from vdifs.model.names import validate_name

FORMAT_VERSION = 1


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

    @property
    def object_size(self) -> int:
        return 1 << self.object_order

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VdiRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


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

    # -- queries ---------------------------------------------------------

    def get(self, name: str) -> VdiRecord:
        try:
            return self.vdis[name]
        except KeyError:
            raise VdiNotFound(f"no VDI named {name!r}") from None

    def by_vid(self, vid: int) -> tuple[str, VdiRecord] | None:
        for name, rec in self.vdis.items():
            if rec.vid == vid:
                return name, rec
        return None

    def vids_in_use(self) -> set[int]:
        return {r.vid for r in self.vdis.values()} | self.deleting

    # -- operations (mutate self; call them on a copy) ---------------------

    def create(self, name: str, size: int, *, copies: int = 1, mode: int = 0o644,
               uid: int = 0, gid: int = 0, shared: bool = False,
               now: float | None = None) -> VdiRecord:
        validate_name(name)
        check_size(size)
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

    def _allocate_vid(self) -> int:
        in_use = self.vids_in_use()
        vid = self.next_vid
        for _ in range(MAX_VID):
            if vid > MAX_VID:
                vid = 1
            if vid not in in_use:
                self.next_vid = vid + 1
                return vid
            vid += 1
        raise NoSpace("all 16 million VDI ids are in use")

    def delete(self, name: str) -> int:
        """Remove a name and tombstone its vid; returns the vid to purge."""
        rec = self.get(name)
        del self.vdis[name]
        self.deleting.add(rec.vid)
        return rec.vid

    def rename(self, old: str, new: str, *, replace: bool = True) -> int | None:
        """Rename atomically; returns the vid of a replaced target, if any."""
        rec = self.get(old)
        validate_name(new)
        if old == new:
            return None
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

    # -- codec -----------------------------------------------------------

    def encode(self) -> bytes:
        return msgpack.packb({
            "format": FORMAT_VERSION,
            "next_vid": self.next_vid,
            "vdis": {n: r.to_dict() for n, r in self.vdis.items()},
            "deleting": sorted(self.deleting),
        })

    @classmethod
    def decode(cls, raw: bytes) -> Directory:
        if not raw:
            return cls()
        d = msgpack.unpackb(raw)
        if d.get("format") != FORMAT_VERSION:
            raise ValueError(f"unknown directory format {d.get('format')!r}")
        return cls(
            vdis={n: VdiRecord.from_dict(r) for n, r in d["vdis"].items()},
            next_vid=d["next_vid"],
            deleting=set(d["deleting"]),
        )

    def clone(self) -> Directory:
        return copy.deepcopy(self)
