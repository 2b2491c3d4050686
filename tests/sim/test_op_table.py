"""The peer's op table tells the truth about its handlers.

Each entry declares whether the op is open before authentication, whether
its handler checks the sender's epoch, and whether it waits at the gate
while the peer sorts out stale objects. The handlers make those checks
themselves (no wrapper on the hot path), so this test holds every flag to
what the handler does: a stale epoch is refused exactly by the ops that
say they check it, and a shut gate holds exactly the ops that say they
wait at it.
"""

import errno
import inspect

import pytest
import trio

from vdifs.errors import InvalidArgument, VdifsError
from vdifs.model.cluster import PeerInfo
from vdifs.model.ids import data_oid
from vdifs.peer.daemon import EPOCH, EPOCH_IF_SENT, NO_EPOCH
from vdifs.wire.rpc import RemoteError, Session
from vdifs.wire.seal import wrap_secret

from .test_epochs import MemoryNet, make_cluster

OID = data_oid(3, 0)


def valid_args(daemons) -> dict[str, dict]:
    """A well-formed request for every op (without its epoch)."""
    me, other = daemons[0].state, daemons[1].state
    return {
        "peer.hello": {},
        "peer.register_pending": {"peer": PeerInfo("newcomer", "10.0.0.9:7000").to_dict()},
        "peer.info": {},
        "peer.ping": {},
        "peer.probe": {"address": other.listen},
        "peer.relay": {"to": other.listen, "op": "peer.info", "args": {}},
        "cluster.format": {"cluster_id": "c", "secret": b"s" * 32, "copies": 1, "min_copies": 1},
        "cluster.adopt": {"cluster_id": "c", "secret": b"s" * 32, "map": me.cmap.to_dict()},
        "cluster.map": {},
        "cluster.notify": {"map": me.cmap.to_dict()},
        "cluster.add_peer": {"peer": me.cmap.peers[other.peer_id].to_dict()},  # already in: no change
        "cluster.remove_peer": {"peer": "nobody"},
        "cluster.set": {"copies": None, "min_copies": None},
        "cluster.replace_meta": {"old": "nobody", "new": "nobody"},
        # the secret it already has: a retry, nothing changes
        "cluster.rotate_secret": {"wrapped": wrap_secret(me.creds.secret, me.creds.secret,
                                                         me.creds.cluster_id.encode())},
        "paxos.prepare": {"key": "k", "ballot": [1, "t"]},
        "paxos.accept": {"key": "k", "ballot": [1, "t"], "value": b"v"},
        "paxos.peek": {"key": "k"},
        "paxos.peek_many": {"keys": ["k", "k2"], "unless": [None, [1, "t"]]},
        "paxos.keys": {},
        "paxos.install": {"key": "k2", "ballot": [1, "t"], "value": None},
        "obj.read": {"oid": OID, "offset": 0, "length": 1},
        "obj.write": {"oid": OID, "offset": 0, "data": b"w"},
        "obj.writev": {"oids": [OID], "offsets": [0], "lengths": [1], "data": b"w"},
        "obj.create": {"oid": data_oid(3, 1), "offset": 0, "data": b"c", "size": 8},
        "obj.delete": {"oid": data_oid(3, 2)},
        "obj.collect": {"oid": data_oid(3, 3), "older_than": 3600},
        "obj.fetch": {"oid": OID},
        "obj.sync": {"oids": [OID]},
        "obj.list": {"vid": 3},
        "obj.vids": {},
        "obj.finish_vid": {"vid": 99},
        "obj.digest": {"oids": [OID]},
        "obj.pull": {"oid": OID, "source": other.listen},
        "obj.changed_after": {"since": 0},
        "lease.fence": {"vid": 77, "gen": 1},
    }


async def outcome(handler, args, wait: float = 1.0) -> str:
    """'blocked', 'stale', 'invalid', or 'answered' (a result or another error)."""
    with trio.move_on_after(wait):
        try:
            await handler(args, Session("test", True))
        except RemoteError as e:
            return "stale" if e.errno == errno.ESTALE else "answered"
        except InvalidArgument:
            return "invalid"
        except VdifsError:
            return "answered"
        return "answered"
    return "blocked"


async def test_every_flag_matches_what_its_handler_does(tmp_path, nursery):
    net = MemoryNet()
    _creds, daemons = await make_cluster(tmp_path, 3, net)
    d = daemons[0]
    for peer in daemons:
        await peer.data.h_create({"oid": OID, "offset": 0, "data": b"x", "size": 8, "epoch": 1},
                                 Session("test", True))
    samples = valid_args(daemons)
    assert samples.keys() == d.ops.keys()  # every op is covered
    assert d.open_ops() == {"peer.hello", "peer.register_pending", "cluster.format", "cluster.adopt"}

    for name, op in d.ops.items():
        assert op.epoch in (NO_EPOCH, EPOCH, EPOCH_IF_SENT), name
        # an older epoch (the map is at 1): refused exactly where the epoch is checked
        got = await outcome(op.handler, {**samples[name], "epoch": 0})
        assert got == ("stale" if op.epoch != NO_EPOCH else "answered"), (name, got)
        # no epoch at all: missing only where it is required
        got = await outcome(op.handler, dict(samples[name]))
        assert got == ("invalid" if op.epoch == EPOCH else "answered"), (name, got)

    d.state.shut_gate()
    for name, op in d.ops.items():
        got = await outcome(op.handler, {**samples[name], "epoch": 1}, wait=0.5)
        assert (got == "blocked") == op.gate, (name, got)
    d.state.open_gate()


async def test_the_fast_forms_make_the_same_checks_or_hand_over(tmp_path, nursery):
    """An op's fast form (run in the connection's reader) answers only when its
    handler would answer at once: with the gate shut, an older or newer epoch,
    or an object it does not hold open, it hands over (NOT_NOW) and changes
    nothing; a fenced writer is refused as by the handler; otherwise its answer
    is the handler's."""
    from vdifs.wire.rpc import NOT_NOW

    net = MemoryNet()
    _creds, daemons = await make_cluster(tmp_path, 3, net)
    d = daemons[0]
    s = Session("test", True)
    await d.data.h_create({"oid": OID, "offset": 0, "data": b"x" * 8, "size": 1 << 20, "epoch": 1}, s)
    await d.data.h_write({"oid": OID, "offset": 100, "data": b"y", "epoch": 1}, s)  # table DIRTY: inline ok
    fast = {name: op.fast for name, op in d.ops.items() if op.fast is not None}
    assert set(fast) == {"obj.read", "obj.write", "obj.writev"}
    read = {"oid": OID, "offset": 0, "length": 8}
    write = {"oid": OID, "offset": 4, "data": b"z"}
    writev = {"oids": [OID, OID], "offsets": [2, 6], "lengths": [1, 1], "data": b"vv"}

    for epoch in (0, 2):  # stale: the handler refuses; newer: it refreshes the map first
        assert fast["obj.read"]({**read, "epoch": epoch}, s) is NOT_NOW
        assert fast["obj.write"]({**write, "epoch": epoch}, s) is NOT_NOW
        assert fast["obj.writev"]({**writev, "epoch": epoch}, s) is NOT_NOW
    assert await d.data.h_read({**read, "epoch": 1}, s) == b"x" * 8  # no fast write landed
    d.state.shut_gate()
    assert fast["obj.read"]({**read, "epoch": 1}, s) is NOT_NOW
    assert fast["obj.write"]({**write, "epoch": 1}, s) is NOT_NOW
    assert fast["obj.writev"]({**writev, "epoch": 1}, s) is NOT_NOW
    d.state.open_gate()
    assert await d.data.h_read({**read, "epoch": 1}, s) == b"x" * 8
    assert fast["obj.read"]({"oid": data_oid(3, 5), "offset": 0, "length": 8, "epoch": 1}, s) is NOT_NOW

    assert fast["obj.read"]({**read, "epoch": 1}, s) == b"x" * 8
    assert fast["obj.write"]({**write, "epoch": 1, "gen": 3}, s) is None
    assert await d.data.h_read({**read, "epoch": 1}, s) == b"xxxxzxxx"
    assert fast["obj.writev"]({**writev, "epoch": 1, "gen": 3}, s) is None
    assert await d.data.h_read({**read, "epoch": 1}, s) == b"xxvxzxvx"
    await d.data.h_fence({"vid": 3, "gen": 5}, s)
    for op, args in (("obj.write", {**write, "epoch": 1, "gen": 4}),
                     ("obj.write", {**write, "epoch": 1, "gen": 4, "lvid": 3}),
                     ("obj.writev", {**writev, "data": b"ww", "epoch": 1, "gen": 4})):
        try:
            fast[op](args, s)
        except VdifsError as e:
            assert e.errno == errno.EPERM
        else:
            raise AssertionError("a fenced generation wrote through the fast path")
    assert await d.data.h_read({**read, "epoch": 1}, s) == b"xxvxzxvx"


async def test_a_writev_makes_every_write_or_refuses_them_all(tmp_path, nursery):
    """obj.writev: the fast form makes the writes it can at once, in order,
    and hands the rest to the handler, which makes only those; bad input
    (lists that disagree, data that does not add up, a write past the
    object) is refused before anything is written."""
    from vdifs.wire.rpc import NOT_NOW

    net = MemoryNet()
    _creds, daemons = await make_cluster(tmp_path, 3, net)
    d = daemons[0]
    s = Session("test", True)
    a, b = OID, data_oid(3, 7)
    for oid in (a, b):
        await d.data.h_create({"oid": oid, "offset": 0, "data": b"x" * 8, "size": 1 << 20, "epoch": 1}, s)
        await d.data.h_write({"oid": oid, "offset": 100, "data": b"y", "epoch": 1}, s)  # table DIRTY: inline ok
    # one open object at a time: b's stays open, a's is closed (a write into it waits for an open)
    d.data.store.max_open = 1
    await d.data.h_create({"oid": data_oid(3, 8), "offset": 0, "data": b"c", "size": 8, "epoch": 1}, s)
    await d.data.h_write({"oid": b, "offset": 100, "data": b"y", "epoch": 1}, s)

    args = {"oids": [b, a, b], "offsets": [0, 1, 7], "lengths": [2, 3, 1], "data": b"BBAAAb", "epoch": 1}
    assert d.ops["obj.writev"].fast(args, s) is NOT_NOW  # b's first write made, a's not
    assert await d.data.h_read({"oid": b, "offset": 0, "length": 8, "epoch": 1}, s) == b"BBxxxxxx"
    # the handler makes the rest, not b's first write again (it would undo this one)
    await d.data.h_write({"oid": b, "offset": 0, "data": b"QQ", "epoch": 1}, s)
    await d.data.h_writev(args, s)
    assert await d.data.h_read({"oid": a, "offset": 0, "length": 8, "epoch": 1}, s) == b"xAAAxxxx"
    assert await d.data.h_read({"oid": b, "offset": 0, "length": 8, "epoch": 1}, s) == b"QQxxxxxb"

    for bad in ({"oids": [a, b], "offsets": [0], "lengths": [1, 1], "data": b"zz"},
                {"oids": [a, b], "offsets": [0, 0], "lengths": [1, 1], "data": b"zzz"},
                {"oids": [a, b], "offsets": [0, (4 << 20) - 1], "lengths": [1, 2], "data": b"zzz"},
                {"oids": [a], "offsets": [0], "lengths": [0], "data": b""},
                {"oids": [a], "offsets": [0], "lengths": [1], "data": "z"}):
        for form in (d.ops["obj.writev"].fast, d.data.h_writev):
            with pytest.raises(InvalidArgument):
                got = form({**bad, "epoch": 1}, s)
                if inspect.iscoroutine(got):
                    await got
    assert await d.data.h_read({"oid": a, "offset": 0, "length": 8, "epoch": 1}, s) == b"xAAAxxxx"
    assert await d.data.h_read({"oid": b, "offset": 0, "length": 8, "epoch": 1}, s) == b"QQxxxxxb"
