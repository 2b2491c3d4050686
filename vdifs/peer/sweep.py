"""The leak pass: objects no live map points at, and objects of vids the
directory does not know, removed once they have been left alone for a grace
period.

Leaks happen: a writer killed between creating an object and storing the
map that names it, a peer's folder of a vid the directory forgot. Cluster
mounts do not reconcile, so without this they would stay forever. One peer
runs the pass in the background (`Sweeper`: the first up consensus peer of
the map, so one pass at a time in the cluster), and `vdifs cluster check
--repair` runs the same steps on demand.

Why this never removes an object a map names or a writer is about to name:

- Unreferenced objects are judged only in families no mount may be writing
  (no VDI of it holds a lease or is shared): a writer's map entries can
  live in its memory alone for as long as it cannot store its map (a full
  pool pausing the guest for hours, say), however old the object.
- Only while every peer has finished recovering the current epoch (objects
  handed off in a new epoch are in no listing until their new owners copied
  them), and every request carries that epoch, so a map change during the
  pass stops it.
- Whole map objects are read, not just the part the directory's size
  covers (a file grown since its last flush), and a map object that exists
  but could not be read makes the pass judge no unreferenced object.
- The maps, and the directory a second time, are read after the objects
  were listed, so anything named since the listing is seen; and the peer
  checks the age again when it deletes (`obj.collect`, under the object's
  locks), so an object written after the listing is kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import trio

from vdifs.errors import VdifsError
from vdifs.meta.consensus import MetaClient
from vdifs.model.cluster import ClusterMap, PeerInfo
from vdifs.model.directory import Directory
from vdifs.model.ids import ObjectKind, map_oid, unpack_oid, vid_of
from vdifs.meta.lease import Lease, lease_key
from vdifs.meta.paxos import PaxosRegister
from vdifs.model.objmap import ObjectMap, is_allocated, map_chunks
from vdifs.peer.recovery import recovery_settled
from vdifs.peer.state import PeerState
from vdifs.wire import objlist
from vdifs.wire.rpc import RpcPool

log = logging.getLogger("vdifs.peer.sweep")

LIST_TIMEOUT = 60.0  # seconds for a page of a peer's object list
OBJECT_TIMEOUT = 120.0  # seconds for fetching or collecting one object
#: Seconds an object nobody points at must have been left unchanged before it
#: is removed: a writer creates an object before a map names it.
LEAK_GRACE = 3600
LEAK_GRACE_MIN = 300  # well above a mount's --io-wait (60 s), which a map page write may wait out
#: Seconds between background passes.
SWEEP_INTERVAL = 3600

#: data vid -> (a label for people, oid -> peer ids holding it)
Holdings = dict[int, tuple[str, dict[int, set[str]]]]


async def list_holders_many(pool: RpcPool, cmap: ClusterMap, up: dict[str, PeerInfo],
                            vids: list[int]) -> dict[int, dict[int, set[str]]]:
    """vid -> oid -> the up peers holding it, for every object of the vids:
    each peer listed once for all of them (`objlist.list_on_peers`)."""
    extra = {"epoch": cmap.epoch}
    try:
        listed = await objlist.list_on_peers({pid: objlist.rpc_lister(pool, p.address, extra, LIST_TIMEOUT)
                                                   for pid, p in up.items()}, vids)
    except objlist.ListFailed as e:
        raise e.error from None  # as the listing itself failed
    holders: dict[int, dict[int, set[str]]] = {vid: {} for vid in vids}
    for pid, oids in listed.items():
        for oid in oids:
            per_vid = holders.get(vid_of(oid))
            if per_vid is not None:
                per_vid.setdefault(oid, set()).add(pid)
    return holders


async def list_holders(pool: RpcPool, cmap: ClusterMap, up: dict[str, PeerInfo], vid: int) -> dict[int, set[str]]:
    """oid -> the up peers holding it, for every object of `vid`."""
    return (await list_holders_many(pool, cmap, up, [vid]))[vid]


@dataclass
class References:
    refs: set[tuple[int, int]] = field(default_factory=set)  # (data vid, index) some live map points at
    unread: set[int] = field(default_factory=set)  # data vids whose unreferenced objects are not judged


async def referenced(pool: RpcPool, directory: Directory, present: Holdings,
                     up: dict[str, PeerInfo]) -> References:
    """What every live map (VDI or snapshot) points at, from the map objects
    themselves. A map object that exists but could not be read leaves the
    references unknown (`unread`: then every data vid): no unreferenced
    object is collected on a guess."""
    out = References()
    sizes = {vid: size for family in {r.family for r in directory.vdis.values()}
             for vid, size in directory.live_maps(family)}
    for data_vid, size in sizes.items():
        objmap = ObjectMap()
        held = present.get(data_vid, ("", {}))[1]
        chunks = {chunk for chunk, _length in map_chunks(size, directory.object_size_of(data_vid))}
        # and the map objects past the size the directory has: a file grown since its last flush
        chunks |= {unpack_oid(oid)[2] for oid in held if unpack_oid(oid)[0] == ObjectKind.MAP}
        for chunk in sorted(chunks):
            oid = map_oid(data_vid, chunk)
            holders = held.get(oid, set())
            for pid in sorted(holders):
                try:
                    raw = await pool.call(up[pid].address, "obj.fetch", {"oid": oid}, timeout=OBJECT_TIMEOUT)
                except VdifsError:
                    continue
                objmap.load_chunk(chunk, raw)
                break
            else:
                if holders:
                    out.unread.add(data_vid)
        out.refs.update((e, i) for i, e in objmap.entries() if is_allocated(e))
    if out.unread:  # a map may point into other vids of its family: judge none this time
        out.unread = {v for _name, v, _copies in directory.data_vids()}
    return out


def family_of(directory: Directory) -> dict[int, int]:
    """data vid -> its family, for every data vid the directory keeps."""
    out = {v: family for v, (family, _copies) in directory.retired.items()}
    for rec in directory.vdis.values():
        out[rec.data_vid] = rec.family
        out.update((s.vid, rec.family) for s in rec.snapshots.values())
    return out


async def families_in_use(meta: MetaClient, directory: Directory) -> set[int]:
    """Families with a VDI a mount may be writing: its lease has a holder,
    or it is shared (written without a lease)."""
    busy = {rec.family for rec in directory.vdis.values() if rec.shared}
    leased = [rec for rec in directory.vdis.values() if not rec.shared]
    if not leased:
        return busy
    # All the leases in peek rounds (`read_many`): a read made as a change
    # takes a ballot, and could pre-empt a mount's renewal.
    values = await PaxosRegister.read_many([meta.register(lease_key(rec.vid)) for rec in leased])
    busy.update(rec.family for rec, (_version, raw) in zip(leased, values) if Lease.decode(raw).holder is not None)
    return busy


async def collect(pool: RpcPool, address: str, oid: int, grace: int, epoch: int) -> bool:
    """Ask one peer to remove a leaked object older than `grace` seconds."""
    done: bool = await pool.call(address, "obj.collect", {"oid": oid, "older_than": grace, "epoch": epoch},
                                 timeout=OBJECT_TIMEOUT)
    return done


@dataclass
class Leaks:
    unreferenced: list[dict[str, Any]] = field(default_factory=list)  # {vdi, oid, collected}
    stray_vids: list[int] = field(default_factory=list)
    collected: int = 0
    kept_young: int = 0
    kept_in_use: int = 0  # unreferenced, but a mount may be writing their VDI (see the module doc)
    unsettled: bool = False  # recovery was still running: nothing collected


async def find_and_collect(pool: RpcPool, cmap: ClusterMap, meta: MetaClient, directory: Directory,
                           present: Holdings, refs: References, grace: int, *,
                           repair: bool) -> Leaks:
    """The data objects of `present` no map in `refs` points at, and the vids
    peers hold that the directory (read again now, after the listing) does
    not know; with `repair`, remove those left alone for `grace` seconds."""
    up = {p.peer_id: p for p in cmap.up_peers()}
    leaks = Leaks()
    for data_vid, (label, holders) in present.items():
        for oid in sorted(holders):
            kind, vid, index = unpack_oid(oid)
            if kind == ObjectKind.DATA and (vid, index) not in refs.refs and data_vid not in refs.unread:
                leaks.unreferenced.append({"vdi": label, "oid": f"{oid:016x}", "collected": False})
    holding: dict[int, set[str]] = {}  # vid -> peers with objects of it
    for pid, p in up.items():
        for v in await pool.call(p.address, "obj.vids", {"epoch": cmap.epoch}, timeout=LIST_TIMEOUT):
            holding.setdefault(int(v), set()).add(pid)
    after = await meta.read_directory()  # after the listing: see the module's doc
    in_use = after.vids_in_use() | directory.vids_in_use()
    leaks.stray_vids = sorted(set(holding) - in_use)
    if not repair:
        return leaks
    if not await recovery_settled(pool, cmap, timeout=LIST_TIMEOUT):
        leaks.unsettled = True
        return leaks
    busy = await families_in_use(meta, directory)
    families = family_of(directory)
    for leak in leaks.unreferenced:
        oid = int(leak["oid"], 16)
        if families.get(unpack_oid(oid)[1]) in busy:
            leaks.kept_in_use += 1
            continue
        done = [await collect(pool, up[pid].address, oid, grace, cmap.epoch)
                for pid in sorted(present[unpack_oid(oid)[1]][1][oid]) if pid in up]
        leak["collected"] = bool(done) and all(done)
        leaks.collected += sum(done)
        leaks.kept_young += done.count(False)
    for vid in leaks.stray_vids:
        for pid in sorted(holding[vid]):
            for oid in await list_holders(pool, cmap, {pid: up[pid]}, vid):
                ok = await collect(pool, up[pid].address, oid, grace, cmap.epoch)
                leaks.collected += ok
                leaks.kept_young += not ok
    return leaks


async def leak_pass(pool: RpcPool, cmap: ClusterMap, meta: MetaClient, grace: int) -> Leaks:
    """One pass over the whole cluster: list, read the maps, collect. Skipped
    at once while recovery runs (listing the cluster would be wasted);
    `find_and_collect` asks again after the listing, which took a while."""
    if not await recovery_settled(pool, cmap, timeout=LIST_TIMEOUT):
        return Leaks(unsettled=True)
    directory = await meta.read_directory()
    up = {p.peer_id: p for p in cmap.up_peers()}
    labels = {data_vid: name for name, data_vid, _copies in directory.data_vids()}
    listed = await list_holders_many(pool, cmap, up, sorted(labels))
    present: Holdings = {vid: (labels[vid], listed[vid]) for vid in labels}
    refs = await referenced(pool, directory, present, up)
    return await find_and_collect(pool, cmap, meta, directory, present, refs, grace, repair=True)


class Sweeper:
    """The background leak pass of one peer: runs only while this peer is
    the first up consensus peer of its map (by peer id), so the cluster has
    one pass at a time, and only with every peer of the map up (a peer that
    is down may hold the only copy of a map object: its leaks wait)."""

    def __init__(self, peer: PeerState, *, interval: float = SWEEP_INTERVAL, grace: int = LEAK_GRACE) -> None:
        self.peer = peer
        self.interval = interval
        self.grace = grace
        self.passes = 0
        self.collected = 0

    def my_turn(self) -> bool:
        cmap = self.peer.cmap
        if cmap is None or self.peer.catching_up or self.peer.rpc is None or self.peer.meta is None:
            return False
        up = cmap.up_peers()
        if len(up) != len(cmap.peers):
            return False
        meta_up = sorted(p.peer_id for p in up if p.peer_id in cmap.meta)
        return bool(meta_up) and meta_up[0] == self.peer.peer_id

    async def run(self) -> None:
        if self.interval <= 0:
            return
        while True:
            await trio.sleep(self.interval)
            rpc, cmap, meta = self.peer.rpc, self.peer.cmap, self.peer.meta
            if not self.my_turn() or rpc is None or cmap is None or meta is None:
                continue
            try:
                leaks = await leak_pass(rpc, cmap, meta, self.grace)
            except VdifsError as e:
                log.warning("leak pass stopped: %s; trying again in %.0f s", e, self.interval)
                continue
            if leaks.unsettled:
                log.info("leak pass skipped: recovery of epoch %d is still running somewhere", cmap.epoch)
                continue
            self.passes += 1
            self.collected += leaks.collected
            if leaks.collected or leaks.kept_young or leaks.kept_in_use:
                log.info("leak pass: %d objects no map points at and %d vids the directory does not know; "
                         "%d objects removed, %d kept (changed within %d s), %d kept (their VDI is open for "
                         "writing or shared)", len(leaks.unreferenced), len(leaks.stray_vids), leaks.collected,
                         leaks.kept_young, self.grace, leaks.kept_in_use)
