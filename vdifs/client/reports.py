"""Reports on VDIs read from their object maps alone: diff, usage, family tree.

Nothing here changes a map or the directory. In a shared pool a live VDI's
map is re-read from the pool unless this mount holds its lease (another
mount may be writing it).
"""

from __future__ import annotations

from typing import Any

from vdifs.client.catalog import Catalog
from vdifs.client.volume import load_map
from vdifs.model.extents import objects_for_size
from vdifs.model.objmap import ObjectMap, is_allocated


class Reports:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    async def stored_map(self, vid: int) -> ObjectMap:
        """The map of a live VDI: ours if we hold it (or nobody else can write
        it), else re-read from the pool (another mount's writes)."""
        vol = await self.catalog.volume(vid)
        if not self.catalog.shared or (self.catalog.leases is not None and self.catalog.leases.holds(vid)):
            return vol.map
        return await load_map(self.catalog.pool, vol.data_vid, vol.size, vol.object_size)

    async def diff(self, name: str, snap: str | None = None, since: str | None = None) -> dict[str, Any]:
        """What changed in NAME (or NAME@SNAP) since snapshot `since` of the same
        VDI (or since empty), from the object maps alone: an object changed
        when the two maps point at different data vids. Whole objects:
        extents [offset, length, "data" | "zero"] in order."""
        rec = self.catalog.current.get(name)
        if snap is not None:
            s = self.catalog.current.snapshot_of(name, snap)
            target, size, object_size = (await self.catalog.snapshot_volume(s.vid)).map, s.size, s.object_size
        else:
            vol = await self.catalog.volume(rec.vid)
            target, size, object_size = await self.stored_map(rec.vid), vol.size, vol.object_size
        base = ObjectMap()
        if since is not None:
            base = (await self.catalog.snapshot_volume(self.catalog.current.snapshot_of(name, since).vid)).map
        count = objects_for_size(size, object_size)
        indexes = sorted({i for i, _ in target.entries()} | {i for i, _ in base.entries()})
        extents: list[list[Any]] = []
        for i in indexes:
            if i >= count:
                break
            t, b = target.get(i), base.get(i)
            t, b = (t if is_allocated(t) else 0), (b if is_allocated(b) else 0)
            if t == b:
                continue
            kind = "data" if t else "zero"
            start, length = i * object_size, min(object_size, size - i * object_size)
            if extents and extents[-1][2] == kind and extents[-1][0] + extents[-1][1] == start:
                extents[-1][1] += length
            else:
                extents.append([start, length, kind])
        return {"name": name, "snapshot": snap, "from": since, "size": size, "object_size": object_size,
                "extents": extents}

    async def usage(self, name: str) -> list[dict[str, Any]]:
        """Space of a VDI and each of its snapshots: allocated, and the part no
        other map of the family (snapshots, clones, the VDI) points at, which
        deleting just that one would free."""
        d = self.catalog.current
        rec = d.get(name)
        maps: dict[int, ObjectMap] = {}
        for data_vid, _size in d.live_maps(rec.family):
            found = d.find_snapshot(data_vid)
            if found is not None:
                maps[data_vid] = (await self.catalog.snapshot_volume(data_vid)).map
            else:
                owner = next(r for r in d.vdis.values() if r.data_vid == data_vid)
                maps[data_vid] = await self.stored_map(owner.vid)
        refs: dict[tuple[int, int], int] = {}
        for m in maps.values():
            for i, e in m.entries():
                if is_allocated(e):
                    refs[(e, i)] = refs.get((e, i), 0) + 1
        rows = []
        for label, data_vid, size in ([(f"{name}@{sn}", s.vid, s.size) for sn, s in
                                       sorted(rec.snapshots.items(), key=lambda kv: kv[1].ctime)]
                                      + [(name, rec.data_vid, rec.size)]):
            entries = [(e, i) for i, e in maps[data_vid].entries() if is_allocated(e)]
            exclusive = sum(1 for key in entries if refs[key] == 1)
            rows.append({"name": label, "size": size, "allocated": len(entries) * rec.object_size,
                         "exclusive": exclusive * rec.object_size,
                         "shared": (len(entries) - exclusive) * rec.object_size})
        return rows

    def family_tree(self) -> list[dict[str, object]]:
        """Every VDI with its snapshots and where it was cloned from."""
        d = self.catalog.current
        out: list[dict[str, object]] = []
        for name, rec in sorted(d.vdis.items()):
            parent = None
            if rec.parent_vid:
                found = d.find_snapshot(rec.parent_vid)
                parent = f"{found[0]}@{found[1]}" if found else f"(deleted snapshot, data vid {rec.parent_vid})"
            out.append({"name": name, "vid": rec.vid, "data_vid": rec.data_vid, "size": rec.size,
                        "family": rec.family, "parent": parent,
                        "snapshots": [{"name": sn, "data_vid": s.vid, "size": s.size, "ctime": s.ctime,
                                       "id": s.id}
                                      for sn, s in sorted(rec.snapshots.items(), key=lambda kv: kv[1].ctime)]})
        return out

