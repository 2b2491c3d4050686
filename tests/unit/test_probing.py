"""The failure detector's schedule (`model.probing`): whom a peer pings."""

from __future__ import annotations

import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from vdifs.model.probing import ProbeOrder, pick_helpers


@given(n=st.integers(1, 60), k=st.integers(1, 5), seed=st.integers(0, 2**32))
@settings(max_examples=200, deadline=None)
def test_every_member_is_pinged_once_per_pass_and_never_twice_in_a_round(n, k, seed):
    members = [f"p{i}" for i in range(n)]
    order = ProbeOrder(random.Random(seed))
    rounds = math.ceil(n / k)
    last: dict[str, int] = {}
    for r in range(rounds * 4):
        picked = order.next(members, k, version=1)
        assert len(picked) == min(k, n) and len(set(picked)) == len(picked)
        assert set(picked) <= set(members)
        for p in picked:
            if p in last:  # at most two passes apart, however the shuffles fell
                assert r - last[p] <= 2 * rounds
            last[p] = r
    assert set(last) == set(members)


@given(n=st.integers(2, 40), k=st.integers(1, 4), seed=st.integers(0, 2**32), data=st.data())
@settings(max_examples=200, deadline=None)
def test_a_peer_that_leaves_is_never_pinged_again_and_one_that_joins_is_pinged_within_a_pass(n, k, seed, data):
    members = [f"p{i}" for i in range(n)]
    order = ProbeOrder(random.Random(seed))
    for _ in range(data.draw(st.integers(0, 10))):
        order.next(members, k, version=1)
    gone = set(data.draw(st.lists(st.sampled_from(members), max_size=n - 1, unique=True)))
    new = [f"q{i}" for i in range(data.draw(st.integers(0, 5)))]
    after = [m for m in members if m not in gone] + new
    seen: set[str] = set()
    for _ in range(math.ceil(len(after) / k) + 1):
        picked = order.next(after, k, version=2)
        assert not gone & set(picked)
        seen.update(picked)
    assert set(new) <= seen


def test_an_unchanged_version_is_not_compared_again():
    """The membership is read only when its version changes: a round costs
    O(k) at a thousand peers (what a peer left is skipped when the version
    says so)."""
    order = ProbeOrder(random.Random(1))
    members = [f"p{i}" for i in range(1000)]
    order.next(members, 2, version=5)
    assert order.next([], 2, version=5) != []  # the old membership is kept while the version stands
    assert order.next([], 2, version=6) == []


@given(n=st.integers(1, 2000), k=st.integers(0, 5), seed=st.integers(0, 2**32))
@settings(max_examples=200, deadline=None)
def test_helpers_are_distinct_members_other_than_the_suspect(n, k, seed):
    members = [f"p{i}" for i in range(n)]
    helpers = pick_helpers(members, ("p0",), k, random.Random(seed))
    assert len(helpers) == min(k, n - 1)
    assert len(set(helpers)) == len(helpers)
    assert "p0" not in helpers and set(helpers) <= set(members)


@given(st.lists(st.sampled_from([f"10.0.0.{i}:7000" for i in range(12)]), unique=True),
       st.dictionaries(st.sampled_from([f"10.0.0.{i}:7000" for i in range(12)]), st.floats(0, 100)),
       st.sets(st.sampled_from([f"10.0.0.{i}:7000" for i in range(12)])), st.floats(0, 200))
def test_a_mount_pings_the_peers_it_uses_and_those_it_cut_off(up, last_sent, cut, now):
    from vdifs.model.probing import MOUNT_ACTIVE_WINDOW, mount_probe_targets

    targets = mount_probe_targets(up, last_sent, cut, now)
    assert set(targets) <= set(up)  # never a peer the map has down
    for a in up:
        used = now - last_sent.get(a, float("-inf")) < MOUNT_ACTIVE_WINDOW
        assert (a in targets) == (used or a in cut)


def test_a_mount_at_rest_pings_nobody():
    from vdifs.model.probing import mount_probe_targets

    up = [f"10.0.0.{i}:7000" for i in range(1000)]
    assert mount_probe_targets(up, {a: 0.0 for a in up}, set(), now=3600.0) == []
    assert mount_probe_targets(up, {up[7]: 3599.0}, {up[9]}, now=3600.0) == [up[7], up[9]]
