"""Failure detection: heartbeats, an indirect probe, and map changes.

Every peer pings every other up peer each `interval`. A peer not heard
from for `suspect_after` is probed through another peer (so one broken link
does not look like a dead peer); if nobody reaches it, this peer proposes
the map change that marks it down (CAS: many proposers, one change). A
peer that is alive but finds itself marked down announces itself up.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from vdifs.errors import VdifsError
from vdifs.model.cluster import DOWN, UP, ClusterMap
from vdifs.peer.membership import Membership, peer_state_change
from vdifs.peer.state import PeerState
from vdifs.wire import args as arg
from vdifs.wire.rpc import Session

log = logging.getLogger("vdifs.peer.health")

PING_TIMEOUT = 1.0


class FailureDetector:
    def __init__(self, peer: PeerState, membership: Membership, *, interval: float = 1.0,
                 suspect_after: float = 4.0) -> None:
        self.peer = peer
        self.membership = membership
        self.interval = interval
        self.suspect_after = suspect_after
        self.last_seen: dict[str, float] = {}

    async def _ping(self, address: str) -> bool:
        assert self.peer.rpc is not None
        try:
            await self.peer.rpc.call(address, "peer.ping", timeout=PING_TIMEOUT)
            return True
        except VdifsError as e:
            log.info("ping %s failed: %s", address, e)
            return False

    async def h_probe(self, args: dict[str, Any], s: Session) -> bool:
        """Can this peer reach `address`? (Asked by others as the indirect probe.)"""
        return await self._ping(arg.text(args, "address"))

    async def run(self) -> None:
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
            others = [p for p in cmap.up_peers() if p.peer_id != self.peer.peer_id]
            now = trio.current_time()

            async def check(peer_id: str, address: str) -> None:
                if await self._ping(address):
                    self.last_seen[peer_id] = trio.current_time()

            async with trio.open_nursery() as nursery:
                for p in others:
                    self.last_seen.setdefault(p.peer_id, now)
                    nursery.start_soon(check, p.peer_id, p.address)
            for p in others:
                if trio.current_time() - self.last_seen[p.peer_id] < self.suspect_after:
                    continue
                if await self._reached_indirectly(cmap, p.peer_id):
                    self.last_seen[p.peer_id] = trio.current_time()
                    continue
                await self._mark_down(p.peer_id)

    async def _reached_indirectly(self, cmap: ClusterMap, suspect: str) -> bool:
        assert self.peer.rpc is not None
        helpers = [p for p in cmap.up_peers() if p.peer_id not in (suspect, self.peer.peer_id)]
        for helper in helpers[:2]:
            try:
                if await self.peer.rpc.call(helper.address, "peer.probe",
                                            {"address": cmap.peers[suspect].address}, timeout=3 * PING_TIMEOUT):
                    log.info("peer %s answers %s but not us: keeping it up", suspect, helper.peer_id)
                    return True
            except VdifsError:
                continue
        return False

    async def _mark_down(self, peer_id: str) -> None:
        try:
            new = await self.membership.change_map(peer_state_change(peer_id, DOWN))
        except VdifsError as e:
            log.warning("could not mark peer %s down: %s", peer_id, e)
            return
        if new.peers[peer_id].state == DOWN:
            log.warning("peer %s at %s stopped answering: marked down (epoch %d)", peer_id,
                        new.peers[peer_id].address, new.epoch)

