"""Peers that hang instead of dying: a bounded pause, never an error."""

from __future__ import annotations

import os
import signal
import time

import pytest

from .conftest import current_map, fully_replicated, peer_states, recovery_settled, vdifs, wait_for

#: Failure detection (pings for 4 s, an indirect probe, the map change) plus the
#: mount's map poll, with room for a loaded machine: the longest a write may
#: wait for a hung replica. The pause lasts longer, so a write that waits for
#: the paused peer itself fails the test.
PAUSE_BOUND_S = 12.0
PAUSE_S = 20.0


@pytest.mark.parametrize("role", ["meta", "data"])
def test_a_paused_peer_costs_writes_a_bounded_pause(cluster, role):
    """SIGSTOP of a consensus peer or a plain data peer for 20 s under fio
    verify: no error, no write longer than failure detection; after SIGCONT
    it rejoins and every object is back at its replicas, identical."""
    from tests.e2e.conftest import FioVerify

    cluster.format(4, copies=3)
    m = cluster.mount("a")
    cmap = current_map(cluster.peers[0])
    # Peer ids are random, so the one peer that is not meta may be the first: look there last.
    victim = next(p for p in cluster.peers[1:] + cluster.peers[:1] if (p.peer_id in cmap.meta) == (role == "meta"))
    # 96 MiB at 3 MB/s: the write phase spans the whole pause; an fsync every 16 writes
    with FioVerify(m.path("fio.img"), 96, rate="3m", fsync=16) as fio:
        time.sleep(3)
        os.kill(victim.proc.pid, signal.SIGSTOP)
        paused = time.monotonic()
        try:
            wait_for(lambda: peer_states(cluster)[victim.address] == "down", 30, "paused peer marked down")
            time.sleep(max(0.0, PAUSE_S - (time.monotonic() - paused)))
        finally:
            os.kill(victim.proc.pid, signal.SIGCONT)
        job = fio.finish(timeout=300)
    longest_write_s = job["write"]["clat_ns"]["max"] / 1e9
    print(f"longest write while {role} peer was paused: {longest_write_s:.2f} s")
    assert longest_write_s < PAUSE_BOUND_S, f"a write waited {longest_write_s:.1f} s"
    assert f"at {victim.address} is no longer up" in open(m.log).read()

    # it comes back and catches up: every object at its 3 replicas, all identical
    wait_for(lambda: peer_states(cluster)[victim.address] == "up", 60, "paused peer up again")
    vid = m.vid("fio.img")
    wait_for(lambda: recovery_settled(cluster) and fully_replicated(cluster.peers, vid), 120,
             "every peer recovered, 3 replicas of every object")
    check = vdifs("cluster", "check", "--cluster", cluster.addresses, "--secret-file", cluster.secret)
    assert "all replicas where placement says, identical" in check.stdout
