"""Whether an object is still referenced: the question that decides whether
a copy nobody serves may come back.

A peer that was down holds copies of objects changed meanwhile (set aside
as stale when it returns), and objects handed off at an epoch change live
on in the handoff trees. When recovery finds that no up peer serves an
object, such a copy may be the last one left - or a copy of an object freed
while its holder was away: a shrink or a zeroed object inside a live VDI
frees it on the peers that are up at the time, and only those. From the
stores both look the same. Only the maps tell them apart, so a copy nobody
serves is brought back only when the directory (read through consensus)
and a live map of the object's family say the object exists.

Concurrency: reads only (the directory register, map objects on their
placement peers or in our own store); the caller holds the object's
recovery lock. A free that lands after the map was read is a delete of
the object, which reaches this peer (it is up) and removes every copy it
has, set aside or not (`ObjectStore.delete`).
"""

from __future__ import annotations

import errno
import logging

from vdifs.errors import VdifsError
from vdifs.model.ids import ObjectKind, map_oid, unpack_oid
from vdifs.model.objmap import ENTRY_BYTES, decode_entry, entry_location, map_chunks
from vdifs.model.placement import placement
from vdifs.peer.state import PeerState

log = logging.getLogger("vdifs.peer.references")
MAP_READ_TIMEOUT = 10.0  # seconds a map replica may take to answer


async def still_referenced(peer: PeerState, oid: int) -> bool | None:
    """True: a live map points at this data object (or needs this map
    object); False: none does; None: cannot tell now (a map could not be
    read): keep any copy aside and ask again on a later pass."""
    assert peer.meta is not None
    kind, vid, index = unpack_oid(oid)
    if kind not in (ObjectKind.DATA, ObjectKind.MAP):
        return True  # not an object of a VDI: nothing to judge by
    directory = await peer.meta.read_directory()
    maps = directory.maps_that_may_point_at(vid)
    if kind == ObjectKind.MAP:
        return any(m == vid and index < len(map_chunks(size, osize)) for m, size, osize in maps)
    copies = directory.copies_by_data_vid()
    unknown = False
    for map_vid, size, osize in maps:
        if index >= -(-size // osize):
            continue  # past this map's end
        chunk, offset = entry_location(index)
        entry = await _read_entry(peer, map_oid(map_vid, chunk), offset, copies.get(map_vid, 1))
        if entry is None:
            unknown = True
        elif entry == vid:
            return True
    return None if unknown else False


async def _read_entry(peer: PeerState, moid: int, offset: int, copies: int) -> int | None:
    """One map entry: from our own replica of the map object if we serve
    one (we are up and caught up, so it is current), else from its
    placement peers. None when no replica could be read and some may exist."""
    assert peer.rpc is not None and peer.cmap is not None
    if await peer.store.exists(moid):
        return decode_entry(await peer.store.read(moid, offset, ENTRY_BYTES))
    cmap = peer.cmap
    up = {p.peer_id: p for p in cmap.up_peers()}
    for peer_id in placement(cmap, moid, copies):
        if peer_id == peer.peer_id or peer_id not in up:
            continue
        try:
            raw = await peer.rpc.call(up[peer_id].address, "obj.read",
                                      {"oid": moid, "offset": offset, "length": ENTRY_BYTES, "epoch": cmap.epoch},
                                      timeout=MAP_READ_TIMEOUT)
        except VdifsError as e:
            if getattr(e, "errno", None) == errno.ENOENT:
                continue
            log.info("map object %016x: peer %s could not be read (%s)", moid, peer_id, e)
            return None
        return decode_entry(raw)
    # No replica anywhere: the map was never written this far (a hole) -
    # unless our own set-aside copy is the last one, which recovery brings
    # back first (it is a map a live VDI needs); until then we cannot tell.
    _kind, map_vid, _chunk = unpack_oid(moid)
    if moid in await peer.store.list_stale(map_vid):
        return None
    return decode_entry(b"")
