from vdifs.cli.cluster import status_text


def peer(pid, state, recovery, reachable=True):
    return {"peer_id": pid, "address": f"127.0.0.1:{7000 + len(pid)}", "state": state,
            "reachable": reachable, "recovery": recovery}


def test_status_shows_progress_rate_and_eta():
    info = {"cluster": "c1", "epoch": 7, "peers": [
        peer("a", "up", {"running": True, "done": 25, "total": 100, "bytes": 25 * (4 << 20), "elapsed": 10.0}),
        peer("bb", "up", {"running": False, "epoch": 7, "recovered_total": 3}),
        peer("ccc", "up", {"stopped": "stopped: only 20 MiB free, the reserve is 24 MiB"}),
        peer("dddd", "down", {}, reachable=False),
    ]}
    text = status_text(info)
    assert "epoch 7  peers 3 up, 1 down" in text
    assert "degraded: 75 object replicas still to recover" in text  # a's 75 (c's pass stopped at 0/0)
    line = next(ln for ln in text.splitlines() if ln.startswith("a "))
    assert "[######.................." in line and "25%" in line and "25/100" in line
    assert "10.5 MB/s" in line and "ETA 0:30" in line  # 25 objects in 10 s: 75 more take 30 s
    assert "clean (epoch 7, 3 objects recovered so far)" in text
    assert "stopped: only 20 MiB free" in text and "unreachable" in text
