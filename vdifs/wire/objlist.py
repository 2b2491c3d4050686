"""Object lists in pages.

A 4 TiB VDI has a million objects, more ids than one frame holds, so
`obj.list` answers at most LIST_PAGE ids after a cursor and says whether
more follow. `page` is the peer's side, `list_all` the caller's.
"""

from __future__ import annotations

import bisect
import errno
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from vdifs.errors import VdifsError

if TYPE_CHECKING:
    from vdifs.wire.rpc import RpcPool

LIST_PAGE = 100_000  # ids per reply: about 1 MB of msgpack
VIDS_PER_LIST = 4096  # vids one request may name (`vids`)
PEERS_AT_ONCE = 16  # peers `list_on_peers` asks side by side

#: sends one obj.list request with these args and returns its reply
ListCall = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def rpc_lister(pool: RpcPool, address: str, extra: dict[str, Any], timeout: float) -> ListCall:
    """The ListCall of a peer at `address`: obj.list through `pool`, with
    `extra` arguments (the epoch, `handoff`) added to each request."""
    async def call(args: dict[str, Any]) -> dict[str, Any]:
        reply: dict[str, Any] = await pool.call(address, "obj.list", {**args, **extra}, timeout=timeout)
        return reply
    return call


def page(oids: list[int], after: int | None, limit: int | None = None) -> dict[str, Any]:
    """The part of sorted `oids` after the cursor, at most LIST_PAGE long."""
    limit = min(limit or LIST_PAGE, LIST_PAGE)
    if after is not None:
        oids = oids[bisect.bisect_right(oids, int(after)):]
    return {"oids": oids[:limit], "more": len(oids) > limit}


async def list_all(call: ListCall, vid: int | list[int], kind: int | None = None) -> list[int]:
    """Every id of `vid` (or of each of a list of at most VIDS_PER_LIST vids)
    on one peer, following the cursor page by page."""
    out: list[int] = []
    after = None
    which: dict[str, Any] = {"vids": vid} if isinstance(vid, list) else {"vid": vid}
    while True:
        reply = await call({**which, "kind": kind, "after": after})
        out.extend(reply["oids"])
        if not reply["more"] or not reply["oids"]:
            return out
        after = reply["oids"][-1]


async def list_many(call: ListCall, vids: list[int], kind: int | None = None) -> list[int]:
    """Every id of the `vids` on one peer: one listing per VIDS_PER_LIST
    vids, or one per vid from a peer older than `vids` (it refuses the
    argument with EINVAL)."""
    out: list[int] = []
    for at in range(0, len(vids), VIDS_PER_LIST):
        chunk = vids[at:at + VIDS_PER_LIST]
        try:
            out.extend(await list_all(call, chunk, kind))
        except VdifsError as e:
            if e.errno != errno.EINVAL:
                raise
            for vid in chunk:
                out.extend(await list_all(call, vid, kind))
    return out


class ListFailed(VdifsError):
    """A peer could not be listed (`list_on_peers`): which, and why."""

    def __init__(self, peer: str, error: VdifsError) -> None:
        super().__init__(f"cannot list objects on peer {peer}: {error}", code=error.errno)
        self.peer = peer
        self.error = error


async def list_on_peers(calls: dict[str, ListCall], vids: list[int],
                        kind: int | None = None) -> dict[str, list[int]]:
    """peer -> every id of the `vids` it holds, PEERS_AT_ONCE peers at a
    time (`calls`: peer -> its ListCall). The first peer that fails stops
    the others and is raised as ListFailed."""
    found: dict[str, list[int]] = {}
    limiter = trio.CapacityLimiter(PEERS_AT_ONCE)
    failed: list[ListFailed] = []

    async def one(peer: str, call: ListCall, cancel: trio.CancelScope) -> None:
        async with limiter:
            try:
                found[peer] = await list_many(call, vids, kind)
            except VdifsError as e:
                failed.append(ListFailed(peer, e))
                cancel.cancel()

    async with trio.open_nursery() as nursery:
        for peer, call in calls.items():
            nursery.start_soon(one, peer, call, nursery.cancel_scope)
    if failed:
        raise failed[0]
    return found
