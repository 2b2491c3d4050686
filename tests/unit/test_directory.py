import pytest

from vdifs.errors import InvalidArgument, TooLarge, VdiExists, VdiNotFound
from vdifs.model.directory import Directory
from vdifs.model.ids import MAX_VDI_SIZE
from vdifs.model.names import InvalidName


def test_create_rename_delete_roundtrip():
    d = Directory()
    a = d.create("a", 10, now=1.0)
    b = d.create("b", 20, now=2.0)
    assert (a.vid, b.vid) == (1, 2)
    replaced = d.rename("a", "b")
    assert replaced == 2 and d.deleting == {2}
    assert d.get("b").vid == 1 and "a" not in d.vdis
    assert d.delete("b") == 1 and d.deleting == {1, 2}
    back = Directory.decode(d.encode())
    assert back == d


def test_vids_are_not_reused_while_tombstoned():
    d = Directory()
    d.create("a", 1)
    d.delete("a")
    d.next_vid = 1  # as after a wrap-around
    assert d.create("b", 1).vid == 2
    d.finish_delete(1)
    d.next_vid = 1
    assert d.create("c", 1).vid == 1


def test_refusals_change_nothing():
    d = Directory()
    d.create("a", 1)
    before = d.encode()
    for fn, exc in [
        (lambda: d.create("a", 1), VdiExists),
        (lambda: d.create("n", -1), InvalidArgument),
        (lambda: d.create("n", MAX_VDI_SIZE + 1), TooLarge),
        (lambda: d.create("x@y", 1), InvalidName),
        (lambda: d.rename("missing", "z"), VdiNotFound),
        (lambda: d.rename("a", "bad/name"), InvalidName),
        (lambda: d.delete("missing"), VdiNotFound),
    ]:
        with pytest.raises(exc):
            fn()
        assert d.encode() == before
    d.create("b", 1)
    with pytest.raises(VdiExists):
        d.rename("a", "b", replace=False)


def test_max_size_is_allowed():
    assert Directory().create("huge", MAX_VDI_SIZE).size == MAX_VDI_SIZE
