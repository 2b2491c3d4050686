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
        await _receive_raw(HEADER.pack(2 << 30))


async def test_garbage_and_truncation():
    with pytest.raises(ProtocolError):
        await _receive_raw(HEADER.pack(3) + b"\xc1\xc1\xc1")  # 0xc1 is never valid msgpack
    with pytest.raises(ProtocolError, match="middle"):
        await _receive_raw(HEADER.pack(10) + b"abc")
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
