import os

import pytest

from vdifs.errors import ObjectNotFound
from vdifs.model.ids import ObjectKind, data_oid, map_oid
from vdifs.peer.store import ObjectStore


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


async def test_many_objects_beyond_fd_cache(store, monkeypatch):
    monkeypatch.setattr("vdifs.peer.store.MAX_OPEN_FILES", 4)
    oids = [data_oid(9, i) for i in range(20)]
    for i, oid in enumerate(oids):
        await store.create(oid, 0, bytes([i]) * 3, 8)
    assert len(store._handles) <= 4
    for i, oid in enumerate(oids):
        assert await store.read(oid, 0, 3) == bytes([i]) * 3
