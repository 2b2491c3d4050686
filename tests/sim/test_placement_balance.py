"""Placement balance at 1,000 peers (issue 17): every peer holds replicas
of its weight's part of the objects, within 10%, counted exactly from the
ring's arcs (`Ring.shares`), not from sampled objects (sampling 600,000
objects spreads the counts by about 2.4% on its own)."""

from __future__ import annotations

import hashlib

import pytest

from vdifs.model.placement import Ring, recovery_shares

COPIES = 3


@pytest.mark.parametrize("heavy_every", [0, 3], ids=["equal weights", "every third peer weighs 2"])
def test_replicas_are_balanced_within_a_tenth_at_1000_peers(heavy_every):
    peers = tuple(sorted((hashlib.sha1(b"peer %d" % i).hexdigest()[:16], f"zone{i % 5}",
                          2.0 if heavy_every and i % heavy_every == 0 else 1.0) for i in range(1000)))
    shares = Ring(peers).shares(COPIES)
    total_weight = sum(weight for _, _, weight in peers)
    off = [shares[peer] / (COPIES * weight / total_weight) - 1 for peer, _zone, weight in peers]
    print(f"\nreplica share against weight: {min(off):+.1%} .. {max(off):+.1%}")
    assert sum(shares.values()) == pytest.approx(COPIES)
    assert max(abs(x) for x in off) < 0.10


def test_a_join_at_1000_peers_moves_only_the_newcomers_share_and_zones_hold():
    """Read backwards, a join is the newcomer leaving the bigger ring:
    `recovery_shares` raises if anything but its replicas moves, and the
    objects that move add up to its share, about copies/n."""
    peers = [(hashlib.sha1(b"peer %d" % i).hexdigest()[:16], f"zone{i % 5}", 1.0) for i in range(1000)]
    newcomer = ("newcomer-000001", "zone2", 1.0)
    before, after = Ring(tuple(sorted(peers))), Ring(tuple(sorted(peers + [newcomer])))
    moved = recovery_shares(after, before, newcomer[0], COPIES)  # raises if anything else moves
    share = after.shares(COPIES)[newcomer[0]]
    assert sum(moved.values()) == pytest.approx(share)
    assert abs(share / (COPIES / 1001) - 1) < 0.10
    for i in range(2000):  # every replica set spans three zones
        replicas = after.lookup(i * 7919, COPIES)
        assert len({zone for peer, zone, _ in peers + [newcomer] if peer in replicas}) == COPIES
