"""The replicated object pool: objects on the peers that placement names.

Reads go to the first replica that answers (failover on error or timeout);
writes, creates and deletes go to every replica in parallel and succeed only
when all of them did; `sync` asks each replica involved to make its objects
durable. Every data request carries our map's epoch: a peer with a newer map
refuses it and sends its map, and we retry against the new placement.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import secrets
import socket
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from vdifs.client.cache import TTL, ObjectCache
from vdifs.client.cached_pool import CachingPool
from vdifs.client.catalog import Catalog
from vdifs.client.pool import PoolSpace, Write
from vdifs.client.reach import RoutedRpc
from vdifs.errors import NoSpace, ObjectExists, ObjectNotFound, PoolError, VdifsError
from vdifs.meta.consensus import MetaClient
from vdifs.meta.credentials import Credentials, default_secret_file, read_credentials
from vdifs.meta.directory_service import DirectoryService
from vdifs.meta.lease import DEFAULT_TERM, LeaseManager, lease_key
from vdifs.model.cluster import ClusterMap
from vdifs.model.ids import unpack_oid
from vdifs.model.iostats import OpStats
from vdifs.model.placement import placement
from vdifs.wire import objlist
from vdifs.wire.rpc import ESTALE_EPOCH, PEER, PeerUnavailable, RemoteError, RpcPool

log = logging.getLogger(__name__)

T = TypeVar("T")
DATA_TIMEOUT = 30.0
STALE_RETRIES = 5
#: How long a write waits for the cluster to replace an unreachable replica.
REPLICA_WAIT = 60.0
#: How often the mount reads the cluster map: a write stuck on a hung replica
#: continues once the map that marks it down is seen, so this is part of the pause.
MAP_POLL_SECONDS = 1.0
PLACEMENTS_KEPT = 1 << 16  # objects whose replicas are remembered (about 10 MiB)


class _StaleMap(Exception):
    """A peer refused our epoch as stale, saying it knows `epoch`."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"a peer knows epoch {epoch}")
        self.epoch = epoch


class _NotYet(Exception):
    """A replica cannot answer for an object yet (it is recovering it, or lacks
    it while the others have it): try again shortly, within --io-wait."""


#: seconds between tries of a request a replica could not answer yet
NOT_YET_RETRY = 0.5


class _ReplicaDown(Exception):
    """A replica did not answer: wait for the map that leaves it out."""

    def __init__(self, epoch: int, error: Exception) -> None:
        super().__init__(str(error))
        self.epoch = epoch
        self.error = error


#: writes, and bytes, one obj.writev carries at most (a frame holds an object and some)
WRITEV_WRITES = 256
WRITEV_BYTES = 1 << 20


def _requests_of(which: list[int], writes: list[Write]) -> list[list[int]]:
    """`which` (indexes into `writes`) cut into the obj.writev requests that carry them."""
    out: list[list[int]] = [[]]
    size = 0
    for i in which:
        n = len(writes[i][2])
        if out[-1] and (len(out[-1]) >= WRITEV_WRITES or size + n > WRITEV_BYTES):
            out.append([])
            size = 0
        out[-1].append(i)
        size += n
    return out


class RemotePool:
    def __init__(self, seeds: list[str], creds: Credentials, nursery: trio.Nursery, node_id: str, *,
                 io_wait: float = REPLICA_WAIT, encrypt: bool = False) -> None:
        self.io_wait = io_wait
        self.seeds = list(seeds)
        self.creds = creds
        self.nursery = nursery
        wire = RpcPool(creds.client_key(), nursery, cluster_id=creds.cluster_id, encrypt=encrypt)
        self.meta = MetaClient(node_id, wire, [])  # consensus needs a majority, never a relay
        # the data path, around peers cut off from us (pinged on connections of their own)
        probes = RpcPool(creds.client_key(), nursery, cluster_id=creds.cluster_id, encrypt=encrypt)
        self.rpc = RoutedRpc(wire, lambda: self.cmap, probes)
        self.cmap: ClusterMap | None = None
        self.vid_copies: dict[int, int] = {}
        self.vid_generation: dict[int, int] = {}
        self.vid_lease: dict[int, int] = {}  # data vid -> the vid whose lease guards it
        self._placed: dict[tuple[int, int], list[str]] = {}  # (oid, copies) -> replica addresses
        self._placed_epoch = -1  # the epoch of the map those were placed in
        self.writes_together = 0  # writes sent in obj.writev requests (`write_many`)
        self.write_batches = 0  # `write_many` calls
        self.writes_again = 0  # of those, sent again one by one (see `write_many`)
        self._map_read: trio.Event | None = None  # set when the read of the map under way ends (`_read_map`)
        self._map_read_began = -math.inf  # trio time that read began
        self.map_reads = 0  # reads of the map through consensus (`_read_map`)
        self._continued_epoch = 0  # the newest map requests waited for and went on with (logged once)

    # -- the map -----------------------------------------------------------------------

    async def connect(self) -> ClusterMap:
        errors = []
        for seed in self.seeds:
            try:
                cmap = ClusterMap.from_dict(await self.rpc.call(seed, "cluster.map", timeout=10))
            except VdifsError as e:
                errors.append(f"{seed}: {e}")
                continue
            self._adopt(cmap)
            self.nursery.start_soon(self._watch_map)
            self.nursery.start_soon(self.rpc.probe_forever)
            return cmap
        raise PoolError("no cluster peer answered: " + "; ".join(errors))

    @property
    def map(self) -> ClusterMap:
        if self.cmap is None:
            raise PoolError("not connected to a cluster")
        return self.cmap

    def _adopt(self, cmap: ClusterMap) -> bool:
        if self.cmap is not None and cmap.epoch <= self.cmap.epoch:
            return False
        if cmap.cluster_id != self.creds.cluster_id:
            return False
        if self.cmap is not None:
            log.info("cluster map epoch %d -> %d", self.cmap.epoch, cmap.epoch)
            self._drop_departed(self.cmap, cmap)
        self.cmap = cmap
        self.meta.set_meta(cmap.meta_addresses())
        return True

    def _drop_departed(self, old: ClusterMap, new: ClusterMap) -> None:
        """Close our connections to the peers `new` no longer counts as up.

        A peer that hangs (SIGSTOP, a dead link) keeps its TCP connection
        open: the requests in flight to it, and a send stuck behind its full
        socket buffer, would wait out their timeouts (30 s) although the
        cluster has already replaced it. Closing the connection fails them
        at once (PeerUnavailable), and the caller retries on this map."""
        for p in old.no_longer_up(new):
            log.warning("peer %s at %s is no longer up in epoch %d: its requests in flight go to the "
                        "new placement", p.peer_id, p.address, new.epoch)
            self.rpc.drop_soon(p.address)

    async def _watch_map(self) -> None:
        async def adopt(cmap: ClusterMap) -> None:
            self._adopt(cmap)

        await self.meta.follow_map(adopt, lambda: self.cmap.epoch if self.cmap else 0, interval=lambda: MAP_POLL_SECONDS)

    @property
    def max_copies(self) -> int:
        return len(self.map.up_peers())

    @property
    def default_copies(self) -> int:
        return self.map.copies

    def register_vdi(self, vid: int, copies: int, lease_vid: int | None = None) -> None:
        self.vid_copies[vid] = copies
        if lease_vid is not None and lease_vid != vid:
            self.vid_lease[vid] = lease_vid

    def set_generation(self, vid: int, generation: int | None) -> None:
        if generation is None:
            self.vid_generation.pop(vid, None)
        else:
            self.vid_generation[vid] = generation

    def _gen(self, oid: int) -> dict[str, int]:
        vid = unpack_oid(oid)[1]
        lease_vid = self.vid_lease.get(vid, vid)
        gen = self.vid_generation.get(lease_vid)
        if gen is None:
            return {}
        return {"gen": gen} if lease_vid == vid else {"gen": gen, "lvid": lease_vid}

    async def fence(self, vid: int, generation: int) -> None:
        """Every peer in the map must take the fence: any of them may hold the VDI's objects.
        The data vids this lease guards are fenced with it, so a peer checks a
        write against its object's own vid, whatever lease vid it names."""
        also = sorted(d for d, lease in self.vid_lease.items() if lease == vid)
        await self._everywhere("lease.fence", {"vid": vid, "gen": generation, **({"also": also} if also else {})})

    def _targets(self, oid: int, cmap: ClusterMap) -> list[str]:
        """The addresses of an object's replicas in `cmap`, remembered per
        epoch: hashing the ring on every request cost 5% of a read."""
        vid = unpack_oid(oid)[1]
        copies = self.vid_copies.get(vid)
        if copies is None:  # e.g. a deleted VDI being purged: every peer may hold it
            return [p.address for p in cmap.up_peers()]
        if self._placed_epoch != cmap.epoch or len(self._placed) >= PLACEMENTS_KEPT:
            self._placed.clear()
            self._placed_epoch = cmap.epoch
        key = (oid, copies)
        targets = self._placed.get(key)
        if targets is None:
            targets = self._placed[key] = [cmap.peers[p].address for p in placement(cmap, oid, copies)]
        return list(targets)

    # -- calls ---------------------------------------------------------------------------

    async def _call(self, address: str, op: str, args: dict[str, Any], epoch: int,
                    timeout: float = DATA_TIMEOUT) -> Any:
        """One request stamped with `epoch`: the epoch of the map its targets came
        from, never a newer one adopted meanwhile (that would let a peer that is
        no longer a replica accept it)."""
        args["epoch"] = epoch
        try:
            return await self.rpc.call(address, op, args, timeout=timeout)
        except RemoteError as e:
            stale = self._stale(e)
            if stale is not None:
                raise stale from None
            raise

    def _stale(self, error: RemoteError) -> _StaleMap | None:
        """A refusal for a stale epoch, with the epoch the peer claims. Its map
        is not adopted as sent: `_catch_up` reads the one consensus chose."""
        if error.errno == ESTALE_EPOCH and isinstance(error.result, dict):
            sent = error.result.get("map")
            epoch = sent.get("epoch") if isinstance(sent, dict) else None
            return _StaleMap(epoch if type(epoch) is int else self.map.epoch + 1)
        return None

    async def _catch_up(self, claimed: int) -> None:
        """A peer says a map newer than ours exists: adopt the map the cluster
        register holds (never one a peer or client made up)."""
        if claimed <= self.map.epoch:
            return
        try:
            await self._read_map(trio.current_time(), lambda: self.map.epoch >= claimed)
        except VdifsError as e:
            log.info("could not read the cluster map to confirm epoch %d: %s", claimed, e)

    async def _read_map(self, since: float, enough: Callable[[], bool]) -> None:
        """Adopt the map the cluster register holds now, read no earlier than
        `since` (trio time), unless `enough()` says the map we have will do.
        Callers share reads: one that began at or after `since` answers them
        all, so a hundred requests waiting for a map cost the meta peers one
        read, not a hundred. A failed read raises in the caller that made it
        only."""
        while True:
            reading = self._map_read
            if reading is not None and self._map_read_began >= since:
                await reading.wait()
                return
            if reading is None:
                break
            await reading.wait()  # began too early for us: wait it out, then read
            if enough():
                return
        self._map_read = reading = trio.Event()
        self._map_read_began = trio.current_time()
        self.map_reads += 1
        try:
            latest = await self.meta.read_map()
        finally:
            reading.set()
            self._map_read = None
        if latest is not None:
            self._adopt(latest)

    async def _with_fresh_map(self, fn: Callable[[ClusterMap], Awaitable[T]]) -> T:
        """Run an attempt against one map; on a stale-epoch refusal, again with the
        newer map; when a replica is unreachable, wait (bounded) for the map that
        replaces it and try again there."""
        stale = 0
        deadline = trio.current_time() + self.io_wait
        while True:
            routes = self.rpc.version
            try:
                return await fn(self.map)
            except _StaleMap as e:
                stale += 1
                if stale >= STALE_RETRIES:
                    raise PoolError("the cluster map kept changing under this request") from None
                await self._catch_up(e.epoch)
            except _NotYet as e:
                if trio.current_time() >= deadline:
                    raise PoolError(f"a replica could not take the request within {self.io_wait:.0f} s: "
                                    f"{e}") from None
                await trio.sleep(NOT_YET_RETRY)
            except _ReplicaDown as e:
                if not await self._wait_for_epoch_after(e.epoch, routes, deadline):
                    raise PoolError(f"a replica is unreachable and the cluster did not replace it "
                                    f"within {self.io_wait:.0f} s: {e.error}") from None

    async def _wait_for_epoch_after(self, epoch: int, routes: int, deadline: float) -> bool:
        """Wait for a map newer than `epoch`, or for a peer of it to be cut off
        from us since the attempt (`routes`: then its requests go through a
        relay, and the attempt is worth another try at once)."""
        while self.map.epoch <= epoch:
            if trio.current_time() >= deadline:  # first: a peer cut off and back, again and again
                return False
            if self.rpc.version != routes:
                log.info("continuing with requests relayed around %s", ", ".join(sorted(self.rpc.cut)) or "nobody")
                return True
            since = trio.current_time()
            await trio.sleep(0.5)
            try:
                await self._read_map(since, lambda: self.map.epoch > epoch)
            except VdifsError:
                continue
        if self.map.epoch > self._continued_epoch:  # once, not once per request that waited
            self._continued_epoch = self.map.epoch
            log.info("continuing with cluster map epoch %d", self.map.epoch)
        return True

    def _writable_targets(self, oid: int, cmap: ClusterMap) -> list[str]:
        """Targets of a write; below min_copies up replicas, wait for the cluster."""
        targets = self._targets(oid, cmap)
        copies = self.vid_copies.get(unpack_oid(oid)[1], cmap.copies)
        need = min(cmap.min_copies, copies)  # a VDI with copies=1 needs its one replica
        if len(targets) < need:
            raise _ReplicaDown(cmap.epoch, PoolError(
                f"only {len(targets)} replicas are up, {need} are needed (min_copies)"))
        return targets

    async def _all(self, targets: list[str], op: str, args: dict[str, Any], epoch: int) -> list[Any]:
        """The op on every target in parallel; all must succeed.

        All requests are queued first and then awaited: in flight together
        without a task each (this runs for every replicated write), and
        sent by each connection's flusher with the others queued in the
        same scheduling pass (`RpcClient.start(soon=True)`)."""
        results: list[Any] = [None] * len(targets)
        errors: list[BaseException] = []
        pending = []
        for i, address in enumerate(targets):
            try:
                pending.append((i, await self.rpc.start(address, op, {**args, "epoch": epoch}, soon=True)))
            except VdifsError as e:
                errors.append(e)
        for i, call in pending:
            try:
                results[i] = await call.finish(DATA_TIMEOUT)
            except RemoteError as e:
                errors.append(self._stale(e) or e)
            except VdifsError as e:
                errors.append(e)
        if errors:
            stale = [e for e in errors if isinstance(e, _StaleMap)]
            if stale:
                raise stale[0]
            down = [e for e in errors if isinstance(e, PeerUnavailable)]
            if down:
                raise _ReplicaDown(epoch, down[0])
            not_yet = [e for e in errors if isinstance(e, RemoteError) and e.errno == errno.EAGAIN]
            if not_yet:
                raise _NotYet(str(not_yet[0]))
            missing = [e for e in errors if isinstance(e, RemoteError) and e.errno == errno.ENOENT]
            if missing and len(missing) == len(targets):
                raise ObjectNotFound(str(missing[0]))
            if missing and len(missing) == len(errors):
                # Some replicas have it, one says it does not (it took the object over
                # and its recovery has not seen the others' copies yet): again, shortly.
                raise _NotYet(f"{op}: {len(missing)} of {len(targets)} replicas lack the object: {missing[0]}")
            existing = [e for e in errors if isinstance(e, RemoteError) and e.errno == errno.EEXIST]
            if existing and len(existing) == len(errors):
                raise ObjectExists(str(existing[0]))
            full = [e for e in errors if isinstance(e, RemoteError) and e.errno in (errno.ENOSPC, errno.EDQUOT)]
            if full:  # the writer sees ENOSPC (QEMU pauses the VM), not an I/O error
                raise NoSpace(f"{op}: the pool is full on {len(full)} of {len(targets)} replicas: {full[0]}")
            raise PoolError(f"{op} failed on {len(errors)} of {len(targets)} replicas: {errors[0]}")
        return results

    # -- the ObjectPool interface ----------------------------------------------------------

    def read_now(self, oid: int, offset: int, length: int) -> None:
        return None  # a read from a peer always waits for its answer

    def write_now(self, oid: int, offset: int, data: bytes | bytearray | memoryview) -> bool:
        return False  # so does a write

    async def read(self, oid: int, offset: int, length: int) -> bytes:
        # The common case first, without the retry machinery around it: the
        # first replica of our map answers. Anything else (a refusal, an
        # unreachable peer) goes the full way below, which fails over, adopts
        # newer maps and waits for replacements.
        cmap = self.map
        targets = self._targets(oid, cmap)
        if not targets or (self.rpc.cut and targets[0] in self.rpc.cut):
            return await self._read_all_ways(oid, offset, length, tried=None)
        first = targets[0]
        try:
            data: bytes = await self.rpc.call(
                first, "obj.read", {"oid": oid, "offset": offset, "length": length, "epoch": cmap.epoch},
                timeout=DATA_TIMEOUT)
            return data
        except RemoteError as e:
            stale = self._stale(e)
            if stale is not None:  # a newer map exists: take it and place again
                await self._catch_up(stale.epoch)
                return await self._read_all_ways(oid, offset, length, tried=None)
            if e.errno != errno.ENOENT:
                log.info("read of %016x failed on %s (%s); trying the next replica", oid, first, e)
            error: Exception = e
        except PeerUnavailable as e:
            log.info("read of %016x failed on %s (%s); trying the next replica", oid, first, e)
            error = e
        return await self._read_all_ways(oid, offset, length, tried=(first, cmap.epoch, error))

    async def _read_all_ways(self, oid: int, offset: int, length: int,
                             tried: tuple[str, int, Exception] | None) -> bytes:
        """A read that failed over: every replica in turn, on the newest map.
        `tried`: the replica already asked at that epoch, and what it said
        (not asked again while the map is the same)."""
        async def attempt(cmap: ClusterMap) -> bytes:
            targets = self._targets(oid, cmap)
            if self.rpc.cut:  # replicas cut off from us last: a relay costs a hop
                targets.sort(key=lambda a: a in self.rpc.cut)
            not_found = 0
            last: Exception | None = None
            for address in targets:
                if tried is not None and (address, cmap.epoch) == tried[:2]:
                    last = tried[2]
                    if isinstance(last, RemoteError) and last.errno == errno.ENOENT:
                        not_found += 1
                    continue
                try:
                    data: bytes = await self._call(address, "obj.read",
                                                   {"oid": oid, "offset": offset, "length": length}, cmap.epoch)
                    return data
                except RemoteError as e:
                    if e.errno == errno.ENOENT:
                        not_found += 1
                        continue
                    last = e
                except PeerUnavailable as e:
                    last = e
                log.info("read of %016x failed on %s (%s); trying the next replica", oid, address, last)
            if not_found == len(targets):
                raise ObjectNotFound(f"object {oid:016x} does not exist")
            if isinstance(last, RemoteError) and last.errno == errno.EAGAIN:
                raise _NotYet(str(last))  # a replica is still recovering it: again, shortly
            raise PoolError(f"no replica of object {oid:016x} could be read: {last}")

        return await self._with_fresh_map(attempt)

    async def write(self, oid: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        args = {"oid": oid, "offset": offset, "data": data, **self._gen(oid)}
        await self._with_fresh_map(lambda m: self._all(self._writable_targets(oid, m), "obj.write", args, m.epoch))

    async def write_many(self, writes: list[Write]) -> list[Exception | None]:
        """The writes bound for each replica go as one obj.writev, all
        replicas' at once: a batch of small writes costs each side one
        frame and one reply per replica, not one per write and replica.
        Whatever goes wrong on the way (a replica down or stale, an object
        missing, a full disk) sends the writes it concerns again one by one
        (`write`, which knows how to wait out each case and says what it
        met); a write made twice writes the same bytes twice."""
        results: list[Exception | None] = [None] * len(writes)
        cmap = self.map
        groups: dict[tuple[str, tuple[tuple[str, int], ...]], list[int]] = defaultdict(list)
        again: set[int] = set()
        for i, (oid, _, _) in enumerate(writes):
            try:
                targets = self._writable_targets(oid, cmap)
            except _ReplicaDown:
                again.add(i)
                continue
            lease = tuple(self._gen(oid).items())  # one VDI's writes share it; a request carries one
            for address in targets:
                groups[address, lease].append(i)
        calls = []
        blobs: dict[tuple[int, ...], bytes] = {}  # replicas that get the same writes share one copy of their bytes
        for (address, lease), every in groups.items():
            for which in _requests_of(every, writes):
                key = tuple(which)
                if key not in blobs:
                    blobs[key] = b"".join(writes[i][2] for i in which)
                args = {"oids": [writes[i][0] for i in which], "offsets": [writes[i][1] for i in which],
                        "lengths": [len(writes[i][2]) for i in which], "data": blobs[key],
                        "epoch": cmap.epoch, **dict(lease)}
                try:
                    calls.append((which, await self.rpc.start(address, "obj.writev", args, soon=True)))
                except VdifsError:
                    again.update(which)
        for which, call in calls:
            try:
                await call.finish(DATA_TIMEOUT)
            except VdifsError:
                again.update(which)
        self.writes_together += len(writes)
        self.write_batches += 1
        self.writes_again += len(again)

        async def alone(i: int) -> None:
            try:
                await self.write(*writes[i])
            except Exception as e:
                results[i] = e

        if again:  # side by side, as they would have gone alone: each may wait (a new map, space, a recovery)
            async with trio.open_nursery() as nursery:
                for i in sorted(again):
                    nursery.start_soon(alone, i)
        return results

    async def create(self, oid: int, offset: int, data: bytes | bytearray | memoryview, size: int,
                     exclusive: bool = False) -> None:
        args = {"oid": oid, "offset": offset, "data": data, "size": size, "exclusive": exclusive, **self._gen(oid)}
        # An exclusive create that meets an existing copy on some replica raises
        # ObjectExists: another mount created it meanwhile, the object now exists
        # on every replica, and the caller writes its data into it.
        await self._with_fresh_map(lambda m: self._all(self._writable_targets(oid, m), "obj.create", args, m.epoch))

    async def delete(self, oid: int) -> None:
        await self._with_fresh_map(
            lambda m: self._all(self._targets(oid, m), "obj.delete", {"oid": oid, **self._gen(oid)}, m.epoch))

    async def sync(self, oids: Iterable[int]) -> None:
        oids = list(oids)

        async def attempt(cmap: ClusterMap) -> None:
            by_peer: dict[str, list[int]] = defaultdict(list)
            for oid in oids:
                for address in self._targets(oid, cmap):
                    by_peer[address].append(oid)
            if not oids:  # a bare sync: make every peer's pending deletes durable
                for p in cmap.up_peers():
                    by_peer[p.address] = []
            errors: list[Exception] = []

            async def one(address: str, group: list[int]) -> None:
                try:
                    await self._call(address, "obj.sync", {"oids": group}, cmap.epoch)
                except VdifsError as e:
                    errors.append(e)

            async with trio.open_nursery() as nursery:
                for address, group in by_peer.items():
                    nursery.start_soon(one, address, group)
            down = [e for e in errors if isinstance(e, PeerUnavailable)]
            if down:  # sync again on the map that replaces it
                raise _ReplicaDown(cmap.epoch, down[0])
            if errors:
                raise PoolError(f"sync failed on {len(errors)} peers: {errors[0]}")

        await self._with_fresh_map(attempt)

    async def _everywhere(self, op: str, args: dict[str, Any]) -> list[Any]:
        return await self._with_fresh_map(
            lambda m: self._all([p.address for p in m.up_peers()], op, args, m.epoch))

    async def _union(self, op: str, args: dict[str, Any]) -> list[int]:
        results = await self._everywhere(op, args)
        return sorted({x for r in results for x in r})

    async def list_vids(self) -> list[int]:
        return await self._union("obj.vids", {})

    async def list_objects(self, vid: int, kind: int | None = None) -> list[int]:
        """Union of the object ids of `vid` on the peers that answer, page by page.

        An unreachable peer is skipped: every object it holds has replicas on
        others, and a peer that returns after being marked down sets its old
        objects aside anyway."""
        found: set[int] = set()
        answered = 0
        for address in [p.address for p in self.map.up_peers()]:
            async def call(args: dict[str, Any], address: str = address) -> dict[str, Any]:
                reply: dict[str, Any] = await self._with_fresh_map(
                    lambda m: self._call(address, "obj.list", args, m.epoch))
                return reply
            try:
                found.update(await objlist.list_all(call, vid, kind))
                answered += 1
            except PeerUnavailable as e:
                log.info("listing vid %d: %s is unreachable; using the other replicas", vid, address)
                log.debug("%s", e)
        if not answered:
            raise PoolError(f"no peer answered a listing of vid {vid}")
        return sorted(found)

    async def finish_vid(self, vid: int) -> None:
        await self._everywhere("obj.finish_vid", {"vid": vid})

    async def space(self) -> PoolSpace:
        infos = await self._everywhere("peer.info", {})
        copies = max(1, self.map.copies)
        return PoolSpace(sum(i["total"] for i in infos) // copies, sum(i["free"] for i in infos) // copies, copies)

    def cache_status(self) -> None:
        return None  # `CachingPool` adds one

    def cluster_map(self) -> ClusterMap:
        return self.map

    def round_trips(self) -> dict[str, OpStats]:
        return self.rpc.round_trips()

    def io_stats(self) -> dict[str, int]:
        return {"epoch": self.map.epoch, "peers_up": len(self.map.up_peers()),
                "peers_cut_off": len(self.rpc.cut), "relayed": self.rpc.relayed,
                "writes_together": self.writes_together, "write_batches": self.write_batches,
                "writes_again": self.writes_again, "map_reads": self.map_reads}

    async def aclose(self) -> None:
        await self.rpc.aclose()


@dataclass
class ClusterAccess:
    """What a mount needs to join a cluster: its seed addresses and secret
    (read when this is made, so a missing secret fails before mounting),
    the lease term, how long a write waits for a replica's replacement, and
    whether its connections are encrypted, and where and how large its
    local object cache is (`cache_size` 0: none)."""

    seeds: list[str]
    creds: Credentials
    lease_term: float = DEFAULT_TERM
    io_wait: float = REPLICA_WAIT
    encrypt: bool = False
    cache_dir: str | None = None
    cache_size: int = 0
    cache_ttl: float = TTL

    @classmethod
    def load(cls, seeds: list[str], secret_file: str | None = None, *, lease_term: float | None = None,
             io_wait: float = REPLICA_WAIT, encrypt: bool = False, cache_dir: str | None = None,
             cache_size: int = 0, cache_ttl: float = TTL) -> ClusterAccess:
        path = secret_file or default_secret_file()
        creds = read_credentials(path)
        if creds.role == PEER:
            raise VdifsError(f"{path} holds the peer credential {creds.credential}, which cannot open VDIs; "
                             "a mount needs a mount credential ('vdifs cluster credential mount NAME')",
                             code=errno.EACCES)
        return cls(list(seeds), creds, DEFAULT_TERM if lease_term is None else lease_term, io_wait, encrypt,
                   cache_dir, cache_size, cache_ttl)

    async def open_catalog(self, nursery: trio.Nursery, mountpoint: str, store_id: str = "") -> Catalog:
        """Connect to the cluster and return the catalog of its shared
        directory, with leases held under a fresh node id (renewed by a task
        in `nursery`). `store_id`: the mount's store (`fsutil.store_id`),
        whose lock this process holds: leases an earlier process of the
        same store left are taken over at once (`LeaseManager`)."""
        node_id = f"mount-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        remote = RemotePool(self.seeds, self.creds, nursery, node_id, io_wait=self.io_wait, encrypt=self.encrypt)
        cmap = await remote.connect()
        log.info("cluster %s: epoch %d, %d peers up, copies %d", cmap.cluster_id, cmap.epoch,
                 len(cmap.up_peers()), cmap.copies)
        # The credential goes into the lease: peers let only its holder change a live lease.
        leases = LeaseManager(node_id, {"host": socket.gethostname(), "pid": os.getpid(),
                                        "mountpoint": mountpoint, "credential": self.creds.credential,
                                        "store": store_id},
                              lambda vid: remote.meta.register(lease_key(vid)), remote.fence,
                              term=self.lease_term)
        pool: RemotePool | CachingPool = remote
        if self.cache_dir is not None and self.cache_size > 0:
            cache = ObjectCache(self.cache_dir, self.cache_size, ttl=self.cache_ttl)
            await cache.open(cmap.cluster_id)
            pool = CachingPool(remote, cache)
            await nursery.start(pool.run)
        catalog = Catalog(pool, DirectoryService(remote.meta.register), shared=True,
                          leases=leases)
        if isinstance(pool, CachingPool):
            pool.attach(catalog.cache_facts, leases.generation_held)
        nursery.start_soon(leases.run)
        return catalog
