"""Recovery: get back to `copies` replicas, in the background and on demand.

Background, after every epoch change: for every live VDI (the directory
says which, and with how many copies: objects of deleted vids are never
recovered), each peer lists the objects the up peers hold and copies to
itself those that placement now gives it and it lacks. Throttled (bytes per
second), it stops before eating into a reserve of free space, and starts
over when the map changes under it. Objects a peer no longer owns are
handed off: moved out of service (so a stale copy is never served when
placement gives the object back later) but kept as a source until every up
peer has finished recovering the epoch, then dropped.

On demand (`recovering_first`): a read or write of an object this peer
should hold but lacks (placement gave it to us and the background pass has
not reached it yet), or holds rotten, first copies it from another peer.
Both ways go through `recover`, one lock per object being recovered, so an
object is fetched once however many want it.

A copy that no up peer serves - handed off at an epoch change, or our own
set aside as stale when we came back - is brought back only if a live map
still points at the object (`references`): an object freed while a holder
was away looks exactly like a last copy, and must stay freed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from vdifs.errors import ChecksumError, NoSpace, ObjectNotFound, PoolError, VdifsError
from vdifs.model.cluster import UP, ClusterMap
from vdifs.model.ids import ObjectKind, unpack_oid, vid_of
from vdifs.model.placement import placement
from vdifs.peer.references import still_referenced
from vdifs.peer.state import PeerState
from vdifs.wire import objlist
from vdifs.wire.rpc import ESTALE_EPOCH, RemoteError, RpcPool

log = logging.getLogger("vdifs.peer.recovery")
# What recovering an object came to: we hold it; it was freed; every peer said
# it has no copy (a map object never written, say); or some peer could not be
# asked, or a map not read (UNREACHED: it may exist where we cannot see it now).
HELD, FREED, MISSING, UNREACHED = "held", "freed", "missing", "unreached"
#: Seconds a delete is remembered: an object deleted here that recently is
#: not recovered (another replica may not have processed its delete yet).
FREED_MEMORY = 60.0
#: Seconds a handed-off copy that no map names yet is taken for a new object
#: whose map entry is on its way (the entry may wait out --io-wait, 60 s).
UNNAMED_GRACE = 300
FREED_KEPT = 1 << 16  # deletes remembered at most
T = TypeVar("T")
HANDOFF_POLL = 3.0  # seconds between asking the peers whether they finished an epoch
DEFAULT_RATE = 100e6  # bytes per second a pass copies at most
DEFAULT_RESERVE = 1 << 30  # bytes of free space recovery leaves alone


@dataclass
class RecoveryState:
    epoch: int = 0
    running: bool = False
    total: int = 0  # objects this pass must copy
    done: int = 0
    bytes: int = 0
    stopped: str = ""  # why the last pass gave up, if it did
    started: float = 0.0  # trio clock at the start of the pass (for rate and ETA)


async def recovery_settled(pool: RpcPool, cmap: ClusterMap, *, skip: str | None = None,
                           timeout: float = 10.0) -> bool:
    """Whether every up peer of `cmap` (but `skip`) says it finished
    recovering that epoch: until then, objects handed off at the epoch
    change may be needed, and are in no listing of served objects."""
    for p in cmap.up_peers():
        if p.peer_id == skip:
            continue
        try:
            r = (await pool.call(p.address, "peer.info", {}, timeout=timeout))["recovery"]
        except (VdifsError, KeyError, TypeError):
            return False
        if r["epoch"] != cmap.epoch or r["running"] or r["done"] != r["total"] or r["stopped"]:
            return False
    return True


class Recovery:
    def __init__(self, peer: PeerState, *, rate: float = DEFAULT_RATE,
                 reserve: int = DEFAULT_RESERVE) -> None:
        self.peer = peer
        self.rate = rate  # bytes per second
        self.reserve = reserve  # free bytes the store keeps
        self.state = RecoveryState()
        self.wakeup = trio.Event()
        self.recovered = 0  # objects copied from other peers
        self._recovering: dict[int, trio.Lock] = {}
        self._deleted: dict[int, float] = {}  # oid -> when a delete of it last ran here
        peer.on_map_change(self.epoch_changed)

    def epoch_changed(self) -> None:
        self.wakeup.set()

    async def run(self) -> None:
        while True:
            await self.wakeup.wait()
            self.wakeup = trio.Event()
            cmap = self.peer.cmap
            if cmap is None:
                continue
            try:
                await self._pass(cmap.epoch)
            except VdifsError as e:
                self.state.stopped = str(e)
                log.warning("recovery for epoch %d interrupted: %s; retrying", cmap.epoch, e)
                await trio.sleep(2)
                self.wakeup.set()
            finally:
                self.state.running = False

    async def _pass(self, epoch: int) -> None:
        d = self.peer
        assert d.meta is not None and d.rpc is not None
        cmap = d.cmap
        assert cmap is not None
        me = cmap.peers.get(d.peer_id)
        if me is None or me.state != UP:
            return  # not serving at this epoch: nothing to recover, nothing to hand off
        await d.caught_up()  # a returning peer first sets aside what went stale
        # Which VDIs live, with how many copies: read through consensus, since a
        # peek may show a directory from before a delete, and copying a deleted
        # VDI's objects would leak them. (A VDI created a moment ago has its
        # objects created at the new placement anyway.)
        live = await self._live_vdis()
        held: dict[int, set[int]] = {}
        for vid, copies in sorted(live.items()):  # first, before any peer must answer us
            held[vid] = set(await d.store.list_objects(vid))
            unowned = [oid for oid in held[vid] if d.peer_id not in placement(cmap, oid, copies)]
            if unowned:
                await d.store.hand_off(unowned, epoch)
                log.info("epoch %d: handed off %d objects of vid %d that placement gives to other peers",
                         epoch, len(unowned), vid)
        # One listing, not a check per object: recover() looks again under
        # the object's lock, so one created meanwhile is not copied twice.
        listed = await self._cluster_objects(sorted(live))
        todo: list[int] = []
        for vid, copies in sorted(live.items()):
            todo.extend(oid for oid in sorted(listed[vid])
                        if oid not in held[vid] and d.peer_id in placement(cmap, oid, copies))
        # Map objects first: whether a data object nobody serves comes back
        # depends on its map (`references`), which may itself need recovering.
        todo.sort(key=lambda oid: unpack_oid(oid)[0] != ObjectKind.MAP)
        self.state = RecoveryState(epoch=epoch, running=True, total=len(todo))
        if todo:
            log.info("epoch %d: recovering %d objects to this peer", epoch, len(todo))
        started = self.state.started = trio.current_time()
        for oid in todo:
            if d.cmap is None or d.cmap.epoch != epoch:
                log.info("the map changed during recovery: starting over")
                self.wakeup.set()
                return
            _total, free = await d.store.space()
            if free < self.reserve + (4 << 20):
                self.state.stopped = (f"stopped: only {free >> 20} MiB free, the reserve is "
                                      f"{self.reserve >> 20} MiB")
                log.error("recovery %s (%d of %d objects copied)", self.state.stopped, self.state.done,
                          self.state.total)
                return
            before = self.recovered
            if await self._recover(oid, True) not in (MISSING, UNREACHED):  # held now, or freed
                self.state.done += 1
                if self.recovered > before:
                    self.state.bytes += 4 << 20
            # throttle: never faster than `rate` on average
            ahead = self.state.bytes / self.rate - (trio.current_time() - started)
            if ahead > 0:
                await trio.sleep(ahead)
        if todo:
            log.info("epoch %d: recovery done, %d objects copied", epoch, self.state.done)
            # A VDI deleted while we copied: its purge may have missed our copies.
            still = await self._live_vdis()
            dead = [oid for oid in todo if vid_of(oid) not in still]
            for oid in dead:
                await d.store.delete(oid)
            if dead:
                log.info("epoch %d: dropped %d copied objects of VDIs deleted meanwhile", epoch, len(dead))
        if self.state.done < self.state.total:
            # Some could not be fetched (peers unreachable for now): try again.
            raise PoolError(f"{self.state.total - self.state.done} of {self.state.total} objects "
                            "could not be fetched yet")
        await d.store.drop_stale()  # everything we should hold is current now
        self.state.running = False  # what the other peers wait to see
        await self._drop_handoff_when_cluster_done(epoch)

    async def _drop_handoff_when_cluster_done(self, epoch: int) -> None:
        """Copies we handed off are kept until every up peer says it finished
        recovering `epoch` (each may still need to copy them); then dropped.
        Gives up when the map moves on: the next pass waits for the next epoch."""
        d = self.peer
        assert d.rpc is not None
        while d.cmap is not None and d.cmap.epoch == epoch:
            if await recovery_settled(d.rpc, d.cmap, skip=d.peer_id):
                if await d.store.drop_handoff(epoch):
                    log.info("epoch %d: every peer finished recovery; dropped the objects handed off", epoch)
                return
            with trio.move_on_after(HANDOFF_POLL):
                await self.wakeup.wait()  # a new epoch: go recover it at once
            if self.wakeup.is_set():
                return

    async def _live_vdis(self) -> dict[int, int]:
        """data vid -> copies of everything the directory keeps: VDIs, their
        snapshots, and retired snapshots clones still read (not the deleted)."""
        assert self.peer.meta is not None
        return (await self.peer.meta.read_directory()).copies_by_data_vid()

    async def _cluster_objects(self, vids: list[int]) -> dict[int, set[int]]:
        """vid -> the objects of it that some up peer (or our own set-aside
        stale copies) holds. Each peer is asked once for all the vids,
        several peers at a time (`objlist.list_on_peers`): one
        request per peer and VDI, one peer after the other, would be 10^7
        requests per peer for every epoch at 1,000 peers and 10,000 VDIs."""
        d = self.peer
        assert d.rpc is not None and d.cmap is not None
        found = {vid: set(oids) for vid, oids in (await d.store.stale_of(vids)).items()}  # maybe the only copies
        rpc, extra = d.rpc, {"epoch": d.cmap.epoch, "handoff": True}
        try:
            listed = await objlist.list_on_peers(
                {p.peer_id: objlist.rpc_lister(rpc, p.address, extra, 30) for p in d.cmap.up_peers()
                 if p.peer_id != d.peer_id}, vids)
        except objlist.ListFailed as e:
            # Skipping it could miss objects only it lists (and call the pass
            # finished); if it died, the map will say so and this pass restarts.
            raise PoolError(str(e)) from None
        for oids in listed.values():
            for oid in oids:
                objects = found.get(vid_of(oid))
                if objects is not None:
                    objects.add(oid)
        return found

    # -- on demand -------------------------------------------------------------------

    async def recover(self, oid: int, *, stale_ok: bool = True) -> bool:
        """Copy an object we should hold but lack from any up peer that has it.

        Used before serving a read or write of an object this peer took over
        in a new epoch and has not recovered yet, and to replace a rotten
        replica. True if we hold it now."""
        return await self._recover(oid, stale_ok) == HELD

    @contextlib.asynccontextmanager
    async def _object_lock(self, oid: int) -> AsyncIterator[None]:
        """The lock of one object's recovery (and of deletes of it), kept
        only while someone holds or waits for it."""
        lock = self._recovering.setdefault(oid, trio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._recovering.pop(oid, None)  # one lock per object being recovered, not ever

    async def deleting(self, oid: int, delete: Callable[[], Awaitable[T]]) -> T:
        """Run a delete of `oid` under the object's recovery lock, and remember
        it unless `delete` returns False (it deleted nothing on purpose). A
        recovery racing with a free would otherwise bring the object back:
        it installs a copy fetched from a replica whose delete came later,
        after ours had found nothing to delete."""
        async with self._object_lock(oid):
            result = await delete()
            if result is not False:
                now = trio.current_time()
                if len(self._deleted) >= FREED_KEPT:
                    self._deleted = {o: t for o, t in self._deleted.items() if now - t < FREED_MEMORY}
                self._deleted[oid] = now
            return result

    def _recently_deleted(self, oid: int) -> bool:
        when = self._deleted.get(oid)
        return when is not None and trio.current_time() - when < FREED_MEMORY

    async def _recover(self, oid: int, stale_ok: bool) -> str:
        """HELD, FREED (no peer has it and no live map points at it), MISSING
        (every peer said it has none) or UNREACHED (not now: some copy may
        exist that we could not reach)."""
        async with self._object_lock(oid):
            return await self._recover_locked(oid, stale_ok)

    async def _recover_locked(self, oid: int, stale_ok: bool) -> str:
        if await self.peer.store.exists(oid):
            return HELD
        if self._recently_deleted(oid):
            log.info("object %016x: deleted here %.0f s ago: freed, not recovered", oid,
                     trio.current_time() - self._deleted[oid])
            return FREED
        for _ in range(3):
            found, all_said_missing, stale_epoch = await self._fetch_from_others(oid, handoff=False)
            if found:
                return HELD
            if not stale_epoch:
                break
            # A source was at a newer epoch than our request: catch up and ask again.
            await self.peer.refresh_map()
        if not all_said_missing:
            return UNREACHED  # a peer that failed otherwise (newer epoch, timeout) may hold the current one
        # No up peer serves it. A copy handed off at an epoch change, or our
        # own from before we were marked down, may be the last one left, or
        # a copy of an object freed meanwhile: only the maps can tell.
        referenced = await still_referenced(self.peer, oid)
        if referenced is not True:
            if referenced is None:
                return UNREACHED
            # No map names it. A new object's map entry comes right after the
            # object, but may wait out an unreachable replica meanwhile: a
            # handed-off copy changed that recently may be such an object, and
            # is recovered (if it is a leak after all, the leak pass removes it).
            found, _, _ = await self._fetch_from_others(oid, handoff=True, younger_than=UNNAMED_GRACE)
            if found:
                log.warning("object %016x: no map points at it yet, but a copy handed off changed in the "
                            "last %d s: recovered, not judged freed", oid, UNNAMED_GRACE)
                return HELD
            log.info("object %016x: no peer serves it and no map points at it: freed, not recovered", oid)
            return FREED
        found, all_said_missing, _ = await self._fetch_from_others(oid, handoff=True)
        if found:
            return HELD
        if stale_ok and all_said_missing and await self.peer.store.take_stale(oid):
            log.warning("object %016x: no other peer has it; took back our own copy from before "
                        "we were marked down", oid)
            return HELD
        return MISSING if all_said_missing else UNREACHED

    async def _fetch_from_others(self, oid: int, *, handoff: bool,
                                 younger_than: int | None = None) -> tuple[bool, bool, bool]:
        """Fetch and install a copy: (installed, every peer said it has none,
        some peer refused our epoch as stale). `handoff`: ask for the copies
        peers handed off at an epoch change instead of those they serve
        (`younger_than`: only one changed within that many seconds)."""
        d = self.peer
        assert d.rpc is not None and d.cmap is not None
        all_said_missing, stale_epoch = True, False
        for p in d.cmap.up_peers():
            if p.peer_id == d.peer_id:
                continue
            try:
                args: dict[str, Any] = {"oid": oid, "handoff": handoff, "epoch": d.cmap.epoch}
                if younger_than is not None:
                    args["younger_than"] = younger_than
                data = await d.rpc.call(p.address, "obj.fetch", args, timeout=30)
            except VdifsError as e:
                if getattr(e, "errno", None) != errno.ENOENT:
                    all_said_missing = False
                    stale_epoch |= isinstance(e, RemoteError) and e.errno == ESTALE_EPOCH
                continue
            _total, free = await d.store.space()
            if free < self.reserve + len(data):
                raise NoSpace(f"object {oid:016x}: not recovered here, only {free >> 20} MiB free and "
                              f"the recovery reserve is {self.reserve >> 20} MiB")
            await d.store.install(oid, data)  # durable and whole before it counts as a replica
            self.recovered += 1
            log.info("recovered object %016x from peer %s%s", oid, p.peer_id,
                     " (a handed-off copy)" if handoff else "")
            return True, False, False
        return False, all_said_missing, stale_epoch

    async def recovering_first(self, oid: int, op: Callable[[], Awaitable[T]], *,
                               admitted: int | None = None) -> T:
        """Run `op` on an object; if we lack it (we took it over in a new epoch
        and recovery has not reached it yet), recover it first and run `op`
        again. Trying first keeps the common case at one store call.

        `admitted`: the epoch a change was admitted at. Its recovery gives up
        (stale epoch: the writer retries on the new map) once our map moves
        past it: recovery copies wait for the source's older-epoch changes to
        land, so an older-epoch change waiting on a recovery could end up
        waiting on itself through the other replicas (the soak test caught
        every peer stalled until the 30 s timeout)."""
        try:
            return await op()
        except ObjectNotFound:
            state = await self._recover_within(oid, admitted)
            if state == UNREACHED:  # not "does not exist": a copy may be where we cannot reach now
                raise VdifsError(f"object {oid:016x} is not recovered here yet: no peer we reach "
                                 "could say whether it exists; try again", code=errno.EAGAIN) from None
            if state != HELD:
                raise
        except ChecksumError as e:
            await self._repair_rotten(oid, e)
        return await op()

    async def _recover_within(self, oid: int, epoch: int | None) -> str:
        """What `_recover` came to; with `epoch`, ESTALE once our
        map moves past it."""
        if epoch is None:
            return await self._recover(oid, True)
        found = UNREACHED
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                async def watch() -> None:
                    while self.peer.need_map().epoch == epoch:
                        await self.peer.map_moved.wait()
                    scope.cancel()

                nursery.start_soon(watch)
                found = await self._recover(oid, True)
                nursery.cancel_scope.cancel()
        if scope.cancelled_caught:
            cmap = self.peer.need_map()
            raise RemoteError(ESTALE_EPOCH, {"message": f"the map moved to epoch {cmap.epoch} while object "
                                                        f"{oid:016x} was being recovered for a change of "
                                                        f"epoch {epoch}", "map": cmap.to_dict()})
        return found

    async def _repair_rotten(self, oid: int, error: ChecksumError) -> None:
        """Our replica failed its checksums: set it aside and fetch a good copy
        (the other peers verify theirs before sending). Raises if none exists."""
        dest = await self.peer.store.set_aside(oid)
        log.error("object %016x: our replica is corrupt (%s); moved to %s, fetching a good copy",
                  oid, error, dest)
        if not await self.recover(oid, stale_ok=False):
            raise ChecksumError(f"object {oid:016x}: our replica is corrupt and no other peer "
                                f"has a good copy") from None
        log.warning("object %016x: repaired from another peer", oid)
