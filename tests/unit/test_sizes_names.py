import pytest
from hypothesis import given
from hypothesis import strategies as st

from vdifs.model.names import InvalidName, ReservedName, validate_name
from vdifs.model.sizes import format_size, parse_size


@pytest.mark.parametrize("text,value", [
    ("0", 0), ("512", 512), ("4K", 4096), ("4k", 4096), ("10G", 10 << 30), ("10GiB", 10 << 30),
    ("1.5K", 1536), ("2T", 2 << 40), ("16P", 16 << 50), (" 3M ", 3 << 20),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "-1", "-5G", "G", "1X", "1.3", "ten", "1..2K", "0x10"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


@given(st.integers(0, 1 << 60))
def test_format_size_never_fails(n):
    assert format_size(n)


@pytest.mark.parametrize("name", ["db01", "a", "x" * 255, ".rsync.tmp.XY12", "名前", "with space", "a.b-c_d"])
def test_valid_names(name):
    assert validate_name(name) == name
    assert validate_name(name.encode()) == name


@pytest.mark.parametrize("raw", [b"", b"x" * 256, b"a/b", b"a\0b", b"vm@snap", b".", b"..", b"\xff\xfe"])
def test_invalid_names(raw):
    with pytest.raises(InvalidName):
        validate_name(raw)


@pytest.mark.parametrize("raw", [b".snapshots", b".vdifs", b".vdifs-anything"])
def test_reserved_names(raw):
    with pytest.raises(ReservedName):
        validate_name(raw)


def test_the_error_of_parallel_pieces_is_the_one_that_says_most():
    from vdifs.errors import NoSpace, PoolError, VdifsError, as_vdifs_error

    io, full = PoolError("replica gone"), NoSpace("pool full")
    assert as_vdifs_error(io) is io
    assert as_vdifs_error(ExceptionGroup("x", [io, ExceptionGroup("y", [full])])) is full  # ENOSPC first
    assert as_vdifs_error(ExceptionGroup("x", [io])) is io
    assert as_vdifs_error(ExceptionGroup("x", [io, ValueError("bug")])) is None  # a bug stays a bug
    assert as_vdifs_error(KeyError("bug")) is None
    assert isinstance(as_vdifs_error(VdifsError("plain")), VdifsError)


@given(sizes=st.lists(st.integers(0, 50), max_size=8), data=st.data())
def test_dropping_sent_bytes_leaves_exactly_the_rest(sizes, data):
    from vdifs.model.buffers import drop_sent

    parts = [bytes([i]) * n for i, n in enumerate(sizes)]
    whole = b"".join(parts)
    sent = data.draw(st.integers(0, len(whole)))
    views = [memoryview(x) for x in parts]
    drop_sent(views, sent)
    assert b"".join(bytes(v) for v in views) == whole[sent:]
