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


def test_fio_verify_survives_a_peer_kill(cluster):
    import json
    import subprocess
    import time

    from tests.e2e.conftest import need

    need("fio")
    cluster.format(4, copies=3)
    m = cluster.mount("a")
    # 64 MiB at 8 MB/s: the write phase spans the kill, the detection and the new epoch
    fio = subprocess.Popen(["fio", "--name=v", f"--filename={m.path('fio.img')}", "--size=64M", "--rate=8m",
                            "--rw=randwrite", "--bs=64k", "--ioengine=libaio", "--iodepth=8", "--direct=1",
                            "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
                            "--output-format=json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    victim = cluster.peers[2]
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait()
    victim.proc = None
    out, err = fio.communicate(timeout=300)
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert fio.returncode == 0 and job["error"] == 0, err
    assert job["write"]["io_bytes"] == 64 << 20 and job["read"]["io_bytes"] == 64 << 20
    assert states(cluster)[1][victim.address] == "down"  # it happened while fio was writing
    assert "continuing with cluster map epoch" in open(m.log).read()  # writes waited for it

    # recovery: every object of the VDI gets back to 3 replicas where placement says
    from vdifs.model.cluster import ClusterMap
    from vdifs.model.placement import placement

    survivors = [p for p in cluster.peers if p is not victim]
    vid = m.vid("fio.img")

    def recovered() -> bool:
        with open(os.path.join(survivors[0].store, "meta", "cluster_map"), "rb") as f:
            cmap = ClusterMap.decode(f.read())
        by_id = {p.peer_id: p for p in survivors}
        objects = set().union(*(p.object_files(vid, kind="") for p in survivors))
        return bool(objects) and all(
            fname in by_id[pid].object_files(vid, kind="")
            for fname in objects for pid in placement(cmap, int(fname, 16), 3))

    wait_for(recovered, 60, "3 replicas of every object at the new placement")
    assert sum(len(p.object_files(vid)) for p in survivors) >= 3 * 16  # 64 MiB = 16 data objects


def test_returning_peer_never_serves_stale_data(cluster):
    from tests.e2e.conftest import read_at

    cluster.format(4, copies=3)
    m = cluster.mount("a")
    size = 16 << 22  # 16 objects
    with open(m.path("vm"), "wb") as f:
        f.write(b"\xaa" * size)
        f.flush()
        os.fsync(f.fileno())
    victim = cluster.peers[1]
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait()
    victim.proc = None
    wait_for(lambda: states(cluster)[1][victim.address] == "down", 30, "victim down")
    with open(m.path("vm"), "r+b") as f:  # overwritten while the victim is away
        f.write(b"\xbb" * size)
        f.flush()
        os.fsync(f.fileno())
    victim.start()
    wait_for(lambda: states(cluster)[1][victim.address] == "up", 30, "victim back")
    # whichever replica serves the reads now, it must be the new data
    for _ in range(3):
        data = read_at(m.path("vm"), 0, size)
        stale = [i for i in range(16) if data[i << 22:(i + 1) << 22] != b"\xbb" * (4 << 20)]
        assert not stale, f"objects {stale} served stale"
