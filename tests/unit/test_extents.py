import pytest
from hypothesis import given
from hypothesis import strategies as st

from vdifs.model.extents import Extent, objects_for_size, split_extents

OBJ = 4 << 20


@given(st.integers(0, 1 << 54), st.integers(0, 64 << 20), st.sampled_from([4096, 1 << 20, OBJ]))
def test_extents_tile_the_range(offset, length, obj):
    extents = split_extents(offset, length, obj)
    assert sum(e.length for e in extents) == length
    pos = offset
    for e in extents:
        assert e.index * obj + e.offset == pos
        assert e.buf_offset == pos - offset
        assert 0 < e.length and e.offset + e.length <= obj
        pos += e.length
    # only the first and last extent may be partial
    for e in extents[1:-1]:
        assert e.offset == 0 and e.length == obj


def test_boundary_straddling_write():
    assert split_extents(4190208, 8192, OBJ) == [Extent(0, 4190208, 4096, 0), Extent(1, 0, 4096, 4096)]


def test_empty_and_negative():
    assert split_extents(123, 0, OBJ) == []
    with pytest.raises(ValueError):
        split_extents(-1, 1, OBJ)


def test_objects_for_size():
    assert objects_for_size(0, OBJ) == 0
    assert objects_for_size(1, OBJ) == 1
    assert objects_for_size(OBJ, OBJ) == 1
    assert objects_for_size(OBJ + 1, OBJ) == 2
