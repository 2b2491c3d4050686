"""The cluster map: which peers exist, where they listen, and the epoch.

Every change (a peer joins, leaves, is marked down, a setting changes)
produces a new map with epoch + 1. The map lives in the `cluster` consensus
register. A peer keeps its newest copy on disk and re-reads the register
when a request carries a newer epoch or `cluster.notify` arrives; a mount
adopts the map that a stale-epoch refusal carries, or re-reads the register
while it waits for a replica to be replaced.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import msgpack

UP = "up"
DOWN = "down"
MAX_META = 5


DEFAULT_WEIGHT = 1.0  # a peer's relative share of the data
DEFAULT_COPIES = 3  # replicas per object of a new cluster
DEFAULT_MIN_COPIES = 2  # up replicas a write needs


@dataclass
class PeerInfo:
    peer_id: str
    address: str  # host:port
    zone: str = ""
    weight: float = DEFAULT_WEIGHT
    state: str = UP

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ClusterMap:
    cluster_id: str
    epoch: int = 1
    copies: int = DEFAULT_COPIES
    min_copies: int = DEFAULT_MIN_COPIES
    peers: dict[str, PeerInfo] = field(default_factory=dict)
    meta: list[str] = field(default_factory=list)  # peer ids that run the consensus acceptors
    #: the placement ring, built once per map; maps are never changed in place
    ring: Any = field(default=None, compare=False, repr=False)

    def up_peers(self) -> list[PeerInfo]:
        return [p for p in self.peers.values() if p.state == UP]

    def no_longer_up(self, newer: ClusterMap) -> list[PeerInfo]:
        """Our up peers that `newer` does not count as up at the same address
        (their connections should be dropped: a hung peer keeps them open)."""
        still_up = {p.address for p in newer.up_peers()}
        return [p for p in self.up_peers() if p.address not in still_up]

    def meta_addresses(self) -> list[str]:
        return [self.peers[p].address for p in self.meta if p in self.peers]

    def encode(self) -> bytes:
        return msgpack.packb(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {"cluster_id": self.cluster_id, "epoch": self.epoch, "copies": self.copies,
                "min_copies": self.min_copies, "meta": list(self.meta),
                "peers": {k: v.to_dict() for k, v in self.peers.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClusterMap:
        return cls(cluster_id=d["cluster_id"], epoch=d["epoch"], copies=d["copies"],
                   min_copies=d["min_copies"], meta=list(d["meta"]),
                   peers={k: PeerInfo(**v) for k, v in d["peers"].items()})

    @classmethod
    def decode(cls, raw: bytes) -> ClusterMap:
        return cls.from_dict(msgpack.unpackb(raw))

    def with_changes(self, **changes: Any) -> ClusterMap:
        """A copy with the given fields replaced and the epoch bumped."""
        new = ClusterMap.from_dict(self.to_dict())
        for k, v in changes.items():
            setattr(new, k, v)
        new.epoch = self.epoch + 1
        return new

    def with_peer_state(self, peer_id: str, state: str) -> ClusterMap | None:
        """The next map with `peer_id` marked `state` (UP or DOWN); None when
        that changes nothing (no such peer, or it is in that state already),
        so a map change built on it proposes nothing."""
        p = self.peers.get(peer_id)
        if p is None or p.state == state:
            return None
        return self.with_changes(peers={**self.peers, peer_id: dataclasses.replace(p, state=state)})


def choose_meta(peers: list[str], wanted: int = MAX_META) -> list[str]:
    """An odd number of meta peers (1, 3 or 5), so a majority is well defined."""
    n = min(len(peers), wanted)
    if n % 2 == 0:
        n -= 1
    return sorted(peers)[:max(n, 1)] if peers else []
