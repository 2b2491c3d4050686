"""The mount's local object cache on real files: fills, restarts, damage, room, TTL."""

from __future__ import annotations

import os
import time

import trio
import trio.testing
from hypothesis import given, settings, strategies as st

from vdifs.client.cache import ObjectCache, size_leaving_room
from vdifs.model.cache_index import CacheIndex, State
from vdifs.model.ids import data_oid

MiB = 1 << 20
OBJ = 4 * MiB


def oid_of(vid: int, index: int) -> int:
    return data_oid(vid, index)


def body(n: int) -> bytes:
    return bytes([n % 251 + 1]) * OBJ


async def fill(cache: ObjectCache, oid: int, data: bytes, *, mutable: bool = False) -> bool:
    """A fill, made durable at once (`run` would do it moments later)."""
    version = cache.begin_fill(oid, len(data), mutable, 1 if mutable else None)
    if version is None:
        return False
    done = await cache.finish_fill(oid, version, data)
    await cache.persist()
    return done


async def opened(root: str, capacity: int, cluster: str = "c1", **kw) -> ObjectCache:
    cache = ObjectCache(root, capacity, **kw)
    await cache.open(cluster)
    return cache


async def test_fill_read_and_restart(tmp_path):
    root = str(tmp_path / "cache")
    cache = await opened(root, 64 * MiB)
    a, b, c = oid_of(7, 0), oid_of(7, 1), oid_of(8, 0)
    assert await fill(cache, a, body(1))
    assert await fill(cache, b, body(2), mutable=True)
    version = cache.begin_fill(c, OBJ, False, None)  # a fill the "crash" interrupts
    assert version is not None
    assert await cache.read(a, MiB, 4096) == body(1)[:4096]
    assert cache.index.used == 2 * OBJ and cache.index.reserved == OBJ
    cache.close()

    again = await opened(root, 64 * MiB)
    # The immutable READY object stays; the mutable one may be older than its
    # replicas and the FILLING one was never complete: both gone, files too.
    assert set(again.index.entries) == {a}
    assert again.index.entries[a].state == State.READY
    assert await again.read(a, 0, OBJ) == body(1)
    assert not os.path.exists(again.store.path(b)) and not os.path.exists(again.store.path(c))
    again.close()

    other = await opened(root, 64 * MiB, cluster="c2")  # another cluster's cache: emptied
    assert not other.index.entries and not os.path.exists(other.store.path(a))
    other.close()


async def test_damaged_object_is_dropped_not_served(tmp_path):
    cache = await opened(str(tmp_path / "cache"), 64 * MiB)
    a = oid_of(3, 5)
    assert await fill(cache, a, body(9))
    path = cache.store.path(a)
    cache.store.close()  # no cached descriptor: the next read opens the file again
    with open(path, "r+b") as f:
        f.seek(2 * MiB + 100)
        f.write(b"\x00\xff\x00")
    assert await cache.read(a, 2 * MiB, 4096) is None
    assert a not in cache.index.entries and cache.index.stats.drops == 1
    assert not os.path.exists(path)
    cache.close()


async def test_room_is_reserved_and_least_recently_used_evicted(tmp_path):
    cache = await opened(str(tmp_path / "cache"), 2 * OBJ)
    a, b, c, d = (oid_of(4, i) for i in range(4))
    assert await fill(cache, a, body(1))
    assert await fill(cache, b, body(2))
    assert await cache.read(a, 0, 10) == body(1)[:10]  # a is now more recent than b
    cache.index.acquire(a)  # a reader inside a: never evicted
    assert await fill(cache, c, body(3))  # b, the least recently used, makes room
    assert cache.index.entries[b].state == State.EVICTING  # its file goes once the evictor runs
    # Room for d needs two more objects gone while only c may go (a is being
    # read, b's space is not free yet): refused, and nothing changed.
    assert cache.begin_fill(d, OBJ, False, None) is None
    assert d not in cache.index.entries and cache.index.stats.fill_refusals == 1
    assert await cache.read(c, 0, OBJ) == body(3)
    cache.index.release(a)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cache.run)
        for _ in range(100):
            if b not in cache.index.entries:
                break
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert b not in cache.index.entries and not os.path.exists(cache.store.path(b))
    assert cache.index.committed <= cache.index.capacity and cache.index.stats.evictions == 1
    assert await cache.read(a, 0, OBJ) == body(1)
    cache.close()


def test_expiry_under_a_mock_clock(tmp_path):
    async def main() -> None:
        cache = await opened(str(tmp_path / "cache"), 64 * MiB, ttl=3600.0, clock=trio.current_time)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cache.run)
            old, fresh = oid_of(5, 0), oid_of(5, 1)
            assert await fill(cache, old, body(1))
            await trio.sleep(3000)
            assert await fill(cache, fresh, body(2))
            await trio.sleep(700)  # old: 3700 s unused; fresh: 700 s
            await trio.sleep(120)  # the expiry pass runs every minute
            assert old not in cache.index.entries and not os.path.exists(cache.store.path(old))
            assert fresh in cache.index.entries and cache.index.stats.expirations == 1
            nursery.cancel_scope.cancel()
        cache.close()

    # jumps only when nothing ran for 0.2 s of real time: a worker thread (file I/O) is not "blocked"
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.2))


# -- the index alone -----------------------------------------------------------------------------

ops = st.lists(st.tuples(st.sampled_from(["fill", "done", "fail", "drop", "acquire", "release", "evicted"]),
                         st.integers(0, 7)), max_size=80)


@settings(max_examples=200, deadline=None)
@given(ops, st.integers(1, 5))
def test_index_never_overcommits_nor_evicts_what_is_read(steps, slots):
    """Whatever happens, READY + FILLING never exceed the capacity once
    evictions finish, and a referenced object is never chosen for eviction."""
    index = CacheIndex(slots * 10)
    for op, oid in steps:
        e = index.get(oid)
        if op == "fill":
            victims = index.begin_fill(oid, 10, False, None, 0.0)
            for v in victims or []:
                assert index.entries[v].refs == 0
                index.evicted(v)
        elif op == "done" and e is not None and e.state == State.FILLING:
            index.fill_done(oid, 10)
        elif op == "fail" and e is not None and e.state == State.FILLING:
            index.fill_failed(oid)
        elif op == "drop" and e is not None:
            if index.drop(oid):
                assert e.refs == 0
                index.evicted(oid)
        elif op == "acquire" and e is not None and e.state == State.READY:
            index.acquire(oid)
        elif op == "release" and e is not None and e.refs:
            if index.release(oid):
                index.evicted(oid)
        assert index.committed <= index.capacity
        assert index.used == sum(x.charged for x in index.entries.values() if x.state != State.FILLING)
        assert index.reserved == sum(x.charged for x in index.entries.values() if x.state == State.FILLING)



async def test_a_journal_rewritten_whole_keeps_what_it_must(tmp_path, monkeypatch):
    from vdifs.client import cache as cache_module
    monkeypatch.setattr(cache_module, "JOURNAL_LIMIT", 100)  # rewritten every few records
    root = str(tmp_path / "cache")
    cache = await opened(root, 64 * MiB)
    oids = [oid_of(9, i) for i in range(6)]
    for i, oid in enumerate(oids):
        assert await fill(cache, oid, body(i), mutable=i == 5)
    await cache.drop(oids[0])
    assert os.path.getsize(os.path.join(root, "journal")) < 300
    cache.close()
    again = await opened(root, 64 * MiB)
    assert set(again.index.entries) == set(oids[1:5])  # not the dropped one, not the mutable one
    assert await again.read(oids[4], 0, OBJ) == body(4)
    again.close()


async def test_the_evictor_sleeps_when_there_is_nothing_to_do(tmp_path):
    """Its clock is not trio's (time.monotonic by default): a deadline taken
    from one and waited for on the other once made it spin."""
    cache = await opened(str(tmp_path / "cache"), 64 * MiB)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cache.run)
        await trio.sleep(0.05)
        used = time.process_time()
        await trio.sleep(0.5)
        used = time.process_time() - used
        nursery.cancel_scope.cancel()
    cache.close()
    assert used < 0.2, f"the evictor used {used:.2f} s of CPU in 0.5 s of idling"


def test_default_size_counts_only_what_the_mount_can_use():
    GiB, blk = 1 << 30, 4096
    g = GiB // blk  # blocks per GiB
    # A plain disk, 100 GiB with 60 free (nothing reserved): a tenth.
    assert size_leaving_room(100 * g, 60 * g, 60 * g, blk) == 10 * GiB
    # Almost full: only what keeps a fifth free, then nothing.
    assert size_leaving_room(100 * g, 25 * g, 25 * g, blk) == 5 * GiB
    assert size_leaving_room(100 * g, 15 * g, 15 * g, blk) == 0
    # 252 GiB of which 150 are reserved for another user, 26 used, 76
    # available (this project's VMs): the mount sees a 102 GiB disk a
    # quarter full, not a 252 GiB one with less than a fifth free.
    assert size_leaving_room(252 * g, 226 * g, 76 * g, blk) == 102 * GiB // 10
    # The same disk nearly full as the mount sees it: still room kept.
    assert size_leaving_room(252 * g, 160 * g, 10 * g, blk) == 0
