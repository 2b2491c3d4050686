import pytest
from hypothesis import given
from hypothesis import strategies as st

from vdifs.model.ids import (
    MAX_INDEX, MAX_VDI_SIZE, MAX_VID, OBJECT_SIZE, ObjectKind, data_oid, map_oid, pack_oid, unpack_oid,
    vid_of,
)

kinds = st.sampled_from(list(ObjectKind))
vids = st.integers(1, MAX_VID)
indexes = st.integers(0, MAX_INDEX)


@given(kinds, vids, indexes)
def test_pack_unpack_roundtrip(kind, vid, index):
    oid = pack_oid(kind, vid, index)
    assert 0 <= oid < 1 << 64
    assert unpack_oid(oid) == (kind, vid, index)
    assert vid_of(oid) == vid


@given(vids, indexes, vids, indexes)
def test_distinct_inputs_give_distinct_ids(v1, i1, v2, i2):
    assert (data_oid(v1, i1) == data_oid(v2, i2)) == ((v1, i1) == (v2, i2))
    assert data_oid(v1, i1) != map_oid(v2, i2)


def test_limits():
    assert OBJECT_SIZE == 4 << 20
    assert MAX_VDI_SIZE == 16 << 50  # 16 PiB
    for bad in [(0, 0, 0), (0, MAX_VID + 1, 0), (0, 1, MAX_INDEX + 1), (256, 1, 0), (0, 1, -1)]:
        with pytest.raises(ValueError):
            pack_oid(*bad)
    with pytest.raises(ValueError):
        unpack_oid(1 << 64)
