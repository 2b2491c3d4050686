"""Verified page-cache reads (`store/verified.py`): the native implementation
is held to the Python one on real files, both to the file's bytes, and both
give None, never an exception, for what the awaiting path must handle."""

from __future__ import annotations

import os
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.pagecache import evict
from vdifs.store import checksums, verified
from vdifs.store.checksums import BLOCK

IMPLEMENTATIONS = [pytest.param(verified.read_verified_py, id="python")]
if verified.NATIVE:
    IMPLEMENTATIONS.append(pytest.param(verified.read_verified, id="native"))

SIZE = 5 * BLOCK + 1234  # a short last block: the table counts it zero-padded


@pytest.fixture(scope="module")
def obj(tmp_path_factory):
    """An object file in the page cache, its bytes and its table."""
    data = os.urandom(SIZE)
    path = tmp_path_factory.mktemp("verified") / "obj"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    yield fd, data, checksums.table_of(data, SIZE)
    os.close(fd)


def test_make_test_builds_the_native_reads():
    """`make test` (and so CI) sets VDIFS_REQUIRE_NATIVE: there the
    extension must have been built, or the fast path silently is Python."""
    if os.environ.get("VDIFS_REQUIRE_NATIVE") != "1":
        pytest.skip("VDIFS_REQUIRE_NATIVE is not set")
    assert verified.NATIVE
    from vdifs.store import _verified  # type: ignore[attr-defined]
    assert _verified.BLOCK_SIZE == BLOCK


@settings(max_examples=300, deadline=None)
@given(offset=st.integers(0, SIZE + BLOCK), length=st.integers(0, 3 * BLOCK),
       bad=st.one_of(st.none(), st.integers(0, 7)), checked=st.booleans())
def test_native_and_python_agree_with_the_file(obj, offset, length, bad, checked):
    fd, data, good = obj
    table = array("I", good) if checked else None
    if table is not None and bad is not None:
        if bad < len(table):
            table[bad] ^= 1  # this block no longer matches
        else:
            table = table[:bad - 2]  # a short table: blocks past it must read as zeros, and do not
    results = [impl(fd, offset, length, table) for impl in (p.values[0] for p in IMPLEMENTATIONS)]
    assert all(r == results[0] for r in results)  # both None, or the same bytes
    got = results[0]
    covered = range(offset // BLOCK, -(-(offset + length) // BLOCK)) if length > 0 else range(0)
    spoiled = table is not None and (bad is not None and any(
        k == bad if bad < len(good) else k >= len(table) for k in covered))
    past_end = offset + length > SIZE if table is None else covered and covered[-1] * BLOCK + BLOCK > SIZE
    if length == 0 or spoiled or past_end:
        assert got is None
    else:
        assert bytes(got) == data[offset:offset + length]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_pages_not_in_the_cache_give_none_without_waiting(tmp_path, impl):
    """A page not in the cache gives None, or the right bytes: a RWF_NOWAIT
    read of a missing page starts a readahead, and on a fast disk that
    readahead may finish before the read looks again (this test failed so
    right after the page was seen evicted). Never wrong bytes, never an
    error; once cached, always the bytes."""
    path = tmp_path / "cold"
    data = os.urandom(4 * BLOCK)
    path.write_bytes(data)
    evict(str(path))
    fd = os.open(path, os.O_RDONLY)
    try:
        table = checksums.table_of(data, len(data))
        got = impl(fd, BLOCK, 4096, table)
        assert got is None or bytes(got) == data[BLOCK:BLOCK + 4096]
        assert os.pread(fd, len(data), 0) == data  # now cached
        assert bytes(impl(fd, BLOCK, 4096, table)) == data[BLOCK:BLOCK + 4096]
    finally:
        os.close(fd)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_bad_descriptors_and_ranges_give_none(obj, impl):
    fd, data, table = obj
    assert impl(-1, 0, 4096, table) is None
    assert impl(fd, -1, 4096, table) is None
    assert impl(fd, 0, -5, table) is None
    assert bytes(impl(fd, 0, BLOCK, table)) == data[:BLOCK]
