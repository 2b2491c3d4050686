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
