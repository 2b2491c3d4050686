"""ClusterMap edits: pure functions from one map to the next."""

from vdifs.model.cluster import DOWN, UP, ClusterMap, PeerInfo


def a_map() -> ClusterMap:
    peers = {p: PeerInfo(p, f"10.0.0.{i}:7000", zone=f"z{i}", weight=1.5) for i, p in enumerate("abc")}
    return ClusterMap("c1", epoch=7, copies=2, min_copies=1, peers=peers, meta=["a", "b", "c"])


def test_with_peer_state_marks_one_peer_and_bumps_the_epoch():
    m = a_map()
    new = m.with_peer_state("b", DOWN)
    assert new is not None
    assert new.epoch == 8
    assert new.peers["b"] == PeerInfo("b", "10.0.0.1:7000", zone="z1", weight=1.5, state=DOWN)
    assert {p: new.peers[p] for p in "ac"} == {p: m.peers[p] for p in "ac"}
    assert (new.copies, new.min_copies, new.meta, new.cluster_id) == (2, 1, ["a", "b", "c"], "c1")
    assert m.peers["b"].state == UP and m.epoch == 7  # the old map is unchanged
    back = new.with_peer_state("b", UP)
    assert back is not None and back.epoch == 9 and back.peers == m.peers


def test_with_peer_state_is_none_when_nothing_changes():
    m = a_map()
    assert m.with_peer_state("a", UP) is None  # already up
    assert m.with_peer_state("zz", DOWN) is None  # no such peer
    down = m.with_peer_state("a", DOWN)
    assert down is not None and down.with_peer_state("a", DOWN) is None


def test_a_silent_peer_is_marked_down_only_on_a_judgement_the_map_still_bears_out():
    m = a_map()
    new = m.with_silent_peer_down("a", "b", "10.0.0.1:7000")
    assert new is not None and new.peers["b"].state == DOWN and new.epoch == 8
    judge_down = m.with_peer_state("a", DOWN)
    assert judge_down is not None
    # a judge the others marked down meanwhile (it was the one cut off) changes nothing
    assert judge_down.with_silent_peer_down("a", "b", "10.0.0.1:7000") is None
    # nor a judgement of a peer that came back at another address, or is down already, or unknown
    assert m.with_silent_peer_down("a", "b", "10.0.0.9:7000") is None
    assert new.with_silent_peer_down("c", "b", "10.0.0.1:7000") is None
    assert m.with_silent_peer_down("a", "x", "10.0.0.1:7000") is None
    assert m.with_silent_peer_down("x", "b", "10.0.0.1:7000") is None


def test_a_map_survives_encoding():
    m = a_map().with_peer_state("c", DOWN)
    assert m is not None
    assert ClusterMap.decode(m.encode()) == m
