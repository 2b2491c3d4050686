"""Recovery time for one lost peer at 1,000 peers (issue 17), against the
model in docs/architecture.md ("Recovery time"): when a peer dies, every
object it held gets one new replica, placed on the next peer of the ring,
and nothing else moves; the survivors copy side by side, so the time is
set by the survivor with the most to copy.

Exact, not sampled: `placement.recovery_shares` walks the ring's arcs, so
the shares below are the fractions of the object space each survivor
must copy, whatever the objects are."""

from __future__ import annotations

import statistics

import pytest

from vdifs.model.placement import VNODES, Ring, recovery_shares

COPIES = 3


def ring(n: int, zones: int = 1, without: str | None = None) -> Ring:
    return Ring(tuple(sorted((f"p{i}", f"z{i % zones}", 1.0) for i in range(n) if f"p{i}" != without)))


def shares_after_losing(n: int, lost: str) -> tuple[float, dict[str, float]]:
    before, after = ring(n), ring(n, without=lost)
    held = sum(share for _, share, _ in before.arcs_of(lost, COPIES))
    return held, recovery_shares(before, after, lost, COPIES)


@pytest.mark.parametrize("lost", ["p7", "p512"])
def test_one_lost_peer_at_1000_peers_is_copied_by_nearly_all_survivors(lost):
    n = 1000
    held, shares = shares_after_losing(n, lost)
    # the lost peer held its part of the objects (copies / n of them) ...
    assert held == pytest.approx(COPIES / n, rel=0.10)
    # ... every one of them gets exactly one new replica (recovery_shares
    # raises if any other replica, or any other object, moved) ...
    assert sum(shares.values()) == pytest.approx(held, rel=1e-9)
    # ... and the copying is spread: most survivors take part, and the
    # busiest has at most a few times the mean, so the time is near the
    # model's D / ((n - 1) R) rather than D / R.
    mean = held / (n - 1)
    assert len(shares) >= 0.75 * (n - 1)
    assert max(shares.values()) / mean < 8  # 4.2-5.2 for the peers tried
    busiest = max(shares.values()) / mean
    print(f"\nlost {lost}: held {held:.5f} of the objects, {len(shares)} of {n - 1} survivors copy, "
          f"median {statistics.median(shares.values()) / mean:.2f}x the mean, busiest {busiest:.2f}x")


def test_with_few_peers_the_survivors_share_evenly():
    """At 4 peers each survivor takes a third of the lost peer's objects,
    give or take the ring's balance (VNODES points per peer)."""
    held, shares = shares_after_losing(4, "p1")
    assert sorted(shares) == ["p0", "p2", "p3"]
    for share in shares.values():
        assert share == pytest.approx(held / 3, rel=3 / VNODES ** 0.5)
