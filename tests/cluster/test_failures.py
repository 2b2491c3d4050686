"""Peers die and come back: detection and map changes."""

import os
import signal

from .conftest import wait_for


def states(cluster):
    info = cluster.info()
    return info["epoch"], {p["address"]: p["state"] for p in info["peers"]}


def test_dead_peer_is_marked_down_and_returns(cluster):
    cluster.format(4, copies=3)
    victim = cluster.peers[3]
    epoch0, st = states(cluster)
    assert set(st.values()) == {"up"}
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait()
    victim.proc = None
    wait_for(lambda: states(cluster)[1][victim.address] == "down", 30, "victim marked down")
    epoch1, st = states(cluster)
    assert epoch1 > epoch0 and list(st.values()).count("up") == 3
    logs = "".join(p.log_text() for p in cluster.peers[:3])
    assert "stopped answering: marked down" in logs
    victim.start()  # its store remembers the cluster
    wait_for(lambda: states(cluster)[1][victim.address] == "up", 30, "victim back up")
    assert states(cluster)[0] > epoch1
