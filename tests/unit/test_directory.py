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


def _snapshot(d: Directory, name: str, snap: str) -> int:
    new = d.reserve(f"snapshot {name}@{snap}", d.get(name).data_vid)
    d.snapshot(name, snap, new, d.get(name).size)
    return new


def test_a_snapshot_freezes_the_data_vid_and_the_vdi_goes_on_under_a_new_one():
    d = Directory()
    a = d.create("a", 100)
    assert a.data_vid == a.vid == 1 and a.family == 1
    new = _snapshot(d, "a", "s1")
    rec = d.get("a")
    assert rec.vid == 1 and rec.data_vid == new == 2 and rec.snapshots["s1"].vid == 1 and not d.reserved
    assert d.find_snapshot(1) == ("a", "s1", rec.snapshots["s1"])
    _snapshot(d, "a", "s2")
    assert sorted(d.live_maps(1)) == [(1, 100), (2, 100), (3, 100)]
    assert d.vids_in_use() == {1, 2, 3}
    with pytest.raises(VdiExists):
        d.snapshot("a", "s1", d.reserve("x", 3), 100)
    with pytest.raises(InvalidName):
        d.snapshot("a", "bad@name", d.reserve("x", 3), 100)
    assert Directory.decode(d.encode()) == d


def test_clones_share_the_family_and_deleting_keeps_what_they_read():
    d = Directory()
    d.create("gold", 50, copies=2)
    _snapshot(d, "gold", "base")
    frozen = d.get("gold").snapshots["base"].vid
    cvid = d.reserve("clone", frozen)
    with pytest.raises(Exception, match="being copied"):
        d.delete_snapshot("gold", "base")  # a clone is being made from it
    clone = d.clone_snapshot("gold", "base", "vm1", cvid)
    assert clone.family == d.get("gold").family and clone.parent_vid == frozen and clone.size == 50
    assert clone.copies == 2 and clone.data_vid == cvid
    with pytest.raises(Exception, match="snapshot"):
        d.delete("gold")  # it has snapshots: refused unless asked
    assert d.get("gold").snapshots
    purge = d.delete("gold", with_snapshots=True)
    assert purge == 2 and d.deleting == {2} and d.retired == {frozen: [1, 2]}
    assert d.copies_by_data_vid() == {frozen: 2, cvid: 2}
    assert d.live_maps(1) == [(cvid, 50)]  # the clone still reads the retired objects
    assert frozen in d.vids_in_use()
    d.finish_retired(frozen)
    assert frozen not in d.vids_in_use()
    assert Directory.decode(d.encode()) == d


def test_rollback_and_released_reservations_leave_objects_to_purge():
    d = Directory()
    d.create("a", 10)
    _snapshot(d, "a", "s")
    d.get("a").size = 20
    new = d.reserve("rollback", 1)
    assert d.rollback("a", "s", new) == 2 and d.get("a").data_vid == new and d.get("a").size == 10
    assert 2 in d.deleting
    spare = d.reserve("clone", 1)
    d.release(spare)
    assert spare in d.deleting and spare not in d.reserved
    with pytest.raises(InvalidArgument):
        d.clone_snapshot("a", "s", "b", spare)  # no longer reserved
    assert "b" not in d.vdis


def test_records_encode_with_the_stored_keys_and_order():
    """The stored field names and their order are part of the on-disk format."""
    d = Directory()
    d.create("gold", 100, copies=2, now=1.0)
    new = d.reserve("snapshot gold@s1", d.get("gold").data_vid)
    d.snapshot("gold", "s1", new, 100, now=2.0)
    raw = d.get("gold").to_dict()
    assert list(raw) == ["vid", "size", "ctime", "mtime", "copies", "object_order", "shared", "mode", "uid",
                         "gid", "atime", "data_vid", "family", "parent_vid", "snapshots"]
    assert raw["data_vid"] == new and raw["family"] == 1
    assert Directory.decode(d.encode()) == d
    d.set_xattr(d.get("gold").vid, "security.selinux", b"system_u:object_r:svirt_image_t:s0:c1,c2")
    assert list(d.get("gold").to_dict())[-1] == "xattrs"  # stored only when there are some
    assert Directory.decode(d.encode()) == d


def test_the_maps_that_may_point_at_a_data_vid_are_its_familys_live_maps():
    d = Directory()
    d.create("gold", 50, copies=2)
    d.create("other", 10)
    _snapshot(d, "gold", "base")
    frozen = d.get("gold").snapshots["base"].vid
    osize = d.get("gold").object_size
    clone = d.clone_snapshot("gold", "base", "vm1", d.reserve("clone", frozen))
    family = {(d.get("gold").data_vid, 50, osize), (frozen, 50, osize), (clone.data_vid, 50, osize)}
    assert set(d.maps_that_may_point_at(frozen)) == family  # a snapshot's objects
    assert set(d.maps_that_may_point_at(clone.data_vid)) == family
    assert d.maps_that_may_point_at(d.get("other").data_vid) == [(d.get("other").data_vid, 10, osize)]
    gold = d.get("gold").data_vid
    d.delete("gold", with_snapshots=True)
    assert d.maps_that_may_point_at(frozen) == [(clone.data_vid, 50, osize)]  # retired: the clone still reads it
    assert d.maps_that_may_point_at(gold) == []  # deleted: nothing points at its objects
    assert d.maps_that_may_point_at(999) == []
