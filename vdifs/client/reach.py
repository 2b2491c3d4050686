"""Which peers this mount reaches, and a way around the ones it cannot.

The cluster's failure detector decides whether a peer is up, from the peers'
point of view. A mount can lose its own link to a peer that the others still
reach (a partial partition); that peer stays up in the map, so waiting for a
map that replaces it would wait forever, and every write to an object it
holds would fail. So the mount pings the up peers it has sent requests to
in the last 30 s, and those it has cut off (pinging every up peer was a
ping per peer per mount per second at rest, issue 17). A peer that has
not answered for `LOST_AFTER` while others have is *cut off* from us: its
connection is dropped (requests in flight fail at once and are retried) and
from then on the data-path requests meant for it go through another up peer
(`peer.relay`, see vdifs.peer.relay), which forwards them. Once it answers
our pings again, requests go to it directly.

A peer that is really gone is first cut off here and relayed to, and the
relay answers EHOSTUNREACH when it cannot reach it either; the mount then
waits for the map that marks it down, as before. Reads prefer replicas that
are not cut off.

`RoutedRpc` has the interface of `RpcPool` that `RemotePool` uses (start,
call, drop_soon, aclose), so the routing is in one place. `version` changes
whenever the set of cut-off peers does: a request that failed on a peer that
has since been cut off is retried at once, through a relay.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from typing import Any

import trio

from vdifs.errors import VdifsError
from vdifs.model.cluster import ClusterMap
from vdifs.model.iostats import OpStats
from vdifs.model.probing import MOUNT_ACTIVE_WINDOW, mount_probe_targets
from vdifs.wire.rpc import RELAYED_OPS, PeerUnavailable, PendingCall, RemoteError, RpcPool

log = logging.getLogger(__name__)

PROBE_INTERVAL = 1.0
RELAY_TIMEOUT = 25  # seconds a relay waits for the target: less than the mount's DATA_TIMEOUT (30)
PROBE_TIMEOUT = 1.0
#: No answer to our pings for this long (while other peers answer): cut off.
LOST_AFTER = 3.0


class RelayedCall:
    """A request in flight through a relay; `finish` as PendingCall's."""

    __slots__ = ("call", "target", "relay")

    def __init__(self, call: PendingCall, target: str, relay: str) -> None:
        self.call = call
        self.target = target
        self.relay = relay

    async def finish(self, timeout: float) -> Any:
        try:
            return await self.call.finish(timeout)
        except RemoteError as e:
            if e.errno == errno.EHOSTUNREACH:  # the relay cannot reach it either
                raise PeerUnavailable(f"{self.target} (relayed via {self.relay}): {e}") from None
            raise


class RoutedRpc:
    def __init__(self, rpc: RpcPool, current_map: Callable[[], ClusterMap | None],
                 probes: RpcPool | None = None) -> None:
        """`probes`: the pool the pings go through: connections of their own,
        so a ping never waits behind data (a busy peer is not a silent one)."""
        self.rpc = rpc
        self.probes = probes if probes is not None else rpc
        self._current_map = current_map
        self.cut: dict[str, float] = {}  # address -> when we cut it off
        self.version = 0  # changes whenever `cut` does
        self.relayed = 0  # requests sent through a relay
        self._last_answer: dict[str, float] = {}
        self._rounds = 0  # probe rounds so far: the clock of `_used`, read with no clock call
        self._used: dict[str, int] = {}  # address -> the round a data request was last sent to it

    def round_trips(self) -> dict[str, OpStats]:
        """Of the data connections (pings go through their own)."""
        return self.rpc.round_trips()

    # -- requests ----------------------------------------------------------------------

    def relay_for(self, address: str, op: str) -> str | None:
        """The peer to send `op` for `address` through, or None to send it directly."""
        if address not in self.cut or op not in RELAYED_OPS:
            return None
        cmap = self._current_map()
        if cmap is None:
            return None
        for p in cmap.up_peers():
            if p.address != address and p.address not in self.cut:
                return p.address
        return None  # nobody else reachable either: try it directly

    async def start(self, address: str, op: str, args: dict[str, Any], *,
                    soon: bool = False) -> PendingCall | RelayedCall:
        self._used[address] = self._rounds
        relay = self.relay_for(address, op) if self.cut else None
        if relay is None:
            return await self.rpc.start(address, op, args, soon=soon)
        inner = dict(args)
        data = inner.pop("data", None)
        # the relay gives up on the target before we give up on the relay
        outer: dict[str, Any] = {"to": address, "op": op, "args": inner, "timeout": RELAY_TIMEOUT}
        if data is not None:
            outer["data"] = data
        self.relayed += 1
        return RelayedCall(await self.rpc.start(relay, "peer.relay", outer), address, relay)

    async def call(self, address: str, op: str, args: dict[str, Any] | None = None, *,
                   timeout: float = 30.0) -> Any:
        self._used[address] = self._rounds
        if not self.cut or self.relay_for(address, op) is None:
            return await self.rpc.call(address, op, args, timeout=timeout)
        return await (await self.start(address, op, args or {})).finish(timeout)

    def drop_soon(self, address: str, *, abort: bool = False) -> None:
        self.rpc.drop_soon(address, abort=abort)

    async def aclose(self) -> None:
        await self.rpc.aclose()
        if self.probes is not self.rpc:
            await self.probes.aclose()

    # -- probing -----------------------------------------------------------------------

    async def probe_forever(self) -> None:
        while True:
            await trio.sleep(PROBE_INTERVAL)
            cmap = self._current_map()
            if cmap is not None:
                await self.probe(cmap)

    async def probe(self, cmap: ClusterMap) -> None:
        """One round: ping each up peer this mount has sent requests to lately
        (and those cut off) directly; cut off or restore each."""
        self._rounds += 1
        # by what this mount's data path sent: not its pings, nor its consensus requests (a
        # directory peek every 0.5 s would keep the meta peers pinged for ever)
        up = mount_probe_targets([p.address for p in cmap.up_peers()], self._used, self.cut, self._rounds,
                                 MOUNT_ACTIVE_WINDOW / PROBE_INTERVAL)
        now = trio.current_time()
        for a in up:
            self._last_answer.setdefault(a, now)
        for a in set(self._last_answer) - set(up):
            del self._last_answer[a]
        for a in set(self.cut) - set(up):  # left the map's up set: the map routes around it now
            self._set_cut(a, False, "is no longer up in the map")

        async def ping(address: str) -> None:
            try:
                await self.probes.call(address, "peer.ping", timeout=PROBE_TIMEOUT)
            except VdifsError:
                return
            self._last_answer[address] = trio.current_time()

        async with trio.open_nursery() as nursery:
            for a in up:
                nursery.start_soon(ping, a)
        now = trio.current_time()
        # a reply on the data connection is an answer too
        answering = {a for a, t in self._last_answer.items()
                     if now - max(t, self.rpc.last_heard(a)) < LOST_AFTER}
        for a in up:
            if a in answering and a in self.cut:
                self._set_cut(a, False, "answers again: requests go to it directly")
            elif a not in answering and a not in self.cut and answering:
                self._set_cut(a, True, f"has not answered this mount for {LOST_AFTER:.0f} s while other peers "
                                       "do: its requests go through another peer")
                # What waits on it fails now and is retried through a relay; the
                # reset makes sure no request still queued in our kernel reaches
                # it later, behind the relayed ones.
                self.rpc.drop_soon(a, abort=True)

    def _set_cut(self, address: str, cut: bool, why: str) -> None:
        if cut:
            self.cut[address] = trio.current_time()
            log.warning("peer at %s %s", address, why)
        else:
            del self.cut[address]
            log.info("peer at %s %s", address, why)
        self.version += 1
