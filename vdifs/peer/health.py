"""Failure detection: a constant number of pings per peer, indirect probes,
a suspicion period, and map changes.

Each round (`interval`) a peer pings FANOUT others, in the order of
`model.probing.ProbeOrder`, so its cost does not grow with the cluster.
A peer that does not answer is pinged through HELPERS others at once (one
broken or slow link does not make a live peer look dead); if none of them
reaches it either, it is *suspected*: pinged again every round, directly
and through helpers, and marked down only if it stays silent for
SUSPECT_FOR (a peer stalled for a moment, or a burst of lost packets, is
not declared down). The mark is a map change (CAS: many may propose it,
one change is made). A peer that is alive but finds itself marked down
announces itself up.

`Probing` is the loop, with the network and the map given as callables,
so the simulation runs a thousand of them on an in-memory network with a
mock clock; `FailureDetector` wires it to the peer's RPC and membership.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio

from vdifs.errors import VdifsError
from vdifs.model.cluster import UP, ClusterMap
from vdifs.model.probing import FANOUT, HELPERS, ProbeOrder, pick_helpers
from vdifs.peer.membership import Membership
from vdifs.peer.state import PeerState
from vdifs.wire import args as arg
from vdifs.wire.rpc import Session

log = logging.getLogger("vdifs.peer.health")

PING_TIMEOUT = 1.0
PROBE_TIMEOUT = 2.5  # a helper's own ping (PING_TIMEOUT) and the two messages to and from it
SUSPECT_FOR = 3.0  # seconds a suspected peer must stay silent before it is marked down
MARK_DOWN_WITHIN = 5.0  # seconds the map change may take before its evidence counts as old

#: peer id -> address of the other up peers, and a version of that (the map's epoch)
Members = Callable[[], tuple[Mapping[str, str], object]]


class Probing:
    """The detection loop of one peer. `ping(address, timeout)` says whether
    the peer answered; `probe_via(helper_address, address, timeout)` whether
    the helper reached it (None: the helper did not answer us);
    `mark_down(peer_id, address)` proposes the map change."""

    def __init__(self, members: Members, ping: Callable[[str, float], Awaitable[bool]],
                 probe_via: Callable[[str, str, float], Awaitable[bool | None]],
                 mark_down: Callable[[str, str], Awaitable[None]], *, interval: float = 1.0,
                 fanout: int = FANOUT, helpers: int = HELPERS, suspect_for: float = SUSPECT_FOR,
                 rng: random.Random | None = None) -> None:
        self.members, self.ping, self.probe_via, self.mark_down = members, ping, probe_via, mark_down
        self.interval, self.fanout, self.helpers, self.suspect_for = interval, fanout, helpers, suspect_for
        self.rng = rng or random.Random()
        self.order = ProbeOrder(self.rng)
        self.checking: set[str] = set()  # peers with a check under way (never two at once)
        self.pings_sent = 0  # direct pings, for the simulation's cost figures
        self._ids: tuple[object, list[str]] = (None, [])  # the members' ids, listed for a version

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                await trio.sleep(self.interval)
                self.round(nursery)

    def round(self, nursery: trio.Nursery) -> None:
        """Start this round's checks (no await: a slow check never delays the next round)."""
        members, version = self.members()
        for peer_id in self.order.next(members.keys(), self.fanout, version):
            if peer_id not in self.checking:
                self.checking.add(peer_id)
                nursery.start_soon(self._check, peer_id, members[peer_id])

    async def _ping(self, address: str) -> bool:
        self.pings_sent += 1
        return await self.ping(address, PING_TIMEOUT)

    async def _check(self, peer_id: str, address: str) -> None:
        try:
            if await self._ping(address):
                return
            first_miss = trio.current_time()
            while True:
                helper, heard = await self._reached_indirectly(peer_id, address)
                if helper is not None:
                    log.info("peer %s answers %s but not us: keeping it up", peer_id, helper)
                    return
                if trio.current_time() - first_miss >= self.suspect_for:
                    break
                await trio.sleep(self.interval)
                if peer_id not in self.members()[0]:
                    return  # marked down (or gone) meanwhile
                if await self._ping(address):
                    return
            if not heard:
                # no helper answered us either: we are the one cut off, and a mark-down
                # proposed now would land the moment our link heals, on live peers
                log.info("peer %s is silent, and so are the peers asked to reach it: not judging it", peer_id)
                return
            if await self._ping(address):  # fresh evidence, just before the change
                return
            await self.mark_down(peer_id, address)
        finally:
            self.checking.discard(peer_id)

    async def _reached_indirectly(self, peer_id: str, address: str) -> tuple[str | None, bool]:
        """Ask HELPERS other peers at once to ping `peer_id`: the first that
        reached it (its id) or None, and whether any helper answered at all
        (True too when there is no helper to ask)."""
        members, version = self.members()
        if self._ids[0] != version or version is None:
            self._ids = (version, list(members))  # once per membership, not per probe
        ids = self._ids[1]
        helpers = pick_helpers(ids, (peer_id,), self.helpers, self.rng) if len(ids) > 1 else []
        reached: str | None = None
        heard = not helpers
        async with trio.open_nursery() as nursery:
            async def ask(helper: str) -> None:
                nonlocal reached, heard
                answer = await self.probe_via(members[helper], address, PROBE_TIMEOUT)
                if answer is not None:
                    heard = True
                if answer and reached is None:
                    reached = helper
                    nursery.cancel_scope.cancel()

            for h in helpers:
                nursery.start_soon(ask, h)
        return reached, heard


class FailureDetector:
    """`Probing` over the peer's RPC and map, plus the answer to `peer.probe`."""

    def __init__(self, peer: PeerState, membership: Membership, *, interval: float = 1.0) -> None:
        self.peer = peer
        self.membership = membership
        self.interval = interval
        self._members: tuple[Mapping[str, str], object] = ({}, None)
        self.newer_map = trio.Event()  # a ping's answer came from a newer epoch
        self.probing = Probing(self._others, self._ping, self._probe_via, self._mark_down, interval=interval)

    def _others(self) -> tuple[Mapping[str, str], object]:
        """The other up peers of the current map (computed once per epoch)."""
        cmap = self.peer.cmap
        if cmap is None:
            return {}, None
        if self._members[1] != cmap.epoch:
            self._members = ({p.peer_id: p.address for p in cmap.up_peers() if p.peer_id != self.peer.peer_id},
                             cmap.epoch)
        return self._members

    async def _ping(self, address: str, timeout: float) -> bool:
        """Whether `address` answered; an answer from a newer epoch than ours
        wakes `_catch_up` (how a peer that missed a map change learns of it
        within a round, so the map poll can be rare in a large cluster)."""
        assert self.peer.rpc is not None
        try:
            reply = await self.peer.rpc.call(address, "peer.ping", timeout=timeout)
        except VdifsError as e:
            log.info("ping %s failed: %s", address, e)
            return False
        epoch = reply.get("epoch") if isinstance(reply, dict) else None
        if isinstance(epoch, int) and epoch > self.peer.epoch():
            self.newer_map.set()
        return True

    async def _catch_up(self) -> None:
        """Read the map through consensus when a ping met a newer epoch (at
        most once a round)."""
        while True:
            await self.newer_map.wait()
            self.newer_map = trio.Event()
            try:
                await self.peer.refresh_map()
            except VdifsError as e:
                log.info("a peer has a newer map, but reading it failed: %s", e)
            await trio.sleep(self.interval)

    async def _probe_via(self, helper: str, address: str, timeout: float) -> bool | None:
        assert self.peer.rpc is not None
        try:
            return bool(await self.peer.rpc.call(helper, "peer.probe", {"address": address}, timeout=timeout))
        except VdifsError:
            return None  # the helper did not answer us

    async def h_probe(self, args: dict[str, Any], s: Session) -> bool:
        """Can this peer reach `address`? (Asked by others as the indirect probe.)"""
        return await self._ping(arg.text(args, "address"), PING_TIMEOUT)

    async def _mark_down(self, peer_id: str, address: str) -> None:
        """Propose the change, on fresh evidence only: if the meta peers do
        not take it within MARK_DOWN_WITHIN (this peer may be the one cut
        off), it is dropped, and `ClusterMap.with_silent_peer_down` drops it
        if the map moved against it meanwhile."""
        me = self.peer.peer_id
        made = False

        def change(cmap: ClusterMap) -> ClusterMap | None:
            nonlocal made
            new = cmap.with_silent_peer_down(me, peer_id, address)
            made = new is not None
            return new

        try:
            new = await self.membership.change_map(change, within=MARK_DOWN_WITHIN)
        except VdifsError as e:
            log.warning("could not mark peer %s at %s down: %s; dropped", peer_id, address, e)
            return
        if made:
            log.warning("peer %s at %s stopped answering: marked down (epoch %d)", peer_id, address, new.epoch)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._catch_up)
            while True:
                await trio.sleep(self.interval)
                cmap = self.peer.cmap
                if cmap is None or self.peer.rpc is None:
                    continue
                me = cmap.peers.get(self.peer.peer_id)
                if me is not None and me.state != UP:
                    log.warning("peer %s: the map says we are down, but we are here: rejoining", me.peer_id)
                    try:
                        await self.membership.rejoin()
                    except VdifsError as e:
                        log.warning("rejoin failed: %s", e)
                    continue
                self.probing.round(nursery)
