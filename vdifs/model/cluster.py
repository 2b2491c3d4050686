"""The cluster map: which peers exist, where they listen, and the epoch.

Every change (a peer joins, leaves, is marked down, a setting changes)
produces a new map with epoch + 1. The map lives in the `cluster` consensus
register. A peer keeps its newest copy on disk and re-reads the register
when a request carries a newer epoch or `cluster.notify` arrives; a mount
re-reads it when a stale-epoch refusal says a newer map exists, and while
it waits for a replica to be replaced. Nobody adopts a map a peer or client
sent: only the register's. Every map and peer description that arrives is
checked field by field (`from_dict`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import msgpack

from vdifs.errors import InvalidArgument

UP = "up"
DOWN = "down"
MAX_META = 5


DEFAULT_WEIGHT = 1.0  # a peer's relative share of the data
DEFAULT_COPIES = 3  # replicas per object of a new cluster
DEFAULT_MIN_COPIES = 2  # up replicas a write needs
#: limits of what a map may hold: it arrives over the wire and every peer acts on it
NAME_MAX = 64  # characters of a peer id, zone or cluster id
ADDRESS_MAX = 300  # characters of host:port
WEIGHT_MAX = 1e6
COPIES_MAX = 16
EPOCH_MAX = (1 << 63) - 1


def _name(value: Any, what: str, *, empty: bool = False) -> str:
    if not isinstance(value, str) or len(value) > NAME_MAX or (not value and not empty) \
            or any(c.isspace() or not c.isprintable() for c in value):
        raise InvalidArgument(f"{what} must be a string of {0 if empty else 1} to {NAME_MAX} printable "
                              "characters without spaces")
    return value


def check_cluster_id(value: Any) -> str:
    """A cluster id as a map carries it (InvalidArgument otherwise)."""
    return _name(value, "cluster_id")


def _address(value: Any) -> str:
    host, sep, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    if not sep or not host or len(value) > ADDRESS_MAX or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"peer address must be HOST:PORT, not {str(value)[:80]!r}")
    return value


def _count(value: Any, what: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise InvalidArgument(f"{what} must be an integer in {lo}..{hi}")
    return value


@dataclass
class PeerInfo:
    peer_id: str
    address: str  # host:port
    zone: str = ""
    weight: float = DEFAULT_WEIGHT
    state: str = UP

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> PeerInfo:
        """A peer description as sent or stored, every field checked
        (InvalidArgument): a map holds it, and every peer dials its address."""
        if not isinstance(d, dict):
            raise InvalidArgument("a peer must be a map")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise InvalidArgument(f"unknown peer fields {sorted(map(str, unknown))[:5]}")
        if "peer_id" not in d or "address" not in d:
            raise InvalidArgument("a peer needs peer_id and address")
        weight = d.get("weight", DEFAULT_WEIGHT)
        if type(weight) not in (int, float) or not (math.isfinite(weight) and 0 < weight <= WEIGHT_MAX):
            raise InvalidArgument(f"peer weight must be a number in (0, {WEIGHT_MAX:g}]")
        state = d.get("state", UP)
        if state not in (UP, DOWN):
            raise InvalidArgument(f"peer state must be {UP!r} or {DOWN!r}")
        return cls(_name(d["peer_id"], "peer_id"), _address(d["address"]),
                   _name(d.get("zone", ""), "zone", empty=True), float(weight), state)


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
    def from_dict(cls, d: Any) -> ClusterMap:
        """A map as sent or stored, every field checked (InvalidArgument)."""
        if not isinstance(d, dict) or not isinstance(d.get("peers"), dict) or not isinstance(d.get("meta"), list):
            raise InvalidArgument("a cluster map must be a map with peers (a map) and meta (a list)")
        peers = {}
        for k, v in d["peers"].items():
            info = PeerInfo.from_dict(v)
            if info.peer_id != k:
                raise InvalidArgument(f"peer {str(k)[:80]!r} is filed under another id")
            peers[k] = info
        copies = _count(d.get("copies"), "copies", 1, COPIES_MAX)
        meta = [_name(m, "meta peer id") for m in d["meta"]]
        if len(meta) > MAX_META:
            raise InvalidArgument(f"a map has at most {MAX_META} meta peers")
        return cls(cluster_id=_name(d.get("cluster_id"), "cluster_id"),
                   epoch=_count(d.get("epoch"), "epoch", 0, EPOCH_MAX), copies=copies,
                   min_copies=_count(d.get("min_copies"), "min_copies", 1, copies), meta=meta, peers=peers)

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

    def with_silent_peer_down(self, judge: str, peer_id: str, address: str) -> ClusterMap | None:
        """The next map with `peer_id` down, as peer `judge` found it silent at
        `address`; None unless, in this map, the judge is up and `peer_id` is
        still up at that address. A judgement can be old when it is applied:
        made by a peer cut off from everyone (which the others marked down
        meanwhile) and applied the moment its link healed, it would mark
        live peers down."""
        j, p = self.peers.get(judge), self.peers.get(peer_id)
        if j is None or j.state != UP or p is None or p.address != address:
            return None
        return self.with_peer_state(peer_id, DOWN)


def choose_meta(peers: list[str], wanted: int = MAX_META) -> list[str]:
    """An odd number of meta peers (1, 3 or 5), so a majority is well defined."""
    n = min(len(peers), wanted)
    if n % 2 == 0:
        n -= 1
    return sorted(peers)[:max(n, 1)] if peers else []
