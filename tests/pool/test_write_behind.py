"""Write-behind on the embedded pool: the contract of docs/architecture.md,
one clause per test. Where a test must see the window before it drains, it
hands the volume a spawn function that keeps the drainer until the test
starts it; otherwise the drainer runs in the catalog's nursery as in a mount."""

import os

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from vdifs.client.snapshots import Snapshots
from vdifs.errors import NoSpace, PoolError
from vdifs.model.ids import ObjectKind

from .conftest import make_catalog

OBJ = 4 << 20
KiB = 1024


class HeldDrainer:
    """A spawn function that keeps the drainer until `run` starts it."""

    def __init__(self) -> None:
        self.held = []

    def __call__(self, fn) -> None:
        self.held.append(fn)

    async def run(self) -> None:
        while self.held:
            await self.held.pop(0)()


async def open_volume(store_dir, nursery, *, size=4 * OBJ, limit=16 << 20, held=None):
    cat = make_catalog(store_dir)
    await cat.start(nursery)
    rec = await cat.create("v", size)
    vol = await cat.open(rec.vid, writable=True)
    if held is not None:
        vol.enable_write_behind(held, limit)
    else:
        vol.window_limit = limit
    assert vol.accepts_behind
    return cat, vol


async def stored(store_dir, vid, offset, length):
    """What a restart reads: a fresh catalog on the same store."""
    again = make_catalog(store_dir)
    await again.directory.refresh()
    return bytes(await (await again.volume(vid)).read(offset, length))



class RefusedWrites:
    """The pool refuses writes to data objects while `on`, as a failing
    disk or a peer that fenced our lease generation does."""

    def __init__(self, cat, monkeypatch, why: str, error: type[Exception] = PoolError) -> None:
        self.on = True
        real_write = cat.pool.write

        async def write(oid, *args, **kwargs):
            if self.on and oid >> 56 == ObjectKind.DATA:
                raise error(f"injected: {why}")
            return await real_write(oid, *args, **kwargs)

        monkeypatch.setattr(cat.pool, "write", write)


async def test_reads_see_the_window_and_overlapping_writes_keep_the_last(store_dir, nursery):
    held = HeldDrainer()
    cat, vol = await open_volume(store_dir, nursery, held=held)
    await vol.write(4 * KiB, b"a" * 8 * KiB, behind=True)
    await vol.write(6 * KiB, b"b" * 2 * KiB, behind=True)  # inside the first
    await vol.write(11 * KiB, b"c" * 2 * KiB, behind=True)  # over its end
    await vol.write(OBJ - KiB, b"d" * 2 * KiB, behind=True)  # across two objects
    expect = bytearray(2 * OBJ)
    expect[4 * KiB:12 * KiB] = b"a" * 8 * KiB
    expect[6 * KiB:8 * KiB] = b"b" * 2 * KiB
    expect[11 * KiB:13 * KiB] = b"c" * 2 * KiB
    expect[OBJ - KiB:OBJ + KiB] = b"d" * 2 * KiB
    assert await cat.pool.list_objects(vol.data_vid, ObjectKind.DATA) == []  # all still in the window
    assert vol.behind_writes == 4 and vol.dirty
    assert await vol.read(0, 2 * OBJ) == expect
    assert await vol.read(6 * KiB, KiB) == b"b" * KiB  # served from the window whole
    await held.run()
    assert not vol.window
    assert len(await cat.pool.list_objects(vol.data_vid, ObjectKind.DATA)) == 2
    assert await vol.read(0, 2 * OBJ) == expect
    await vol.flush()
    assert await stored(store_dir, vol.vid, 0, 2 * OBJ) == expect


async def test_flush_returns_when_the_window_is_durable(store_dir, nursery):
    cat, vol = await open_volume(store_dir, nursery)
    blocks = {i * 64 * KiB + 512: os.urandom(4 * KiB) for i in range(200)}
    for off, data in blocks.items():
        await vol.write(off, data, behind=True)
    await vol.write(5 * OBJ, b"end", behind=True)  # grows the VDI
    assert vol.size == 5 * OBJ + 3
    await vol.flush()
    assert not vol.window and not vol.dirty
    assert cat.lookup("v").size == 5 * OBJ + 3
    for off, data in blocks.items():
        assert await stored(store_dir, vol.vid, off, len(data)) == data
    assert await stored(store_dir, vol.vid, 5 * OBJ, 3) == b"end"


async def test_a_write_through_never_overtakes_the_window(store_dir, nursery):
    """A handle that has not flushed writes through; with older writes of
    another handle in the window, it waits for them, so the last write wins."""
    held = HeldDrainer()
    cat, vol = await open_volume(store_dir, nursery, held=held)
    await vol.write(0, b"old" * 1000, behind=True)
    done = trio.Event()

    async def through():
        await vol.write(0, b"new" * 1000)
        done.set()

    nursery.start_soon(through)
    await wait_all_tasks_blocked(0.05)
    assert not done.is_set()  # acknowledged only once written
    await held.run()
    await done.wait()
    await vol.flush()
    assert await stored(store_dir, vol.vid, 0, 3000) == b"new" * 1000


async def test_a_full_window_makes_writers_wait_for_room(store_dir, nursery):
    held = HeldDrainer()
    cat, vol = await open_volume(store_dir, nursery, held=held, limit=64 * KiB)
    for i in range(16):
        await vol.write(i * 8 * KiB, b"%d" % (i % 10) * 4 * KiB, behind=True)
    assert vol.window.bytes == 64 * KiB
    done = trio.Event()

    async def one_more():
        await vol.write(OBJ, b"x" * 4 * KiB, behind=True)
        done.set()

    nursery.start_soon(one_more)
    await wait_all_tasks_blocked(0.05)
    assert not done.is_set() and vol.window.bytes == 64 * KiB
    await held.run()
    await done.wait()
    await held.run()
    assert not vol.window
    assert await vol.read(OBJ, 4 * KiB) == b"x" * 4 * KiB
    assert await vol.read(15 * 8 * KiB, 4 * KiB) == b"5" * 4 * KiB


async def test_a_failed_write_back_fails_the_flush_and_the_next_flush_retries(store_dir, nursery, monkeypatch):
    """A disk error while writing back: the data stays readable in the
    window, the flush reports EIO (as a disk reports a write error at its
    cache flush), and a later flush writes it."""
    cat, vol = await open_volume(store_dir, nursery)
    await vol.write(0, b"first", behind=True)
    await vol.flush()  # allocated and written: later writes are overwrites
    refused = RefusedWrites(cat, monkeypatch, "the disk refused the write")
    await vol.write(0, b"again", behind=True)
    with pytest.raises(PoolError):
        await vol.flush()
    assert vol.window and await vol.read(0, 5) == b"again"
    assert await stored(store_dir, vol.vid, 0, 5) == b"first"
    refused.on = False
    await vol.flush()
    assert not vol.window and await stored(store_dir, vol.vid, 0, 5) == b"again"
    assert not vol.window
    assert await stored(store_dir, vol.vid, 0, 5) == b"again"


async def test_a_full_pool_fails_later_writes_with_enospc_until_there_is_room(store_dir, nursery, monkeypatch):
    """A write-back refused for space: the writer's next write and the flush
    see ENOSPC, not EIO (QEMU pauses the guest on ENOSPC). When QEMU resumes
    the guest it sends the failed write again without a flush first: once
    there is room, that write itself gets the window written back."""
    cat, vol = await open_volume(store_dir, nursery)
    await vol.write(0, b"first", behind=True)
    await vol.flush()
    full = RefusedWrites(cat, monkeypatch, "the pool is full", NoSpace)
    await vol.write(0, b"again", behind=True)
    await wait_all_tasks_blocked()  # the drainer tried and failed
    with pytest.raises(NoSpace):
        await vol.write(OBJ, b"more", behind=True)
    with pytest.raises(NoSpace):
        await vol.flush()
    full.on = False  # room again (a VDI was deleted)
    await vol.write(OBJ, b"more", behind=True)
    await vol.flush()
    assert not vol.window
    assert await stored(store_dir, vol.vid, 0, 5) == b"again" and await stored(store_dir, vol.vid, OBJ, 4) == b"more"


async def test_a_fenced_volume_drops_its_window_and_fails_the_flush(store_dir, nursery):
    held = HeldDrainer()
    cat, vol = await open_volume(store_dir, nursery, held=held)
    await vol.write(0, b"kept", behind=True)
    await held.run()
    await vol.flush()
    await vol.write(0, b"lost", behind=True)
    vol.fence("lease lost: test")
    with pytest.raises(PoolError):
        await vol.flush()
    with pytest.raises(PoolError):
        await vol.write(0, b"more", behind=True)
    await held.run()
    assert not vol.window
    assert await stored(store_dir, vol.vid, 0, 4) == b"kept"


async def test_a_snapshot_cut_includes_every_acknowledged_write(store_dir, nursery):
    cat, vol = await open_volume(store_dir, nursery)
    data = os.urandom(256 * KiB)
    for i in range(0, len(data), 4 * KiB):
        await vol.write(OBJ + i, data[i:i + 4 * KiB], behind=True)
    await Snapshots(cat).snapshot("v", "s")
    assert not vol.window
    await vol.write(OBJ, b"after" * 100, behind=True)
    snap = await cat.snapshot_volume(cat.current.get("v").snapshots["s"].vid)
    assert await snap.read(OBJ, len(data)) == data
    assert await vol.read(OBJ, 500) == b"after" * 100


async def test_a_shrink_writes_the_window_back_first(store_dir, nursery):
    """Nothing the window held past the new end lands after the shrink: it
    is written back before the size changes (never an object past the
    size), and the grown-back tail reads zeros."""
    held = HeldDrainer()
    cat, vol = await open_volume(store_dir, nursery, held=held)
    created_at = []
    real_create = cat.pool.create

    async def create(oid, *args, **kwargs):
        created_at.append((oid, vol.size))
        return await real_create(oid, *args, **kwargs)

    cat.pool.create = create
    await vol.write(3 * OBJ + 100, b"tail" * 100, behind=True)
    shrink = trio.Event()

    async def truncate():
        await vol.truncate(OBJ)
        shrink.set()

    nursery.start_soon(truncate)
    await wait_all_tasks_blocked(0.05)
    assert not shrink.is_set()
    await held.run()
    await shrink.wait()
    assert [size for oid, size in created_at if oid >> 56 == ObjectKind.DATA] == [4 * OBJ]
    await vol.truncate(4 * OBJ)
    assert await vol.read(3 * OBJ, 4096) == bytes(4096)
    assert await cat.pool.list_objects(vol.data_vid, ObjectKind.DATA) == []


async def test_shared_vdis_never_write_behind(store_dir, nursery):
    cat, vol = await open_volume(store_dir, nursery)
    await cat.close(vol, writable=True)
    await cat.set_shared(vol.vid, True)
    vol = await cat.open(vol.vid, writable=True)
    assert not vol.accepts_behind
    await vol.write(0, b"through", behind=True)
    assert not vol.window and vol.behind_writes == 0
    assert len(await cat.pool.list_objects(vol.data_vid, ObjectKind.DATA)) == 1


async def test_after_a_fence_and_a_new_lease_write_behind_works_again(store_dir, nursery, monkeypatch):
    """A write-back refused (as peers refuse a fenced generation), then the
    lease lost: the window is dropped with its failure. Once the VDI's lease
    is taken again, a flushing handle's writes go behind and land, instead
    of failing with EIO forever (the failure of the dropped window must not
    outlive it)."""
    cat, vol = await open_volume(store_dir, nursery)
    await vol.write(0, b"first", behind=True)
    await vol.flush()
    refused = RefusedWrites(cat, monkeypatch, "fenced at a newer generation")
    await vol.write(0, b"lost!", behind=True)
    with pytest.raises(PoolError):
        await vol.flush()  # the write-back was refused
    vol.fence("lease lost: test")
    assert not vol.window
    refused.on = False
    vol.fenced = None  # what Catalog.open does when it takes the lease again
    await vol.flush()
    await vol.write(0, b"again", behind=True)
    assert vol.behind_writes == 3
    await vol.flush()
    assert await stored(store_dir, vol.vid, 0, 5) == b"again"


async def test_a_round_writes_back_each_object_or_keeps_it(store_dir, nursery, monkeypatch):
    """One round holding runs of objects the VDI holds (written back
    together, `pool.write_many`), one into a hole and one refused by the
    pool: everything but the refused object's run is stored, the flush
    fails, the window keeps only that run, and the next flush stores it."""
    from vdifs.model.ids import data_oid

    held = HeldDrainer()
    cat, vol = await open_volume(store_dir, nursery, size=4 * OBJ, held=held)
    for index in (0, 1, 3):
        await vol.write(index * OBJ, b"old", behind=True)
    await held.run()
    await vol.flush()  # objects 0, 1 and 3 allocated: later writes into them are overwrites
    refused_oid = data_oid(vol.data_vid, 1)
    real_write = cat.pool.write

    async def write(oid, *args, **kwargs):
        if oid == refused_oid:
            raise PoolError("injected: object 1 cannot be written")
        return await real_write(oid, *args, **kwargs)

    monkeypatch.setattr(cat.pool, "write", write)
    writes = {0: b"zero-a", 100 * KiB: b"zero-b", OBJ + 8 * KiB: b"one", 2 * OBJ + 4 * KiB: b"hole",
              3 * OBJ + 64 * KiB: b"three"}
    for offset, data in writes.items():
        await vol.write(offset, data, behind=True)
    await held.run()  # one round: all five runs
    vol.enable_write_behind(nursery.start_soon, 16 << 20)  # from now on the drainer runs at once
    with pytest.raises(PoolError):
        await vol.flush()
    for offset, data in writes.items():
        assert await vol.read(offset, len(data)) == data
        # (object 1's run never landed: there it still holds zeros)
        want = bytes(len(data)) if offset == OBJ + 8 * KiB else data
        assert await stored(store_dir, vol.vid, offset, len(data)) == want, offset
    assert vol.window.bytes == len(b"one")
    monkeypatch.setattr(cat.pool, "write", real_write)
    await vol.flush()
    assert not vol.window
    for offset, data in writes.items():
        assert await stored(store_dir, vol.vid, offset, len(data)) == data


async def test_a_round_cancelled_midway_gives_every_object_back(store_dir, nursery, monkeypatch):
    """A round cancelled while its objects' runs are with the pool (the
    mount stopping): every object of the round, those that would have been
    written alone too, goes back to the window, and the next round writes
    them all."""
    held = HeldDrainer()
    cat, vol = await open_volume(store_dir, nursery, size=4 * OBJ, held=held)
    for index in (0, 1):
        await vol.write(index * OBJ, b"old", behind=True)
    await held.run()
    await vol.flush()
    real_write_many = cat.pool.write_many

    async def stuck(writes):
        await trio.sleep_forever()

    monkeypatch.setattr(cat.pool, "write_many", stuck)
    writes = {4 * KiB: b"zero", OBJ + 4 * KiB: b"one", 2 * OBJ: b"hole"}
    for offset, data in writes.items():
        await vol.write(offset, data, behind=True)
    with trio.move_on_after(0.5):
        await held.run()  # the round: objects 0 and 1 together (stuck), the hole alone (not reached)
    monkeypatch.setattr(cat.pool, "write_many", real_write_many)
    vol.enable_write_behind(nursery.start_soon, 16 << 20)
    await vol.flush()
    assert not vol.window
    for offset, data in writes.items():
        assert await stored(store_dir, vol.vid, offset, len(data)) == data
