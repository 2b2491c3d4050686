"""What an authenticated client sends cannot take a live peer down, poison
its map or slip past a check (issue 14).

Real peer processes on 127.0.0.1; the requests are made with the cluster's
own secret, as any mount holds it, through the same RPC client the mount
uses, or as raw frames where a client would misbehave below that layer.
After each attack the peer must still be running and answering, and its
log must hold no traceback of a crash.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import socket
import struct
import time

import msgpack
import trio

from tests.cluster.conftest import Cluster, current_map, wait_for
from vdifs.errors import VdifsError
from vdifs.meta.credentials import read_credentials
from vdifs.model.ids import OBJECT_SIZE, data_oid
from vdifs.wire.rpc import RemoteError, RpcClient

#: an error text longer than this would mean the reply echoes what the client sent
ERROR_TEXT_MAX = 1024


def formatted(cluster: Cluster, n: int = 3) -> Cluster:
    cluster.format(n, copies=min(n, 3))
    return cluster


def call_all(cluster: Cluster, peer_index: int, requests: list[tuple[str, dict]]) -> list[object]:
    """Send each request to one peer, authenticated with the cluster secret;
    the results, or the RemoteError each one raised."""
    creds = read_credentials(cluster.secret)
    address = cluster.peers[peer_index].address

    async def main() -> list[object]:
        async with trio.open_nursery() as nursery:
            client = RpcClient(address, creds.secret, nursery)
            out: list[object] = []
            for op, args in requests:
                try:
                    out.append(await client.call(op, args, timeout=30))
                except VdifsError as e:  # RemoteError: an answer; PeerUnavailable: the connection broke
                    out.append(e)
            await client.aclose()
            nursery.cancel_scope.cancel()
            return out

    return trio.run(main)


def assert_alive(cluster: Cluster, peer_index: int = 0) -> None:
    """The peer process runs, answers, and logged no crash."""
    peer = cluster.peers[peer_index]
    assert peer.proc is not None and peer.proc.poll() is None, f"{peer.name} died:\n{peer.log_text()[-3000:]}"
    info = call_all(cluster, peer_index, [("peer.info", {})])[0]
    assert isinstance(info, dict) and info.get("peer") == peer.peer_id or "epoch" in info, info
    assert "Traceback" not in peer.log_text(), peer.log_text()[-3000:]


def refused(result: object, code: int) -> RemoteError:
    assert isinstance(result, RemoteError), f"expected errno {code}, got {result!r}"[:500]
    assert result.errno == code, f"expected errno {code}, got {result.errno}: {result}"[:500]
    assert len(str(result)) <= ERROR_TEXT_MAX, f"error text of {len(str(result))} characters"
    return result


def test_replies_are_bounded_and_never_fatal(cluster):
    """Requests whose answer would not fit a frame (reproduced: each one
    killed the peer) get a short error; the peer keeps serving."""
    formatted(cluster)
    epoch = current_map(cluster.peers[0]).epoch
    oid = data_oid(7, 0)
    results = call_all(cluster, 0, [
        ("obj.create", {"oid": oid, "offset": 0, "data": b"x" * 4096, "size": OBJECT_SIZE, "epoch": epoch}),
        ("obj.read", {"oid": oid, "offset": 0, "length": 8 << 20, "epoch": epoch}),
        ("obj.read", {"oid": oid, "offset": 1 << 20, "length": OBJECT_SIZE, "epoch": epoch}),
        ("x" * (1 << 20), {}),
        ("cluster.remove_peer", {"peer": "p" * (1 << 20)}),
        ("paxos.peek", {"key": "k" * (1 << 20)}),
        ("paxos.prepare", {"key": "k" * (1 << 20), "ballot": [1, "t"]}),
        ("obj.read", {"oid": oid, "offset": 0, "length": OBJECT_SIZE, "epoch": epoch}),
    ])
    assert results[0] is None
    refused(results[1], errno.EINVAL)
    refused(results[2], errno.EINVAL)
    refused(results[3], errno.ENOSYS)
    refused(results[4], errno.EINVAL)
    refused(results[5], errno.EINVAL)
    refused(results[6], errno.EINVAL)
    whole = results[7]
    assert isinstance(whole, (bytes, bytearray)) and len(whole) == OBJECT_SIZE
    assert whole[:4096] == b"x" * 4096 and not any(whole[4096:])
    assert_alive(cluster)


def test_bad_values_are_refused_and_change_nothing(cluster):
    """Epochs, generations and vids out of range or of the wrong type are
    EINVAL, and the object they aimed at keeps its bytes."""
    formatted(cluster)
    epoch = current_map(cluster.peers[0]).epoch
    oid = data_oid(7, 0)
    setup = call_all(cluster, 0, [
        ("obj.create", {"oid": oid, "offset": 0, "data": b"a" * 4096, "size": OBJECT_SIZE, "epoch": epoch})])
    assert setup == [None]
    write = {"oid": oid, "offset": 0, "data": b"b" * 4096}
    bad = [("obj.write", {**write, "epoch": e}) for e in (1 << 63, (1 << 64) - 1, float(epoch), str(epoch),
                                                          True, -1, epoch + 1000)]
    bad += [("obj.write", {**write, "epoch": epoch, "gen": g}) for g in ("5", 1.5, True, -1, 1 << 63)]
    bad += [("lease.fence", {"vid": 7, "gen": g}) for g in ("5", 1.5, True, -1, 1 << 63, float("inf"))]
    bad += [("lease.fence", {"vid": v, "gen": 3}) for v in (0, 1 << 24, -1, "7", 7.0)]
    bad += [("obj.list", {"vid": v}) for v in (0, 1 << 24, -5)]
    bad += [("obj.finish_vid", {"vid": v}) for v in (0, 1 << 24, -5)]
    results = call_all(cluster, 0, bad)
    for (op, args), result in zip(bad, results):
        shown = {k: v for k, v in args.items() if k != "data"}
        assert isinstance(result, RemoteError), f"{op} {shown} was accepted: {result!r}"
        assert result.errno == errno.EINVAL, f"{op} {shown}: errno {result.errno} {result}"
        assert "\n" not in str(result) and len(str(result)) <= ERROR_TEXT_MAX, str(result)
    back = call_all(cluster, 0, [("obj.read", {"oid": oid, "offset": 0, "length": 4096, "epoch": epoch})])[0]
    assert back == b"a" * 4096
    fences = call_all(cluster, 0, [("lease.fence", {"vid": 7, "gen": 0})])[0]
    assert fences == 0  # no bad generation was taken
    assert_alive(cluster)


def test_a_fence_cannot_be_sidestepped_by_naming_another_lease(cluster):
    """A write with a generation below its vid's fence is refused whatever
    `lvid` the client names (reproduced: naming an unfenced vid let it land)."""
    formatted(cluster)
    epoch = current_map(cluster.peers[0]).epoch
    oid = data_oid(9, 0)
    results = call_all(cluster, 0, [
        ("obj.create", {"oid": oid, "offset": 0, "data": b"a" * 4096, "size": OBJECT_SIZE, "epoch": epoch,
                        "gen": 5}),
        ("lease.fence", {"vid": 9, "gen": 6}),
        ("obj.write", {"oid": oid, "offset": 0, "data": b"b" * 4096, "epoch": epoch, "gen": 5, "lvid": 12}),
        ("obj.write", {"oid": oid, "offset": 0, "data": b"c" * 4096, "epoch": epoch, "gen": 5}),
        ("obj.read", {"oid": oid, "offset": 0, "length": 4096, "epoch": epoch}),
    ])
    assert results[0] is None and results[1] == 6
    refused(results[2], errno.EPERM)
    refused(results[3], errno.EPERM)
    assert results[4] == b"a" * 4096
    assert_alive(cluster)


def test_a_forged_map_is_not_adopted(cluster):
    """cluster.notify with the real map and its epoch raised by 1,000: the
    peer keeps the epoch consensus chose, and the next real map change
    reaches it (reproduced: it adopted the forgery and refused every request
    after as stale)."""
    formatted(cluster)
    real = current_map(cluster.peers[0])
    forged = real.to_dict()
    forged["epoch"] = real.epoch + 1000
    for i in range(3):
        call_all(cluster, i, [("cluster.notify", {"map": forged})])
    for i in range(3):
        assert current_map(cluster.peers[i]).epoch == real.epoch
    cluster.add_peer("--join", cluster.peers[0].address, "--secret-file", cluster.secret)  # a real map change
    wait_for(lambda: all(os.path.exists(os.path.join(p.store, "meta", "cluster_map")) and
                         current_map(p).epoch > real.epoch for p in cluster.peers), 20, "the real map")
    assert all(current_map(p).epoch < real.epoch + 1000 for p in cluster.peers)
    epoch = current_map(cluster.peers[0]).epoch
    oid = data_oid(7, 3)
    results = call_all(cluster, 0, [
        ("obj.create", {"oid": oid, "offset": 0, "data": b"z" * 4096, "size": 4096, "epoch": epoch}),
        ("obj.read", {"oid": oid, "offset": 0, "length": 4096, "epoch": epoch})])
    assert results == [None, b"z" * 4096]
    for i in range(3):
        assert_alive(cluster, i)
# -- raw frames: a client that misbehaves below the RPC layer ------------------------------

def _frame(obj: object, blob: bytes = b"") -> bytes:
    meta = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">II", 4 + len(meta) + len(blob), len(meta)) + meta + blob


def _read_frame(sock: socket.socket) -> object:
    head = b""
    while len(head) < 8:
        head += sock.recv(8 - len(head))
    total, meta_len = struct.unpack(">II", head)
    body = b""
    while len(body) < total - 4:
        body += sock.recv(total - 4 - len(body))
    return msgpack.unpackb(body[:meta_len], raw=False)


def raw_session(address: str, secret: bytes) -> socket.socket:
    """A connection past the handshake, as a plain blocking socket."""
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    hello = _read_frame(sock)
    nonce = b"n" * 16
    token = hmac.new(secret, b"vdifs-c" + hello["nonce"] + nonce, hashlib.sha256).digest()
    sock.sendall(_frame({"proto": 1, "nonce": nonce, "mac": token}))
    assert _read_frame(sock)["ok"]
    return sock


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_unread_replies_do_not_grow_memory(cluster):
    """2,000 reads of a whole object whose replies are never read, on six
    connections: the peer stops reading requests it cannot answer instead of
    holding gigabytes of replies (reproduced: 1.58 GiB, kept after close)."""
    formatted(cluster, 1)
    creds = read_credentials(cluster.secret)
    peer = cluster.peers[0]
    epoch = current_map(peer).epoch
    oid = data_oid(7, 0)
    assert call_all(cluster, 0, [("obj.create", {"oid": oid, "offset": 0, "data": b"r" * OBJECT_SIZE,
                                                 "size": OBJECT_SIZE, "epoch": epoch})]) == [None]
    socks = [raw_session(peer.address, creds.secret) for _ in range(6)]
    peak = 0.0
    try:
        burst = b"".join(_frame([i, "obj.read", {"oid": oid, "offset": 0, "length": OBJECT_SIZE, "epoch": epoch}])
                         for i in range(2000))
        for s in socks:
            s.setblocking(False)
            try:
                s.send(burst)  # as much as the peer takes; it must stop taking at some point
            except BlockingIOError:
                pass
        for _ in range(30):
            time.sleep(0.2)
            peak = max(peak, rss_mib(peer.proc.pid))
        assert_alive(cluster)  # other clients are still served meanwhile
    finally:
        for s in socks:
            s.close()
    assert peak < 150, f"peer RSS reached {peak:.0f} MiB"
    time.sleep(1)
    assert rss_mib(peer.proc.pid) < 150
    assert_alive(cluster)


def test_half_frames_are_closed_after_the_idle_timeout(cluster):
    """Connections that stop in the middle of a frame are closed after the
    peer's --idle-timeout; whole requests keep being answered."""
    cluster.format(1, copies=1, peer_options=("--idle-timeout", "2"))
    creds = read_credentials(cluster.secret)
    peer = cluster.peers[0]
    socks = [raw_session(peer.address, creds.secret) for _ in range(50)]
    try:
        for i, s in enumerate(socks):  # half a header, or a header and half the message
            s.sendall(_frame([1, "peer.info", {}])[:5 if i % 2 else 11])
        time.sleep(4)
        for s in socks:
            s.settimeout(5)
            try:
                got = s.recv(100)
            except ConnectionResetError:  # closed with a reset: nothing it sent is kept
                got = b""
            assert got == b"", "a half-frame connection was left open"
        whole = raw_session(peer.address, creds.secret)  # a connection that sends whole frames is served
        whole.sendall(_frame([1, "peer.info", {}]))
        whole.settimeout(10)
        reply = _read_frame(whole)
        whole.close()
        assert reply[0] == 1 and reply[1] == 0 and reply[2]["peer"] == peer.peer_id
    finally:
        for s in socks:
            s.close()
    assert_alive(cluster)
