"""The split directory (design change 55) on in-memory registers: a change
writes one part; a rename or clone across parts survives a crash after
any of its steps with the VDI under exactly one name; two mounts finishing
one intent end it the same way; a format-1 directory is split without
losing a change, also when the split is interrupted or raced."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import msgpack
import pytest
import trio

from vdifs.errors import VdiExists, VdifsError, leaf_errors
from vdifs.meta.directory_service import ROOT_KEY, DirectoryReader, DirectoryService, part_key, read_directory
from vdifs.model.directory import Directory, VdiRecord, part_of
from vdifs.model.ids import MAX_VID

PARTS = 8


class Crash(Exception):
    """The mount died here."""


class Registers:
    """Registers in memory, shared by the mounts of one test. `crash_after`:
    the CAS after that many successful ones raises Crash (writes nothing);
    `before_cas(key)`: runs before every CAS (to interleave another mount)."""

    def __init__(self) -> None:
        self.values: dict[str, tuple[int, bytes]] = {}
        self.written: list[str] = []  # keys of the successful CASes, in order
        self.crash_after: int | None = None
        self.before_cas: Callable[[str], Awaitable[None]] | None = None

    def open(self, key: str) -> MemoryRegister:
        return MemoryRegister(self, key)


class MemoryRegister:
    def __init__(self, registers: Registers, key: str) -> None:
        self.registers = registers
        self.key = key

    async def get(self) -> tuple[int, bytes]:
        await trio.sleep(0)
        return self.registers.values.get(self.key, (0, b""))

    async def read(self) -> tuple[int, bytes]:
        return await self.get()

    async def cas(self, version: int, value: bytes) -> bool:
        regs = self.registers
        if regs.before_cas is not None:
            await regs.before_cas(self.key)
        await trio.sleep(0)
        if regs.crash_after is not None and len(regs.written) >= regs.crash_after:
            raise Crash(self.key)
        if regs.values.get(self.key, (0, b""))[0] != version:
            return False
        regs.values[self.key] = (version + 1, value)
        regs.written.append(self.key)
        return True


@contextmanager
def crashing() -> Iterator[None]:
    """The mount dies in the block (Crash, maybe inside an exception group)."""
    try:
        yield
    except BaseException as e:
        leaves = leaf_errors(e)
        assert leaves and all(isinstance(x, Crash) for x in leaves), e
    else:
        raise AssertionError("no crash")


def names_in_two_parts() -> tuple[str, str, str]:
    """Two names of one part and a third of another."""
    names = [f"vm-{i}" for i in range(100)]
    a = names[0]
    b = next(n for n in names[1:] if part_of(n, PARTS) == part_of(a, PARTS))
    c = next(n for n in names if part_of(n, PARTS) != part_of(a, PARTS))
    return a, b, c


def holders(d: Directory, vid: int) -> list[str]:
    return sorted(n for n, r in d.vdis.items() if r.vid == vid)


def assert_unique_vids(d: Directory) -> None:
    vids = [r.vid for r in d.vdis.values()]
    assert len(vids) == len(set(vids))


async def rename_dying_after_its_intent(regs: Registers, svc: DirectoryService, old: str, new: str,
                                       replace: bool = True) -> None:
    """svc begins renaming old to new and dies once the intent is stored."""
    regs.crash_after = len(regs.written) + 1
    with pytest.raises(Crash):
        await svc.rename(old, new, replace=replace)
    regs.crash_after = None


async def one_vdi(name: str) -> tuple[Registers, DirectoryService, VdiRecord]:
    """Fresh registers, a mount, and a VDI `name` made through it."""
    regs = Registers()
    svc = await mount(regs)
    return regs, svc, await svc.update_name(name, lambda d: d.create(name, 1))


async def mount(regs: Registers) -> DirectoryService:
    svc = DirectoryService(regs.open, parts=PARTS)
    await svc.refresh()
    return svc


async def test_each_create_writes_one_part_and_vids_are_unique_and_per_part():
    regs = Registers()
    svc = await mount(regs)
    await svc.update_name("first", lambda d: d.create("first", 1))
    assert regs.values[ROOT_KEY][1] == msgpack.packb({"format": 2, "parts": PARTS})
    for i in range(200):
        name = f"disk-{i}"
        before = len(regs.written)
        rec = await svc.update_name(name, lambda d, n=name: d.create(n, 1 << 30))
        assert regs.written[before:] == [part_key(part_of(name, PARTS))]
        assert rec.vid % PARTS == part_of(name, PARTS)
    view = await read_directory(regs.open)
    assert len(view.vdis) == 201
    assert_unique_vids(view)
    for k in range(PARTS):  # every part holds exactly its names
        raw = regs.values[part_key(k)][1]
        assert all(part_of(n, PARTS) == k for n in Directory.decode(raw, part=k, parts=PARTS).vdis)


async def test_a_kept_reader_decodes_only_the_parts_that_changed(monkeypatch):
    regs = Registers()
    svc = await mount(regs)
    for i in range(40):
        await svc.update_name(f"disk-{i}", lambda d, n=f"disk-{i}": d.create(n, 1 << 30))
    reader = DirectoryReader(regs.open)
    first = await reader.read()
    decoded: list[int] = []
    decode = Directory.decode.__func__  # type: ignore[attr-defined]

    def counting(cls, raw, *, part=0, parts=1):
        decoded.append(part)
        return decode(cls, raw, part=part, parts=parts)

    monkeypatch.setattr(Directory, "decode", classmethod(counting))
    again = await reader.read()
    assert decoded == []
    assert sorted(again.vdis) == sorted(first.vdis) and len(again.vdis) == 40
    await svc.update_name("disk-new", lambda d: d.create("disk-new", 1 << 30))
    after = await reader.read()
    assert decoded == [part_of("disk-new", PARTS)]  # the changed part, once, though collected twice
    assert len(after.vdis) == 41 and after.get("disk-new").vid == svc.current.get("disk-new").vid
    decoded.clear()
    await read_directory(regs.open)  # a reader made for one read decodes every part
    assert sorted(decoded) == list(range(PARTS))


async def test_a_rename_within_one_part_is_one_cas():
    a, b, _ = names_in_two_parts()
    regs, svc, rec = await one_vdi(a)
    before = len(regs.written)
    await svc.rename(a, b)
    assert regs.written[before:] == [part_key(part_of(a, PARTS))]
    assert holders(await read_directory(regs.open), rec.vid) == [b]


@pytest.mark.parametrize("crash_after", [0, 1, 2, 3])
@pytest.mark.parametrize("replace", [False, True])
async def test_a_rename_across_parts_leaves_exactly_one_name_after_a_crash_at_any_step(crash_after, replace):
    old, _, new = names_in_two_parts()
    regs = Registers()
    svc = await mount(regs)
    rec = await svc.update_name(old, lambda d: d.create(old, 5 << 30))
    await svc.update_vid(rec.vid, lambda d: d.set_xattr(rec.vid, "security.selinux", b"db"))
    victim = await svc.update_name(new, lambda d: d.create(new, 1 << 30)) if replace else None
    regs.crash_after = len(regs.written) + crash_after
    with pytest.raises(Crash) if crash_after < 3 else _nothing():
        await svc.rename(old, new, replace=True)
    regs.crash_after = None

    seen = await read_directory(regs.open)  # what any mount sees at once
    assert len(holders(seen, rec.vid)) == 1
    assert_unique_vids(seen)

    other = await mount(regs)  # another mount (or this one, restarted) finishes it
    await other.finish_intents(older_than=0)
    after = await read_directory(regs.open)
    assert not after.intents
    assert_unique_vids(after)
    renamed = crash_after >= 1  # once the intent is stored, the rename happens
    assert holders(after, rec.vid) == [new if renamed else old]
    moved = after.get(new if renamed else old)
    assert (moved.size, moved.xattrs) == (5 << 30, {"security.selinux": b"db"})
    if victim is not None:
        assert (victim.data_vid in after.deleting) == renamed
        assert holders(after, victim.vid) == ([] if renamed else [new])


@pytest.mark.parametrize("crash_after", [1, 2])
async def test_a_rename_onto_a_name_taken_meanwhile_is_refused_by_whoever_finishes_it(crash_after):
    old, _, new = names_in_two_parts()
    regs, a, rec = await one_vdi(old)
    b = await mount(regs)
    regs.crash_after = len(regs.written) + 1  # a dies after its intent
    with pytest.raises(Crash):
        await a.rename(old, new, replace=False)
    regs.crash_after = None
    taken = await b.update_name(new, lambda d: d.create(new, 2))  # b takes the name first
    if crash_after == 2:  # b decides, and dies before ending the intent
        await b.refresh()
        regs.crash_after = len(regs.written) + 1
        with pytest.raises(Crash):
            await b.finish_intents(older_than=0)
        regs.crash_after = None
    c = await mount(regs)
    await c.finish_intents(older_than=0)
    after = await read_directory(regs.open)
    assert holders(after, rec.vid) == [old] and holders(after, taken.vid) == [new]
    assert not after.intents


async def test_a_mount_finishing_late_follows_the_decision_another_acted_on():
    """b refuses a's rename (the target is taken) and ends the intent; the
    target is then deleted. c, which read the intent before, must not take
    the record now: the VDI would have two names."""
    old, _, new = names_in_two_parts()
    regs, a, rec = await one_vdi(old)
    await a.update_name(new, lambda d: d.create(new, 1))
    await rename_dying_after_its_intent(regs, a, old, new, replace=False)
    b, c = await mount(regs), await mount(regs)

    async def b_refuses_and_the_target_goes(key: str) -> None:
        if key == part_key(part_of(new, PARTS)):
            regs.before_cas = None
            await b.finish_intents(older_than=0)
            await b.update_name(new, lambda d: d.delete(new))

    regs.before_cas = b_refuses_and_the_target_goes
    await c.finish_intents(older_than=0)
    after = await read_directory(regs.open)
    assert holders(after, rec.vid) == [old] and new not in after.vdis and not after.intents


async def test_the_mount_that_began_a_rename_is_told_why_it_was_refused():
    old, _, new = names_in_two_parts()
    regs, svc, rec = await one_vdi(old)
    await svc.update_name(new, lambda d: d.create(new, 1))
    with pytest.raises(VdiExists):
        await svc.rename(old, new, replace=False)
    after = await read_directory(regs.open)
    assert holders(after, rec.vid) == [old] and not after.intents


async def test_two_mounts_finishing_one_rename_at_once_agree():
    old, _, new = names_in_two_parts()
    regs, a, rec = await one_vdi(old)
    await rename_dying_after_its_intent(regs, a, old, new)
    mounts = [await mount(regs) for _ in range(3)]
    async with trio.open_nursery() as nursery:
        for m in mounts:
            nursery.start_soon(m.finish_intents, 0.0)
    after = await read_directory(regs.open)
    assert holders(after, rec.vid) == [new] and not after.intents
    assert_unique_vids(after)


async def test_a_change_of_a_record_being_renamed_finishes_the_rename_first():
    old, _, new = names_in_two_parts()
    regs, a, rec = await one_vdi(old)
    await rename_dying_after_its_intent(regs, a, old, new)
    b = await mount(regs)
    await b.update_vid(rec.vid, lambda d: d.set_xattr(rec.vid, "trusted.owner", b"ops"))
    after = await read_directory(regs.open)
    assert holders(after, rec.vid) == [new] and after.get(new).xattrs == {"trusted.owner": b"ops"}
    assert not after.intents


async def snapshot_of(svc: DirectoryService, name: str, vid: int) -> int:
    """Cut snapshot `s1` of VDI `name` (the directory's steps; no maps)."""
    rec = svc.current.get(name)
    new = await svc.update_vid(vid, lambda d: d.reserve("snapshot", rec.data_vid))
    s = await svc.update_vid(vid, lambda d: d.snapshot(name, "s1", new, rec.size))
    return s.vid


@pytest.mark.parametrize("crash_after", [0, 1, 2, 3])
async def test_a_clone_across_parts_survives_a_crash_at_any_step(crash_after):
    src, _, new_name = names_in_two_parts()
    regs = Registers()
    svc = await mount(regs)
    rec = await svc.update_name(src, lambda d: d.create(src, 3 << 30))
    snap_vid = await snapshot_of(svc, src, rec.vid)
    new_vid = await svc.update_vid(rec.vid, lambda d: d.reserve("clone", snap_vid))
    regs.crash_after = len(regs.written) + crash_after
    with pytest.raises(Crash) if crash_after < 3 else _nothing():
        await svc.clone(src, "s1", new_name, new_vid)
    regs.crash_after = None
    seen = await read_directory(regs.open)
    assert new_vid in seen.reserved or holders(seen, new_vid) == [new_name]

    other = await mount(regs)  # deleting the snapshot: the clone's commit is finished first
    if crash_after == 0:  # the map's copy was not committed: the snapshot stays for it
        with pytest.raises(VdifsError, match="being copied"):
            await other.update_name(src, lambda d: d.delete_snapshot(src, "s1"))
    else:
        assert await other.update_name(src, lambda d: d.delete_snapshot(src, "s1")) == snap_vid
    after = await read_directory(regs.open)
    assert not after.intents
    assert_unique_vids(after)
    if crash_after == 0:  # nothing stored: the reservation waits for the purger's release
        assert new_vid in after.reserved and new_name not in after.vdis
    else:
        assert new_vid not in after.reserved and holders(after, new_vid) == [new_name]
        clone = after.get(new_name)
        assert (clone.family, clone.parent_vid, clone.size) == (rec.vid, snap_vid, 3 << 30)


async def test_a_clone_onto_a_taken_name_releases_its_reservation():
    src, _, new_name = names_in_two_parts()
    regs, svc, rec = await one_vdi(src)
    snap_vid = await snapshot_of(svc, src, rec.vid)
    new_vid = await svc.update_vid(rec.vid, lambda d: d.reserve("clone", snap_vid))
    await svc.update_name(new_name, lambda d: d.create(new_name, 1))
    with pytest.raises(VdiExists):
        await svc.clone(src, "s1", new_name, new_vid)
    after = await read_directory(regs.open)
    assert new_vid not in after.reserved and new_vid in after.deleting  # its copied map is purged
    assert not after.intents


def format_one(count: int) -> Directory:
    d = Directory()
    for i in range(count):
        d.create(f"old-{i}", i + 1, copies=2)
    d.get("old-3").snapshots = {}
    new = d.reserve("snapshot", d.get("old-3").data_vid)
    d.snapshot("old-3", "s", new, 4)
    d.delete("old-5")
    d.reserve("clone", 1)
    return d


async def test_a_format_one_directory_is_split_at_the_first_change_without_losing_anything():
    regs = Registers()
    old = format_one(50)
    regs.values[ROOT_KEY] = (7, old.encode())
    svc = await mount(regs)
    assert svc.parts == 1 and sorted(svc.current.vdis) == sorted(old.vdis)
    rec = await svc.update_name("fresh", lambda d: d.create("fresh", 1))
    assert svc.parts == PARTS and regs.values[ROOT_KEY] == (8, msgpack.packb({"format": 2, "parts": PARTS}))
    after = await read_directory(regs.open)
    assert {n: r.to_dict() for n, r in after.vdis.items() if n != "fresh"} == {
        n: r.to_dict() for n, r in old.vdis.items()}
    assert (after.deleting, after.retired, set(after.reserved)) == (old.deleting, old.retired, set(old.reserved))
    assert rec.vid not in old.vids_in_use() and rec.vid > max(old.vids_in_use())


async def test_an_interrupted_split_leaves_format_one_in_charge_and_a_later_split_takes_every_change():
    regs = Registers()
    regs.values[ROOT_KEY] = (3, format_one(20).encode())
    svc = await mount(regs)
    regs.crash_after = len(regs.written) + 3  # three parts written, then the mount dies
    with crashing():
        await svc.update_name("x", lambda d: d.create("x", 1))
    regs.crash_after = None
    legacy = DirectoryService(regs.open, parts=1)  # a mount that keeps format 1
    await legacy.update_name("late", lambda d: d.create("late", 1))
    assert "late" in (await read_directory(regs.open)).vdis
    svc = await mount(regs)
    await svc.update_name("x", lambda d: d.create("x", 1))
    after = await read_directory(regs.open)
    assert svc.parts == PARTS and {"late", "x", "old-0"} <= set(after.vdis)
    assert_unique_vids(after)


async def test_a_late_split_does_not_overwrite_parts_in_use():
    regs = Registers()
    regs.values[ROOT_KEY] = (3, format_one(20).encode())
    first = await mount(regs)
    late = await mount(regs)  # read format 1 too
    made: list[str] = []

    async def the_first_mount_splits_and_writes_every_part(key: str) -> None:
        regs.before_cas = None
        for i in range(100):
            await first.update_name(f"new-{i}", lambda d, n=f"new-{i}": d.create(n, 1))
            made.append(f"new-{i}")

    regs.before_cas = the_first_mount_splits_and_writes_every_part
    await late.update_name("late", lambda d: d.create("late", 1))
    after = await read_directory(regs.open)
    assert set(made) | {"late", "old-0"} <= set(after.vdis)
    assert len({part_of(n, PARTS) for n in made}) == PARTS  # every part was in use
    assert_unique_vids(after)


async def test_a_consistent_read_sees_a_record_that_moves_while_it_reads():
    old, _, new = names_in_two_parts()
    regs, svc, rec = await one_vdi(old)
    reader = DirectoryService(regs.open, parts=1)
    moved = False
    real_get = MemoryRegister.get

    async def get_then_rename(self: MemoryRegister) -> tuple[int, bytes]:
        nonlocal moved
        got = await real_get(self)
        if self.key == part_key(part_of(new, PARTS)) and not moved:  # read the target before the move
            moved = True
            await svc.rename(old, new)
        return got

    MemoryRegister.get = get_then_rename  # type: ignore[method-assign]
    try:
        seen = await reader.refresh(consistent=True)
    finally:
        MemoryRegister.get = real_get  # type: ignore[method-assign]
    assert moved and holders(seen, rec.vid) == [new]


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


async def test_a_target_deleted_before_the_intent_ends_does_not_bring_the_old_name_back():
    old, _, new = names_in_two_parts()
    regs, a, rec = await one_vdi(old)
    regs.crash_after = len(regs.written) + 2  # the target took it; the intent did not end
    with pytest.raises(Crash):
        await a.rename(old, new)
    regs.crash_after = None
    b = await mount(regs)
    await b.update_name(new, lambda d: d.delete(new))
    seen = await read_directory(regs.open)
    assert holders(seen, rec.vid) == [] and rec.data_vid in seen.deleting
    await b.finish_intents(older_than=0)
    after = await read_directory(regs.open)
    assert holders(after, rec.vid) == [] and not after.intents and old not in after.vdis


async def test_a_part_whose_counter_wraps_skips_the_vids_other_parts_use_and_keeps_counting():
    old, _, new = names_in_two_parts()
    k = part_of(old, PARTS)
    regs, svc, moved = await one_vdi(old)  # the first vid of part k ...
    await svc.rename(old, new)  # ... now lives in another part
    key = part_key(k)
    version, raw = regs.values[key]
    stored = Directory.decode(raw, part=k, parts=PARTS)
    stored.next_vid = max(v for v in range(MAX_VID - 2 * PARTS, MAX_VID + 1) if v % PARTS == k)
    regs.values[key] = (version + 1, stored.encode())
    svc = await mount(regs)
    names = [n for n in (f"w{i}" for i in range(2000)) if part_of(n, PARTS) == k][:3]
    vids = [(await svc.update_name(n, lambda d, n=n: d.create(n, 1))).vid for n in names]
    assert vids[0] == stored.next_vid and moved.vid not in vids  # wrapped, and skipped the moved one
    assert all(v % PARTS == k for v in vids) and len(set(vids)) == 3
    assert Directory.decode(regs.values[key][1], part=k, parts=PARTS).wrapped
    assert_unique_vids(await read_directory(regs.open))


async def test_a_release_after_a_clone_was_committed_elsewhere_releases_nothing():
    src, _, new_name = names_in_two_parts()
    regs, svc, rec = await one_vdi(src)
    snap_vid = await snapshot_of(svc, src, rec.vid)
    new_vid = await svc.update_vid(rec.vid, lambda d: d.reserve("clone", snap_vid))
    regs.crash_after = len(regs.written) + 2  # the target took the clone; the intent did not end
    with crashing():
        await svc.clone(src, "s1", new_name, new_vid)
    regs.crash_after = None
    other = await mount(regs)  # what the failed clone's cleanup asks: it finishes the commit first
    assert not await other.update_entry(new_vid, lambda d: d.release(new_vid))
    after = await read_directory(regs.open)
    assert holders(after, new_vid) == [new_name] and new_vid not in after.deleting
