"""The metrics endpoints of a mount and a peer, scraped around a real fio."""

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.cluster.conftest import free_port


def scrape(address: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value}, parsed by prometheus-client."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=")
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def vdi(name: str, kind: str, sample: str, **more: str) -> tuple[str, tuple]:
    return sample, tuple(sorted({"vdi": name, "kind": kind, **more}.items()))


def fio(path: str, rw: str, size: str) -> dict:
    out = subprocess.run(["fio", "--name=m", f"--filename={path}", "--ioengine=libaio", "--direct=1",
                          f"--rw={rw}", "--bs=4k", "--iodepth=8", f"--size={size}", "--randseed=7",
                          "--output-format=json"], check=True, capture_output=True, text=True, timeout=300).stdout
    return json.loads(out)["jobs"][0]


def test_mount_and_peer_metrics_follow_fio(cluster):
    cluster.format(3, copies=3, metrics=True)
    mount_metrics = f"127.0.0.1:{free_port()}"
    m = cluster.mount("a", "--metrics", mount_metrics)
    path = m.path("vm")
    with open(path, "wb") as f:
        f.truncate(32 << 20)
    before = scrape(mount_metrics)
    running = subprocess.Popen(["fio", "--name=during", f"--filename={path}", "--ioengine=libaio", "--direct=1",
                                "--rw=randwrite", "--bs=4k", "--iodepth=8", "--size=32M", "--time_based",
                                "--runtime=3"], stdout=subprocess.DEVNULL)
    try:  # scraped while fio writes: both endpoints answer, the counter moves
        time.sleep(1)
        during = [scrape(mount_metrics)[vdi("vm", "write", "vdifs_vdi_bytes_total")] for _ in range(3)]
        assert scrape(cluster.peers[0].metrics)[("vdifs_cluster_epoch", ())] >= 1
    finally:
        assert running.wait(timeout=60) == 0
    assert 0 < during[0] <= during[-1]
    before = scrape(mount_metrics)
    job = fio(path, "randwrite", "16M")
    wrote = job["write"]["io_bytes"]
    assert wrote == 16 << 20
    read_job = fio(path, "randread", "8M")
    holder = os.open(path, os.O_RDWR)  # as QEMU holds it: the lease is ours while it is open
    try:
        after = scrape(mount_metrics)
    finally:
        os.close(holder)

    def delta(key: tuple[str, tuple]) -> float:
        return after[key] - before.get(key, 0.0)

    written = delta(vdi("vm", "write", "vdifs_vdi_bytes_total"))
    assert abs(written - wrote) <= wrote * 0.01, (written, wrote)
    assert abs(delta(vdi("vm", "read", "vdifs_vdi_bytes_total")) - read_job["read"]["io_bytes"]) <= \
        read_job["read"]["io_bytes"] * 0.01
    for kind, requests in (("write", job["write"]["total_ios"]), ("read", read_job["read"]["total_ios"])):
        count = delta(vdi("vm", kind, "vdifs_vdi_requests_total"))
        assert abs(count - requests) <= requests * 0.01, (kind, count, requests)
        # the histogram counts every request, in buckets that add up
        assert after[vdi("vm", kind, "vdifs_vdi_request_seconds_count")] == after[vdi("vm", kind,
                                                                                      "vdifs_vdi_requests_total")]
        assert after[vdi("vm", kind, "vdifs_vdi_request_seconds_bucket", le="+Inf")] == \
            after[vdi("vm", kind, "vdifs_vdi_request_seconds_count")]
        assert after[vdi("vm", kind, "vdifs_vdi_request_seconds_sum")] > 0
    assert after[("vdifs_vdi_lease_held", (("vdi", "vm"),))] == 1.0
    assert after[("vdifs_cluster_peers", (("state", "up"),))] == 3.0
    assert after[("vdifs_cluster_epoch", ())] >= 1
    assert after[("vdifs_pool_size_bytes", ())] > 0
    for p in cluster.peers:  # three replicas of each write: round trips to every peer
        assert after[("vdifs_peer_round_trip_seconds_count", (("peer", p.address),))] >= wrote // 4096

    peer = scrape(cluster.peers[0].metrics)
    assert peer[("vdifs_store_size_bytes", ())] > peer[("vdifs_store_free_bytes", ())] > 0
    assert peer[("vdifs_cluster_peers", (("state", "up"),))] == 3.0
    assert peer[("vdifs_recovery_pending_objects", ())] == 0
    assert peer[("vdifs_store_open_objects", ())] >= 1  # the objects fio wrote are open here

    # Bad requests get their 4xx, and the endpoint goes on serving.
    for raw, status in ((b"NONSENSE\r\n\r\n", b"400"), (b"GET /secret HTTP/1.1\r\n\r\n", b"404"),
                        (b"POST /metrics HTTP/1.1\r\n\r\n", b"405"), (b"GET / HTTP/1.1\r\nX: " + b"x" * 20000, b"431")):
        host, port = cluster.peers[0].metrics.split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(raw)
            assert s.recv(64).split()[1] == status
    try:
        urllib.request.urlopen(f"http://{mount_metrics}/nothing", timeout=10)
    except urllib.error.HTTPError as e:
        assert e.code == 404
    assert scrape(cluster.peers[0].metrics)[("vdifs_cluster_epoch", ())] >= 1
    assert scrape(mount_metrics)[("vdifs_vdis", ())] == 1.0
