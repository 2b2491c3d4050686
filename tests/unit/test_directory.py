import dataclasses

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdifs.errors import InvalidArgument, TooLarge, VdiExists, VdiNotFound
from vdifs.model.directory import Directory, SnapshotRecord, VdiRecord
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


# -- the codec and drafts, against the dataclasses' own view of a record ------

_ints = st.integers(min_value=0, max_value=2**40)
_names = st.text(alphabet="abcdefgh-._0123", min_size=1, max_size=8)
_snapshots = st.builds(SnapshotRecord, vid=_ints, size=_ints, ctime=st.floats(0, 2e9), copies=st.integers(1, 5),
                       id=st.text(max_size=4))
_records = st.builds(
    VdiRecord, vid=_ints, size=_ints, ctime=st.floats(0, 2e9), mtime=st.floats(0, 2e9),
    copies=st.integers(1, 5), shared=st.booleans(), mode=st.integers(0, 0o7777), uid=_ints, gid=_ints,
    atime=st.floats(0, 2e9), stored_data_vid=_ints, stored_family=_ints, parent_vid=_ints,
    snapshots=st.dictionaries(_names, _snapshots, max_size=3),
    xattrs=st.dictionaries(st.sampled_from(["security.selinux", "trusted.a", "security.b"]), st.binary(max_size=8)))


def _stored_by_the_book(rec: VdiRecord) -> dict:
    """What a record's stored dict must be: every field in order under its
    stored key, snapshots as dicts, no xattrs key when there are none."""
    out = dataclasses.asdict(rec)
    out = {{"stored_data_vid": "data_vid", "stored_family": "family"}.get(k, k): v for k, v in out.items()}
    if not out["xattrs"]:
        del out["xattrs"]
    return out


@settings(max_examples=200)
@given(_records)
def test_a_record_is_stored_as_its_fields_say_and_read_back_equal(rec):
    stored = rec.to_dict()
    assert stored == _stored_by_the_book(rec) and list(stored) == list(_stored_by_the_book(rec))
    back = VdiRecord.from_dict(msgpack.unpackb(msgpack.packb(stored)))
    assert back == rec
    assert list(back.__dict__) == [f.name for f in dataclasses.fields(VdiRecord)]


@given(_records, st.dictionaries(st.sampled_from(["later_field", "zone", "x"]), st.integers()))
def test_keys_a_newer_writer_added_are_ignored_and_missing_ones_take_defaults(rec, extra):
    stored = rec.to_dict()
    assert VdiRecord.from_dict({**stored, **extra}) == rec
    for optional in ("copies", "shared", "snapshots", "family"):
        del stored[optional]
    back = VdiRecord.from_dict(stored)
    assert (back.copies, back.shared, back.snapshots, back.stored_family) == (1, False, {}, 0)
    assert back.xattrs == rec.xattrs and back.snapshots is not VdiRecord.from_dict(stored).snapshots


@pytest.mark.parametrize("required", ["vid", "size", "ctime", "mtime"])
def test_a_stored_record_without_a_required_field_is_refused(required):
    stored = VdiRecord(vid=1, size=2, ctime=3.0, mtime=4.0).to_dict()
    del stored[required]
    with pytest.raises(ValueError, match=required):
        VdiRecord.from_dict(stored)


@settings(max_examples=100)
@given(st.dictionaries(_names, _records, max_size=6), st.data())
def test_changing_a_draft_leaves_the_directory_it_came_from_alone(vdis, data):
    d = Directory(vdis=vdis, next_vid=7, deleting={3}, retired={9: [1, 2]}, reserved={11: {"for": "x", "source": 1}})
    before = d.encode()
    draft = d.clone()
    assert draft == d
    for name in list(draft.vdis):  # every way an operation changes a record in place, as `get` gives it
        rec = draft.get(name) if len(name) % 2 else draft.by_vid(draft.vdis[name].vid)[1]
        rec.size += 1
        rec.snapshots[data.draw(_names)] = SnapshotRecord(vid=5, size=1, ctime=1.0)
        rec.snapshots.pop(next(iter(rec.snapshots)))
        rec.xattrs["trusted.z"] = b"z"
    draft.vdis["new"] = VdiRecord(vid=99, size=1, ctime=1.0, mtime=1.0)
    draft.deleting.add(4)
    draft.retired[9].append(5)
    draft.reserved[11]["source"] = 2
    draft.next_vid = 8
    assert d.encode() == before
    assert Directory.decode(draft.encode()) == draft
    again = draft.clone()  # a draft of a draft shares with the draft, not with the first
    again.get(next(iter(again.vdis))).size += 1
    assert Directory.decode(draft.encode()) == draft and d.encode() == before


def test_the_copies_a_familys_maps_may_need_are_its_own_and_no_other_familys():
    d = Directory()
    d.create("gold", 50, copies=2)
    d.create("other", 50, copies=1)
    new = d.reserve("snapshot", d.get("gold").data_vid)
    s1 = d.snapshot("gold", "s1", new, 50)
    clone_vid = d.reserve("clone", s1.vid)
    d.clone_snapshot("gold", "s1", "vm", clone_vid, copies=3)
    new2 = d.reserve("snapshot", d.get("gold").data_vid)
    s2 = d.snapshot("gold", "s2", new2, 50)
    d.delete_snapshot("gold", "s2")  # retired: clones of it could still read it
    gold = d.get("gold")
    expected = {gold.data_vid: 2, s1.vid: 2, clone_vid: 3, s2.vid: 2}
    assert d.copies_in_family(gold.family) == expected
    assert d.get("vm").family == gold.family
    assert d.copies_in_family(d.get("other").family) == {d.get("other").data_vid: 1}
    everything = d.copies_by_data_vid()
    assert {v: everything[v] for v in expected} == expected
