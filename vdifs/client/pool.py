"""The object-pool interface: everything the mount needs from storage.

The mount (volumes, catalog, FUSE) only ever talks to an `ObjectPool`. The
embedded single-node pool (`client.local.LocalPool`) runs an `ObjectStore`
in the mount's own process; the cluster (`client.remote.RemotePool`) puts
remote, replicated peers behind the same interface.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from vdifs.model.cluster import ClusterMap
from vdifs.model.directory import Directory
from vdifs.model.iostats import OpStats


#: One write of `ObjectPool.write_many`: (oid, offset, data).
Write = tuple[int, int, bytes | bytearray | memoryview]


async def write_each(pool: ObjectPool, writes: list[Write]) -> list[Exception | None]:
    """`write_many` as one `write` after another, for pools whose writes
    gain nothing from going together."""
    results: list[Exception | None] = []
    for oid, offset, data in writes:
        try:
            await pool.write(oid, offset, data)
        except Exception as e:
            results.append(e)
        else:
            results.append(None)
    return results


@dataclass(frozen=True)
class PoolSpace:
    total: int  # usable bytes, already divided by the copies
    free: int
    copies: int


class ObjectPool(Protocol):
    @property
    def max_copies(self) -> int:
        """The most copies a VDI can ask for (the number of peers that are up)."""

    @property
    def default_copies(self) -> int: ...

    def register_vdi(self, vid: int, copies: int, lease_vid: int | None = None) -> None:
        """Tell the pool how many copies the objects of (data) vid `vid` have,
        and whose lease guards writes to them (a VDI's data vid changes at
        each snapshot; its lease, keyed by its vid, does not)."""

    def set_generation(self, vid: int, generation: int | None) -> None:
        """The lease generation our writes to vid carry (None: no lease)."""

    async def fence(self, vid: int, generation: int) -> None:
        """Make every peer refuse writes to vid below `generation`."""

    async def read(self, oid: int, offset: int, length: int) -> bytes | bytearray:
        """`length` bytes at `offset` (zeros past what was written); ObjectNotFound if absent."""

    def read_now(self, oid: int, offset: int, length: int) -> bytes | bytearray | None:
        """`read`, if it can be answered without waiting (no await at all);
        else None, and `read` must be used."""

    async def write(self, oid: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write into an existing object; ObjectNotFound if it does not exist."""

    def write_now(self, oid: int, offset: int, data: bytes | bytearray | memoryview) -> bool:
        """`write`, if it can be done without waiting (no await at all);
        else False, nothing was written, and `write` must be used."""

    async def write_many(self, writes: list[Write]) -> list[Exception | None]:
        """Several `write`s at once, each into an existing object: one
        result per write, None or what it failed with (ObjectNotFound as
        `write` raises it). They may go to the storage together (the
        cluster: one request per replica for the lot)."""

    async def create(self, oid: int, offset: int, data: bytes | bytearray | memoryview, size: int,
                     exclusive: bool = False) -> None:
        """Create or replace the object whole: zeros except `data` at `offset`.
        `exclusive`: raise ObjectExists rather than replace (on any replica)."""

    async def delete(self, oid: int) -> None:
        """Remove an object; a missing object is not an error."""

    async def sync(self, oids: Iterable[int]) -> None:
        """Return only when the named objects are durable."""

    async def list_vids(self) -> list[int]:
        """vids that have at least one object in the pool."""

    async def list_objects(self, vid: int, kind: int | None = None) -> list[int]:
        """All object ids of one VDI (optionally of one kind), sorted."""

    async def finish_vid(self, vid: int) -> None:
        """Tidy up after the last object of a vid was deleted."""

    async def space(self) -> PoolSpace: ...

    def io_stats(self) -> dict[str, int]:
        """Counters for `status`: how the pool's I/O was carried out."""

    def cache_status(self) -> dict[str, Any] | None:
        """The local object cache's size, use and counters (None: no cache)."""

    def cluster_map(self) -> ClusterMap | None:
        """The cluster map requests go by (None: the embedded pool)."""

    def round_trips(self) -> dict[str, OpStats]:
        """Round trips to each peer so far, by address (empty: no peers)."""

    async def aclose(self) -> None: ...


def register_data_vids(pool: ObjectPool, directory: Directory, family: int) -> None:
    """Tell the pool the copies of every data vid a map of `family` may
    point at (a clone's ancestors may keep fewer or more copies than the
    clone). One family, not the whole directory: a create at 2,000 VDIs
    spent a quarter of its time listing every data vid."""
    for vid, copies in directory.copies_in_family(family).items():
        pool.register_vdi(vid, copies)
