"""The RPC layer over real loopback TCP: auth, multiplexing, bad traffic."""

import errno
import functools
import logging
import os
import struct

import pytest
import trio

from tests.old_clients import deaf_to_encryption
from vdifs.errors import InvalidArgument, VdifsError
from vdifs.wire.rpc import PeerUnavailable, RemoteError, RpcClient, RpcPool, RpcServer

SECRET = b"s" * 32


async def start_server(nursery, secret=SECRET, cluster="c1"):
    async def echo(args, session):
        if "x" not in args:  # handlers check their arguments themselves
            raise InvalidArgument("missing argument 'x'")
        return {"echo": args["x"], "auth": session.authenticated}

    async def slow(args, session):
        await trio.sleep(args["t"])
        return args["t"]

    async def bad(args, session):
        raise InvalidArgument("no good")

    async def crash(args, session):
        raise RuntimeError("bug")

    async def lookup_bug(args, session):
        return {}["missing"]  # a bug, not a bad argument

    server = RpcServer("test", {"echo": echo, "slow": slow, "bad": bad, "crash": crash, "open": echo,
                                "lookup_bug": lookup_bug},
                       secret=lambda: secret, cluster_id=lambda: cluster, peer_id="p1",
                       open_ops=frozenset({"open"}))
    listeners = await nursery.start(server.serve, "127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]
    return server, f"127.0.0.1:{port}"


async def test_calls_multiplex_and_errors(nursery):
    server, addr = await start_server(nursery)
    client = RpcClient(addr, SECRET, nursery)
    assert await client.call("echo", {"x": b"\0\1"}) == {"echo": b"\0\1", "auth": True}
    results = []

    async def one(t):
        results.append(await client.call("slow", {"t": t}))

    async with trio.open_nursery() as n:  # replies arrive out of order, routed by id
        for t in (0.2, 0.0, 0.1):
            n.start_soon(one, t)
    assert results == [0.0, 0.1, 0.2]
    with pytest.raises(RemoteError) as e:
        await client.call("bad")
    assert e.value.errno == errno.EINVAL and "no good" in str(e.value)
    with pytest.raises(RemoteError) as e:
        await client.call("crash")
    assert e.value.errno == errno.EIO
    with pytest.raises(RemoteError) as e:  # a KeyError inside a handler is a bug, not EINVAL
        await client.call("lookup_bug")
    assert e.value.errno == errno.EIO
    with pytest.raises(RemoteError) as e:
        await client.call("nope")
    assert e.value.errno == errno.ENOSYS
    with pytest.raises(RemoteError) as e:
        await client.call("echo", {"y": 1})  # missing argument
    assert e.value.errno == errno.EINVAL
    with pytest.raises(PeerUnavailable):
        await client.call("slow", {"t": 5}, timeout=0.2)
    assert await client.call("echo", {"x": 1}) == {"echo": 1, "auth": True}
    await client.aclose()


async def test_an_idle_connection_still_times_calls_out(nursery):
    """The watchdog that fails late calls sleeps while no call is pending
    (an idle peer kept a timer per connection); a call on a connection idle
    for a while must still time out, at its deadline plus a sweep."""
    _server, addr = await start_server(nursery)
    client = RpcClient(addr, SECRET, nursery)
    assert await client.call("echo", {"x": 1}) == {"echo": 1, "auth": True}
    await trio.sleep(1.0)  # idle: the watchdog has nothing to watch
    started = trio.current_time()
    with trio.fail_after(3):
        with pytest.raises(PeerUnavailable):
            await client.call("slow", {"t": 5}, timeout=0.2)
    assert trio.current_time() - started < 1.0
    await client.aclose()


async def test_wrong_secret_is_refused(nursery, caplog):
    server, addr = await start_server(nursery)
    with caplog.at_level(logging.WARNING):
        with pytest.raises(Exception, match="authentication failed"):
            await RpcClient(addr, b"wrong", nursery).call("echo", {"x": 1})
        with pytest.raises(Exception, match="authentication failed"):
            await RpcClient(addr, None, nursery).call("open", {"x": 1})
    assert "authentication failed" in caplog.text
    assert server.refused == 2


async def test_unformatted_peer_allows_only_open_ops(nursery):
    server, addr = await start_server(nursery, secret=None, cluster=None)
    client = RpcClient(addr, None, nursery)
    assert await client.call("open", {"x": 2}) == {"echo": 2, "auth": False}
    with pytest.raises(RemoteError) as e:
        await client.call("echo", {"x": 2})
    assert e.value.errno == errno.EACCES


async def raw_exchange(addr, payload: bytes) -> bytes:
    host, port = addr.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    got = b""
    with trio.move_on_after(3):
        await stream.send_all(payload)
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            got += chunk
    await stream.aclose()
    return got


@pytest.mark.parametrize("payload", [
    os.urandom(5000),  # random bytes
    struct.pack(">II", 2 << 30, 4) + b"x" * 100,  # a 2 GiB length prefix
    struct.pack(">II", 7, 3) + b"\xc1\xc1\xc1",  # undecodable
    struct.pack(">II", 9, 5) + bytes([0x93, 1, 2, 3]) + b"\x00",  # msgpack with trailing garbage
])
async def test_bad_traffic_closes_only_that_connection(nursery, payload, caplog):
    server, addr = await start_server(nursery)
    good = RpcClient(addr, SECRET, nursery)
    assert await good.call("echo", {"x": 1})
    with caplog.at_level(logging.WARNING):
        await raw_exchange(addr, payload)  # the server hangs up on it
        with trio.fail_after(5):
            while server.refused < 1:
                await trio.sleep(0.01)
    assert server.refused == 1
    assert "refused connection" in caplog.text
    assert await good.call("echo", {"x": 2}) == {"echo": 2, "auth": True}


async def test_wrong_types_after_authentication(nursery):
    server, addr = await start_server(nursery)
    client = RpcClient(addr, SECRET, nursery)
    assert await client.call("echo", {"x": 1})
    await client._frames.send(["not-an-id", 5, None])  # valid msgpack, wrong shape
    with trio.fail_after(5):
        while server.refused == 0:
            await trio.sleep(0.01)
    other = RpcClient(addr, SECRET, nursery)
    assert await other.call("echo", {"x": 3}) == {"echo": 3, "auth": True}
    assert await client.call("echo", {"x": 4}) == {"echo": 4, "auth": True}  # reconnects


async def test_pool_reset_takes_new_credentials(nursery):
    server, addr = await start_server(nursery)
    pool = RpcPool(b"w" * 32, nursery)
    with pytest.raises(VdifsError) as e:  # a wrong secret
        await pool.call(addr, "echo", {"x": 1})
    assert e.value.errno == errno.EACCES
    pool.reset(SECRET)  # the next connection authenticates with the new secret
    assert await pool.call(addr, "echo", {"x": 1}) == {"echo": 1, "auth": True}
    await pool.aclose()


async def test_a_fast_handler_answers_in_the_reader_or_hands_over(nursery):
    """A fast handler's answer is the reply (no task, no handler call); NOT_NOW
    hands the request to the handler; its errors are replies like the handler's."""
    from vdifs.wire.rpc import NOT_NOW

    slow_calls = []

    async def handler(args, session):
        slow_calls.append(args["x"])
        return ("slow", args["x"])

    def fast(args, session):
        if args["x"] == "bad":
            raise InvalidArgument("bad x")
        if args["x"] == "bug":
            raise RuntimeError("a bug")
        return NOT_NOW if args["x"] == "later" else ("fast", args["x"], session.authenticated)

    server = RpcServer("test", {"op": handler}, secret=lambda: SECRET, cluster_id=lambda: "c1", peer_id="p1",
                       fast={"op": fast})
    listeners = await nursery.start(server.serve, "127.0.0.1", 0)
    client = RpcClient(f"127.0.0.1:{listeners[0].socket.getsockname()[1]}", SECRET, nursery)
    assert await client.call("op", {"x": "now"}) == ["fast", "now", True]
    assert await client.call("op", {"x": "later"}) == ["slow", "later"]
    with pytest.raises(RemoteError) as e:
        await client.call("op", {"x": "bad"})
    assert e.value.errno == errno.EINVAL
    with pytest.raises(RemoteError) as e:
        await client.call("op", {"x": "bug"})
    assert e.value.errno == errno.EIO
    assert slow_calls == ["later"] and server.fast_answers == 3


async def test_closing_a_client_ends_its_tasks_at_once(nursery):
    """A short-lived caller (the CLI) must not wait for the next watchdog sweep."""
    import trio.testing

    _server, addr = await start_server(nursery)
    async with trio.open_nursery() as n:
        client = RpcClient(addr, SECRET, n)
        assert await client.call("echo", {"x": 1}) == {"echo": 1, "auth": True}
        assert len(n.child_tasks) == 3  # the reader, the watchdog and the flusher
        await client.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert not n.child_tasks


async def test_fast_replies_to_a_burst_of_requests_leave_together(nursery, monkeypatch):
    """Requests that arrive together are answered together: the server sends
    the fast replies of one burst in a few system calls, not one per reply."""
    server = RpcServer("test", {}, secret=lambda: SECRET, cluster_id=lambda: "c1", peer_id="p1",
                       fast={"op": lambda args, session: args["x"] * 2})
    listeners = await nursery.start(server.serve, "127.0.0.1", 0)
    client = RpcClient(f"127.0.0.1:{listeners[0].socket.getsockname()[1]}", SECRET, nursery)
    assert await client.call("op", {"x": 0}) == 0  # connected
    writes = 0
    real_writev = os.writev

    def counting(fd, buffers):
        nonlocal writes
        writes += 1
        return real_writev(fd, buffers)

    monkeypatch.setattr(os, "writev", counting)
    calls = [await client.start("op", {"x": i}) for i in range(32)]  # 32 sends, no wait between
    sent = writes
    assert [await c.finish(10) for c in calls] == [2 * i for i in range(32)]
    assert sent == 32 and writes - sent <= 4  # replies: one send per 16 at most, not 32


async def test_requests_queued_in_one_pass_leave_together_in_order(nursery, monkeypatch):
    """Requests started with soon=True go out in one system call once the
    starting task lets the flusher run, in the order they were started, and
    a plain send started after them never overtakes them."""
    seen: list[int] = []

    def record(args, session):
        seen.append(args["x"])
        return args["x"] * 2

    server = RpcServer("test", {}, secret=lambda: SECRET, cluster_id=lambda: "c1", peer_id="p1",
                       fast={"op": record})
    listeners = await nursery.start(server.serve, "127.0.0.1", 0)
    client = RpcClient(f"127.0.0.1:{listeners[0].socket.getsockname()[1]}", SECRET, nursery)
    assert await client.call("op", {"x": -1}) == -2  # connected
    fd = client._frames._sock.fileno()  # type: ignore[union-attr]
    writes: list[int] = []
    real_writev = os.writev

    def counting(f, buffers):
        if f == fd:
            writes.append(f)
        return real_writev(f, buffers)

    monkeypatch.setattr(os, "writev", counting)
    soon = [await client.start("op", {"x": i}, soon=True) for i in range(20)]
    assert writes == []  # queued, not sent: no await let the flusher run yet
    assert [await c.finish(10) for c in soon] == [2 * i for i in range(20)]
    assert len(writes) == 1  # all 20 requests in one writev
    assert seen == [-1, *range(20)]
    soon = [await client.start("op", {"x": i}, soon=True) for i in range(20, 23)]
    late = await client.start("op", {"x": 23})  # a plain send carries the queue before its own
    assert [await c.finish(10) for c in [*soon, late]] == [40, 42, 44, 46]
    assert seen[-4:] == [20, 21, 22, 23]


async def _relay(nursery, target: str, flips: dict[str, int] | None = None,
                 seen: list[bytes] | None = None) -> str:
    """A TCP relay in front of `target`. `flips`: flip one byte of the first
    connection's stream, at offset flips["up"] of what the client sends or
    flips["down"] of what the server sends (later connections pass
    unchanged). `seen`: record every byte that passes."""
    host, port = target.rsplit(":", 1)
    connections = [0]
    flips = flips or {}

    async def pump(src, dst, flip_at: int | None) -> None:
        count = 0
        try:
            while chunk := bytearray(await src.receive_some(1 << 16)):
                if flip_at is not None and count <= flip_at < count + len(chunk):
                    chunk[flip_at - count] ^= 0x01
                count += len(chunk)
                if seen is not None:
                    seen.append(bytes(chunk))
                await dst.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            with trio.CancelScope(shield=True):
                await dst.aclose()

    async def handle(client) -> None:
        first = connections[0] == 0
        connections[0] += 1
        server = await trio.open_tcp_stream(host, int(port))
        async with trio.open_nursery() as n:
            n.start_soon(pump, client, server, flips.get("up") if first else None)
            n.start_soon(pump, server, client, flips.get("down") if first else None)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"


@pytest.mark.parametrize("direction", ["up", "down"])
async def test_a_byte_flipped_on_the_way_is_caught(nursery, caplog, direction):
    """A relay between client and server flips one bit inside a data frame's
    blob (a write on the way up, a read's reply on the way down): the
    receiver drops the connection, the flipped data is neither stored nor
    returned, and the next call works on a new connection."""
    stored: list[bytes] = []

    async def store(args, session):
        stored.append(bytes(args["data"]))
        return len(args["data"])

    async def give(args, session):
        return b"g" * 65536

    server = RpcServer("test", {"store": store, "give": give}, secret=lambda: SECRET,
                       cluster_id=lambda: "c1", peer_id="p1")
    listeners = await nursery.start(server.serve, "127.0.0.1", 0)
    relay = await _relay(nursery, f"127.0.0.1:{listeners[0].socket.getsockname()[1]}",
                                   {direction: 2000 + 30000})  # past the handshake, inside the blob
    client = RpcClient(relay, SECRET, nursery)
    data = b"w" * 65536
    with caplog.at_level(logging.INFO):
        with pytest.raises(PeerUnavailable):
            if direction == "up":
                await client.call("store", {"data": data}, timeout=10)
            else:
                await client.call("give", {}, timeout=10)
    assert stored == []  # nothing changed on the way was handed to a handler
    assert await client.call("store", {"data": data}, timeout=10) == len(data)  # a new connection
    assert stored == [data]
    assert await client.call("give", {}, timeout=10) == b"g" * 65536
    if direction == "up":
        assert "integrity check" in caplog.text
    await client.aclose()


async def test_before_a_cluster_exists_traffic_is_encrypted(nursery):
    """A server of no cluster yet agrees on a key with each client (X25519)
    and their frames are encrypted: a relay in between sees neither the
    request's arguments nor the reply (as `cluster format` sends the new
    secret to the peers waiting for it)."""
    seen: list[bytes] = []

    async def adopt(args, session):
        return {"echo": args["secret"]}

    server = RpcServer("test", {"cluster.adopt": adopt}, secret=lambda: None, cluster_id=lambda: None,
                       peer_id="p1", open_ops=frozenset({"cluster.adopt"}))
    listeners = await nursery.start(server.serve, "127.0.0.1", 0)
    relay = await _relay(nursery, f"127.0.0.1:{listeners[0].socket.getsockname()[1]}", seen=seen)
    secret = os.urandom(32)
    client = RpcClient(relay, None, nursery)
    assert await client.call("cluster.adopt", {"secret": secret}) == {"echo": secret}
    traffic = b"".join(seen)
    assert traffic and secret not in traffic and secret.hex().encode() not in traffic
    assert b"cluster.adopt" not in traffic  # the op name is inside the encrypted body too
    await client.aclose()


@pytest.mark.parametrize("who", ["client asks", "server demands"])
async def test_an_authenticated_connection_can_be_encrypted(nursery, who):
    """Encryption after an authenticated handshake, asked by the client
    (`vdifs mount --encrypt`) or demanded by the server (`vdifs peer
    --encrypt`): a relay sees neither the data (4 KiB and 1 MiB blobs, both
    ways) nor the op names, and everything arrives whole."""
    seen: list[bytes] = []

    async def echo(args, session):
        return args["data"]

    server = RpcServer("test", {"obj.echo": echo}, secret=lambda: SECRET, cluster_id=lambda: "c1",
                       peer_id="p1", encrypt=who == "server demands")
    listeners = await nursery.start(server.serve, "127.0.0.1", 0)
    relay = await _relay(nursery, f"127.0.0.1:{listeners[0].socket.getsockname()[1]}", seen=seen)
    client = RpcClient(relay, SECRET, nursery, encrypt=who == "client asks")
    for size in (4096, 1 << 20):
        data = os.urandom(32) * (size // 32)
        assert await client.call("obj.echo", {"data": data}) == data
        traffic = b"".join(seen)
        assert data[:64] not in traffic and b"obj.echo" not in traffic
    await client.aclose()


async def test_a_server_that_demands_encryption_refuses_a_client_that_will_not(nursery, caplog):
    """A client of before encryption (no "enc" in its hello whatever the
    server says) is refused with a clear reason."""
    server = RpcServer("test", {"op": lambda a, s: None}, secret=lambda: SECRET, cluster_id=lambda: "c1",
                       peer_id="p1", encrypt=True)
    listeners = await nursery.start(server.serve, "127.0.0.1", 0)
    client = RpcClient(f"127.0.0.1:{listeners[0].socket.getsockname()[1]}", SECRET, nursery)
    deaf_to_encryption(client)
    with pytest.raises(VdifsError, match="requires encrypted connections"):
        await client.call("op", {})
    assert "did not ask for encryption" in caplog.text
    await client.aclose()
