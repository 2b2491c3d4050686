"""Object lists (`wire/objlist.py`): pages, several vids per request, peers
side by side, and the answer of a peer that predates `vids`."""

from __future__ import annotations

import errno

import pytest
import trio

from vdifs.errors import InvalidArgument
from vdifs.wire.rpc import PeerUnavailable
from vdifs.model.ids import data_oid
from vdifs.wire import objlist


def peer(holds: list[int], *, old: bool = False, page: int = 3, log: list | None = None):
    """A ListCall answering like a peer's obj.list, over `holds`."""
    held = sorted(holds)

    async def call(args):
        await trio.sleep(0)
        if log is not None:
            log.append(args)
        if "vids" in args:
            if old:
                raise InvalidArgument("vid is required")
            vids = set(args["vids"])
            assert len(vids) <= objlist.VIDS_PER_LIST
        else:
            vids = {args["vid"]}
        return objlist.page([o for o in held if (o >> 32) & 0xFFFFFF in vids], args["after"], page)
    return call


async def test_many_vids_in_one_listing_paged():
    oids = [data_oid(v, i) for v in (1, 2, 5) for i in range(4)]
    log: list = []
    got = await objlist.list_many(peer(oids, log=log), [1, 2, 3])
    assert sorted(got) == [o for o in oids if o >> 32 & 0xFFFFFF in (1, 2)]
    assert all("vids" in a for a in log) and len(log) == 3  # 8 ids in pages of 3


async def test_a_peer_before_vids_is_asked_per_vid():
    oids = [data_oid(v, i) for v in (1, 2) for i in range(2)]
    log: list = []
    assert sorted(await objlist.list_many(peer(oids, old=True, log=log), [1, 2])) == oids
    assert [("vids" in a, a.get("vid")) for a in log] == [(True, None), (False, 1), (False, 2)]


async def test_vids_beyond_one_request_are_split():
    vids = list(range(1, 2 * objlist.VIDS_PER_LIST + 2))
    log: list = []
    assert await objlist.list_many(peer([data_oid(8000, 0)], log=log), vids) == [data_oid(8000, 0)]
    assert [len(a["vids"]) for a in log] == [objlist.VIDS_PER_LIST, objlist.VIDS_PER_LIST, 1]


async def test_peers_side_by_side_and_the_first_failure_stops_the_rest():
    started = 0
    most = 0
    running = 0

    def slow(holds):
        inner = peer(holds)

        async def call(args):
            nonlocal started, most, running
            started += 1
            running += 1
            most = max(most, running)
            try:
                await trio.sleep(1)
                return await inner(args)
            finally:
                running -= 1
        return call

    calls = {f"p{i}": slow([data_oid(1, i)]) for i in range(40)}
    got = await objlist.list_on_peers(calls, [1])
    assert got == {f"p{i}": [data_oid(1, i)] for i in range(40)}
    assert most == objlist.PEERS_AT_ONCE

    async def broken(args):
        raise PeerUnavailable("request lost")

    calls["p7"] = broken
    started = 0
    with pytest.raises(objlist.ListFailed) as e:
        await objlist.list_on_peers(calls, [1])
    assert e.value.peer == "p7" and isinstance(e.value.error, PeerUnavailable)
    assert e.value.errno == PeerUnavailable("x").errno != errno.EINVAL
    assert started < 40  # the rest were not asked
