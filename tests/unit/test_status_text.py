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


def test_check_says_missing_replicas_are_on_their_way_while_recovery_runs():
    from vdifs.cli.check import check_text

    def report(recovering: bool) -> dict:
        problems = [{"vdi": "vm", "oid": "0000000100000013", "missing": ["dc68"], "differing": [],
                     "source": "aa01", "repaired": False},
                    {"vdi": "vm", "oid": "0000000100000014", "missing": [], "differing": ["dc68"],
                     "source": "aa01", "repaired": False},
                    {"vdi": "vm", "oid": "0000000100000015", "missing": ["dc68"], "differing": [],
                     "source": None, "repaired": False}]
        return {"epoch": 5, "vdis": 1, "objects": 3, "problems": problems, "lost": [], "unreferenced": [],
                "stray_vids": [], "recovering": recovering}

    def states(text: str) -> list[str]:
        return [ln.split()[-1] if "repair" not in ln else "needs --repair"
                for ln in text.splitlines() if ln.startswith("vm ")]

    settled, running = check_text(report(False)), check_text(report(True))
    assert states(settled) == ["needs --repair", "needs --repair", "copy"]  # "no good copy"
    assert states(running) == ["recovering", "needs --repair", "copy"]  # a differing replica is no recovery's
    assert "replicas may be missing until it ends" in running and "until it ends" not in settled


def test_mount_status_says_when_the_cache_is_off():
    from vdifs.cli.status import summary

    st = {"cluster": "127.0.0.1:7000", "mountpoint": "/mnt/vdis", "pid": 1, "version": "0", "total": 1 << 40,
          "free": 1 << 39, "copies": 3, "vdis": 2, "epoch": 4, "peers_up": 3, "peers": 3, "cache": None}
    assert "cache: off (--cache-size 0, or less than a fifth of its disk free)" in summary(st)
    st["cache"] = {"used": 1 << 30, "size": 4 << 30, "hits": 5, "misses": 2}
    assert "cache: 1.0 GiB of 4.0 GiB, 5 hits, 2 misses" in summary(st)
    del st["cluster"]
    st["store"] = "/var/lib/vdifs"
    st["cache"] = None
    assert "cache" not in summary(st)  # the embedded pool is local: no cache to have
