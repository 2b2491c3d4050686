"""The NBD codec: extents of base:allocation, option payloads, request checks."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vdifs.nbd import protocol as p

OBJ = 4 << 20


@given(data=st.data(), object_size=st.sampled_from([4096, OBJ]), req_one=st.booleans())
def test_allocation_extents_cover_a_prefix_exactly_with_the_map_flags(data, object_size, req_one):
    offset = data.draw(st.integers(0, 64 * object_size))
    length = data.draw(st.integers(1, 64 * object_size))
    first, last = offset // object_size, (offset + length - 1) // object_size
    allocated = data.draw(st.lists(st.booleans(), min_size=last - first + 1, max_size=last - first + 1))
    extents = p.allocation_extents(offset, length, object_size, allocated, req_one)
    assert extents and sum(n for n, _ in extents) <= length
    if req_one:
        assert len(extents) == 1
    pos = offset
    for i, (n, flags) in enumerate(extents):
        assert 0 < n <= p.EXTENT_MAX
        if i:
            assert flags != extents[i - 1][1]  # neighbours alike are merged
        for byte in (pos, pos + n - 1):  # every object an extent touches has its flags
            held = allocated[byte // object_size - first]
            assert flags == (0 if held else p.STATE_HOLE | p.STATE_ZERO)
        pos += n
    if not req_one:
        assert pos == offset + length  # short ranges are answered whole


def test_an_extent_never_passes_32_bits():
    extents = p.allocation_extents(0, 8 << 30, OBJ, [False] * 2048, False)
    assert extents == [((4 << 30) - OBJ, 3)]  # the client asks again from where it ends


@given(name=st.text(max_size=50), infos=st.lists(st.integers(0, 65535), max_size=10))
def test_go_requests_round_trip(name, infos):
    raw = name.encode()
    data = struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos)) + struct.pack(f">{len(infos)}H", *infos)
    assert p.parse_go(data) == p.GoRequest(name, tuple(infos))


@given(name=st.text(max_size=20), queries=st.lists(st.text(max_size=30), max_size=5))
def test_meta_requests_round_trip(name, queries):
    def s(x: str) -> bytes:
        return struct.pack(">I", len(x.encode())) + x.encode()

    data = s(name) + struct.pack(">I", len(queries)) + b"".join(s(q) for q in queries)
    assert p.parse_meta(data) == p.MetaRequest(name, tuple(queries))


@given(garbage=st.binary(max_size=64))
def test_garbage_options_are_value_errors_only(garbage):
    for parse in (p.parse_go, p.parse_meta):
        try:
            parse(garbage)
        except ValueError:
            pass


@pytest.mark.parametrize("cmd, flags, offset, length, read_only, structured, contexts, want", [
    (p.Cmd.READ, 0, 0, 512, False, False, False, 0),
    (p.Cmd.READ, 0, 1000, 100, False, False, False, p.EINVAL),  # past the end
    (p.Cmd.WRITE, 0, 1000, 100, False, False, False, p.ENOSPC),
    (p.Cmd.WRITE, 0, 0, 512, True, False, False, p.EPERM),
    (p.Cmd.TRIM, 0, 0, 512, True, False, False, p.EPERM),
    (p.Cmd.READ, p.CmdFlag.NO_HOLE, 0, 512, False, False, False, p.EINVAL),  # a flag READ does not take
    (p.Cmd.READ, p.CmdFlag.FUA, 0, 512, False, False, False, 0),  # FUA: allowed everywhere, ignored
    (p.Cmd.FLUSH, p.CmdFlag.FUA, 0, 0, False, False, False, 0),
    (p.Cmd.READ, p.CmdFlag.DF, 0, 512, False, False, False, p.EINVAL),  # DF needs structured replies
    (p.Cmd.READ, p.CmdFlag.DF, 0, 512, False, True, False, 0),
    (p.Cmd.BLOCK_STATUS, 0, 0, 512, False, True, False, p.EINVAL),  # no context chosen
    (p.Cmd.BLOCK_STATUS, p.CmdFlag.REQ_ONE, 0, 512, False, True, True, 0),
    (p.Cmd.FLUSH, 0, 0, 0, False, False, False, 0),
    (p.Cmd.FLUSH, 0, 0, 512, False, False, False, p.EINVAL),
    (p.Cmd.WRITE_ZEROES, p.CmdFlag.NO_HOLE | p.CmdFlag.FAST_ZERO, 0, 512, False, False, False, p.ENOTSUP),
    (p.Cmd.WRITE_ZEROES, p.CmdFlag.FAST_ZERO, 0, 512, False, False, False, 0),
    (p.Cmd.READ, 0, 0, 0, False, False, False, p.EINVAL),
    (p.Cmd.CACHE, 0, 0, 0, False, False, False, 0),
    (99, 0, 0, 512, False, False, False, p.EINVAL),
])
def test_request_checks(cmd, flags, offset, length, read_only, structured, contexts, want):
    assert p.check_request(int(flags), int(cmd), offset, length, 1024, read_only, structured, contexts) == want


def test_a_read_larger_than_the_block_limit_overflows():
    assert p.check_request(0, p.CMD_READ, 0, p.MAX_BLOCK + 1, 1 << 40, False, True, True) == p.EOVERFLOW
    assert p.check_request(0, p.CMD_WRITE, 0, p.MAX_BLOCK + 1, 1 << 40, False, True, True) == p.EINVAL


@given(flags=st.integers(0, 65535), kind=st.integers(0, 65535), offset=st.integers(0, 2**64 - 1),
       length=st.integers(0, 2**32 - 1), read_only=st.booleans(), structured=st.booleans(), contexts=st.booleans())
def test_every_request_header_gets_an_answer_and_only_sane_ones_are_served(
        flags, kind, offset, length, read_only, structured, contexts):
    size = 1 << 30
    error = p.check_request(flags, kind, offset, length, size, read_only, structured, contexts)
    assert error in (0, p.EINVAL, p.EPERM, p.ENOSPC, p.EOVERFLOW, p.ENOTSUP)
    if not error:
        assert kind in p.ALLOWED_FLAGS_BY_TYPE and not flags & ~p.ALLOWED_FLAGS_BY_TYPE[kind]
        assert offset + length <= size and (length > 0 or kind in (p.CMD_CACHE, p.CMD_FLUSH, p.CMD_DISC))
        assert not (read_only and kind in p.CHANGING)


@given(text=st.text(max_size=3000))
def test_messages_are_cut_on_a_character_boundary(text):
    raw = p.utf8_prefix(text * 3)
    assert len(raw) <= 4096 and (text * 3).encode().startswith(raw)
    raw.decode("utf-8")  # valid UTF-8, whatever was cut


def test_df_is_offered_only_with_structured_replies():
    from vdifs.nbd.server import transmission_flags

    assert not transmission_flags(False, False) & p.TransmissionFlag.SEND_DF
    assert transmission_flags(False, True) & p.TransmissionFlag.SEND_DF
    assert transmission_flags(True, True) & p.TransmissionFlag.READ_ONLY
