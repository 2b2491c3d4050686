"""The embedded pool: one in-process object store, one copy of every object,
and opening a mount's catalog on it.

One mount per store (the CLI holds the store's flock), so there are no
leases and nothing is shared: the catalog trusts its maps and purges
leftovers of unknown vids at start.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import trio

from vdifs.client.catalog import Catalog
from vdifs.client.pool import PoolSpace, Write, write_each
from vdifs.errors import ChecksumError, PoolError
from vdifs.meta.directory_service import DirectoryService
from vdifs.meta.register import FileRegister
from vdifs.model.iostats import OpStats
from vdifs.store.objects import ObjectStore

log = logging.getLogger("vdifs.pool")


class LocalPool:
    """The embedded pool: one in-process store, one copy of every object."""

    max_copies = 1
    default_copies = 1

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.write = store.write
        self.write_now = store.write_now  # small writes into the page cache, with no await
        self.read_now = store.read_now  # page-cache reads, verified, with no await
        self.create = store.create
        self.delete = store.delete
        self.sync = store.sync
        self.list_vids = store.list_vids
        self.list_objects = store.list_objects
        self.finish_vid = store.remove_vid_dir

    async def write_many(self, writes: list[Write]) -> list[Exception | None]:
        return await write_each(self, writes)  # most land at once in the page cache

    async def read(self, oid: int, offset: int, length: int) -> bytes | bytearray:
        try:
            return await self.store.read(oid, offset, length)
        except ChecksumError as e:
            # One copy, and it rotted: an I/O error, never the bad bytes.
            log.error("%s; there is no other copy to repair it from", e)
            raise PoolError(str(e)) from None

    def register_vdi(self, vid: int, copies: int, lease_vid: int | None = None) -> None:
        pass  # one copy of everything

    def set_generation(self, vid: int, generation: int | None) -> None:
        pass  # one mount per store: no leases

    async def fence(self, vid: int, generation: int) -> None:
        pass

    async def space(self) -> PoolSpace:
        total, free = await self.store.space()
        return PoolSpace(total, free, 1)

    def io_stats(self) -> dict[str, int]:
        return self.store.io_stats()

    def cluster_map(self) -> None:
        return None

    def round_trips(self) -> dict[str, OpStats]:
        return {}

    def cache_status(self) -> None:
        return None  # the pool is local already

    async def aclose(self) -> None:
        await self.store.close_cleanly()
        self.store.close()


async def open_embedded(store_path: str, nursery: trio.Nursery) -> Catalog:
    """The catalog of the embedded pool in `store_path`: opens the store,
    starts its checksum task in `nursery`, and keeps the directory in the
    file registers `meta/directory` (the root) and `meta/directory.K` (the
    parts) of the store."""
    store = ObjectStore(store_path)
    await trio.to_thread.run_sync(store.open)
    nursery.start_soon(store.keep_checksums_durable)
    meta = os.path.join(store_path, "meta")
    await trio.to_thread.run_sync(lambda: os.makedirs(meta, mode=0o700, exist_ok=True))
    return Catalog(LocalPool(store), DirectoryService(file_registers(meta)))


def file_registers(meta: str) -> Callable[[str], FileRegister]:
    """The registers of the embedded pool: key `directory/K` in file `directory.K` of `meta`."""
    return lambda key: FileRegister(os.path.join(meta, key.replace("/", ".")))
