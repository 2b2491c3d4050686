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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cluster.conftest import Cluster, current_map, wait_for
from tests.e2e.conftest import FioVerify
from vdifs.errors import VdifsError
from vdifs.meta.credentials import read_credentials
from vdifs.model.ids import OBJECT_SIZE, data_oid
from vdifs.wire.rpc import PROTO, RemoteError, RpcClient
from vdifs.wire.seal import TAG, FrameSeal, session_key, wrap_secret

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
        ("paxos.peek", {"key": "k", "unless": ["x" * (1 << 20), 1]}),
        ("paxos.peek_many", {"keys": ["k"] * 100_000, "unless": [None] * 100_000}),
        ("obj.read", {"oid": oid, "offset": 0, "length": OBJECT_SIZE, "epoch": epoch}),
    ])
    assert results[0] is None
    refused(results[1], errno.EINVAL)
    refused(results[2], errno.EINVAL)
    refused(results[3], errno.ENOSYS)
    refused(results[4], errno.EINVAL)
    refused(results[5], errno.EINVAL)
    refused(results[6], errno.EINVAL)
    refused(results[7], errno.EINVAL)
    refused(results[8], errno.EINVAL)
    whole = results[9]
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

def _frame(obj: object, blob: bytes = b"", seal: FrameSeal | None = None) -> bytes:
    """A frame as the wire carries it; with `seal`, tagged as after the handshake."""
    meta = msgpack.packb(obj, use_bin_type=True)
    tag_len = TAG if seal is not None else 0
    head = struct.pack(">II", 4 + len(meta) + len(blob) + tag_len, len(meta)) + meta
    return head + blob + (seal.tag(head, blob or None) if seal is not None else b"")


def _read_frame(sock: socket.socket) -> object:
    head = b""
    while len(head) < 8:
        head += sock.recv(8 - len(head))
    total, meta_len = struct.unpack(">II", head)
    body = b""
    while len(body) < total - 4:
        body += sock.recv(total - 4 - len(body))
    return msgpack.unpackb(body[:meta_len], raw=False)


def raw_session(address: str, secret: bytes) -> tuple[socket.socket, FrameSeal]:
    """A connection past the handshake, as a plain blocking socket, and the
    seal its frames must carry from now on."""
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    hello = _read_frame(sock)
    nonce = b"n" * 16
    token = hmac.new(secret, b"vdifs-c" + hello["nonce"] + nonce, hashlib.sha256).digest()
    sock.sendall(_frame({"proto": PROTO, "nonce": nonce, "mac": token}))
    assert _read_frame(sock)["ok"]
    return sock, FrameSeal(session_key(secret, hello["nonce"], nonce), server=False)


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
    sessions = [raw_session(peer.address, creds.secret) for _ in range(6)]
    socks = [s for s, _ in sessions]
    peak = 0.0
    try:
        for s, seal in sessions:
            burst = b"".join(_frame([i, "obj.read", {"oid": oid, "offset": 0, "length": OBJECT_SIZE,
                                                     "epoch": epoch}], seal=seal) for i in range(2000))
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
    socks = [raw_session(peer.address, creds.secret)[0] for _ in range(50)]
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
        whole, seal = raw_session(peer.address, creds.secret)  # one that sends whole frames is served
        whole.sendall(_frame([1, "peer.info", {}], seal=seal))
        whole.settimeout(10)
        reply = _read_frame(whole)
        whole.close()
        assert reply[0] == 1 and reply[1] == 0 and reply[2]["peer"] == peer.peer_id
    finally:
        for s in socks:
            s.close()
    assert_alive(cluster)


# -- every op, every kind of wrong argument ------------------------------------------------

HOSTILE_VID = 0xABCD  # objects and fences of a vid no VDI of the test uses
#: values that are wrong for most arguments: types, ranges, sizes
BAD_VALUES = [None, True, False, -1, 0, 1 << 63, (1 << 64) - 1, 1.5, float("inf"), float("nan"), "", "x" * 5000,
              b"", b"\0" * 70000, [], [1, "a"], {}, {"a": 1}]


def well_formed(cluster: Cluster, epoch: int) -> dict[str, dict]:
    """A harmless, well-formed request for every op a peer serves."""
    cmap = current_map(cluster.peers[0])
    me = cmap.peers[cluster.peers[0].peer_id]
    other = cluster.peers[1].address
    oid = data_oid(HOSTILE_VID, 0)
    creds = read_credentials(cluster.secret)
    return {
        "peer.hello": {},
        "peer.register_pending": {"peer": {**me.to_dict(), "peer_id": "newcomer", "address": "127.0.0.9:1"}},
        "peer.info": {},
        "peer.ping": {},
        "peer.probe": {"address": other},
        "peer.relay": {"to": other, "op": "peer.info", "args": {}},
        "cluster.format": {"cluster_id": "c", "secret": b"s" * 32, "copies": 1, "min_copies": 1},
        "cluster.adopt": {"cluster_id": "c", "secret": b"s" * 32, "map": cmap.to_dict()},
        "cluster.map": {},
        "cluster.notify": {"map": cmap.to_dict()},
        "cluster.add_peer": {"peer": me.to_dict()},
        "cluster.remove_peer": {"peer": "nobody"},
        "cluster.set": {"copies": None, "min_copies": None},
        "cluster.replace_meta": {"old": "nobody", "new": "nobody"},
        # the secret the peers already have: answered, nothing changes
        "cluster.rotate_secret": {"wrapped": wrap_secret(creds.secret, creds.secret, creds.cluster_id.encode())},
        "paxos.prepare": {"key": "hostile", "ballot": [1, "t"]},
        "paxos.accept": {"key": "hostile", "ballot": [1, "t"], "value": b"v"},
        "paxos.peek": {"key": "hostile"},
        "paxos.peek_many": {"keys": ["hostile", "hostile3"], "unless": [None, [1, "t"]]},
        "paxos.keys": {},
        "paxos.install": {"key": "hostile2", "ballot": [1, "t"], "value": None},
        "obj.read": {"oid": oid, "offset": 0, "length": 1, "epoch": epoch},
        "obj.write": {"oid": oid, "offset": 0, "data": b"w", "epoch": epoch},
        "obj.writev": {"oids": [oid, oid], "offsets": [0, 8], "lengths": [1, 2], "data": b"wvv", "epoch": epoch},
        "obj.create": {"oid": data_oid(HOSTILE_VID, 1), "offset": 0, "data": b"c", "size": 8, "epoch": epoch},
        "obj.delete": {"oid": data_oid(HOSTILE_VID, 2), "epoch": epoch},
        "obj.collect": {"oid": data_oid(HOSTILE_VID, 3), "older_than": 3600, "epoch": epoch},
        "obj.fetch": {"oid": oid},
        "obj.sync": {"oids": [oid]},
        "obj.list": {"vid": HOSTILE_VID},
        "obj.vids": {},
        "obj.finish_vid": {"vid": HOSTILE_VID + 1},
        "obj.digest": {"oids": [oid]},
        "obj.pull": {"oid": data_oid(HOSTILE_VID, 4), "source": other},
        "obj.changed_after": {"since": 0},
        "lease.fence": {"vid": HOSTILE_VID, "gen": 3},
    }


def mutations(requests: dict[str, dict]) -> st.SearchStrategy[tuple[str, dict]]:
    """One op's request with one key missing, one value wrong, or one key too
    many; at the top level, or inside a map it carries (a peer, a map, a
    relayed request)."""
    def mutate(op: str, how: str, pick: int, deep: bool, value: object) -> tuple[str, dict]:
        args = dict(requests[op])
        target = args
        inner = sorted(k for k, v in args.items() if isinstance(v, dict) and v)
        if deep and inner:
            key = inner[pick % len(inner)]
            target = args[key] = dict(args[key])
        keys = sorted(target)
        if how == "missing" and keys:
            del target[keys[pick % len(keys)]]
        elif how == "wrong" and keys:
            target[keys[pick % len(keys)]] = value
        else:
            target["unexpected"] = value
        return op, args
    return st.builds(mutate, st.sampled_from(sorted(requests)), st.sampled_from(["missing", "wrong", "extra"]),
                     st.integers(0, 20), st.booleans(), st.sampled_from(BAD_VALUES))


def assert_answered(op: str, args: dict, result: object) -> None:
    """A result, or an error that is not an internal one (EIO) and whose text is one short line."""
    if isinstance(result, VdifsError):
        shown = {k: (repr(v)[:40]) for k, v in args.items()}
        assert result.errno != errno.EIO, f"{op} {shown}: internal error: {result}"
        text = str(result)
        assert "\n" not in text and len(text) <= ERROR_TEXT_MAX, f"{op} {shown}: {text[:300]}"


def test_every_op_answers_every_wrong_argument(cluster, tmp_path):
    """Every op of a live peer, driven with missing keys, wrong types, values
    out of range and extra keys while a mount runs fio verify: each call is
    answered (never EIO, the code of an internal error, never a dropped
    connection), nothing is logged as a crash, and fio's data verifies."""
    from vdifs.peer.daemon import PeerDaemon

    formatted(cluster)
    epoch = current_map(cluster.peers[0]).epoch
    requests = well_formed(cluster, epoch)
    served = set(PeerDaemon(str(tmp_path / "probe"), "127.0.0.1:1").ops)
    assert set(requests) == served, f"ops without a test request: {served - set(requests)}"
    m = cluster.mount("a")
    with FioVerify(m.path("vm.img"), 48) as fio:
        answered: list[str] = []

        @settings(max_examples=int(os.environ.get("HOSTILE_EXAMPLES", 400)), deadline=None,
                  derandomize=not os.environ.get("HOSTILE_EXAMPLES"),
                  suppress_health_check=list(HealthCheck))
        @given(mutations(requests))
        def one(request: tuple[str, dict]) -> None:
            op, args = request
            result = call_all(cluster, 0, [(op, args)])[0]
            assert not isinstance(result, VdifsError) or isinstance(result, RemoteError), \
                f"{op}: the connection broke: {result}"
            assert_answered(op, args, result)
            answered.append(op)

        one()
        assert set(answered) == served  # every op was driven
        fio.finish(300)
    for i in range(3):
        assert_alive(cluster, i)
    assert "Traceback" not in open(m.log).read()


def control_requests() -> dict[str, dict]:
    """A well-formed request for every op of a mount's control socket, all
    aimed at the VDI 'victim' and its snapshot (never at the one fio writes)."""
    return {
        "status": {}, "flush": {}, "vdi.list": {}, "vdi.jobs": {}, "vdi.tree": {},
        "vdi.info": {"name": "victim"},
        "vdi.create": {"name": "victim2", "size": 1 << 20},
        "vdi.delete": {"name": "victim2"},
        "vdi.resize": {"name": "victim", "size": 2 << 20},
        "vdi.rename": {"old": "victim2", "new": "victim3"},
        "vdi.lock_info": {"name": "victim"},
        "vdi.break_lock": {"name": "victim"},
        "vdi.snapshot": {"name": "victim", "snapshot": "s2"},
        "vdi.snapshot_delete": {"name": "victim", "snapshot": "s2"},
        "vdi.clone": {"name": "victim", "snapshot": "s1", "new": "victim-clone"},
        "vdi.rollback": {"name": "victim", "snapshot": "s1"},
        "vdi.flatten": {"name": "victim-clone"},
        "vdi.diff": {"name": "victim", "snapshot": "s1"},
        "vdi.du": {"name": "victim"},
    }


def test_every_control_op_answers_every_wrong_argument(cluster):
    """The same for a mount's control socket: every op with missing keys,
    wrong types and extra keys is answered (never EIO), the mount logs no
    crash, and a VDI written meanwhile verifies."""
    from vdifs.control import caller
    from vdifs.control.caller import CONTROL_SOCKET

    formatted(cluster)
    m = cluster.mount("a")
    sock = os.path.join(m.store, CONTROL_SOCKET)
    requests = control_requests()

    def control(op: str, args: dict) -> object:
        async def one() -> object:
            try:
                return await caller.call(sock, op, args, timeout=60)
            except VdifsError as e:
                return e
        return trio.run(one)

    for op, args in [("vdi.create", {"name": "victim", "size": 1 << 20}),
                     ("vdi.snapshot", {"name": "victim", "snapshot": "s1"})]:
        assert not isinstance(control(op, args), VdifsError)
    with FioVerify(m.path("vm.img"), 32) as fio:
        answered: list[str] = []

        @settings(max_examples=int(os.environ.get("HOSTILE_EXAMPLES", 300)), deadline=None,
                  derandomize=not os.environ.get("HOSTILE_EXAMPLES"), suppress_health_check=list(HealthCheck))
        @given(mutations(requests))
        def one(request: tuple[str, dict]) -> None:
            op, args = request
            assert_answered(op, args, control(op, args))
            answered.append(op)

        one()
        assert set(answered) == set(requests)
        fio.finish(300)
    assert m.proc is not None and m.proc.poll() is None
    log = open(m.log).read()
    assert "Traceback" not in log, log[-3000:]


def test_format_sends_no_secret_in_clear(cluster):
    """`vdifs cluster format` through a relay that records every byte: the
    secret it makes (written to the secret file afterwards) is nowhere in
    the traffic, and the cluster works."""
    import threading

    first = cluster.add_peer()
    cluster.add_peer("--join", first.address)
    wait_for(lambda: "will join at format time" in first.log_text(), 20, "pending join")
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []

    def relay() -> None:
        client, _ = listener.accept()
        host, port = first.address.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)))

        def pump(src: socket.socket, dst: socket.socket) -> None:
            while chunk := src.recv(1 << 16):
                seen.append(chunk)
                dst.sendall(chunk)
            dst.shutdown(socket.SHUT_WR)
        back = threading.Thread(target=pump, args=(upstream, client))
        back.start()
        pump(client, upstream)
        back.join()
        client.close()
        upstream.close()

    thread = threading.Thread(target=relay)
    thread.start()
    try:
        cluster.cli("cluster", "format", "--copies", "2", "--secret-file", cluster.secret,
                    f"127.0.0.1:{listener.getsockname()[1]}")
    finally:
        thread.join(30)
        listener.close()
    secret = read_credentials(cluster.secret).secret
    traffic = b"".join(seen)
    assert len(traffic) > 200 and secret not in traffic and secret.hex().encode() not in traffic
    epoch = current_map(first).epoch
    oid = data_oid(7, 0)
    assert call_all(cluster, 0, [("obj.create", {"oid": oid, "offset": 0, "data": b"f" * 4096, "size": 4096,
                                                 "epoch": epoch}),
                                 ("obj.read", {"oid": oid, "offset": 0, "length": 4096, "epoch": epoch})]) \
        == [None, b"f" * 4096]
