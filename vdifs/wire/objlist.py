"""Object lists in pages.

A 4 TiB VDI has a million objects, more ids than one frame holds, so
`obj.list` answers at most LIST_PAGE ids after a cursor and says whether
more follow. `page` is the peer's side, `list_all` the caller's.
"""

from __future__ import annotations

import bisect
from collections.abc import Awaitable, Callable
from typing import Any

LIST_PAGE = 100_000  # ids per reply: about 1 MB of msgpack
VIDS_PER_LIST = 4096  # vids one request may name (`vids`)

#: sends one obj.list request with these args and returns its reply
ListCall = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


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
