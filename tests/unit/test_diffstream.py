import errno
import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdifs.model.diffstream import DiffFormatError, DiffHeader, DiffReader, DiffWriter

SIZE = 64 << 20


def header(**kw) -> DiffHeader:
    fields = dict(name="vm", size=SIZE, object_size=4 << 20, to="s2", to_id="b" * 16, created=1.5,
                  from_="s1", from_id="a" * 16)
    fields.update(kw)
    return DiffHeader(**fields)


@st.composite
def record_lists(draw):
    """Ordered, non-overlapping records inside SIZE."""
    out, at = [], 0
    for _ in range(draw(st.integers(0, 8))):
        at += draw(st.integers(0, 1 << 20))
        if draw(st.booleans()):
            data = draw(st.binary(min_size=1, max_size=300))
            if at + len(data) > SIZE:
                break
            out.append(("D", at, data))
            at += len(data)
        else:
            n = draw(st.integers(1, 8 << 20))
            if at + n > SIZE:
                break
            out.append(("Z", at, n))
            at += n
    return out


def encode(records, h=None) -> bytes:
    buf = io.BytesIO()
    w = DiffWriter(buf, h or header())
    for kind, off, x in records:
        w.data(off, x) if kind == "D" else w.zero(off, x)
    w.finish()
    return buf.getvalue()


def decode(raw: bytes):
    r = DiffReader(io.BytesIO(raw))
    h = r.read_header()
    return h, list(r.records())


@given(record_lists())
@settings(max_examples=60)
def test_streams_roundtrip(records):
    h, back = decode(encode(records))
    assert h == header() and back == records


@given(record_lists(), st.data())
@settings(max_examples=150)
def test_any_flipped_byte_or_truncation_is_refused(records, data):
    raw = encode(records)
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(raw) - 1))
        bad = raw[:cut]
    else:
        at = data.draw(st.integers(0, len(raw) - 1))
        bad = raw[:at] + bytes([raw[at] ^ data.draw(st.integers(1, 255))]) + raw[at + 1:]
    with pytest.raises(DiffFormatError):
        decode(bad)


def test_trailing_bytes_out_of_order_and_oversized_records_are_refused():
    raw = encode([("D", 0, b"x")])
    with pytest.raises(DiffFormatError, match="follow the end"):
        decode(raw + b"\0")
    with pytest.raises(DiffFormatError, match="out of order"):
        decode(encode([("D", 100, b"x"), ("Z", 50, 10)]))
    with pytest.raises(DiffFormatError, match="past the size"):
        decode(encode([("Z", SIZE - 1, 2)]))
    with pytest.raises(DiffFormatError, match="bad magic"):
        decode(b"qcow2 or so" + raw)
    with pytest.raises(DiffFormatError, match="version"):
        decode(raw[:11] + b"\x09" + raw[12:])
    with pytest.raises(DiffFormatError, match="'@'"):
        decode(encode([], header(to="x@y")))
    with pytest.raises(DiffFormatError, match="both"):
        decode(encode([], header(from_id=None)))


def test_a_bad_stream_is_ebadmsg():
    assert DiffFormatError("x").errno == errno.EBADMSG
