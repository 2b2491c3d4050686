import contextlib
import os
import resource
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdifs.errors import ObjectNotFound
from vdifs.model.ids import ObjectKind, data_oid, map_oid
from vdifs.store import checksums, files
from vdifs.store.checksums import BLOCK
from vdifs.store.objects import ObjectStore

from tests.pagecache import all_cached, evict, pages_cached


@pytest.fixture
def store(tmp_path):
    s = ObjectStore(str(tmp_path))
    s.open()
    yield s
    s.close()


async def test_create_write_read(store):
    oid = data_oid(7, 3)
    await store.create(oid, 100, b"hello", 4 << 20)
    assert os.path.getsize(store.path(oid)) == 4 << 20
    await store.write(oid, 0, b"ab")
    assert await store.read(oid, 0, 4) == b"ab\0\0"
    assert await store.read(oid, 98, 9) == b"\0\0hello\0\0"
    # reads past the end of a short object come back as zeros
    await store.create(map_oid(7, 0), 0, b"xy", 2)
    assert await store.read(map_oid(7, 0), 0, 6) == b"xy\0\0\0\0"


async def test_write_never_creates(store):
    with pytest.raises(ObjectNotFound):
        await store.write(data_oid(1, 1), 0, b"x")
    with pytest.raises(ObjectNotFound):
        await store.read(data_oid(1, 1), 0, 1)
    assert await store.list_vids() == []


async def test_create_replaces_stale_content(store):
    oid = data_oid(2, 0)
    await store.create(oid, 0, b"old data", 16)
    await store.create(oid, 4, b"new", 16)
    assert await store.read(oid, 0, 16) == b"\0\0\0\0new" + bytes(9)


async def test_delete_list_and_sync(store):
    oids = [data_oid(3, i) for i in range(5)] + [map_oid(3, 0)]
    for oid in oids:
        await store.create(oid, 0, b"z", 8)
    await store.sync(oids)
    assert await store.list_vids() == [3]
    assert await store.list_objects(3) == sorted(oids)
    assert await store.list_objects(3, ObjectKind.MAP) == [map_oid(3, 0)]
    for oid in oids:
        await store.delete(oid)
    await store.delete(oids[0])  # idempotent
    await store.sync([oids[0]])  # syncing a deleted object is not an error
    await store.remove_vid_dir(3)
    assert await store.list_vids() == []


async def test_many_objects_beyond_fd_cache(store):
    store.max_open = 4
    oids = [data_oid(9, i) for i in range(20)]
    for i, oid in enumerate(oids):
        await store.create(oid, 0, bytes([i]) * 3, 8)
    assert len(store.cached_objects()) <= 4
    for i, oid in enumerate(oids):
        assert await store.read(oid, 0, 3) == bytes([i]) * 3
    assert len(store.cached_objects()) <= 4


async def test_the_objects_read_last_stay_open_and_are_read_without_a_thread(tmp_path):
    """A store keeps its most recently used objects open up to `max_open`: a
    read of one of them is answered at once (`read_now`), with no open."""
    store = ObjectStore(str(tmp_path), max_open=40)
    store.open()
    try:
        oids = [data_oid(4, i) for i in range(60)]
        for i, oid in enumerate(oids):
            await store.create(oid, 0, bytes([i]) * BLOCK, BLOCK)
        store.close()  # every handle dropped: each object must be opened again
        opens = store.opens
        for oid in oids:
            await store.read(oid, 0, 8)
        assert store.opens == opens + 60
        assert len(store.cached_objects()) == 40
        # the 40 read last are open: read at once, nothing opened
        assert [store.read_now(oid, 0, 4) for oid in oids[20:]] == [bytes([i]) * 4 for i in range(20, 60)]
        assert store.opens == opens + 60
        # the first 20 were closed, least recently used first
        assert all(store.read_now(oid, 0, 4) is None for oid in oids[:20])
        assert await store.read(oids[0], 0, 4) == bytes(4)
        assert store.opens == opens + 61
        assert len(store.cached_objects()) == 40
    finally:
        store.close()


def test_the_store_s_open_objects_follow_the_open_files_limit(tmp_path):
    """Run as a daemon: the soft limit of open files is raised to what the
    hard limit allows, and a store keeps a quarter of what it may open."""
    code = f"""
import resource
from vdifs.fsutil import raise_open_files_limit
from vdifs.store.objects import ObjectStore
low = ObjectStore({str(tmp_path)!r}).max_open
soft = raise_open_files_limit()
assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == soft
print(low, soft, ObjectStore({str(tmp_path)!r}).max_open)
"""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))).stdout
    low, soft, high = map(int, out.split())
    assert low == 64  # 256 / 4
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    assert soft == want
    assert high == min(8192, want // 4)


def _flip(path: str, pos: int) -> None:
    """Rot one byte on disk behind the store's back (through the page cache)."""
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x40]))


async def test_a_rotten_block_is_detected_not_served(store):
    if not store.checksums:
        pytest.skip("the file system under the test store has no user xattrs")
    from vdifs.errors import ChecksumError
    from vdifs.store.checksums import BLOCK

    oid = data_oid(3, 1)
    data = os.urandom(4 << 20)
    await store.create(oid, 0, data, 4 << 20)
    await store.sync([oid])
    await store.sync_dirty()  # stores the table CLEAN
    _flip(store.path(oid), 5 * BLOCK + 100)
    with pytest.raises(ChecksumError, match="block 5"):
        await store.read(oid, 5 * BLOCK + 4096, 4096)  # same block, other bytes
    with pytest.raises(ChecksumError):
        await store.read_all(oid)
    with pytest.raises(ChecksumError):  # a partial write must not bless the rot around it
        await store.write(oid, 5 * BLOCK, b"x" * 10)
    assert await store.read(oid, 0, 5 * BLOCK) == data[:5 * BLOCK]  # other blocks are fine
    assert store.checksum_errors == 3
    # also after a restart: the table was stored CLEAN
    store.close()
    again = ObjectStore(store.root)
    again.open()
    with pytest.raises(ChecksumError):
        await again.read(oid, 5 * BLOCK, 16)
    dest = await again.set_aside(oid)
    assert os.path.exists(dest) and not os.path.exists(again.path(oid))
    again.close()


async def test_checksums_follow_writes_creates_and_restarts(store):
    if not store.checksums:
        pytest.skip("the file system under the test store has no user xattrs")
    """Random writes of every alignment, re-creates and reopenings: every read
    verifies and returns what was written; no false alarm."""
    import random

    rng = random.Random(7)
    oid = data_oid(4, 0)
    size = 4 << 20
    model = bytearray(size)
    await store.create(oid, 0, b"", size)
    for step in range(300):
        off = rng.randrange(size)
        data = os.urandom(rng.choice([1, 511, 4096, 20000, 70000]))[:size - off]
        if step % 97 == 0:
            await store.create(oid, off, data, size)  # replace
            model[:] = bytes(size)
        else:
            await store.write(oid, off, data)
        model[off:off + len(data)] = data
        if step % 50 == 0:
            await store.sync([oid])
        if step % 70 == 0:  # drop the cached table: it comes back from disk or is rebuilt
            store.close()
        r = rng.randrange(size)
        n = rng.randrange(1, 100000)
        assert await store.read(oid, r, n) == bytes(model[r:r + n]) + bytes(max(0, r + n - size))
    assert await store.read_all(oid) == bytes(model)
    assert store.checksum_errors == 0


async def test_the_periodic_pass_marks_only_objects_left_alone_for_a_pass(store):
    """A CLEAN table costs the next write to its object an fsync (the DIRTY
    mark first): the periodic pass leaves objects still being written DIRTY,
    and marks an object once a whole pass went by without a write to it."""
    if not store.checksums:
        pytest.skip("the file system under the test store has no user xattrs")

    def state(oid):
        return os.getxattr(store.path(oid), checksums.XATTR)[3]

    busy, quiet = data_oid(6, 0), data_oid(6, 1)
    for oid in (busy, quiet):
        await store.create(oid, 0, b"a" * 100, 1 << 20)
    assert await store.sync_dirty(settled_only=True) == 0  # both were written since the pass before
    for n in range(3):
        await store.write(busy, 0, bytes([n]) * 100)
        marked = await store.sync_dirty(settled_only=True)
        assert state(busy) == checksums.DIRTY
        assert (marked, state(quiet)) == ((1, checksums.CLEAN) if n == 0 else (0, checksums.CLEAN))
    assert await store.sync_dirty(settled_only=True) == 1  # busy, once left alone for a pass
    assert state(busy) == checksums.CLEAN
    await store.write(busy, 0, b"z" * 100)
    assert await store.sync_dirty() == 1  # an orderly stop marks everything
    assert state(busy) == checksums.CLEAN
    store.close()
    assert await store.read(busy, 0, 100) == b"z" * 100


async def test_a_dirty_table_is_rebuilt_from_the_data_after_a_crash(store):
    if not store.checksums:
        pytest.skip("the file system under the test store has no user xattrs")
    """Writes since the last sync leave the stored table DIRTY: after a crash it
    may lag the data, so it is rebuilt from the data rather than trusted."""
    from vdifs.store import checksums

    oid = data_oid(5, 0)
    await store.create(oid, 0, b"a" * 100, 1 << 20)
    await store.sync([oid])
    assert os.getxattr(store.path(oid), checksums.XATTR)[3] == checksums.DIRTY  # a sync leaves it
    assert await store.sync_dirty() == 1  # marked CLEAN without another sync
    clean_table = os.getxattr(store.path(oid), checksums.XATTR)
    assert clean_table[3] == checksums.CLEAN
    await store.write(oid, 0, b"b" * 100)
    assert os.getxattr(store.path(oid), checksums.XATTR)[3] == checksums.DIRTY  # before the data changed
    # The crash: the process dies; the stored table is the old one, still DIRTY.
    os.setxattr(store.path(oid), checksums.XATTR, clean_table[:3] + bytes([checksums.DIRTY]) + clean_table[4:])
    store.close()
    assert await store.read(oid, 0, 100) == b"b" * 100
    assert await store.sync_dirty() == 1  # synced, then marked
    assert os.getxattr(store.path(oid), checksums.XATTR)[3] == checksums.CLEAN
    # sync_dirty finds nothing left to do
    assert await store.sync_dirty() == 0


async def test_install_replaces_whole_and_leaves_nothing_half_written(store):
    oid = data_oid(6, 0)
    await store.create(oid, 0, b"old" * 100, 4 << 20)
    assert await store.read(oid, 0, 3) == b"old"  # a cached handle of the old file
    new = os.urandom(4 << 20)
    await store.install(oid, new)
    assert await store.read_all(oid) == new  # the cached handle was replaced too
    assert os.listdir(os.path.dirname(store.path(oid))) == [os.path.basename(store.path(oid))]
    # a crash in the middle of an install leaves only a .part file: never listed, removed at start
    part = store.path(data_oid(6, 1)) + ".part"
    with open(part, "wb") as f:
        f.write(b"half")
    assert await store.list_objects(6) == [oid]
    store.close()
    again = ObjectStore(store.root)
    again.open()
    assert not os.path.exists(part)
    assert await again.read_all(oid) == new
    again.close()


@pytest.mark.parametrize("move", ["hand_off", "delete"])
async def test_an_open_that_overlaps_a_move_never_caches_the_moved_file(store, monkeypatch, move):
    """A read opens the object in a worker thread; before the open returns, the
    object is handed off (renamed away) or deleted. The descriptor it got is of
    a file that left the path: it must not be cached and used (a deleted
    object's bytes served, writes into it lost), the read must find it gone."""
    import threading

    import trio

    from vdifs.store import files as store_files

    oid = data_oid(7, 0)
    await store.create(oid, 0, b"data", 4096)
    store.close()  # no cached handle: the read must open
    opened, release = threading.Event(), threading.Event()
    real = store_files.open_object

    def slow_open(path):
        result = real(path)
        opened.set()
        release.wait(10)
        return result

    monkeypatch.setattr(store_files, "open_object", slow_open)
    outcome = []

    async def reader():
        try:
            outcome.append(await store.read(oid, 0, 4))
        except ObjectNotFound:
            outcome.append("gone")

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await trio.to_thread.run_sync(opened.wait, 10)
        monkeypatch.setattr(store_files, "open_object", real)
        if move == "hand_off":
            await store.hand_off([oid], epoch=2)
        else:
            await store.delete(oid)
        release.set()
    assert outcome == ["gone"]
    assert oid not in store.cached_objects()


async def test_small_writes_run_inline_and_keep_their_checksums(store, monkeypatch):
    """A small write to an object whose blocks are cached runs on the event loop
    (no thread hop); one whose read-around is not cached, a large one, and one
    that must first mark the table DIRTY go through a worker thread. Either way
    the bytes and the checksum table are right."""
    from vdifs.store import objects as store_objects

    # Until the guard is the subject (below), a write slowed down by a busy
    # machine must not switch inline writes off for a second.
    monkeypatch.setattr(store_objects, "INLINE_GUARD", 60.0)
    oid = data_oid(7, 1)
    payload = os.urandom(4 << 20)
    await store.create(oid, 0, payload, 4 << 20)
    await store.sync([oid])
    await store.sync_dirty()  # the table is CLEAN on disk now
    hops = store.io_stats()["thread_calls"]
    await store.write(oid, 100, b"a" * 10)  # must mark DIRTY first (an fsync): a thread
    assert store.io_stats()["inline_writes"] == 0
    assert store.io_stats()["thread_calls"] == hops + 1
    await store.write(oid, 20000, b"b" * 4096)  # now inline
    await store.write(oid, 40000, b"c" * 3)
    assert store.io_stats()["inline_writes"] == 2
    assert store.io_stats()["thread_calls"] == hops + 1
    big = os.urandom(128 << 10)
    await store.write(oid, 1 << 20, big)  # larger than INLINE_WRITE_MAX: a thread
    assert store.io_stats()["inline_writes"] == 2

    # A read-around that is not in the page cache: the write goes to a
    # thread. The kernel cannot be made to say "not cached" every time: a
    # RWF_NOWAIT read of a missing page starts a readahead, and on a fast
    # disk that readahead may finish before the read looks again (it failed
    # CI twice so, once even after tests/pagecache.evict had seen no page).
    # So the miss comes from `files.read_nowait` here; that it says None for
    # pages not cached is tested on real files in test_verified_reads.
    evict(store.path(oid))
    calls = store.io_stats()["thread_calls"]
    with monkeypatch.context() as m:
        m.setattr(files, "read_nowait", lambda fd, offset, length: None)
        await store.write(oid, 3 << 20, b"d" * 100)
    assert store.io_stats()["inline_writes"] == 2 and store.io_stats()["thread_calls"] == calls + 1
    assert await store.read(oid, 3 << 20, 104) == b"d" * 100 + payload[(3 << 20) + 100:(3 << 20) + 104]

    # A slow inline write that did not sleep was only preempted (a busy
    # machine): inline writes go on. (The block at 3 MiB is cached again:
    # the threaded write read it.)
    monkeypatch.setattr(store_objects, "INLINE_GUARD", 0.0)
    await store.write(oid, (3 << 20) + 200, b"e" * 10)
    await store.write(oid, (3 << 20) + 250, b"e" * 10)
    assert store.io_stats()["inline_writes"] == 4
    # One that slept (dirty-page throttling: here the thread's count of
    # voluntary switches is made to move) sends the next ones through
    # threads for a while.
    switches = iter(range(10**9))
    monkeypatch.setattr(store_objects, "voluntary_switches", lambda: next(switches))
    await store.write(oid, (3 << 20) + 300, b"f" * 10)
    assert store.io_stats()["inline_writes"] == 5
    await store.write(oid, (3 << 20) + 300, b"f" * 10)
    assert store.io_stats()["inline_writes"] == 5

    expected = bytearray(payload)
    for off, data in [(100, b"a" * 10), (20000, b"b" * 4096), (40000, b"c" * 3), (3 << 20, b"d" * 100),
                      ((3 << 20) + 200, b"e" * 10), ((3 << 20) + 250, b"e" * 10), ((3 << 20) + 300, b"f" * 10)]:
        expected[off:off + len(data)] = data
    expected[1 << 20:(1 << 20) + len(big)] = big
    assert await store.read(oid, 0, 4 << 20) == expected  # verified against the table
    store.close()  # reopen: the table rebuilt from the data agrees with the bytes
    assert await store.read(oid, 0, 4 << 20) == expected


async def test_read_now_and_write_now_act_only_when_nothing_must_wait(store):
    from vdifs.errors import ChecksumError

    oid = data_oid(7, 2)
    payload = os.urandom(1 << 20)
    await store.create(oid, 0, payload, 4 << 20)
    await store.write(oid, 0, payload[:10])  # the table is DIRTY now: writes may go inline
    assert store.read_now(oid, 100, 5000) == payload[100:5100]  # cached handle, cached pages
    assert store.write_now(oid, 20000, b"w" * 4096)
    assert await store.read(oid, 20000, 4096) == b"w" * 4096
    assert store.write_now(oid, 0, b"x" * (128 << 10)) is False  # too big to go inline
    store.close()  # no cached handle: neither can act, and nothing changed
    assert store.read_now(oid, 0, 10) is None and store.write_now(oid, 0, b"y") is False
    assert await store.read(oid, 0, 10) == payload[:10]
    # a rotten block is never served by read_now: read raises, so the repair runs
    if not store.checksums:
        pytest.skip("no user xattrs here: no checksums")
    with open(store.path(oid), "r+b") as f:
        f.seek(30000)
        f.write(b"\xff")
    assert store.read_now(oid, 0, 10) == payload[:10]  # the block before it: cached, good, served
    assert store.read_now(oid, 16384, 100) is None
    with pytest.raises(ChecksumError):
        await store.read(oid, 16384, 100)


async def test_a_sync_leaves_the_table_dirty_so_writes_after_a_flush_need_no_mark(store):
    """A guest flushing every few writes: each sync makes the data durable
    but leaves the stored table DIRTY, so the writes after it need no DIRTY
    mark (an fsync in a worker thread) and run inline; the periodic
    `sync_dirty` stores it CLEAN once the object was left alone."""
    if not store.checksums:
        pytest.skip("the file system under the test store has no user xattrs")
    from vdifs.errors import ChecksumError
    from vdifs.store import checksums

    oid = data_oid(9, 0)
    await store.create(oid, 0, os.urandom(1 << 20), 1 << 20)
    for i in range(5):
        hops = store.io_stats()["thread_calls"]
        inline = store.io_stats()["inline_writes"]
        await store.write(oid, i * 8192, b"w" * 4096)
        assert store.io_stats()["inline_writes"] == inline + 1
        assert store.io_stats()["thread_calls"] == hops
        await store.sync([oid])
    assert os.getxattr(store.path(oid), checksums.XATTR)[3] == checksums.DIRTY
    assert await store.sync_dirty() == 1
    assert os.getxattr(store.path(oid), checksums.XATTR)[3] == checksums.CLEAN
    store.close()  # the CLEAN table is trusted on reopening: a flipped bit is found
    _flip(store.path(oid), 8192 + 10)
    with pytest.raises(ChecksumError):
        await store.read(oid, 8192, 16)


async def test_a_whole_object_is_written_in_pieces_and_lands_whole(store, monkeypatch):
    """Big writes reach the file in pieces of at most WRITE_PIECE (so the page
    cache keeps small folios that later small writes stay cheap in), every
    byte in place, short writes completed."""
    from vdifs.store import files

    sizes = []
    real = os.pwrite

    def short_pwrite(fd, data, offset):
        sizes.append(len(data))
        return real(fd, memoryview(data)[:max(1, len(data) - 7)], offset)  # the kernel may write less

    monkeypatch.setattr(os, "pwrite", short_pwrite)
    data = os.urandom(4 << 20)
    oid = data_oid(9, 0)
    await store.create(oid, 0, data, 4 << 20)
    await store.write(oid, 5000, data[:300000])
    monkeypatch.undo()
    assert max(sizes) <= files.WRITE_PIECE and len(sizes) > 64
    assert await store.read(oid, 0, 4 << 20) == data[:5000] + data[:300000] + data[305000:]


async def test_delete_removes_the_copies_set_aside_too(store):
    """A free that reaches a peer removes its stale and handed-off copies of
    the object as well, so recovery can never take one back afterwards
    (a returning peer is up when the free is sent)."""
    oid = data_oid(4, 2)
    await store.create(oid, 0, b"old", 4 << 20)
    await store.set_aside_stale([oid], "000000000007")
    assert await store.stale_of([4, 5]) == {4: [oid], 5: []}
    await store.create(oid, 0, b"new", 4 << 20)  # recovered meanwhile
    await store.hand_off([oid], epoch=9)
    assert await store.list_objects_of([4, 5]) == [] and await store.list_objects_of([4, 5], handoff=True) == [oid]
    await store.create(oid, 0, b"now", 4 << 20)
    await store.delete(oid)
    assert not await store.exists(oid)
    assert await store.list_stale(4) == [] and await store.stale_of([4, 5]) == {4: [], 5: []}
    assert not await store.take_stale(oid)
    assert await store.list_objects_of([4], handoff=True) == []
    for root in (store.stale_root, store.handoff_root):
        assert not any(files for _, _, files in os.walk(root))


@pytest.fixture
def tmpfs_store(tmp_path):
    """A store on a tmpfs: a file system that cannot read RWF_NOWAIT."""
    import subprocess

    root = tmp_path / "tmpfs"
    root.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(root)]).returncode != 0:
        pytest.fail("cannot mount a tmpfs (the suite runs as root)")
    s = ObjectStore(str(root))
    try:
        s.open()
        yield s
        s.close()
    finally:
        subprocess.run(["umount", "-l", str(root)])


async def test_a_file_system_without_nowait_reads_takes_the_threads(tmpfs_store):
    """tmpfs answers RWF_NOWAIT with EOPNOTSUPP: small writes (whose
    read-around is NOWAIT on the event loop) and reads go through worker
    threads instead of failing (a store on tmpfs once failed every write)."""
    store = tmpfs_store
    oid = data_oid(3, 0)
    want = bytearray(os.urandom(4 << 20))
    await store.create(oid, 0, want, 4 << 20)
    for i in range(8):
        piece = bytes([i + 1]) * 3000
        offset = i * 70001 + 123  # never block-aligned: every write reads around
        await store.write(oid, offset, piece)
        want[offset:offset + len(piece)] = piece
    assert await store.read(oid, 0, 4 << 20) == want
    assert await store.read(oid, 70001 + 100, 50) == want[70001 + 100:70001 + 150]


async def test_data_stops_at_the_reserve_and_maps_go_on(tmpfs_store):
    """On a 64 MiB file system with an 8 MiB reserve, VDI data fills up to
    the reserve and is then refused (NoSpace, nothing written), while an
    object map can still be created and written: a full pool can still
    record what was written and close files."""
    from vdifs.errors import NoSpace
    from vdifs.model.ids import map_oid
    from vdifs.store.reserve import SpaceReserve

    store = tmpfs_store
    store.reserve = SpaceReserve(store.obj_root, 8 << 20)
    chunk = os.urandom(4 << 20)
    stored = 0
    with pytest.raises(NoSpace, match="reserve"):
        for i in range(20):
            await store.create(data_oid(5, i), 0, chunk, 4 << 20)
            stored += 1
    assert 12 <= stored <= 14  # 56 MiB above the reserve, less metadata
    assert store.space_refusals == 1
    assert not os.path.exists(store.path(data_oid(5, stored)))  # the refused create left nothing
    total, available = await store.space()
    assert total == 64 << 20 and available < 4 << 20
    with pytest.raises(NoSpace):  # an overwrite is data too
        await store.write(data_oid(5, 0), 0, chunk[:1 << 20] * 4)
    assert await store.read(data_oid(5, 0), 0, 4 << 20) == chunk
    table = os.urandom(64 << 10)
    await store.create(map_oid(5, 0), 0, table, 4 << 20)  # into the reserve
    await store.write(map_oid(5, 0), 1 << 20, table)
    assert await store.read(map_oid(5, 0), 1 << 20, 64 << 10) == table
    await store.delete(data_oid(5, 0))  # freeing space lets data in again
    await store.delete(data_oid(5, 1))
    store.reserve._measured_at = -1e9  # measure now, not within the next second
    await store.create(data_oid(5, 99), 0, chunk, 4 << 20)


@contextlib.contextmanager
def _direct_store(root: str) -> Iterator[ObjectStore]:
    """A store that writes large data past the page cache (a peer's default for replicas that serve no reads), opened and closed."""
    s = ObjectStore(root, direct=True)
    s.open()
    try:
        yield s
    finally:
        s.close()


async def test_uncached_large_writes_bypass_the_page_cache(tmp_path):
    """A write made with cache=False (a replica no mount reads from) goes
    past the page cache when it is large and aligned; it reads back right,
    checksums and all, and so does everything around it."""
    s = ObjectStore(str(tmp_path), direct=True)
    s.open()
    try:
        fstype = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True,
                                text=True, check=True).stdout.strip()
        if not s.direct:  # the probe must not miss it where O_DIRECT always works
            assert fstype not in ("ext2/ext3", "xfs", "btrfs"), fstype
            pytest.skip(f"{tmp_path} ({fstype}) cannot do O_DIRECT")
        mib = 1 << 20
        a, b = data_oid(5, 0), data_oid(5, 1)
        one, two, three = os.urandom(mib), os.urandom(mib // 2), os.urandom(mib)
        await s.create(a, mib, one, 4 * mib, cache=False)
        await s.create(b, mib, one, 4 * mib)  # cached: the replica reads come to
        await s.write(a, 2 * mib, two, cache=False)
        assert s.direct_writes == 2
        assert pages_cached(s.path(a), mib, mib) == 0 and pages_cached(s.path(a), 2 * mib, mib // 2) == 0
        assert all_cached(s.path(b), mib, mib)
        # small or unaligned writes stay cached whatever the caller says
        await s.write(a, 0, b"x" * 4096, cache=False)
        await s.write(a, 3 * mib + 1, b"y" * (300 << 10), cache=False)
        assert s.direct_writes == 2
        assert all_cached(s.path(a), 0, 4096)
        # a direct write over cached data: the reader sees the new bytes
        await s.write(b, mib, three, cache=False)
        assert s.direct_writes == 3
        expect_a = b"x" * 4096 + bytes(mib - 4096) + one + two + bytes(mib // 2 + 1) + b"y" * (300 << 10)
        expect_a += bytes(4 * mib - len(expect_a))
        assert await s.read(a, 0, 4 * mib) == expect_a  # verified against its checksums
        assert await s.read(b, 0, 2 * mib) == bytes(mib) + three
    finally:
        s.close()
    # the tables written with the data hold after a reopen (which verifies them)
    with _direct_store(str(tmp_path)) as s:
        assert await s.read(a, 0, 4 * mib) == expect_a
        assert await s.read(b, mib, mib) == three
        assert s.checksum_errors == 0


async def test_small_writes_into_blocks_written_past_the_cache_read_nothing(tmp_path):
    """A replica that wrote an object past the page cache (direct create
    and writes) takes 4 KiB writes into the middle of its blocks without
    reading the rest of each block back (`checksums.Pieces`): the pieces
    around stay uncached, the bytes and checksums read back right, also
    after a restart, and rot in a piece left alone is still found."""
    from vdifs.errors import ChecksumError
    from vdifs.store.checksums import BLOCK, PIECE

    with _direct_store(str(tmp_path)) as s:
        if not s.direct or not s.checksums:
            pytest.skip(f"{tmp_path} cannot do O_DIRECT or has no user xattrs")
        mib = 1 << 20
        oid, other = data_oid(6, 0), data_oid(6, 1)
        expect = bytearray(4 * mib)
        first, second = os.urandom(mib), os.urandom(2 * mib)
        await s.create(oid, 0, first, 4 * mib, cache=False)
        await s.write(oid, mib, second, cache=False)
        expect[:mib], expect[mib:3 * mib] = first, second
        assert pages_cached(s.path(oid), 0, 3 * mib) == 0  # (mincore: a NOWAIT read may start a readahead)
        for block in (0, 5, 70, 130, 200):  # in the create's part, the write's, and never written
            at = block * BLOCK + 2 * PIECE
            small = os.urandom(PIECE)
            await s.write(oid, at, small)
            expect[at:at + PIECE] = small
            assert pages_cached(s.path(oid), at, PIECE) == 1  # the write itself lands in the page cache
            for around in (block * BLOCK, block * BLOCK + PIECE, block * BLOCK + 3 * PIECE):
                assert pages_cached(s.path(oid), around, PIECE) == 0, (block, around)  # nothing was read
        assert await s.read(oid, 0, 4 * mib) == expect  # verified block by block
        await s.sync([oid])
        await s.sync_dirty()  # the table stored CLEAN: trusted, not rebuilt, after a restart
        # rot in a piece no write touches: the next small write into its block
        # must not make a checksum that covers it
        await s.create(other, 0, first, 4 * mib, cache=False)
        _flip(s.path(other), 9 * BLOCK + 100)
        await s.write(other, 9 * BLOCK + 2 * PIECE, os.urandom(PIECE))
        with pytest.raises(ChecksumError, match="block 9"):
            await s.read(other, 9 * BLOCK, BLOCK)
    with _direct_store(str(tmp_path)) as s:
        assert await s.read(oid, 0, 4 * mib) == expect
        assert s.checksum_errors == 0


async def test_the_objects_written_last_keep_their_pieces(tmp_path, monkeypatch):
    """Piece CRCs are kept for the PIECES_KEPT objects written last: a
    small write into an object written longer ago reads its block around
    again (and learns it), one into an object written lately does not."""
    from vdifs.store import objects
    from vdifs.store.checksums import BLOCK, PIECE

    monkeypatch.setattr(objects, "PIECES_KEPT", 2)
    mib = 1 << 20
    with _direct_store(str(tmp_path)) as s:
        if not s.direct or not s.checksums:
            pytest.skip(f"{tmp_path} cannot do O_DIRECT or has no user xattrs")
        oids = [data_oid(7, i) for i in range(3)]
        data = {oid: os.urandom(mib) for oid in oids}
        for oid in oids:  # the first one's pieces give way to the third's
            await s.create(oid, 0, data[oid], 4 * mib, cache=False)
        # newest first: a write into the first one then takes the pieces of
        # the one written least lately, which no later write needs
        for oid, read_around in zip(reversed(oids), (False, False, True)):
            small = os.urandom(PIECE)
            await s.write(oid, BLOCK + PIECE, small)
            assert pages_cached(s.path(oid), BLOCK, PIECE) == int(read_around), oid
            expect = bytearray(data[oid]) + bytes(3 * mib)
            expect[BLOCK + PIECE:BLOCK + 2 * PIECE] = small
            assert await s.read(oid, 0, 4 * mib) == expect


async def test_a_checksum_sync_survives_objects_deleted_during_it(store, monkeypatch):
    """`sync_dirty` (every 30 s in a peer) lists the objects whose tables are
    DIRTY, syncs them, then marks them CLEAN. An object deleted while the
    sync runs had its descriptor closed by the delete: the marking must skip
    it, not close the descriptor a second time (seen in a soak run: a peer
    died of EBADF; a reused descriptor number would close another file)."""
    oids = [data_oid(9, i) for i in range(4)]
    for oid in oids:
        await store.create(oid, 0, b"x" * 4096, 4096)
        await store.write(oid, 0, b"y" * 4096)
    real_sync = store.sync

    async def sync_then_delete(which):
        await real_sync(which)
        for oid in oids[:2]:  # deleted while sync_dirty is between its sync and its marking
            await store.delete(oid)

    monkeypatch.setattr(store, "sync", sync_then_delete)
    await store.sync_dirty()
    monkeypatch.undo()
    for oid in oids[2:]:
        assert await store.read(oid, 0, 4096) == b"y" * 4096


def _page_dirty(path: str, offset: int) -> bool:
    """Whether the page cache holds the file's page at `offset` dirty (not
    yet written back): the kernel's own flag, from /proc/kpageflags (root)."""
    import ctypes
    import mmap

    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 4096, mmap.MAP_SHARED, offset=offset) as m:
            m[0]  # mapped: the page has a frame number now
            cell = ctypes.c_char.from_buffer(m)
            try:
                with open("/proc/self/pagemap", "rb") as f:
                    f.seek(ctypes.addressof(cell) // 4096 * 8)
                    frame = int.from_bytes(f.read(8), "little") & ((1 << 55) - 1)
            finally:
                del cell
        with open("/proc/kpageflags", "rb") as f:
            f.seek(frame * 8)
            return bool(int.from_bytes(f.read(8), "little") >> 4 & 1)  # KPF_DIRTY
    finally:
        os.close(fd)


@pytest.mark.skipif(not os.access("/proc/kpageflags", os.R_OK), reason="reading page flags needs root")
async def test_a_sync_of_many_objects_is_one_syncfs_unless_the_machine_has_much_to_write(store, monkeypatch):
    """Many objects are made durable by one syncfs of the store's file system
    while the machine has little else to write back, and object by object,
    side by side on the store's sync threads, when it has more (design
    change 48); either way no written page is left dirty, and the tables
    can be stored CLEAN with no sync more."""
    from vdifs.store import objects as store_objects

    oids = [data_oid(4, i) for i in range(store_objects.SYNCFS_MIN + 2)]
    written = {oid: os.urandom(4096) for oid in oids}
    for oid in oids:
        await store.create(oid, 0, os.urandom(64 << 10), 1 << 20)
        # ext4 writes back a file truncated to 0 (as a create does) at its
        # next close: let that happen now, not in the middle of the checks.
        os.close(os.open(store.path(oid), os.O_RDONLY))
        await store.write(oid, 256 << 10, written[oid])
    assert all(_page_dirty(store.path(oid), 256 << 10) for oid in oids)
    datasyncs = []
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (datasyncs.append(threading.current_thread().name),
                                                    real_fdatasync(fd))[1])
    monkeypatch.setattr(store_objects, "machine_dirty_bytes", lambda: 0)

    await store.sync(oids)
    assert store.io_stats()["whole_fs_syncs"] == 1 and datasyncs == []
    assert not any(_page_dirty(store.path(oid), 256 << 10) for oid in oids)
    assert await store.sync_dirty() == len(oids) and datasyncs == []  # covered: marked without a sync
    assert {os.getxattr(store.path(oid), checksums.XATTR)[3] for oid in oids} == {checksums.CLEAN}

    # Another writer's writeback pending: each object on its own, side by side
    # on the store's sync threads.
    for oid in oids:
        await store.write(oid, 512 << 10, os.urandom(4096))
    monkeypatch.setattr(store_objects, "machine_dirty_bytes", lambda: store_objects.SYNCFS_DIRTY_MAX + 1)
    await store.sync(oids)
    assert store.io_stats()["whole_fs_syncs"] == 1 and len(datasyncs) == len(oids)
    assert all(name.startswith("vdifs-sync") for name in datasyncs)
    assert not any(_page_dirty(store.path(oid), 512 << 10) for oid in oids)
    for oid in oids:
        assert await store.read(oid, 256 << 10, 4096) == written[oid]


@settings(max_examples=150, deadline=None)
@given(pieces=st.lists(st.tuples(st.integers(0, 255), st.integers(1, 3)), max_size=12),
       offset=st.integers(0, (1 << 20) + 8192), length=st.integers(0, 300_000))
def test_sparse_reads_give_the_file_s_bytes(tmp_path_factory, pieces, offset, length):
    """pread_sparse reads what pread reads, holes as zeros, past the end as
    zeros; its NOWAIT form gives the same bytes or None."""
    path = tmp_path_factory.mktemp("sparse") / "obj"
    with open(path, "wb") as f:
        f.truncate(1 << 20)
        for page, count in pieces:
            f.seek(page * 4096)
            f.write(os.urandom(count * 4096))
    fd = os.open(path, os.O_RDONLY)
    try:
        want = files.pread_full(fd, offset, length)
        assert files.pread_sparse(fd, offset, length) == want
        quick = files.pread_sparse(fd, offset, length, nowait=True)
        assert quick is None or quick == want
    finally:
        os.close(fd)


async def test_holes_are_read_as_zeros_without_filling_the_page_cache(store):
    """A thinly written object (4 KiB written here and there, as a guest
    writes a new disk) is read without the kernel allocating and clearing a
    page-cache page for every hole: on a VM that costs as much as writing
    the data (a first read of such a VDI ran at 160 MB/s). The data and the
    checksums still hold: a block whose table entry is not that of zeros but
    that reads as a hole (the file system lost it) is rot, not zeros."""
    from vdifs.errors import ChecksumError
    from vdifs.store.checksums import BLOCK

    oid = data_oid(9, 4)
    await store.create(oid, 0, b"", 4 << 20)
    want = bytearray(4 << 20)
    for page in (3, 100, 101, 700, 1023):
        piece = os.urandom(4096)
        await store.write(oid, page * 4096, piece)
        want[page * 4096:(page + 1) * 4096] = piece
    path = store.path(oid)
    hole = (200 * 4096, 64 << 10)
    assert not pages_cached(path, *hole)
    cached = pages_cached(path, 0, 4 << 20)  # what the writes' read-around left
    assert store.read_now(oid, 0, 1 << 20) == want[:1 << 20]  # no task, no thread: data cached, holes zeros
    assert await store.read(oid, 0, 4 << 20) == want
    assert await store.read_all(oid) == want
    assert pages_cached(path, 0, 4 << 20) == cached  # the reads filled no page
    assert pages_cached(path, 100 * 4096, 8192) == 2
    if not store.checksums:
        pytest.skip("the file system under the test store has no user xattrs")
    fd = os.open(path, os.O_RDWR)
    try:  # block 6 (pages 24-27) lost its data: a hole where the table has a CRC
        os.pwrite(fd, b"\x01" * 4096, 25 * 4096)
        store.close()
        store.open()
        await store.read(oid, 6 * BLOCK, BLOCK)  # loads the table with the data in it
        fallocate_punch = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.fallocate(fd, fallocate_punch, ctypes.c_long(25 * 4096), ctypes.c_long(4096)) == 0
    finally:
        os.close(fd)
    assert store.read_now(oid, 6 * BLOCK, BLOCK) is None
    with pytest.raises(ChecksumError, match="block 6"):
        await store.read(oid, 6 * BLOCK, BLOCK)


#: One write of the property test below: (first piece, pieces, byte shift,
#: byte trim, page cache or not, tried inline first).
_WRITES = st.lists(st.tuples(st.integers(0, 4 * BLOCK // checksums.PIECE - 1), st.sampled_from([1, 2, 3, 4, 5, 8, 64]),
                             st.sampled_from([0, 0, 0, 512]), st.sampled_from([0, 0, 0, 100]),
                             st.booleans(), st.booleans()),
                   min_size=1, max_size=14)


@settings(max_examples=120, deadline=None)
@given(writes=_WRITES, direct_create=st.booleans())
def test_any_mix_of_writes_keeps_every_block_s_checksum_true(tmp_path_factory, writes, direct_create):
    """Whatever the mix of small and whole-block writes, cached and past the
    page cache, inline and through a thread, every block's checksum is that
    of its bytes: the whole object reads back verified and equal to a model
    of it, and so does every block after a reopen rebuilt nothing. (Piece
    CRCs learnt before a whole-block write over them once survived it, and
    the next small write into that block combined stale pieces: the mount
    failed its own reads with checksum errors.)"""
    import trio

    mib, P = 1 << 20, checksums.PIECE
    root = str(tmp_path_factory.mktemp("mix"))
    oid = data_oid(5, 0)
    model = bytearray(os.urandom(mib))

    async def run() -> None:
        with _direct_store(root) as s:
            await s.create(oid, 0, model, 4 * mib, cache=not direct_create)
            model.extend(bytes(3 * mib))
            for first, n, shift, trim, cache, inline in writes:
                offset, length = first * P + shift, n * P - shift - trim
                data = os.urandom(length)
                model[offset:offset + length] = data
                if not (inline and s.write_now(oid, offset, data)):
                    await s.write(oid, offset, data, cache=cache)
                assert await s.read(oid, 0, 4 * BLOCK + 64 * P) == model[:4 * BLOCK + 64 * P]
            await s.sync([oid])
            await s.sync_dirty()
        with _direct_store(root) as s:
            assert await s.read(oid, 0, 4 * mib) == model
            assert s.checksum_errors == 0

    trio.run(run)
