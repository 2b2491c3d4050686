import random
from collections import Counter

import mmh3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdifs.model.cluster import DOWN, ClusterMap, PeerInfo, choose_meta
from vdifs.model.ids import data_oid
from vdifs.model.placement import VNODES, Ring, placement


def make_map(n, zones=1, copies=3):
    peers = {f"p{i}": PeerInfo(f"p{i}", f"127.0.0.1:{7000 + i}", zone=f"z{i % zones}") for i in range(n)}
    return ClusterMap("c", copies=copies, peers=peers, meta=choose_meta(list(peers)))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 5), st.integers(1, 4), st.lists(st.integers(0, (1 << 56) - 1), min_size=1, max_size=30))
def test_replicas_distinct_and_zone_spread(n, zones, copies, oids):
    cmap = make_map(n, zones, copies)
    for oid in oids:
        got = placement(cmap, oid)
        assert len(got) == min(copies, n)
        assert len(set(got)) == len(got)
        z = {cmap.peers[p].zone for p in got}
        assert len(z) == min(len(got), len({cmap.peers[p].zone for p in cmap.peers}))
        assert placement(cmap, oid) == got  # deterministic


def test_balance_at_100_peers():
    cmap = make_map(100)
    load = Counter()
    for i in range(100000):
        load.update(placement(cmap, data_oid(1 + i % 50, i)))
    mean = 3 * 100000 / 100
    assert max(load.values()) / mean < 1.10
    assert min(load.values()) / mean > 0.90


def test_join_moves_about_one_nth_and_nothing_else():
    before = make_map(20)
    after = make_map(21)
    oids = [data_oid(7, i) for i in range(20000)]
    moved = 0
    for oid in oids:
        a, b = placement(before, oid), placement(after, oid)
        if set(a) != set(b):
            moved += 1
            # only the new peer takes over a slot; nobody else gains data
            assert set(b) - set(a) == {"p20"}
    share = moved / len(oids)
    assert 0.5 * 3 / 21 < share < 1.5 * 3 / 21


def test_leave_moves_only_the_leavers_objects():
    before = make_map(20)
    after = make_map(20)
    after.peers["p5"].state = DOWN
    for i in range(5000):
        oid = data_oid(3, i)
        a, b = placement(before, oid), placement(after, oid)
        if "p5" not in a:
            assert a == b
        else:
            assert set(a) - {"p5"} <= set(b) and "p5" not in b


def test_weight_attracts_more_data():
    cmap = make_map(4)
    cmap.peers["p0"].weight = 3.0
    load = Counter()
    for i in range(20000):
        load.update(placement(cmap, data_oid(2, i), copies=1))
    assert load["p0"] > 2 * load["p1"]


def test_map_codec_and_epochs():
    cmap = make_map(3)
    assert ClusterMap.decode(cmap.encode()) == cmap
    newer = cmap.with_changes(copies=2)
    assert newer.epoch == cmap.epoch + 1 and cmap.copies == 3
    assert choose_meta(["a", "b", "c", "d"]) == ["a", "b", "c"]
    assert choose_meta(["a", "b"]) == ["a"]


def _ring_by_definition(peers):
    """The ring as its docstring defines it: every peer's points at the
    mmh3 hashes of "peer/i", sorted as (hash, peer id) pairs."""
    points = sorted((mmh3.hash64(f"{peer}/{i}".encode(), 0, False)[0], peer)
                    for peer, _zone, weight in peers for i in range(max(1, round(weight * VNODES))))
    return [p[0] for p in points], [p[1] for p in points]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.text(alphabet="abcxyz0129-", min_size=1, max_size=6), st.sampled_from("ab"),
                          st.sampled_from([0.001, 0.5, 1.0, 2.0])), min_size=1, max_size=6,
                unique_by=lambda p: p[0]))
def test_the_ring_is_built_as_defined(peers):
    ring = Ring(tuple(peers))
    assert (ring._keys, ring._owners) == _ring_by_definition(peers)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 6), st.integers(1, 3), st.integers(1, 4), st.integers(0, 2**32))
def test_exact_shares_add_up_and_agree_with_random_points(n, zones, copies, seed):
    # one point per peer: a few arcs of very different lengths, so shares
    # counted from the wrong end of each arc would be far off
    ring = Ring(tuple((f"p{i}", f"z{i % zones}", 0.001) for i in range(n)))
    shares = ring.shares(copies)
    assert sum(shares.values()) == pytest.approx(min(copies, n))
    rnd = random.Random(seed)
    load = Counter()
    for _ in range(20000):
        load.update(ring.lookup_point(rnd.getrandbits(64) - (1 << 63), copies))  # hashes are signed
    for peer, share in shares.items():
        assert load[peer] / 20000 == pytest.approx(share, abs=0.025)
