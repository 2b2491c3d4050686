"""Talking to the meta peers: CASPaxos registers over RPC, and the cluster map."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vdifs.meta.paxos import PaxosRegister, Proposer
from vdifs.model.cluster import ClusterMap
from vdifs.wire.rpc import RpcPool

CLUSTER_KEY = "cluster"
DIRECTORY_KEY = "directory"
PAXOS_TIMEOUT = 2.0


class MetaClient:
    def __init__(self, node_id: str, rpc: RpcPool, meta_addresses: list[str]) -> None:
        self.node_id = node_id
        self.rpc = rpc
        self.proposer = Proposer(node_id, meta_addresses, self._send)

    def set_meta(self, addresses: list[str]) -> None:
        self.proposer.acceptors = list(addresses)

    async def _send(self, address: str, op: str, args: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.rpc.call(address, "paxos." + op, args, timeout=PAXOS_TIMEOUT)
        return result

    def register(self, key: str) -> PaxosRegister:
        return PaxosRegister(self.proposer, key)

    async def read_map(self) -> ClusterMap | None:
        """The current cluster map, linearizable."""
        _version, raw = await self.register(CLUSTER_KEY).get()
        return ClusterMap.decode(raw) if raw else None

    async def peek_map(self) -> ClusterMap | None:
        _version, raw = await self.register(CLUSTER_KEY).peek()
        return ClusterMap.decode(raw) if raw else None

    async def change_map(self, fn: Callable[[ClusterMap], ClusterMap | None]) -> ClusterMap:
        """Apply fn to the current map; fn returns a new map, or None for no change."""
        reg = self.register(CLUSTER_KEY)
        while True:
            version, raw = await reg.get()
            current = ClusterMap.decode(raw)
            new = fn(current)
            if new is None:
                return current
            if await reg.cas(version, new.encode()):
                return new
