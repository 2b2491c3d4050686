"""Where an object lives: consistent hashing over the peers of a cluster map.

Each peer gets `round(weight * VNODES)` points on a 64-bit ring, at the
mmh3 hashes of (peer id, i). An object's point is the mmh3 hash of its id;
its replicas are the first distinct peers clockwise from there, in distinct
zones while enough zones exist. Pure and deterministic: everyone with the
same map computes the same answer, with no lookups.
"""

from __future__ import annotations

import bisect
import struct
from functools import lru_cache

import mmh3

from vdifs.model.cluster import UP, ClusterMap

VNODES = 1024  # points per unit of weight: max/mean load < 1.1 at 100 peers
RING_SIZE = 1 << 64


def _hash64(data: bytes) -> int:
    return mmh3.hash64(data, 0, False)[0]


#: bits of a packed point that name its peer (`Ring.__init__`)
_PEER_BITS = 24


class Ring:
    def __init__(self, peers: tuple[tuple[str, str, float], ...]) -> None:
        """peers: (peer id, zone, weight) of the peers that hold data.

        The points sort as (hash, peer id). Packed into one int each (the
        hash above the peer's rank among the sorted ids) they sort as the
        pairs do, at a quarter of the cost: building the ring of 1,000
        peers took 2.2 s with tuples, 1.2 s packed (docs/benchmarks.md)."""
        ids = sorted({peer_id for peer_id, _zone, _weight in peers})
        if len(ids) >= 1 << _PEER_BITS:
            raise ValueError(f"a ring of more than {(1 << _PEER_BITS) - 1} peers")
        rank = {peer_id: i for i, peer_id in enumerate(ids)}
        packed: list[int] = []
        for peer_id, _zone, weight in peers:
            me, prefix = rank[peer_id], peer_id.encode() + b"/"
            packed.extend((_hash64(prefix + b"%d" % i) << _PEER_BITS) | me
                          for i in range(max(1, round(weight * VNODES))))
        packed.sort()
        mask = (1 << _PEER_BITS) - 1
        self._keys = [p >> _PEER_BITS for p in packed]
        self._owners = [ids[p & mask] for p in packed]
        self._zones = {peer_id: zone for peer_id, zone, _ in peers}
        self.peer_count = len(peers)
        self.zone_count = len(set(self._zones.values()))

    def lookup(self, oid: int, copies: int) -> list[str]:
        return self.lookup_point(_hash64(struct.pack(">Q", oid)), copies)

    def lookup_point(self, point: int, copies: int) -> list[str]:
        """The replicas of the objects whose hash is `point`."""
        n = min(copies, self.peer_count)
        if n == 0:
            return []
        start = bisect.bisect(self._keys, point)
        chosen: list[str] = []
        zones: set[str] = set()
        distinct_zones = min(n, self.zone_count)
        total = len(self._owners)
        # First pass: distinct peers in distinct zones; then fill with distinct peers.
        for want_new_zone in (True, False):
            for step in range(total):
                if len(chosen) == n or (want_new_zone and len(zones) == distinct_zones):
                    break
                peer = self._owners[(start + step) % total]
                if peer in chosen:
                    continue
                if want_new_zone and self._zones[peer] in zones:
                    continue
                chosen.append(peer)
                zones.add(self._zones[peer])
        return chosen


    def shares(self, copies: int) -> dict[str, float]:
        """Fraction of the object space each peer holds a replica of (they
        sum to `copies`, or to the number of peers if fewer): exact, from
        every arc of the ring, no sampling."""
        held = dict.fromkeys(self._zones, 0.0)
        keys = self._keys
        for i in range(len(keys)):
            share = (keys[i] - keys[i - 1]) % RING_SIZE / RING_SIZE if len(keys) > 1 else 1.0
            for peer in self.lookup_point(keys[i - 1], copies):
                held[peer] += share
        return held

    def arcs_of(self, peer_id: str, copies: int) -> list[tuple[int, float, list[str]]]:
        """(first point, share of the ring, replicas) of every arc of the
        ring whose objects `peer_id` holds: the arcs just before each of its
        points, walking back while it stays among the replicas."""
        arcs = []
        total = len(self._keys)
        for at in (i for i, owner in enumerate(self._owners) if owner == peer_id):
            for back in range(total):
                j = (at - back) % total
                low = self._keys[j - 1]  # j - 1 == -1: the arc that wraps around zero
                replicas = self.lookup_point(low, copies)
                if peer_id not in replicas:
                    break
                if back and self._owners[j] == peer_id:
                    break  # reached the arc before another of its points: counted from there
                arcs.append((low, ((self._keys[j] - low) % RING_SIZE) / RING_SIZE, replicas))
        return arcs


def recovery_shares(before: Ring, after: Ring, lost: str, copies: int) -> dict[str, float]:
    """Share of all objects each surviving peer must copy when `lost`
    leaves `before` for `after` (the recovery-time model of
    docs/architecture.md): exact, from the arcs, no sampling. Raises
    ValueError if anything moves but the lost peer's replicas."""
    shares: dict[str, float] = {}
    for point, share, was in before.arcs_of(lost, copies):
        now = after.lookup_point(point, copies)
        new = set(now) - set(was)
        if lost in now or len(new) > 1 or not set(was) - {lost} <= set(now):
            raise ValueError(f"arc at {point:#x}: {was} became {now}")
        for peer in new:
            shares[peer] = shares.get(peer, 0.0) + share
    return shares


@lru_cache(maxsize=8)
def _ring(peers: tuple[tuple[str, str, float], ...]) -> Ring:
    return Ring(peers)


def ring_for(cmap: ClusterMap) -> Ring:
    """The ring of a map's up peers (built once per map object)."""
    if cmap.ring is None:
        peers = tuple(sorted((p.peer_id, p.zone, p.weight) for p in cmap.peers.values() if p.state == UP))
        cmap.ring = _ring(peers)
    return cmap.ring


def placement(cmap: ClusterMap, oid: int, copies: int | None = None) -> list[str]:
    """The peer ids that hold `oid`, primary first."""
    return ring_for(cmap).lookup(oid, cmap.copies if copies is None else copies)
