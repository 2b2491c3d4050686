import hashlib
import os
import random

import pytest
import trio
import trio.testing

from vdifs.client.snapshots import Snapshots
from vdifs.errors import PoolError, TooLarge, VdiNotFound
from vdifs.model.ids import MAX_VDI_SIZE, ObjectKind, data_oid, unpack_oid
from vdifs.model.objmap import PENDING_DELETE

from .conftest import make_catalog

OBJ = 4 << 20


async def data_objects(cat, vid):
    return await cat.pool.list_objects(vid, ObjectKind.DATA)


async def open_catalog(root, nursery):
    cat = make_catalog(root)
    await cat.start(nursery)
    return cat


async def test_write_read_across_boundaries(store_dir, nursery):
    cat = await open_catalog(store_dir, nursery)
    rec = await cat.create("v", 10 * OBJ)
    vol = await cat.open(rec.vid)
    payload = os.urandom(8192)
    await vol.write(OBJ - 4096, payload)
    assert await vol.read(OBJ - 4096, 8192) == payload
    assert await vol.read(0, 16) == bytes(16)
    assert len(await data_objects(cat, rec.vid)) == 2
    assert vol.allocated_bytes == 2 * OBJ
    # last byte of the VDI, then a read beyond EOF
    await vol.write(10 * OBJ - 1, b"\x7f")
    assert await vol.read(10 * OBJ - 1, 100) == b"\x7f"
    assert await vol.read(10 * OBJ, 100) == b""


async def test_zero_detection(store_dir, nursery):
    cat = await open_catalog(store_dir, nursery)
    rec = await cat.create("z", 4 * OBJ)
    vol = await cat.open(rec.vid)
    await vol.write(0, bytes(65536))  # zeros on a hole: nothing allocated
    assert await data_objects(cat, rec.vid) == []
    await vol.write(OBJ, b"\1" * 4096)
    assert len(await data_objects(cat, rec.vid)) == 1
    await vol.write(OBJ, bytes(OBJ))  # a whole object of zeros frees it
    assert await data_objects(cat, rec.vid) == []
    assert vol.map.allocated == 0
    assert await vol.read(OBJ, 4096) == bytes(4096)


async def test_truncate_frees_and_zeroes_tail(store_dir, nursery):
    cat = await open_catalog(store_dir, nursery)
    rec = await cat.create("t", 8 * OBJ)
    vol = await cat.open(rec.vid)
    await vol.write(0, b"\xaa" * (8 * OBJ))
    assert len(await data_objects(cat, rec.vid)) == 8
    await vol.truncate(OBJ + 100)
    assert len(await data_objects(cat, rec.vid)) == 2
    await vol.truncate(8 * OBJ)
    assert await vol.read(OBJ + 96, 8) == b"\xaa" * 4 + bytes(4)
    assert await vol.read(5 * OBJ, 16) == bytes(16)


async def test_limits(store_dir, nursery):
    cat = await open_catalog(store_dir, nursery)
    rec = await cat.create("big", MAX_VDI_SIZE)
    vol = await cat.open(rec.vid)
    await vol.write(MAX_VDI_SIZE - 1, b"x")  # the very last byte of a 16 PiB VDI
    assert await vol.read(MAX_VDI_SIZE - 1, 1) == b"x"
    with pytest.raises(TooLarge):
        await vol.write(MAX_VDI_SIZE, b"x")
    with pytest.raises(TooLarge):
        await vol.truncate(MAX_VDI_SIZE + 1)
    assert vol.map.page_count == 1  # the sparse map stays small


async def test_concurrent_writers_on_one_object(store_dir, nursery):
    cat = await open_catalog(store_dir, nursery)
    rec = await cat.create("c", 2 * OBJ)
    vol = await cat.open(rec.vid)
    pieces = list(range(64))
    random.Random(1).shuffle(pieces)
    async with trio.open_nursery() as n:
        for i in pieces:  # all race to allocate the same fresh object
            n.start_soon(vol.write, i * 4096, bytes([i + 1]) * 4096)
    assert len(await data_objects(cat, rec.vid)) == 1
    for i in range(64):
        assert await vol.read(i * 4096, 4096) == bytes([i + 1]) * 4096


async def test_persistence_after_flush(store_dir):
    digest = None
    async with trio.open_nursery() as n:
        cat = await open_catalog(store_dir, n)
        rec = await cat.create("p", 3 * OBJ)
        vol = await cat.open(rec.vid)
        data = os.urandom(OBJ)
        await vol.write(OBJ // 2, data)
        await vol.write(3 * OBJ, b"grown")  # extends the VDI
        await vol.flush()
        digest = hashlib.sha256(await vol.read(0, vol.size)).hexdigest()
        n.cancel_scope.cancel()
    async with trio.open_nursery() as n:
        cat = await open_catalog(store_dir, n)
        rec = cat.lookup("p")
        assert rec.size == 3 * OBJ + 5
        vol = await cat.open(rec.vid)
        assert hashlib.sha256(await vol.read(0, vol.size)).hexdigest() == digest
        n.cancel_scope.cancel()


async def test_reconcile_cleans_crash_leftovers(store_dir):
    async with trio.open_nursery() as n:
        cat = await open_catalog(store_dir, n)
        rec = await cat.create("r", 4 * OBJ)
        vol = await cat.open(rec.vid)
        await vol.write(0, b"keep")
        await vol.write(OBJ, b"freeing")
        await vol.flush()
        # crash states: an allocation whose map entry never landed, a free
        # that stopped after PENDING_DELETE, an object past the size
        await cat.pool.create(data_oid(rec.vid, 2), 0, b"leak", OBJ)
        vol.map.set(1, PENDING_DELETE)
        await vol.flush()  # the PENDING_DELETE entry is stored
        await cat.pool.create(data_oid(rec.vid, 9), 0, b"beyond", OBJ)
        n.cancel_scope.cancel()
    async with trio.open_nursery() as n:
        cat = await open_catalog(store_dir, n)
        vol = await cat.open(cat.lookup("r").vid)
        assert await data_objects(cat, vol.vid) == [data_oid(vol.vid, 0)]
        assert vol.map.allocated == 1
        assert await vol.read(0, 4) == b"keep"
        assert await vol.read(OBJ, 7) == bytes(7)
        n.cancel_scope.cancel()


async def test_delete_and_rename_purge_objects(store_dir, nursery):
    cat = await open_catalog(store_dir, nursery)
    a = await cat.create("a", OBJ)
    b = await cat.create("b", OBJ)
    for rec in (a, b):
        vol = await cat.open(rec.vid)
        await vol.write(0, b"data")
        await cat.close(vol)
    await cat.rename("a", "b")  # replaces b: its objects go
    assert cat.lookup("b").vid == a.vid
    with pytest.raises(VdiNotFound):
        cat.lookup("a")
    with trio.fail_after(10):
        while await cat.pool.list_objects(b.vid):
            await trio.sleep(0.01)
    # an open VDI that is deleted keeps working until closed, then is purged
    vol = await cat.open(a.vid)
    await cat.delete("b")
    assert await vol.read(0, 4) == b"data"
    await cat.close(vol)
    with trio.fail_after(10):
        while await cat.pool.list_vids() or cat.current.deleting:
            await trio.sleep(0.01)


async def test_zeroing_in_small_writes_frees_the_object(store_dir, nursery):
    cat = await open_catalog(store_dir, nursery)
    rec = await cat.create("zz", 2 * OBJ)
    vol = await cat.open(rec.vid)
    await vol.write(0, os.urandom(2 * OBJ))
    for off in range(0, OBJ, 128 << 10):  # how FUSE delivers a 4 MiB zero write
        await vol.write(off, bytes(128 << 10))
    assert await data_objects(cat, rec.vid) == [data_oid(rec.vid, 1)]
    # zeros ending at the object's end do not free it while other data remains
    await vol.write(2 * OBJ - 4096, bytes(4096))
    assert len(await data_objects(cat, rec.vid)) == 1


async def test_zero_check_waits_for_the_writes_in_flight(store_dir, nursery):
    """A zero check that finds another write to the object in flight leaves
    it to that write, which checks when it ends (the kernel sends the pieces
    of a large zero write at once, and they finish in any order); every
    path drops the index lock it took."""
    cat = await open_catalog(store_dir, nursery)
    rec = await cat.create("locks", 2 * OBJ)
    vol = await cat.open(rec.vid)
    await vol.write(OBJ, b"\1" * 4096)
    real_write = cat.pool.write
    in_flight, release = trio.Event(), trio.Event()

    async def held_write(oid, offset, data):
        if offset == 0:  # the overwrite at the object's start stays in flight
            in_flight.set()
            await release.wait()
        return await real_write(oid, offset, data)

    cat.pool.write = held_write
    async with trio.open_nursery() as n:
        n.start_soon(vol.write, OBJ, bytes(4096))
        await in_flight.wait()
        await vol.write(2 * OBJ - 4096, bytes(4096))  # ends at the object's end: a zero check
        release.set()
    cat.pool.write = real_write
    assert vol.locked_indexes == set()
    assert await vol.read(OBJ, 8192) == bytes(8192)
    assert await data_objects(cat, rec.vid) == []  # all zero once both ended: freed


async def test_zero_check_voided_by_concurrent_write(store_dir, nursery):
    cat = await open_catalog(store_dir, nursery)
    rec = await cat.create("race", OBJ)
    vol = await cat.open(rec.vid)
    await vol.write(0, b"\1" * 4096)
    await vol.write(0, bytes(4096))
    real_read = cat.pool.read

    async def slow_read(oid, offset, length):
        data = await real_read(oid, offset, length)
        await trio.sleep(0.05)  # a concurrent write lands while the check reads
        return data

    cat.pool.read = slow_read
    async with trio.open_nursery() as n:
        n.start_soon(vol.write, OBJ - 4096, bytes(4096))  # triggers the zero check
        await trio.sleep(0.01)
        n.start_soon(vol.write, 8192, b"keep")
    cat.pool.read = real_read
    assert await vol.read(8192, 4) == b"keep"
    assert len(await data_objects(cat, rec.vid)) == 1


async def test_volume_stays_pinned_while_resized(store_dir, nursery, monkeypatch):
    monkeypatch.setattr("vdifs.client.catalog.IDLE_VOLUMES", 0)  # evict whatever is idle
    cat = await open_catalog(store_dir, nursery)
    a = await cat.create("a", 8 * OBJ)
    others = [await cat.create(f"o{i}", OBJ) for i in range(4)]
    async with cat.using(a.vid) as vol:
        await vol.write(0, b"\1" * (8 * OBJ))
    seen = []
    real_free = type(vol).free_object

    async def free_and_load(self, index):
        await cat.volume(others[index % 4].vid)  # loads evict idle volumes
        seen.append(cat.loaded(a.vid) is self)
        await real_free(self, index)

    monkeypatch.setattr(type(vol), "free_object", free_and_load)
    await cat.resize("a", OBJ)
    assert seen and all(seen)  # never a second Volume for the same VDI mid-resize
    assert len(await data_objects(cat, a.vid)) == 1


async def test_map_page_write_never_replaces_a_map_object(store_dir, nursery):
    from vdifs.client.volume import Volume

    cat = await open_catalog(store_dir, nursery)
    rec = await cat.create("m", 4096 * OBJ)
    vol = await cat.open(rec.vid)
    await vol.write(0, b"first")  # entry 0, map page 0 of map object 0
    await vol.flush()
    # a volume that did not see the map object (a listing that missed it) allocates
    # an entry on another page of the same map object
    blind = Volume(cat.pool, vol.record, cat.persist_meta)
    await blind.write(2000 * OBJ, b"second")
    await blind.flush()
    again = await Volume.load(cat.pool, vol.record, cat.persist_meta, reconcile=False)
    assert again.map.get(0) == rec.vid and again.map.get(2000) == rec.vid
    assert await again.read(0, 5) == b"first"


async def test_map_load_does_not_trust_listings(store_dir, nursery):
    from vdifs.client.volume import Volume

    cat = await open_catalog(store_dir, nursery)
    rec = await cat.create("l", 8 * OBJ)
    vol = await cat.open(rec.vid)
    await vol.write(3 * OBJ, b"allocated")
    await vol.flush()
    real_list = cat.pool.list_objects

    async def listing_that_misses_map_objects(vid, kind=None):
        return [o for o in await real_list(vid, kind) if (o >> 56) != ObjectKind.MAP]

    cat.pool.list_objects = listing_that_misses_map_objects  # like a peer that did not answer
    again = await Volume.load(cat.pool, vol.record, cat.persist_meta, reconcile=False)
    assert again.map.get(3) == rec.vid  # not a hole that a write would replace
    assert await again.read(3 * OBJ, 9) == b"allocated"


async def test_a_snapshot_cut_waits_for_a_write_in_flight(store_dir, nursery):
    """A write allocating an object is in flight when the cut begins: the cut
    waits for it, so neither the snapshot nor the VDI's new map misses the
    allocation (without the wait, both copies of the map would lack it and
    the write would be gone after a restart)."""
    from trio.testing import wait_all_tasks_blocked

    cat = await open_catalog(store_dir, nursery)
    rec = await cat.create("v", 4 * OBJ)
    vol = await cat.open(rec.vid, writable=True)
    real_create = cat.pool.create
    entered, release = trio.Event(), trio.Event()

    async def held_create(oid, *args, **kwargs):
        if oid >> 56 == ObjectKind.DATA and not entered.is_set():
            entered.set()
            await release.wait()
        return await real_create(oid, *args, **kwargs)

    cat.pool.create = held_create
    nursery.start_soon(vol.write, OBJ + 4096, b"w" * 4096)  # allocates object 1
    await entered.wait()
    cut = trio.Event()

    async def snapshot():
        await Snapshots(cat).snapshot("v", "s")
        cut.set()

    nursery.start_soon(snapshot)
    await wait_all_tasks_blocked(0.05)
    assert not cut.is_set()  # the cut waits for the write in flight
    release.set()
    await cut.wait()
    s = cat.current.get("v").snapshots["s"]
    assert await (await cat.snapshot_volume(s.vid)).read(OBJ + 4096, 4096) == b"w" * 4096
    await vol.flush()
    again = make_catalog(store_dir)  # what a restart loads
    await again.directory.refresh()
    live = await again.volume(rec.vid)
    assert live.data_vid != s.vid and await live.read(OBJ + 4096, 4096) == b"w" * 4096


async def test_reads_from_the_page_cache_take_no_await_and_still_verify(store_dir, nursery):
    """A read inside one object whose bytes are cached is answered by the
    store at once (`read_now`, verified); a rotten block is never served:
    the read falls back to the path that reports it."""
    from trio.testing import assert_no_checkpoints

    from vdifs.errors import PoolError

    cat = await open_catalog(store_dir, nursery)
    rec = await cat.create("v", 2 * OBJ)
    vol = await cat.open(rec.vid)
    data = os.urandom(64 << 10)
    await vol.write(OBJ + 4096, data)
    store = cat.pool.store
    awaited = []
    real_read = cat.pool.read

    async def read(*args):
        awaited.append(args)
        return await real_read(*args)

    cat.pool.read = read  # counts the reads that take the awaiting path
    before = store.nowait_reads
    with assert_no_checkpoints():
        coro = vol.read(OBJ + 8192, 4096)
        try:
            coro.send(None)
        except StopIteration as done:
            got = done.value
    assert got == data[4096:8192] and store.nowait_reads == before + 1
    assert awaited == []  # answered by read_now, not through pool.read
    assert await vol.read(OBJ - 100, 4300) == bytes(4196) + data[:104]  # two objects: the awaiting path
    assert len(awaited) == 1
    path = store.path(data_oid(rec.vid, 1))
    with open(path, "r+b") as f:  # rot under the cached checksum table
        f.seek(OBJ // 2)
        f.write(b"\xff" * 8)
    with pytest.raises(PoolError):
        await vol.read(OBJ // 2 + OBJ, 16)


async def test_a_vdi_tells_the_pool_the_copies_of_its_familys_data_vids_and_no_others(store_dir, nursery):
    """A clone reads objects of its ancestors, which may keep other copies
    than it does: opening it must tell the pool each ancestor's copies (a
    cluster pool reads from those replicas, else from every peer in turn).
    Only its own family's: listing every data vid of the directory on each
    create grew with the directory."""
    from vdifs.client.catalog import Catalog
    from vdifs.client.local import LocalPool

    class CountedPool(LocalPool):
        """The embedded pool, remembering what it was told per data vid."""
        max_copies = 3

        def __init__(self, store):
            super().__init__(store)
            self.told: dict[int, int] = {}

        def register_vdi(self, vid, copies, lease_vid=None):
            self.told[vid] = copies

    async def counted_catalog():
        plain = make_catalog(store_dir)
        cat = Catalog(CountedPool(plain.pool.store), plain.directory)
        await cat.start(nursery)
        return cat

    cat = await counted_catalog()
    snaps = Snapshots(cat)
    gold = await cat.create("gold", OBJ, copies=2)
    other = await cat.create("other", OBJ, copies=1)
    s1 = await snaps.snapshot("gold", "s1")
    vm = await snaps.clone("gold", "s1", "vm", copies=3)
    gold_now = cat.current.get("gold")
    assert gold.vid == s1.vid and gold_now.data_vid != s1.vid

    again = await counted_catalog()  # as after a restart: opening the clone is what tells the pool
    await (await again.open(vm.vid, writable=True)).read(0, 4096)
    assert again.pool.told == {s1.vid: 2, gold_now.data_vid: 2, vm.data_vid: 3}
    assert other.data_vid not in again.pool.told


async def test_flushes_waiting_together_share_one_sync(store_dir, nursery, monkeypatch):
    """Group commit: flushes that queue behind a running sync are covered by
    one sync that begins after all of them, even while writes go on; a
    write acknowledged after a sync began is covered by a later one, never
    by that one; a sync that fails covers nobody."""
    cat = await open_catalog(store_dir, nursery)
    rec = await cat.create("g", 8 * OBJ)
    vol = await cat.open(rec.vid)
    data_syncs: list[set[int]] = []
    gates = [trio.Event() for _ in range(8)]
    fail_next = []
    real_sync = vol.pool.sync

    async def sync(oids):
        oids = set(oids)
        if any(unpack_oid(o)[0] == ObjectKind.DATA for o in oids):
            data_syncs.append(oids)
            await gates[len(data_syncs) - 1].wait()
            if fail_next:
                fail_next.pop()
                raise PoolError("the disk said no")
        await real_sync(oids)

    monkeypatch.setattr(vol.pool, "sync", sync)
    obj = [data_oid(rec.data_vid, i) for i in range(4)]
    await vol.write(0, b"a" * 4096)
    done: list[int] = []
    errors: list[int] = []

    async def flush(k):
        try:
            await vol.flush()
            done.append(k)
        except PoolError:
            errors.append(k)

    nursery.start_soon(flush, 0)
    await wait_until(lambda: len(data_syncs) == 1)  # flush 0 syncs object 0, held at its gate
    await vol.write(OBJ, b"b" * 4096)  # acknowledged while that sync runs
    for k in range(1, 11):
        nursery.start_soon(flush, k)
    await trio.testing.wait_all_tasks_blocked()
    gates[0].set()
    await wait_until(lambda: len(data_syncs) == 2)  # one of the ten syncs for all ten
    await vol.write(2 * OBJ, b"c" * 4096)  # acknowledged during that second sync
    gates[1].set()
    await wait_until(lambda: len(done) == 11)
    assert len(data_syncs) == 2  # without group commit, a third for object 2
    assert obj[1] in data_syncs[1] and obj[1] not in data_syncs[0] and obj[2] not in data_syncs[1]
    gates[2].set()
    await vol.flush()  # object 2's own flush
    assert data_syncs[2] == {obj[2]}

    # A failed sync covers nobody: the flush behind it syncs, for itself and the third.
    data_syncs.clear()
    gates = [trio.Event() for _ in range(8)]
    done.clear()
    fail_next.append(1)
    await vol.write(3 * OBJ, b"d" * 4096)
    for k in range(3):
        nursery.start_soon(flush, k)
    await trio.testing.wait_all_tasks_blocked()
    for g in gates:
        g.set()
    await wait_until(lambda: len(done) + len(errors) == 3)
    assert len(errors) == 1 and sorted(done + errors) == [0, 1, 2]  # the first to the lock failed
    assert len(data_syncs) == 2 and obj[3] in data_syncs[1]


async def test_flushes_with_no_write_between_share_the_sync_under_way(store_dir, nursery, monkeypatch):
    """A flush with no write acknowledged since a sync began is covered by
    that sync, although it came after the sync began: an NBD client with
    slots free sends flush after flush while its first is answered (fio's
    nbd engine does), and they cost one sync, not two. A flush with nothing
    written since the last sync costs none; one after a write (also one
    taken at once, `write_now`) syncs that write's object."""
    cat = await open_catalog(store_dir, nursery)
    rec = await cat.create("n", 8 * OBJ)
    vol = await cat.open(rec.vid)
    data_syncs: list[set[int]] = []
    gate = trio.Event()
    gate.set()
    real_sync = vol.pool.sync

    async def sync(oids):
        oids = set(oids)
        if any(unpack_oid(o)[0] == ObjectKind.DATA for o in oids):
            data_syncs.append(oids)
            await gate.wait()
        await real_sync(oids)

    monkeypatch.setattr(vol.pool, "sync", sync)
    obj = [data_oid(rec.data_vid, i) for i in range(4)]
    await vol.write(0, b"a" * 4096)
    await vol.flush()
    done: list[int] = []

    async def flush(k):
        await vol.flush()
        done.append(k)

    gate = trio.Event()
    await vol.write(OBJ, b"b" * 4096)
    syncs = vol.syncs
    nursery.start_soon(flush, 0)
    await wait_until(lambda: len(data_syncs) == 2)  # flush 0 syncs object 1, held at the gate
    for k in range(1, 16):  # nothing written since that sync began
        nursery.start_soon(flush, k)
    await trio.testing.wait_all_tasks_blocked()
    gate.set()
    await wait_until(lambda: len(done) == 16)
    assert vol.syncs == syncs + 1 and data_syncs[1] == {obj[1]}  # before: a second sync for 15 flushes
    await vol.flush()
    assert vol.syncs == syncs + 1  # nothing written since: nothing to sync
    assert vol.write_now(8192, b"c" * 4096)  # into object 0, at once (the pool's page cache)
    await vol.flush()
    assert vol.syncs == syncs + 2 and data_syncs[-1] == {obj[0]}
    await vol.write(2 * OBJ, b"d" * 4096)  # into a hole: the object is made
    await vol.flush()
    assert vol.syncs == syncs + 3 and data_syncs[-1] == {obj[2]}


async def wait_until(condition, timeout=10.0):
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


async def test_writes_sent_together_land_as_each_would_alone(store_dir, nursery):
    """`Volume.write_many` (an NBD client's writes parsed together):
    overwrites of objects the VDI holds, writes into holes, across an
    object's end, into objects inherited from a snapshot, zeros that end
    an object, and one past the 16 PiB limit: every good write reads back
    as if made alone, the snapshot keeps its bytes, and only the bad one
    fails."""
    cat = await open_catalog(store_dir, nursery)
    rec = await cat.create("w", 8 * OBJ)
    vol = await cat.open(rec.vid)
    model = bytearray(os.urandom(4 * OBJ) + bytes(4 * OBJ))  # objects 0-3 written, 4-7 holes
    await vol.write(0, bytes(model[:4 * OBJ]))
    snap = await Snapshots(cat).snapshot("w", "s")  # objects 0-3 are now inherited
    frozen = bytes(model)
    await vol.write(OBJ + 512, b"o" * 4096)  # object 1 copied up: ours again
    model[OBJ + 512:OBJ + 512 + 4096] = b"o" * 4096
    rng = random.Random(66)
    pages = rng.sample(range(OBJ // 4096 + 2, 2 * OBJ // 4096 - 2), 20)  # in object 1, ours
    writes = [(page * 4096, os.urandom(4096)) for page in pages]
    writes += [(5 * OBJ + 8192, os.urandom(4096)),  # a hole
               (5 * OBJ - 2048, os.urandom(8192)),  # across the end of object 4 (a hole) into 5
               (3 * OBJ + 4096, os.urandom(512)),  # inherited: copy-up
               (2 * OBJ - 4096, bytes(4096)),  # zeros ending object 1
               (MAX_VDI_SIZE, b"x")]  # past the limit
    results = await vol.write_many(writes)
    assert all(r is None for r in results[:-1]), results
    assert isinstance(results[-1], TooLarge)
    for offset, data in writes[:-1]:
        model[offset:offset + len(data)] = data
    assert await vol.read(0, 8 * OBJ) == model
    assert await (await cat.snapshot_volume(snap.vid)).read(0, 8 * OBJ) == frozen
    assert {unpack_oid(oid)[2] for oid in await data_objects(cat, vol.data_vid)} == {1, 3, 4, 5}
