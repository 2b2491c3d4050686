import os

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from vdifs.wire.frames import (
    HEADER, ConnectionClosed, FrameStream, ProtocolError, check_reply, check_request, encode_frame,
)

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.text(max_size=20) | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)


@settings(max_examples=50, deadline=None)
@given(st.lists(values, min_size=1, max_size=5))
def test_frames_roundtrip(msgs):
    async def main():
        a, b = trio.testing.memory_stream_pair()
        fa, fb = FrameStream(a), FrameStream(b)
        for m in msgs:
            await fa.send(m)
        for m in msgs:
            assert await fb.receive() == m

    trio.run(main)


async def _receive_raw(raw: bytes, max_frame: int = 1 << 20):
    a, b = trio.testing.memory_stream_pair()
    await a.send_all(raw)
    await a.aclose()
    return await FrameStream(b, max_frame).receive()


async def test_oversized_length_prefix_is_refused_without_reading():
    with pytest.raises(ProtocolError, match="exceeds"):
        await _receive_raw(HEADER.pack(2 << 30, 10))


async def test_garbage_and_truncation():
    with pytest.raises(ProtocolError):
        await _receive_raw(HEADER.pack(7, 3) + b"\xc1\xc1\xc1")  # 0xc1 is never valid msgpack
    with pytest.raises(ProtocolError, match="middle"):
        await _receive_raw(HEADER.pack(14, 10) + b"abc")
    with pytest.raises(ProtocolError, match="inconsistent"):
        await _receive_raw(HEADER.pack(8, 100) + b"abcd")
    with pytest.raises(ConnectionClosed):
        await _receive_raw(b"")


def test_encode_refuses_oversized():
    with pytest.raises(ProtocolError):
        encode_frame(b"x" * 100, max_frame=10)


def test_shape_checks():
    assert check_request([1, "op", {}]) == (1, "op", {})
    assert check_reply([1, 0, None]) == (1, 0, None)
    for bad in [None, [], [1, "op"], ["1", "op", {}], [1, 2, {}], [1, "op", []]]:
        with pytest.raises(ProtocolError):
            check_request(bad)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(values, st.one_of(st.none(), st.binary(min_size=1, max_size=200000))),
                min_size=1, max_size=4))
def test_blobs_travel_beside_the_message(frames):
    async def main():
        a, b = trio.testing.memory_stream_pair()
        fa, fb = FrameStream(a, 1 << 20), FrameStream(b, 1 << 20)
        async with trio.open_nursery() as n:
            async def send_all():
                for m, blob in frames:
                    await fa.send(m, blob=blob)
            n.start_soon(send_all)
            for m, blob in frames:
                got, got_blob = await fb.receive_frame()
                assert got == m
                assert (None if got_blob is None else bytes(got_blob)) == blob

    trio.run(main)


async def test_plain_receive_refuses_a_blob():
    a, b = trio.testing.memory_stream_pair()
    await FrameStream(a).send([1], blob=b"data")
    with pytest.raises(ProtocolError, match="unexpected data"):
        await FrameStream(b).receive()


async def _socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    await listeners[0].aclose()
    return client, server


async def _send_concurrently(monkeypatch, sizes) -> int:
    """200 tasks send at once over a real socket; every frame must arrive
    exactly once and intact. Returns how many sendmsg calls carried them."""
    client, server = await _socket_pair()
    sender, receiver = FrameStream(client, 1 << 24), FrameStream(server, 1 << 24)
    calls = 0
    real = type(client.socket).sendmsg

    async def counting(sock, *args, **kwargs):
        nonlocal calls
        calls += 1
        return await real(sock, *args, **kwargs)

    monkeypatch.setattr(type(client.socket), "sendmsg", counting)
    expected = {i: bytes([i % 251]) * sizes(i) for i in range(200)}
    got: dict[int, bytes] = {}
    async with trio.open_nursery() as n:
        async def receive_all():
            for _ in expected:
                msg, blob = await receiver.receive_frame()
                assert msg[0] not in got
                got[msg[0]] = bytes(blob)
        n.start_soon(receive_all)
        async with trio.open_nursery() as senders:
            for i, data in expected.items():
                senders.start_soon(sender.send, [i, "x", {}], data)
    assert got == expected
    await client.aclose()
    await server.aclose()
    return calls


async def test_small_frames_queued_behind_a_busy_sender_share_sendmsg_calls(monkeypatch):
    """Frames queued behind a busy sender ride along in its next sendmsg: a
    frame too big for the socket buffers keeps its sender busy (nobody reads
    yet) while 99 small ones queue; then they go out in a few calls."""
    client, server = await _socket_pair()
    sender, receiver = FrameStream(client, 1 << 25), FrameStream(server, 1 << 25)
    buffers_per_call: list[int] = []
    real = type(client.socket).sendmsg

    async def counting(sock, buffers, *args, **kwargs):
        buffers_per_call.append(len(buffers))
        return await real(sock, buffers, *args, **kwargs)

    monkeypatch.setattr(type(client.socket), "sendmsg", counting)
    async with trio.open_nursery() as n:
        n.start_soon(sender.send, [0, "x", {}], b"b" * (24 << 20))
        await trio.testing.wait_all_tasks_blocked()  # blocked: the buffers are full
        for i in range(1, 100):
            n.start_soon(sender.send, [i, "x", {}], bytes([i]) * i)
        await trio.testing.wait_all_tasks_blocked()  # all queued behind it
        got = {}
        for _ in range(100):
            msg, blob = await receiver.receive_frame()
            got[msg[0]] = len(blob)
    assert got == {0: 24 << 20, **{i: i for i in range(1, 100)}}
    assert max(buffers_per_call) >= 2 * 50  # one call carried at least 50 of the small frames
    await client.aclose()
    await server.aclose()


async def test_a_frame_sent_while_nobody_sends_needs_no_sendmsg(monkeypatch):
    """The fast path: written at once, no lock, no await in the kernel call."""
    calls = await _send_concurrently(monkeypatch, lambda i: 1 + i % 100)
    assert calls == 0


async def test_big_frames_from_concurrent_senders_arrive_whole(monkeypatch):
    """Also when big frames need several sendmsg calls each."""
    await _send_concurrently(monkeypatch, lambda i: 1 + (i * 7919) % 300000)


async def test_a_send_cancelled_while_waiting_never_goes_out():
    client, server = await _socket_pair()
    sender, receiver = FrameStream(client, 1 << 24), FrameStream(server, 1 << 24)
    async with trio.open_nursery() as n:
        # A big frame keeps the sender busy (nobody reads yet), so the next waits.
        n.start_soon(sender.send, ["big"], b"b" * (15 << 20))
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(0.2):
            await sender.send(["cancelled"])
        await sender_after(n, sender)
        msg, blob = await receiver.receive_frame()
        assert msg == ["big"] and len(blob) == 15 << 20
        assert await receiver.receive() == ["after"]
    await client.aclose()
    await server.aclose()


async def sender_after(n: trio.Nursery, sender: FrameStream) -> None:
    n.start_soon(sender.send, ["after"])


async def test_a_failed_send_breaks_the_stream_for_every_later_sender():
    client, server = await _socket_pair()
    sender = FrameStream(client)
    await server.aclose()
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):  # the first sends may still land in kernel buffers
            await sender.send(["x"], b"y" * 65536)
    with pytest.raises((trio.BrokenResourceError, trio.ClosedResourceError)):
        await sender.send(["later"])


async def test_a_frame_being_sent_goes_out_whole_even_if_its_sender_is_cancelled():
    """Cancelling a task mid-send must not cut its frame short (that would
    corrupt the stream for every other request on the connection)."""
    client, server = await _socket_pair()
    sender, receiver = FrameStream(client, 1 << 24), FrameStream(server, 1 << 24)
    big = os.urandom(8 << 20)  # more than the socket buffers hold: the send blocks
    cancelled_at = None

    async def send_then_get_cancelled() -> None:
        nonlocal cancelled_at
        with trio.CancelScope() as scope:
            n.start_soon(cancel_soon, scope)
            await sender.send(["big"], big)
        cancelled_at = trio.current_time()

    async def cancel_soon(scope: trio.CancelScope) -> None:
        await trio.sleep(0.2)
        scope.cancel()

    async with trio.open_nursery() as n:
        n.start_soon(send_then_get_cancelled)
        await trio.sleep(0.5)  # the sender is blocked, and its cancel has come
        assert cancelled_at is None  # still sending: the frame is not cut
        msg, blob = await receiver.receive_frame()
        assert msg == ["big"] and bytes(blob) == big
        await sender.send(["after"])
        assert await receiver.receive() == ["after"]
    assert cancelled_at is not None
    await client.aclose()
    await server.aclose()


async def test_a_closed_stream_never_writes_to_a_socket_that_reused_its_number():
    """After a close the fd number may belong to a new socket: a late send on
    the old stream must fail, not write there."""
    client, server = await _socket_pair()
    sender = FrameStream(client)
    await client.aclose()
    other_client, other_server = await _socket_pair()  # likely takes the freed numbers
    with pytest.raises((trio.BrokenResourceError, trio.ClosedResourceError)):
        await sender.send(["late"], b"x" * 100)
    with trio.move_on_after(0.2):
        assert await other_server.receive_some(1024) == b""  # nothing arrived there
        raise AssertionError("bytes reached the other socket")
    for s in (server, other_client, other_server):
        await s.aclose()


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(values, st.one_of(st.none(), st.binary(min_size=1, max_size=64),
                                            st.integers(100_000, 400_000))),
                min_size=1, max_size=6),
       st.lists(st.integers(1, 70_000), min_size=1, max_size=20))
def test_frames_cut_anywhere_by_the_network_arrive_whole(frames, cuts):
    """The receive buffer over a real socket: frames arrive in pieces cut at
    any byte (headers, messages and blobs split, several frames in one
    piece), and blobs big enough to be read straight into their own buffer."""
    blobs = [os.urandom(b) if isinstance(b, int) else b for _, b in frames]
    wire = b"".join(b"".join(bytes(p) for p in encode_frame(m, 1 << 20, blob))
                    for (m, _), blob in zip(frames, blobs))

    async def main():
        client, server = await _socket_pair()
        receiver = FrameStream(server, 1 << 20)

        async def send_in_pieces():
            pos, i = 0, 0
            while pos < len(wire):
                step = cuts[i % len(cuts)]
                await client.send_all(wire[pos:pos + step])
                await trio.sleep(0)  # let the receiver take what has come so far
                pos, i = pos + step, i + 1

        async with trio.open_nursery() as n:
            n.start_soon(send_in_pieces)
            for (m, _), blob in zip(frames, blobs):
                got, got_blob = await receiver.receive_frame()
                assert got == m
                assert (None if got_blob is None else bytes(got_blob)) == blob
        await client.aclose()
        with pytest.raises(ConnectionClosed):
            await receiver.receive_frame()
        await server.aclose()

    trio.run(main)


async def test_frames_sent_together_are_all_buffered_and_taken_without_a_read():
    client, server = await _socket_pair()
    sender, receiver = FrameStream(client), FrameStream(server)
    await sender.send_encoded([p for i in range(5) for p in encode_frame([i], 1 << 20, b"x" * i or None)])
    assert await receiver.receive() == [0]
    await trio.sleep(0.05)
    assert receiver.frame_buffered()
    for i in range(1, 5):
        msg, blob = await receiver.receive_frame()
        assert msg == [i] and bytes(blob) == b"x" * i
    assert not receiver.frame_buffered()
    await client.aclose()
    await server.aclose()
