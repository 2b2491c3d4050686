"""Talking to the meta peers: CASPaxos registers over RPC, and the cluster map."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from vdifs.errors import VdifsError
from vdifs.meta.directory_service import DirectoryReader
from vdifs.meta.paxos import ConsensusUnavailable, PaxosRegister, Proposer
from vdifs.model.cluster import ClusterMap
from vdifs.model.directory import Directory
from vdifs.wire.rpc import RpcPool

CLUSTER_KEY = "cluster"
DIRECTORY_KEY = "directory"
PAXOS_TIMEOUT = 2.0
MAP_POLL_SECONDS = 2.0
#: What a peer's map polls may cost each meta peer, all peers together: the
#: poll is the last resort (a changed map is announced to every peer, and a
#: peer whose ping meets a newer epoch reads the map at once), so in a large
#: cluster each peer polls more seldom instead of the meta peers working more.
POLLS_PER_SECOND = 4.0


def map_poll_interval(peers: int) -> float:
    """Seconds between a peer's polls of the map in a cluster of `peers`."""
    return max(MAP_POLL_SECONDS, peers / POLLS_PER_SECOND)

log = logging.getLogger(__name__)


class MetaClient:
    def __init__(self, node_id: str, rpc: RpcPool, meta_addresses: list[str]) -> None:
        self.node_id = node_id
        self.rpc = rpc
        self.proposer = Proposer(node_id, meta_addresses, self._send)
        self._registers: dict[str, PaxosRegister] = {}
        self._directory: DirectoryReader | None = None

    def set_meta(self, addresses: list[str]) -> None:
        self.proposer.acceptors = list(addresses)

    async def _send(self, address: str, op: str, args: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.rpc.call(address, "paxos." + op, args, timeout=PAXOS_TIMEOUT)
        return result

    def register(self, key: str) -> PaxosRegister:
        """The register `key` (one object per key, so its peeks remember what they saw)."""
        reg = self._registers.get(key)
        if reg is None:
            reg = self._registers[key] = PaxosRegister(self.proposer, key)
        return reg

    async def read_directory(self) -> Directory:
        """The whole directory as it was at one moment, through one reader
        kept for this client (`DirectoryReader`: each read decodes only the
        parts that changed since the last)."""
        if self._directory is None:
            self._directory = DirectoryReader(self.register)
        return await self._directory.read()

    async def read_map(self) -> ClusterMap | None:
        """The current cluster map, linearizable (and taking no ballot unless a
        change is under way: see `PaxosRegister.read`)."""
        _version, raw = await self.register(CLUSTER_KEY).read()
        return ClusterMap.decode(raw) if raw else None

    async def peek_map(self) -> ClusterMap | None:
        _version, raw = await self.register(CLUSTER_KEY).peek()
        return ClusterMap.decode(raw) if raw else None

    async def change_map(self, fn: Callable[[ClusterMap], ClusterMap | None]) -> ClusterMap:
        """Apply fn to the current map; fn returns a new map, or None for no change."""
        reg = self.register(CLUSTER_KEY)
        while True:
            version, raw = await reg.read()
            if not raw:  # a format that failed half way: peers were told of a map never stored
                raise ConsensusUnavailable("the cluster register holds no map (was the format completed?)")
            current = ClusterMap.decode(raw)
            new = fn(current)
            if new is None:
                return current
            if await reg.cas(version, new.encode()):
                return new

    async def _confirm(self, peeked: ClusterMap) -> ClusterMap | None:
        """Read the map through consensus. If the peeked map names other meta
        peers than ours (replace-meta swapped a dead one), read through those
        first: ours may no longer form a majority. replace-meta only ever
        swaps a peer that is dead, so the two sets share every live member
        and any majority of one meets any majority of the other."""
        ours = list(self.proposer.acceptors)
        theirs = peeked.meta_addresses()
        if sorted(theirs) == sorted(ours):
            return await self.read_map()
        log.info("the cluster map names other meta peers (%s, we use %s): reading it through them", theirs, ours)
        self.set_meta(theirs)
        try:
            return await self.read_map()
        except ConsensusUnavailable:
            self.set_meta(ours)
            raise

    async def follow_map(self, adopt: Callable[[ClusterMap], Awaitable[Any]], known: Callable[[], int],
                         interval: Callable[[], float] = lambda: MAP_POLL_SECONDS) -> None:
        """Poll the cluster register (cheap peeks) every `interval()` seconds and
        hand every map to `adopt`, which keeps it if it is newer. Notifications
        make changes arrive sooner; this makes sure they arrive."""
        while True:
            await trio.sleep(interval())
            if not self.proposer.acceptors:
                continue  # no cluster yet
            try:
                peeked = await self.peek_map()
                # A peek can show a map that was accepted somewhere but never
                # chosen: confirm a newer epoch through consensus first.
                latest = await self._confirm(peeked) if peeked is not None and peeked.epoch > known() else None
            except VdifsError as e:
                log.debug("map poll failed: %s", e)
                continue
            if latest is not None:
                await adopt(latest)
