"""Directory parts, pure (design change 55): where names and vids live,
the split of a format-1 directory, the merged view, and the codec."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vdifs.errors import InvalidArgument, VdiExists, VdiNotFound
from vdifs.model.directory import Directory, IntentPending, part_of
from vdifs.model.ids import MAX_VID

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=40).filter(
    lambda n: n[0] != ".")


@settings(max_examples=50, deadline=None)
@given(st.lists(names, min_size=1, max_size=60, unique=True), st.sampled_from([2, 7, 64]))
def test_creates_in_their_parts_hand_out_distinct_vids_of_each_parts_residue(vdi_names, parts):
    directory = [Directory.decode(b"", part=k, parts=parts) for k in range(parts)]
    vids = []
    for name in vdi_names:
        k = part_of(name, parts)
        rec = directory[k].create(name, 1)
        assert rec.vid % parts == k and 1 <= rec.vid <= MAX_VID
        vids.append(rec.vid)
    assert len(set(vids)) == len(vids)
    view = Directory.merged(directory)
    assert sorted(view.vdis) == sorted(vdi_names)


def test_a_part_refuses_a_name_of_another_part():
    name = "disk"
    other = (part_of(name, 8) + 1) % 8
    with pytest.raises(InvalidArgument, match="belongs in part"):
        Directory.decode(b"", part=other, parts=8).create(name, 1)


@settings(max_examples=30, deadline=None)
@given(st.lists(names, min_size=1, max_size=40, unique=True), st.integers(min_value=1, max_value=5000))
def test_a_split_keeps_every_record_and_entry_and_its_counters_start_above_every_vid(vdi_names, skip):
    whole = Directory(next_vid=skip)
    for name in vdi_names:
        whole.create(name, 7, copies=2)
    whole.delete(vdi_names[0])
    whole.reserve("clone", 1)
    parts = whole.split(8)
    for k, p in enumerate(parts):
        again = Directory.decode(p.encode(), part=k, parts=8)
        assert {n: r.to_dict() for n, r in again.vdis.items()} == {n: r.to_dict() for n, r in p.vdis.items()}
        assert all(part_of(n, 8) == k for n in p.vdis)
    view = Directory.merged(parts)
    assert {n: r.to_dict() for n, r in view.vdis.items()} == {n: r.to_dict() for n, r in whole.vdis.items()}
    assert (view.deleting, view.retired, view.reserved) == (whole.deleting, whole.retired, whole.reserved)
    used = whole.vids_in_use()
    for name in [f"new-{i}" for i in range(20)]:
        k = part_of(name, 8)
        assert parts[k].create(name, 1).vid > max(used)


def test_a_split_of_a_directory_whose_counter_wrapped_makes_every_part_check_the_others():
    whole = Directory()
    whole.create("high", 1)
    whole.next_vid = 1  # the old counter wrapped: vids above it are in use
    parts = whole.split(4)
    assert all(p.wrapped for p in parts)
    k = part_of("another", 4)
    with pytest.raises(Exception, match="other parts"):
        parts[k].clone().create("another", 1)
    draft = parts[k].clone()
    draft.others_in_use = lambda: {v for v in range(1, 100)}
    assert draft.create("another", 1).vid >= 100


def test_a_part_is_read_only_as_the_part_it_is():
    p = Directory.decode(b"", part=3, parts=8)
    with pytest.raises(ValueError, match="read as part"):
        Directory.decode(p.encode(), part=4, parts=8)


def test_a_directory_that_is_not_split_is_stored_as_format_one():
    d = Directory()
    d.create("a", 1)
    stored = msgpack.unpackb(d.encode())
    assert stored["format"] == 1 and set(stored) == {"format", "next_vid", "vdis", "deleting", "retired", "reserved"}


def test_a_record_with_an_intent_is_frozen_in_a_draft_and_shown_once_in_the_view():
    parts = 8
    old = "source"
    new = next(f"t{i}" for i in range(100) if part_of(f"t{i}", parts) != part_of(old, parts))
    k1, k2 = part_of(old, parts), part_of(new, parts)
    src = Directory.decode(b"", part=k1, parts=parts)
    dst = Directory.decode(b"", part=k2, parts=parts)
    rec = src.create(old, 1)
    draft = src.clone()
    key = draft.begin_rename(old, new)
    src = draft.commit()
    with pytest.raises(IntentPending):
        src.clone().get(old)
    assert sorted(Directory.merged([src, dst]).vdis) == [old]  # not taken yet: the old name
    draft = dst.clone()
    assert draft.arrive(src.intents[key]) == (True, None)
    dst = draft.commit()
    assert sorted(Directory.merged([src, dst]).vdis) == [new]  # taken: only the new name
    draft = src.clone()
    draft.settle(key, src.intents[key]["token"])
    assert Directory.merged([draft, dst]).vdis[new].vid == rec.vid and not draft.vdis


def naive_changes(before: Directory, after: Directory) -> list:
    names = sorted(set(before.vdis) | set(after.vdis))
    return [(n, before.vdis.get(n), after.vdis.get(n)) for n in names if before.vdis.get(n) is not after.vdis.get(n)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["create", "delete", "resize", "rename"]), st.integers(0, 6),
                          st.integers(0, 6)), min_size=1, max_size=25))
@example([("create", 0, 0), ("rename", 0, 2)])  # vm0 and vm2 live in different parts
def test_changes_between_views_are_those_of_the_changed_parts_and_intents(steps):
    """What a mount compares after a change (`changes_since`) is exactly
    what comparing every record would find, through every step of a rename
    across parts too."""
    parts = 8
    stored = [Directory.decode(b"", part=k, parts=parts).commit() for k in range(parts)]
    view = Directory.merged(stored)

    def change(k: int, fn) -> None:
        nonlocal view
        draft = stored[k].clone()
        try:
            fn(draft)
        except (VdiNotFound, VdiExists, IntentPending, InvalidArgument):
            return
        stored[k] = draft.commit()
        after = Directory.merged(stored, view)
        assert after.changes_since(view) == naive_changes(view, after)
        view = after

    for op, a, b in steps:
        old, new = f"vm{a}", f"vm{b}"
        ka, kb = part_of(old, parts), part_of(new, parts)
        if op == "create":
            change(ka, lambda d: d.create(old, 1))
        elif op == "delete":
            change(ka, lambda d: d.delete(old))
        elif op == "resize":
            change(ka, lambda d: setattr(d.get(old), "size", b + 1))
        elif ka == kb:
            change(ka, lambda d: d.rename(old, new))
        elif old in stored[ka].vdis and f"rename {old}" not in stored[ka].intents:
            change(ka, lambda d: d.begin_rename(old, new))
            intent = stored[ka].intents[f"rename {old}"]
            taken: list[bool] = []
            change(kb, lambda d: taken.append(d.arrive(intent)[0]))
            token = intent["token"]
            change(ka, lambda d: d.settle(f"rename {old}", token) if taken and taken[0]
                   else d.abandon(f"rename {old}", token))


def test_a_record_found_under_its_target_counts_as_taken_when_the_decision_was_forgotten():
    parts = 8
    target = "dst"
    k = part_of(target, parts)
    p = Directory.decode(b"", part=k, parts=parts)
    rec = p.create(target, 1)
    intent = {"token": "t1", "target": target, "replace": True, "record": rec.to_dict()}
    assert p.arrive(intent) == (True, None)  # the same vid there already: taken, nothing replaced
    assert target in p.vdis and not p.deleting
