"""The data plane: the `obj.*` requests and the lease fences that guard writes.

Every request is checked in one place, at the top of its handler (types and
ranges, with `vdifs.wire.args`); then a change passes the gate, the epoch
check and the fence before it touches the store. Reads and writes are the
hot path: no locks, tasks or cancel scopes per request, and an object this
peer lacks or holds rotten is recovered only when the store says so.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from typing import Any

import msgpack
import trio

from vdifs.errors import ChecksumError, InvalidArgument, ObjectNotFound, VdifsError
from vdifs.fsutil import atomic_write
from vdifs.model.cluster import ClusterMap
from vdifs.model.ids import MAX_VID, OBJECT_SIZE, vid_of
from vdifs.model.placement import placement
from vdifs.peer.recovery import Recovery
from vdifs.peer.state import PeerState
from vdifs.store.files import DIRECT_MIN
from vdifs.store.objects import INLINE_WRITE_MAX
from vdifs.wire import args as arg
from vdifs.wire import objlist
from vdifs.wire.rpc import ESTALE_EPOCH, NOT_NOW, RemoteError, Session

log = logging.getLogger("vdifs.peer")

#: offsets, lengths and sizes: within one object (plus slack), as always accepted
SPAN = 1 << 23
#: how many objects' "do we serve its reads" answers are remembered per epoch
READERS_KEPT = 1 << 16
#: the largest epoch or lease generation (both count up from 0 or 1 in a signed 64-bit range)
COUNTER_MAX = (1 << 63) - 1
#: data vids one lease.fence may name beside the lease's own
FENCE_ALSO_MAX = 1024
#: writes one obj.writev may carry (their bytes are bounded by the frame)
WRITEV_MAX = 256
#: where `writev_now` leaves the index of the first write it did not do, for
#: `h_writev` (not a string: no key a request can carry)
_WRITTEN_NOW: Any = object()

Write = tuple[int, int, memoryview]  # (oid, offset, data) of one write of an obj.writev


def _sha256_hex(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


class DataPlane:
    def __init__(self, peer: PeerState, recovery: Recovery) -> None:
        self.peer = peer
        self.store = peer.store
        self.recovery = recovery
        self.fences: dict[int, int] = {}  # vid -> lowest lease generation still allowed to write
        self._fence_lock = trio.Lock()
        self._changing: dict[int, int] = {}  # epoch -> object changes admitted at it and still running
        self._landed: trio.Event | None = None  # set when an epoch's last change lands, if anyone waits
        self._reads_here: dict[int, bool] = {}  # oid -> whether mounts read it from us, at _reads_epoch
        self._reads_epoch = -1
        self.bytes_read = 0  # object bytes served to reads (mounts and peers)

    def load_fences(self) -> None:
        """Read the durable fences (blocking I/O)."""
        path = os.path.join(self.peer.meta_dir, "fences")
        if os.path.exists(path):
            with open(path, "rb") as f:
                self.fences = {int(k): int(v) for k, v in msgpack.unpackb(f.read(), strict_map_key=False).items()}

    # -- checks every change passes -------------------------------------------------------

    async def check_epoch(self, epoch: int) -> None:
        """Refuse an older epoch (with our map); adopt the newer map first if
        the sender is ahead of us."""
        cmap = self.peer.need_map()
        if epoch < cmap.epoch:
            raise RemoteError(ESTALE_EPOCH, {"message": f"stale epoch {epoch} < {cmap.epoch}",
                                             "map": cmap.to_dict()})
        if epoch > cmap.epoch:
            await self.peer.refresh_map()
            chosen = self.peer.need_map().epoch
            if epoch > chosen:  # no map consensus chose: a client's invention
                raise InvalidArgument(f"epoch {epoch} is newer than the cluster's ({chosen})")

    def check_fence(self, oid: int, gen: int | None, lvid: int | None) -> None:
        """Refuse a write whose lease generation is below the fence of the
        object's own vid, or of the lease's vid the client names (`lvid`):
        naming a vid can only make the check stricter. Mounts fence a VDI's
        data vids with its lease's vid (`lease.fence` "also")."""
        if gen is None:
            return  # embedded-style or shared VDI: no lease
        vid = vid_of(oid)
        floor = self.fences.get(vid, 0)
        if lvid is not None and self.fences.get(lvid, 0) > floor:
            vid, floor = lvid, self.fences[lvid]
        if gen < floor:
            raise VdifsError(f"vid {vid} is fenced at lease generation {floor}; "
                             f"a write of generation {gen} is refused", code=errno.EPERM)

    @staticmethod
    def _stamp(args: dict[str, Any]) -> tuple[int, int | None, int | None]:
        """(epoch, lease generation, lease vid) a change carries."""
        return (arg.integer(args, "epoch", 0, COUNTER_MAX), arg.integer(args, "gen", 0, COUNTER_MAX, default=None),
                arg.integer(args, "lvid", 1, MAX_VID, default=None))

    def _map_now(self, epoch: int) -> ClusterMap | None:
        """Our map, if a request stamped `epoch` can be served without a
        wait (the gate open, the sender's epoch ours); else None."""
        cmap = self.peer.cmap
        if self.peer.catching_up or cmap is None or epoch != cmap.epoch:
            return None
        return cmap

    async def _mutation(self, args: dict[str, Any], oid: int) -> None:
        """What every change of an object passes first: the gate, the epoch and
        the lease fence; then it is journaled."""
        epoch, gen, lvid = self._stamp(args)
        await self.peer.caught_up()
        await self.check_epoch(epoch)
        self.check_fence(oid, gen, lvid)
        assert self.peer.cmap is not None
        self.peer.journal.record(self.peer.cmap.epoch, oid)  # before the change: a returning peer must learn of it

    @staticmethod
    def _placed_range(args: dict[str, Any]) -> tuple[int, int, int]:
        """(oid, offset, length) of a read, inside one object: the reply must fit a frame."""
        oid = arg.integer(args, "oid")
        offset, length = arg.integer(args, "offset", 0, OBJECT_SIZE), arg.integer(args, "length", 0, OBJECT_SIZE)
        if offset + length > OBJECT_SIZE:
            raise InvalidArgument(f"offset {offset} + length {length} runs past the {OBJECT_SIZE} byte object")
        return oid, offset, length

    @staticmethod
    def _placed_data(args: dict[str, Any]) -> tuple[int, int, bytes | bytearray]:
        """(oid, offset, data) of a write, with the data inside one object."""
        oid = arg.integer(args, "oid")
        offset = arg.integer(args, "offset", 0, SPAN)
        data = arg.blob(args, "data")
        if offset + len(data) > OBJECT_SIZE:
            raise InvalidArgument(f"offset {offset} + {len(data)} bytes runs past the {OBJECT_SIZE} byte object")
        return oid, offset, data

    @staticmethod
    def _placed_writes(args: dict[str, Any]) -> list[Write]:
        """The writes of an obj.writev, each inside one object; all of them
        are checked before any is made."""
        oids = arg.int_list(args, "oids", max_items=WRITEV_MAX)
        offsets = arg.int_list(args, "offsets", 0, OBJECT_SIZE, max_items=WRITEV_MAX)
        lengths = arg.int_list(args, "lengths", 1, OBJECT_SIZE, max_items=WRITEV_MAX)
        data = memoryview(arg.blob(args, "data"))
        if not len(oids) == len(offsets) == len(lengths):
            raise InvalidArgument(f"{len(oids)} oids, {len(offsets)} offsets and {len(lengths)} lengths")
        if sum(lengths) != len(data):
            raise InvalidArgument(f"the lengths add up to {sum(lengths)} bytes, the data is {len(data)}")
        writes = []
        at = 0
        for oid, offset, length in zip(oids, offsets, lengths):
            if offset + length > OBJECT_SIZE:
                raise InvalidArgument(f"offset {offset} + {length} bytes runs past the {OBJECT_SIZE} byte object")
            writes.append((oid, offset, data[at:at + length]))
            at += length
        return writes

    async def _epoch_if_sent(self, args: dict[str, Any]) -> None:
        epoch = arg.integer(args, "epoch", 0, COUNTER_MAX, default=None)
        if epoch is not None:
            await self.check_epoch(epoch)

    # Every change is counted while it runs, under the epoch it was admitted
    # at: a peer recovering at a newer epoch copies an object from us only
    # after the changes admitted under older epochs have landed (else its
    # copy could miss a write its writer saw succeed here). On the hot path:
    # a dict update per change, and an Event only while someone waits.

    def _admit(self) -> int:
        assert self.peer.cmap is not None
        epoch = self.peer.cmap.epoch
        self._changing[epoch] = self._changing.get(epoch, 0) + 1
        return epoch

    def _land(self, epoch: int) -> None:
        left = self._changing[epoch] - 1
        if left:
            self._changing[epoch] = left
            return
        del self._changing[epoch]
        if self._landed is not None:
            self._landed.set()
            self._landed = None

    async def _older_changes_landed(self, epoch: int) -> None:
        while any(e < epoch for e in self._changing):
            if self._landed is None:
                self._landed = trio.Event()
            await self._landed.wait()

    # -- request handlers --------------------------------------------------------------------

    async def h_read(self, args: dict[str, Any], s: Session) -> bytes | bytearray:
        oid, offset, length = self._placed_range(args)
        epoch = arg.integer(args, "epoch", 0, COUNTER_MAX)
        await self.peer.caught_up()
        await self.check_epoch(epoch)
        data = await self.recovery.recovering_first(oid, lambda: self.store.read(oid, offset, length))
        self.bytes_read += len(data)
        return data

    # The fast forms of obj.read and obj.write (RpcServer's `fast`): the same
    # checks in the same order, run in the connection's reader without a task,
    # for the common case where nothing needs a wait: the gate is open, the
    # sender's epoch is ours, and the store can act at once. Anything else is
    # NOT_NOW, and the handlers above run as usual (they check again).

    def read_now(self, args: dict[str, Any], s: Session) -> Any:
        oid, offset, length = self._placed_range(args)
        if self._map_now(arg.integer(args, "epoch", 0, COUNTER_MAX)) is None:
            return NOT_NOW
        data = self.store.read_now(oid, offset, length)
        if data is None:
            return NOT_NOW
        self.bytes_read += len(data)
        return data

    def write_now(self, args: dict[str, Any], s: Session) -> Any:
        """A write that lands at once needs no admission count: nothing can
        wait for it to land."""
        oid, offset, data = self._placed_data(args)
        if len(data) > INLINE_WRITE_MAX:
            return NOT_NOW  # never inline: spare the checks the handler makes again
        epoch, gen, lvid = self._stamp(args)
        cmap = self._map_now(epoch)
        if cmap is None:
            return NOT_NOW
        self.check_fence(oid, gen, lvid)
        self.peer.journal.record(cmap.epoch, oid)  # before the change, as in _mutation
        return None if self.store.write_now(oid, offset, data) else NOT_NOW

    def writev_now(self, args: dict[str, Any], s: Session) -> Any:
        """`write_now` for each write of an obj.writev, in order, until one
        cannot be done at once: `h_writev` then does the rest."""
        writes = self._placed_writes(args)
        epoch, gen, lvid = self._stamp(args)
        cmap = self._map_now(epoch)
        if cmap is None:
            return NOT_NOW
        for oid, _, _ in writes:
            self.check_fence(oid, gen, lvid)
        journal, write_now = self.peer.journal, self.store.write_now
        for i, (oid, offset, data) in enumerate(writes):
            journal.record(cmap.epoch, oid)  # before the change, as in _mutation
            if len(data) > INLINE_WRITE_MAX or not write_now(oid, offset, data):
                args[_WRITTEN_NOW] = i
                return NOT_NOW
        return None

    def _cache(self, oid: int, nbytes: int) -> bool:
        """Whether a write should stay in our page cache: small ones always;
        large ones only where mounts read the object, its first replica. The
        other replicas write them past the cache (`files.DIRECT_MIN`): a
        host's page cache then holds one copy of such data, not three, and
        no fresh page is spent on data no one reads from there (dear on VMs
        that give free memory back to their host; design change 65). The
        price: a random write that follows on such a replica takes a fresh
        page where it would have found one (`vdifs peer
        --cached-replica-writes` keeps them all cached)."""
        if nbytes < DIRECT_MIN or not self.store.direct:
            return True
        cmap = self.peer.need_map()
        if cmap.epoch != self._reads_epoch or len(self._reads_here) >= READERS_KEPT:
            self._reads_here.clear()
            self._reads_epoch = cmap.epoch
        here = self._reads_here.get(oid)
        if here is None:
            first = placement(cmap, oid, 1)  # the first replica does not depend on the copies
            here = self._reads_here[oid] = first == [self.peer.peer_id]
        return here

    async def h_write(self, args: dict[str, Any], s: Session) -> None:
        oid, offset, data = self._placed_data(args)
        await self._mutation(args, oid)
        cache = self._cache(oid, len(data))
        epoch = self._admit()
        try:
            await self.recovery.recovering_first(oid, lambda: self.store.write(oid, offset, data, cache),
                                                 admitted=epoch)
        finally:
            self._land(epoch)

    async def h_writev(self, args: dict[str, Any], s: Session) -> None:
        """Several writes in one request (a mount's batch: the writes an NBD
        client sent together), each as obj.write makes it; they pass the
        same checks, all before the first is made. Those `writev_now` made
        already are not made again. The writes run side by side (a request
        puts no order among its writes); the first failure is the answer,
        and the mount then makes every write of the request again, one by
        one (writing the same bytes twice is harmless)."""
        writes = self._placed_writes(args)
        epoch, gen, lvid = self._stamp(args)
        await self.peer.caught_up()
        await self.check_epoch(epoch)
        for oid, _, _ in writes:
            self.check_fence(oid, gen, lvid)
        assert self.peer.cmap is not None
        for oid, _, _ in writes:
            self.peer.journal.record(self.peer.cmap.epoch, oid)
        rest = writes[args.get(_WRITTEN_NOW, 0):]
        admitted = self._admit()
        failures: list[Exception] = []

        async def one(oid: int, offset: int, data: memoryview) -> None:
            try:
                await self.recovery.recovering_first(
                    oid, lambda: self.store.write(oid, offset, data, self._cache(oid, len(data))), admitted=admitted)
            except Exception as e:
                failures.append(e)

        try:
            if len(rest) == 1:
                await one(*rest[0])
            else:
                async with trio.open_nursery() as nursery:
                    for w in rest:
                        nursery.start_soon(one, *w)
        finally:
            self._land(admitted)
        if failures:
            raise failures[0]

    async def h_create(self, args: dict[str, Any], s: Session) -> None:
        oid, offset, data = self._placed_data(args)
        size = arg.integer(args, "size", 0, SPAN)
        if not offset + len(data) <= size <= OBJECT_SIZE:
            raise InvalidArgument(f"object size {size} must hold the data and be at most {OBJECT_SIZE}")
        exclusive = arg.flag(args, "exclusive")
        await self._mutation(args, oid)
        cache = self._cache(oid, len(data))
        epoch = self._admit()
        try:
            await self.store.create(oid, offset, data, size, exclusive=exclusive, cache=cache)
        finally:
            self._land(epoch)

    async def h_delete(self, args: dict[str, Any], s: Session) -> None:
        oid = arg.integer(args, "oid")
        await self._mutation(args, oid)
        epoch = self._admit()
        try:
            await self.recovery.deleting(oid, lambda: self.store.delete(oid))
        finally:
            self._land(epoch)

    async def h_collect(self, args: dict[str, Any], s: Session) -> bool:
        """Delete a leaked object unless it changed in the last `older_than`
        seconds (`cluster check --repair`); True if it was deleted."""
        oid = arg.integer(args, "oid")
        older_than = arg.integer(args, "older_than", 0, 1 << 32)  # seconds
        await self._mutation(args, oid)
        epoch = self._admit()
        try:
            return await self.recovery.deleting(oid, lambda: self.store.collect(oid, older_than))
        finally:
            self._land(epoch)

    async def h_sync(self, args: dict[str, Any], s: Session) -> None:
        oids = arg.int_list(args, "oids", max_items=1 << 40)  # no limit but the frame's
        await self.store.sync(oids)

    async def h_list(self, args: dict[str, Any], s: Session) -> dict[str, Any]:
        """One page of the object ids of a vid (`vid`) or of several (`vids`:
        recovery asks each peer once for every live VDI, not once per VDI),
        after `after`: a 4 TiB VDI has a million objects, more than one frame
        holds, so lists come in pages."""
        if "vids" in args:
            vids = arg.int_list(args, "vids", 1, MAX_VID, max_items=objlist.VIDS_PER_LIST)
        else:
            vids = [arg.integer(args, "vid", 1, MAX_VID)]
        kind = arg.integer(args, "kind", 0, 255, default=None)
        handoff = arg.flag(args, "handoff")
        after = arg.integer(args, "after", default=None)
        limit = arg.integer(args, "limit", 1, objlist.LIST_PAGE, default=None)
        await self._epoch_if_sent(args)
        # recovery (handoff): what was handed off here is still to be copied
        oids = await self.store.list_objects_of(vids, kind, handoff=handoff)
        return objlist.page(oids, after, limit)

    async def h_vids(self, args: dict[str, Any], s: Session) -> list[int]:
        return await self.store.list_vids()

    async def h_finish_vid(self, args: dict[str, Any], s: Session) -> None:
        vid = arg.integer(args, "vid", 1, MAX_VID)
        await self._epoch_if_sent(args)
        await self.store.remove_vid_dir(vid)
        await self.store.sync([])

    async def h_fence(self, args: dict[str, Any], s: Session) -> int:
        """From now on refuse writes to vid, and to the data vids named in
        `also` (those the lease guards), from generations below gen (durable
        first). Answers vid's fence."""
        vid, gen = arg.integer(args, "vid", 1, MAX_VID), arg.integer(args, "gen", 0, COUNTER_MAX)
        also = arg.int_list(args, "also", 1, MAX_VID, max_items=FENCE_ALSO_MAX) if "also" in args else []
        async with self._fence_lock:
            raised = [v for v in [vid, *also] if gen > self.fences.get(v, 0)]
            if raised:
                fences = {**self.fences, **{v: gen for v in raised}}
                await trio.to_thread.run_sync(atomic_write, os.path.join(self.peer.meta_dir, "fences"),
                                              msgpack.packb(fences))
                self.fences = fences
                log.info("vid %d fenced at lease generation %d%s", vid, gen,
                         f" (with data vids {', '.join(map(str, also))})" if also else "")
            return self.fences.get(vid, 0)

    async def h_fetch(self, args: dict[str, Any], s: Session) -> bytes | bytearray:
        """A whole object, for a peer that recovers it; with `handoff`, also a
        copy this peer handed off (when no peer serves the object any more)."""
        oid = arg.integer(args, "oid")
        handoff = arg.flag(args, "handoff")
        younger_than = arg.integer(args, "younger_than", 0, 1 << 32, default=None)  # seconds
        epoch = arg.integer(args, "epoch", 0, COUNTER_MAX, default=None)
        await self.peer.caught_up()  # never hand out a copy that may be stale
        if epoch is not None:  # recovery at that epoch: older writes must have landed first
            await self.check_epoch(epoch)
            await self._older_changes_landed(epoch)
        try:
            return await self.store.read_all(oid)
        except ObjectNotFound:
            if not handoff:
                raise
        return await self.store.read_handoff(oid, younger_than)

    async def h_digest(self, args: dict[str, Any], s: Session) -> dict[str, str | None]:
        """sha256 of whole objects (for `cluster check`), keyed by the oid in hex
        (frames only carry string keys); None for a missing one."""
        oids = arg.int_list(args, "oids", max_items=1024)
        out: dict[str, str | None] = {}
        for oid in oids:
            try:
                data = await self.store.read_all(oid)
            except ObjectNotFound:
                out[f"{oid:016x}"] = None
                continue
            except ChecksumError as e:
                out[f"{oid:016x}"] = f"corrupt: {e}"  # never equal to a good replica's digest
                continue
            out[f"{oid:016x}"] = await trio.to_thread.run_sync(_sha256_hex, data)
        return out

    async def h_pull(self, args: dict[str, Any], s: Session) -> int:
        """Replace our copy of an object with the one `source` holds (repair)."""
        oid, source = arg.integer(args, "oid"), arg.text(args, "source")
        assert self.peer.rpc is not None
        data = await self.peer.rpc.call(source, "obj.fetch", {"oid": oid}, timeout=60)
        await self.store.install(oid, data)  # durable and whole before we say so
        log.warning("object %016x replaced by the copy on %s (repair)", oid, source)
        return len(data)
