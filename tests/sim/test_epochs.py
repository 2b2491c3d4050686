"""Epochs: stale senders refresh and retry; peers learn newer maps.

Real PeerDaemon handlers and a real RemotePool, joined by an in-memory
network instead of TCP (same call signature as RpcPool), so the schedule of
map changes, partitions and requests is exactly the one written here.
"""

import copy
import errno
import math
import os

import pytest
import trio
import trio.testing

from vdifs.client.reach import LOST_AFTER, PROBE_INTERVAL, RoutedRpc
from vdifs.model.probing import MOUNT_ACTIVE_WINDOW
from vdifs.client.remote import RemotePool
from vdifs.errors import InvalidArgument, VdifsError
from vdifs.meta.consensus import CLUSTER_KEY, MAP_POLL_SECONDS, POLLS_PER_SECOND, MetaClient, map_poll_interval
from vdifs.meta.credentials import Credentials
from vdifs.model.cluster import ClusterMap, PeerInfo, choose_meta
from vdifs.model.ids import OBJECT_SIZE, data_oid, vid_of
from vdifs.model.placement import placement
from vdifs.peer.daemon import PeerDaemon
from vdifs.wire.rpc import PeerUnavailable, RemoteError, Session


class MemoryNet:
    """Routes calls to daemons' handlers; `down` addresses are unreachable."""

    def __init__(self) -> None:
        self.daemons: dict[str, PeerDaemon] = {}
        self.down: set[str] = set()
        self.cut: set[frozenset[str]] = set()  # pairs of owners/addresses with no link between them
        self.calls: list[tuple[str, str, int]] = []  # (address, op, epoch)
        self.pings: dict[str, int] = {}  # owner -> peer.ping requests it sent

    def pool_for(self, owner: str):
        net = self

        class Pool:
            secret = None
            nursery = None

            async def call(self, address, op, args=None, *, timeout=30.0):
                args = copy.deepcopy(args or {})
                net.calls.append((address, op, args.get("epoch", -1)))
                if op == "peer.ping":
                    net.pings[owner] = net.pings.get(owner, 0) + 1
                if address in net.down or owner in net.down or frozenset((owner, address)) in net.cut:
                    raise PeerUnavailable(f"{address} unreachable")
                handler = net.daemons[address].ops[op].handler
                try:
                    return await handler(args, Session(owner, True))
                except RemoteError:
                    raise
                except VdifsError as e:
                    raise RemoteError(e.errno, str(e)) from None

            async def start(self, address, op, args=None, *, soon=False):  # in memory: sent at once
                try:
                    result, error = await self.call(address, op, args), None
                except VdifsError as e:
                    result, error = None, e

                class Done:
                    async def finish(self, timeout):
                        if error is not None:
                            raise error
                        return result
                return Done()

            def get(self, address):
                raise NotImplementedError

            async def drop(self, address):
                pass  # no connections to close: a call to a down address fails at once

            def drop_soon(self, address, *, abort=False):
                pass

            def reset(self, secret):
                pass  # no credentials on this network

            def last_heard(self, address):
                return -math.inf  # only the pings count here

            async def aclose(self):
                pass

        return Pool()


async def make_cluster(tmp_path, n: int, net: MemoryNet):
    creds = Credentials.new()
    daemons = []
    for i in range(n):
        d = PeerDaemon(str(tmp_path / f"p{i}"), f"10.0.0.{i}:7000")  # addresses are only names here
        d.load()
        d.state.creds = creds
        d.state.rpc = net.pool_for(d.state.listen)
        d.state.meta = MetaClient(d.state.peer_id, d.state.rpc, [])
        net.daemons[d.state.listen] = d
        daemons.append(d)
    first = daemons[:3]
    peers = {d.state.peer_id: PeerInfo(d.state.peer_id, d.state.listen) for d in first}
    cmap = ClusterMap(creds.cluster_id, epoch=1, copies=2, min_copies=1, peers=peers,
                      meta=choose_meta(list(peers)))
    for d in first:
        await d.state.adopt_map(cmap)
    assert await first[0].state.meta.register(CLUSTER_KEY).cas(0, cmap.encode())
    return creds, daemons


async def connected_pool(daemons, net, nursery, creds) -> RemotePool:
    """A mount's RemotePool talking over the in-memory network."""
    pool = RemotePool([daemons[0].state.listen], creds, nursery, "mount-1")
    wire = net.pool_for("mount")
    pool.rpc = RoutedRpc(wire, lambda: pool.cmap)
    pool.meta = MetaClient("mount-1", wire, [])
    await pool.connect()
    return pool


async def join_while_away(daemons, net: MemoryNet):
    """p3 joins through p0 while p1 is partitioned away: epoch 2, and p1
    misses the notify. Then the partition heals. Returns p1's state and the new map."""
    p1 = daemons[1].state
    net.down.add(p1.listen)
    newcomer = daemons[3].state
    new_map = ClusterMap.from_dict(await daemons[0].membership.h_add_peer(
        {"peer": PeerInfo(newcomer.peer_id, newcomer.listen).to_dict()}, Session("admin", True)))
    await newcomer.adopt_map(new_map)
    net.down.clear()
    return p1, new_map


async def holders(daemons, oid):
    return {d.state.peer_id for d in daemons if oid in await d.state.store.list_objects(vid_of(oid))}


async def test_stale_sender_refreshes_and_retries(tmp_path, nursery):
    net = MemoryNet()
    creds, daemons = await make_cluster(tmp_path, 4, net)
    pool = await connected_pool(daemons, net, nursery, creds)
    pool.register_vdi(5, 2)
    assert pool.map.epoch == 1
    before = [data_oid(5, i) for i in range(40)]
    for oid in before:
        await pool.create(oid, 0, b"epoch1", 64)
        assert await holders(daemons, oid) == set(placement(pool.map, oid, 2))

    map1 = pool.map
    p1, new_map = await join_while_away(daemons, net)
    assert new_map.epoch == 2 and daemons[2].state.cmap.epoch == 2 and p1.cmap.epoch == 1
    while pool.rpc.cut:  # the mount's pings cut p1 off meanwhile: until they reach it again
        await trio.sleep(0.5)

    # p1 never heard of epoch 2; a read (its handler checks the epoch) carrying
    # epoch 2 makes it adopt the newer map from the register before it answers
    held = [oid for oid in before if p1.peer_id in await holders(daemons, oid)][0]
    events = []
    p1.on_map_change(lambda: events.append(("adopted", p1.cmap.epoch)))
    assert await pool.rpc.call(p1.listen, "obj.read", {"oid": held, "offset": 0, "length": 6,
                                                      "epoch": 2}) == b"epoch1"
    events.append(("answered", p1.cmap.epoch))
    assert events == [("adopted", 2), ("answered", 2)]

    # the mount still has epoch 1 (its poll of the register may have seen epoch 2
    # while the peers confirmed the notify through consensus: set it back): peers
    # with epoch 2 refuse, the mount reads the newer map from the register and retries
    pool.cmap = map1
    moved = [oid for oid in (data_oid(5, 100 + i) for i in range(200))
             if set(placement(new_map, oid, 2)) != set(placement(pool.map, oid, 2))]
    assert moved  # the join moved some placements
    pool_map_before = pool.map
    net.calls.clear()
    await pool.create(moved[0], 0, b"epoch2", 64)
    assert pool.map.epoch == 2
    creates = [(a, e) for a, op, e in net.calls if op == "obj.create"]
    old_targets = {pool_map_before.peers[p].address for p in placement(pool_map_before, moved[0], 2)}
    new_targets = {new_map.peers[p].address for p in placement(new_map, moved[0], 2)}
    # the refused attempt went to the old replicas, all stamped with the old epoch ...
    assert {a for a, e in creates if e == 1} == old_targets
    # ... and only the new replicas got the retry with the new one
    assert {a for a, e in creates if e == 2} == new_targets
    assert await holders(daemons, moved[0]) == set(placement(new_map, moved[0], 2))

    # reads fail over when the first replica is unreachable
    oid = [o for o in before if set(placement(new_map, o, 2)) == await holders(daemons, o)][0]
    first = placement(pool.map, oid, 2)[0]
    net.down.add(pool.map.peers[first].address)
    net.calls.clear()
    assert await pool.read(oid, 0, 6) == b"epoch1"
    reads = [a for a, op, _ in net.calls if op == "obj.read"]
    assert reads == [pool.map.peers[p].address for p in placement(pool.map, oid, 2)]  # each once, in order
    net.down.clear()

    # a read the mount sends with an old epoch is refused; it adopts the newer map and reads there
    pool.cmap = pool_map_before
    net.calls.clear()
    assert await pool.read(moved[0], 0, 6) == b"epoch2"
    assert pool.map.epoch == 2
    assert [e for a, op, e in net.calls if op == "obj.read"][-1] == 2


async def test_older_epoch_is_refused_with_the_newer_map(tmp_path, nursery):
    net = MemoryNet()
    creds, daemons = await make_cluster(tmp_path, 3, net)
    d = daemons[0].data
    with pytest.raises(RemoteError) as e:
        await d.h_read({"oid": data_oid(1, 0), "offset": 0, "length": 1, "epoch": 0}, Session("m", True))
    assert e.value.errno == errno.ESTALE
    assert ClusterMap.from_dict(e.value.result["map"]).epoch == 1


async def test_object_lists_come_in_pages(tmp_path, nursery, monkeypatch):
    monkeypatch.setattr("vdifs.wire.objlist.LIST_PAGE", 7)
    net = MemoryNet()
    creds, daemons = await make_cluster(tmp_path, 3, net)
    pool = await connected_pool(daemons, net, nursery, creds)
    pool.register_vdi(9, 2)
    oids = [data_oid(9, i) for i in range(30)]
    for oid in oids:
        await pool.create(oid, 0, b"x", 8)
    net.calls.clear()
    assert await pool.list_objects(9) == oids
    assert sum(1 for _, op, _ in net.calls if op == "obj.list") > 3  # several pages per peer


async def test_peer_refuses_writes_outside_one_object(tmp_path, nursery):
    net = MemoryNet()
    creds, daemons = await make_cluster(tmp_path, 3, net)
    d = daemons[0].data
    oid = data_oid(4, 0)
    s = Session("m", True)
    await d.h_create({"oid": oid, "offset": 0, "data": b"ok", "size": 4 << 20, "epoch": 1}, s)
    for bad in ({"oid": oid, "offset": (4 << 20) - 1, "data": b"xx", "epoch": 1},
                {"oid": oid, "offset": 0, "data": "text", "epoch": 1},
                {"oid": -1, "offset": 0, "data": b"x", "epoch": 1}):
        with pytest.raises(InvalidArgument):
            await d.h_write(bad, s)
    with pytest.raises(InvalidArgument):
        await d.h_create({"oid": oid, "offset": 0, "data": b"x", "size": 8 << 20, "epoch": 1}, s)
    assert await d.store.read(oid, 0, 4) == b"ok\0\0"  # nothing changed


async def test_a_restarted_peer_still_marked_up_leaves_and_comes_back_with_the_delta(tmp_path, nursery):
    """A peer that stopped and came back before the others noticed (the map
    still says up) may have missed writes: rejoin() takes it out of the map
    and back in (two epochs), holding data requests until it has set aside
    what the others changed meanwhile."""
    net = MemoryNet()
    creds, daemons = await make_cluster(tmp_path, 3, net)
    pool = await connected_pool(daemons, net, nursery, creds)
    pool.register_vdi(3, 3)
    oids = [data_oid(3, i) for i in range(4)]
    for oid in oids:
        await pool.create(oid, 0, b"before", 64)
    returning = daemons[2].state
    returning.up_epoch = 1
    # A write that failed on it while it was stopped waits for the epoch without
    # it (2) and lands on another peer then (recorded ahead of time here).
    daemons[0].state.journal.record(2, oids[0])
    await daemons[0].state.store.write(oids[0], 0, b"after!")
    returning.shut_gate()  # as run() does at start
    assert returning.clean_start
    await daemons[2].membership.rejoin()
    assert returning.cmap.epoch == 3  # down, then up again
    assert not returning.catching_up  # the gate is open
    held = await returning.store.list_objects(3)
    assert oids[0] not in held and set(oids[1:]) <= set(held)  # only the changed one set aside
    assert await returning.store.list_stale(3) == [oids[0]]


async def test_recovery_behind_by_an_epoch_catches_up_instead_of_taking_back_its_stale_copy(tmp_path, nursery):
    """The sources refuse a recovery fetch of an older epoch. That is no
    answer about the object: the recovering peer must adopt the newer map
    and ask again, not take back the copy it set aside as stale (the soak
    test caught a replica diverging this way)."""
    net = MemoryNet()
    creds, daemons = await make_cluster(tmp_path, 3, net)
    oid = data_oid(5, 0)
    s = Session("m", True)
    for d in daemons[:2]:
        await d.data.h_create({"oid": oid, "offset": 0, "data": b"current", "size": 64, "epoch": 1}, s)
    behind = daemons[2]
    await behind.data.h_create({"oid": oid, "offset": 0, "data": b"stale!!", "size": 64, "epoch": 1}, s)
    await behind.state.store.set_aside_stale([oid], "epoch-1")
    # The map moves to epoch 2 (chosen by consensus); only the sources hear of it.
    newer = daemons[0].state.cmap.with_changes(copies=3)
    assert await daemons[0].state.meta.register(CLUSTER_KEY).cas(1, newer.encode())
    for d in daemons[:2]:
        await d.state.adopt_map(newer)
    assert behind.state.cmap.epoch == 1
    assert await behind.recovery.recover(oid)
    assert await behind.state.store.read(oid, 0, 7) == b"current"
    assert behind.state.cmap.epoch == 2
    assert [op for a, op, e in net.calls if op == "obj.fetch" and e == 1]  # it was refused first


async def test_a_peer_cut_off_from_the_mount_only_is_reached_through_another(tmp_path, nursery, mock_clock):
    """The mount loses its link to p1, which the peers still reach (the map
    keeps it up). Writes and reads of objects p1 holds go through another
    peer (peer.relay) once the mount's probes have cut p1 off; p1 gets its
    replica. Healed, requests go to p1 directly again. A relay does not
    forward what is not a data-path request, nor to an address not up in its map."""
    mock_clock.autojump_threshold = 0.05  # not 0: the peers' file I/O runs in threads
    net = MemoryNet()
    creds, daemons = await make_cluster(tmp_path, 3, net)
    pool = await connected_pool(daemons, net, nursery, creds)
    pool.register_vdi(5, 2)
    p1 = daemons[1].state
    oids = [o for o in (data_oid(5, i) for i in range(40)) if p1.peer_id in placement(pool.map, o, 2)][:4]
    net.cut.add(frozenset(("mount", p1.listen)))
    started = trio.current_time()
    for oid in oids:
        await pool.create(oid, 0, b"relayed", 64)
    assert trio.current_time() - started <= LOST_AFTER + 2 * PROBE_INTERVAL  # a bounded pause
    assert p1.listen in pool.rpc.cut and pool.map.epoch == 1  # cut off from us, up for the cluster
    for oid in oids:
        assert await holders(daemons, oid) == set(placement(pool.map, oid, 2))
        await pool.write(oid, 8, b"again")
        assert await p1.store.read(oid, 0, 13) == b"relayed\0again"
    assert sum(d.relay.relayed for d in daemons) >= 2 * len(oids)
    net.calls.clear()
    assert await pool.read(oids[0], 0, 7) == b"relayed"
    assert all(a != p1.listen for a, op, _ in net.calls if op == "obj.read")  # reads go where we reach

    relay = daemons[0]
    with pytest.raises(InvalidArgument, match="cannot be relayed"):
        await relay.relay.h_relay({"to": p1.listen, "op": "paxos.accept", "args": {}}, Session("m", True))
    with pytest.raises(VdifsError) as e:
        await relay.relay.h_relay({"to": "10.9.9.9:1", "op": "obj.sync", "args": {"oids": []}}, Session("m", True))
    assert e.value.errno == errno.EHOSTUNREACH

    net.cut.clear()
    await trio.sleep(2 * PROBE_INTERVAL)
    assert not pool.rpc.cut
    net.calls.clear()
    await pool.write(oids[0], 0, b"direct!")
    assert ("mount", p1.listen) in {("mount", a) for a, op, _ in net.calls if op == "obj.write"}
    assert all(op != "peer.relay" for _, op, _ in net.calls)

    # At rest the mount pings nobody (design change 51); a request makes it
    # watch that peer's replicas again.
    await trio.sleep(MOUNT_ACTIVE_WINDOW + 2 * PROBE_INTERVAL)
    resting = net.pings.get("mount", 0)
    await trio.sleep(5 * PROBE_INTERVAL)
    assert net.pings.get("mount", 0) == resting
    await pool.write(oids[0], 0, b"wake up")
    await trio.sleep(2 * PROBE_INTERVAL)
    assert net.pings.get("mount", 0) >= resting + 2  # each replica of the object, each round


async def test_a_write_to_a_replica_that_cannot_recover_yet_waits_instead_of_failing(tmp_path, nursery, mock_clock):
    """A peer takes an object over at a new epoch and cannot reach any peer
    that holds it: it answers EAGAIN ("not yet"), not ENOENT, and the mount
    tries again until it can (within --io-wait) instead of failing the write
    with "no such file" (seen in the soak test under partitions)."""
    mock_clock.autojump_threshold = 0.05  # not 0: the peers' file I/O runs in threads
    net = MemoryNet()
    creds, daemons = await make_cluster(tmp_path, 4, net)
    pool = await connected_pool(daemons, net, nursery, creds)
    pool.register_vdi(5, 2)
    before = pool.map
    oids = [data_oid(5, i) for i in range(200)]
    for oid in oids[:60]:
        await pool.create(oid, 0, b"epoch1", 64)
    newcomer = daemons[3].state
    new_map = ClusterMap.from_dict(await daemons[0].membership.h_add_peer(
        {"peer": PeerInfo(newcomer.peer_id, newcomer.listen).to_dict()}, Session("admin", True)))
    await newcomer.adopt_map(new_map)
    for d in daemons[:3]:
        await d.state.adopt_map(new_map)
    taken = [o for o in oids[:60] if newcomer.peer_id in placement(new_map, o, 2)
             and not await newcomer.store.exists(o)]
    assert taken
    oid = taken[0]
    holders_before = {before.peers[p].address for p in placement(before, oid, 2)}
    for address in holders_before:  # the newcomer reaches neither holder
        net.cut.add(frozenset((newcomer.listen, address)))
    with pytest.raises(VdifsError) as e:
        await daemons[3].data.h_write({"oid": oid, "offset": 0, "data": b"epoch2", "epoch": new_map.epoch},
                                      Session("m", True))
    assert e.value.errno == errno.EAGAIN

    async def heal_later() -> None:
        await trio.sleep(3)
        net.cut.clear()

    nursery.start_soon(heal_later)
    started = trio.current_time()
    await pool.write(oid, 0, b"epoch2")  # waits for the heal, then lands on both replicas
    assert trio.current_time() - started >= 3
    for d in daemons:
        if d.state.peer_id in placement(new_map, oid, 2):
            assert await d.state.store.read(oid, 0, 6) == b"epoch2"


async def test_a_new_object_handed_off_before_its_map_entry_is_recovered_not_judged_freed(tmp_path, nursery):
    """An object that no map names (yet) and no peer serves, whose only copy
    was handed off at an epoch change: if that copy changed recently, it may
    be a new object whose map entry is still on its way, and the new owner
    recovers it; an old one is judged freed (seen in the soak test: objects
    fio had just written, their map entries not stored yet, were lost)."""
    net = MemoryNet()
    creds, daemons = await make_cluster(tmp_path, 3, net)
    pool = await connected_pool(daemons, net, nursery, creds)
    pool.register_vdi(5, 2)
    oid = data_oid(5, 0)  # vid 5 is in no map: "no map points at it"
    await pool.create(oid, 0, b"new data", 64)
    holders_now = [d for d in daemons if d.state.peer_id in placement(pool.map, oid, 2)]
    other = next(d for d in daemons if d not in holders_now)
    epoch = pool.map.epoch
    for d in holders_now:  # an epoch change moved it away from both
        await d.state.store.hand_off([oid], epoch)
    assert not await other.state.store.exists(oid)
    assert await other.recovery.recover(oid)
    assert await other.state.store.read(oid, 0, 8) == b"new data"

    await other.state.store.delete(oid)
    for d in holders_now:
        for folder, _dirs, names in os.walk(d.state.store.handoff_root):
            for name in names:
                if name == f"{oid:016x}":
                    os.utime(os.path.join(folder, name), (1, 1))  # changed long ago: a freed object's leftover
    assert not await other.recovery.recover(oid)
    assert not await other.state.store.exists(oid)


async def test_every_read_goes_to_the_first_replica(tmp_path, nursery):
    """Large reads and small ones go to an object's first replica, the one
    that keeps what it wrote in its page cache (the others may have written
    large writes past it: design change 64); the bytes are the object's."""
    net = MemoryNet()
    creds, daemons = await make_cluster(tmp_path, 3, net)
    pool = await connected_pool(daemons, net, nursery, creds)
    pool.register_vdi(6, 3)
    oid = data_oid(6, 0)
    data = bytes(range(256)) * (OBJECT_SIZE // 256)
    await pool.create(oid, 0, data, OBJECT_SIZE)
    first = pool.map.peers[placement(pool.map, oid, 1)[0]].address
    net.calls.clear()
    for mib in range(OBJECT_SIZE >> 20):
        assert await pool.read(oid, mib << 20, 1 << 20) == data[mib << 20:(mib + 1) << 20]
    for off in range(0, 1 << 20, 256 << 10):
        assert await pool.read(oid, off + 4096, 4096) == data[off + 4096:off + 8192]
    reads = [a for a, op, _ in net.calls if op == "obj.read"]
    assert reads == [first] * ((OBJECT_SIZE >> 20) + 4)


async def test_a_peer_that_missed_a_map_change_learns_it_from_its_pings(tmp_path, nursery, mock_clock):
    """p1 is away while p3 joins (epoch 2) and misses the announcement; no
    map poll runs here. Its failure detector's pings meet peers at epoch 2,
    and it reads the map through consensus within a few rounds (the poll
    is rare in a large cluster: map_poll_interval)."""
    mock_clock.autojump_threshold = 0.05  # not 0: the peers' file I/O runs in threads
    net = MemoryNet()
    _creds, daemons = await make_cluster(tmp_path, 4, net)
    p1, new_map = await join_while_away(daemons, net)
    newcomer = daemons[3].state
    assert p1.cmap.epoch == 1 and new_map.epoch == 2
    nursery.start_soon(daemons[1].health.run)
    with trio.fail_after(5):
        while p1.cmap.epoch < 2:
            await trio.sleep(0.1)
    assert p1.cmap.epoch == 2 and newcomer.peer_id in p1.cmap.peers


def test_the_map_poll_costs_the_meta_peers_the_same_in_a_large_cluster():
    assert map_poll_interval(3) == MAP_POLL_SECONDS
    assert 1000 / map_poll_interval(1000) == 100 / map_poll_interval(100) == POLLS_PER_SECOND


async def test_a_peer_registering_while_the_cluster_formats_neither_breaks_the_format_nor_is_lost(tmp_path):
    """The format tells each registered peer the map, one await each; a peer
    that registers meanwhile (peers are started together) used to make the
    format fail half way ("dictionary changed size"), leaving peers with a
    map the register never held. It stays registered for later instead."""
    net = MemoryNet()
    daemons = []
    for i in range(5):
        d = PeerDaemon(str(tmp_path / f"p{i}"), f"10.0.0.{i}:7000")
        d.load()
        d.state.rpc = net.pool_for(d.state.listen)
        d.state.meta = MetaClient(d.state.peer_id, d.state.rpc, [])
        net.daemons[d.state.listen] = d
        daemons.append(d)
    first = daemons[0].membership
    admin = Session("admin", True)
    for d in daemons[1:4]:
        await first.h_register_pending({"peer": d.state.me().to_dict()}, admin)
    creds = Credentials.new()
    formatted = {}

    async def format_cluster() -> None:
        formatted.update(await first.h_format({"cluster_id": creds.cluster_id, "secret": creds.secret,
                                               "copies": 3, "min_copies": 1}, admin))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(format_cluster)
        await trio.testing.wait_all_tasks_blocked()  # the format is telling the first peer
        await first.h_register_pending({"peer": daemons[4].state.me().to_dict()}, admin)
    cmap = ClusterMap.from_dict(formatted)
    assert set(cmap.peers) == {d.state.peer_id for d in daemons[:4]}
    assert all(d.state.cmap is not None and d.state.cmap.epoch == 1 for d in daemons[:4])
    assert (await daemons[1].state.meta.read_map()).peers.keys() == cmap.peers.keys()  # stored, too
    assert list(first.pending) == [daemons[4].state.peer_id]
