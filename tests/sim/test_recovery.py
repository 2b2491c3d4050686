"""Recovery under message loss (deterministic).

Five real PeerDaemons (stores on disk, real handlers and Recovery) joined by
the in-memory network of test_epochs, which here loses a share of requests
and of replies (seeded). One peer is marked down; the others' background
recovery must get every object of the live VDIs back to exactly the peers
placement names, with the original bytes, hand off and then drop the copies
placement moved away, and never copy an object of a deleted VDI.
"""

import copy
import os
import random

import pytest
import trio
import trio.testing

from vdifs.errors import InvalidArgument
from vdifs.meta.consensus import DIRECTORY_KEY
from vdifs.model.cluster import DOWN, PeerInfo
from vdifs.model.directory import Directory
from vdifs.model.ids import data_oid, vid_of
from vdifs.model.placement import placement
from vdifs.peer.membership import peer_state_change
from vdifs.wire.rpc import PeerUnavailable, Session

from .test_epochs import MemoryNet, connected_pool, make_cluster

COPIES = 3


class LossyNet(MemoryNet):
    """Loses `loss` of the requests (never delivered) and as many replies
    (delivered, the answer lost) once `lossy` is set."""

    def __init__(self, seed: int, loss: float) -> None:
        super().__init__()
        self.rng = random.Random(seed)
        self.loss = loss
        self.lossy = False
        self.lost = 0
        self.lists: list[tuple[str, str]] = []  # (address, "vid" or "vids") of every obj.list once lossy
        self.old_peers: set[str] = set()  # addresses that refuse `vids` as peers before it did

    def pool_for(self, owner: str):
        inner = super().pool_for(owner)
        net = self

        class Lossy(type(inner)):  # type: ignore[misc]
            async def call(self, address, op, args=None, *, timeout=30.0):
                await trio.sleep(net.rng.uniform(0, 0.01))  # some delay, so messages reorder
                if op == "obj.list" and net.lossy:
                    form = "vids" if "vids" in (args or {}) else "vid"
                    net.lists.append((address, form))
                    if form == "vids" and address in net.old_peers:
                        raise InvalidArgument("vid is required")  # what a peer before `vids` answers
                if net.lossy and net.rng.random() < net.loss:
                    net.lost += 1
                    raise PeerUnavailable(f"request {op} to {address} lost")
                result = await inner.call(address, op, copy.deepcopy(args), timeout=timeout)
                if net.lossy and net.rng.random() < net.loss:
                    net.lost += 1
                    raise PeerUnavailable(f"reply to {op} from {address} lost")
                return result

        return Lossy()


async def served(daemons, vid: int) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for d in daemons:
        for oid in await d.state.store.list_objects(vid):
            out.setdefault(oid, set()).add(d.state.peer_id)
    return out


def holds_handoff(d) -> bool:
    """Whether a peer still keeps objects it handed off."""
    root = d.state.store.handoff_root
    return os.path.isdir(root) and bool(os.listdir(root))


def run_scenario(tmp_path, seed: int, *, more_vdis: int = 0, old_peer: bool = False) -> LossyNet:
    """`more_vdis`: live VDIs beside "live" that hold no objects (each one
    more thing to list); `old_peer`: one peer answers lists as before they
    could name several vids."""
    net = LossyNet(seed, loss=0.2)

    async def main() -> None:
        creds, daemons = await make_cluster(tmp_path, 5, net)
        # make_cluster puts three peers in the map; add the other two
        for d in daemons[3:]:
            await daemons[0].membership.h_add_peer({"peer": PeerInfo(d.state.peer_id, d.state.listen).to_dict()},
                                                   Session("admin", True))
        cmap = await daemons[0].state.meta.read_map()
        for d in daemons:
            await d.state.adopt_map(cmap)
        directory = Directory()
        live = directory.create("live", 64 << 20, copies=COPIES, now=0)
        gone = directory.create("gone", 64 << 20, copies=COPIES, now=0)
        for i in range(more_vdis):
            directory.create(f"empty{i}", 64 << 20, copies=COPIES, now=0)
        if old_peer:
            net.old_peers.add(daemons[1].state.listen)
        assert await daemons[0].state.meta.register(DIRECTORY_KEY).cas(0, directory.encode())

        async with trio.open_nursery() as nursery:
            pool = await connected_pool(daemons, net, nursery, creds)
            content: dict[int, bytes] = {}
            for vid in (live.vid, gone.vid):
                pool.register_vdi(vid, COPIES)
                for i in range(24):
                    oid = data_oid(vid, i)
                    content[oid] = random.Random(oid).randbytes(3000)
                    await pool.create(oid, 0, content[oid], 4096)
            gone_before = await served(daemons, gone.vid)
            # "gone" is deleted (its purge is not part of this test) ...
            directory.delete("gone")
            reg = daemons[0].state.meta.register(DIRECTORY_KEY)
            version, _ = await reg.get()
            assert await reg.cas(version, directory.encode())
            # ... and the last peer dies: marked down, epoch moves on
            victim = daemons[4]
            net.down.add(victim.state.listen)
            new = await daemons[0].membership.change_map(peer_state_change(victim.state.peer_id, DOWN))
            up = daemons[:4]
            for d in up:
                await d.state.adopt_map(new)
                d.recovery.wakeup = trio.Event()
            net.lossy = True
            for d in up:
                nursery.start_soon(d.recovery.run)
                d.recovery.epoch_changed()

            async def settled() -> bool:
                where = await served(up, live.vid)
                return (where.keys() == {data_oid(live.vid, i) for i in range(24)}
                        and all(ids == set(placement(new, oid, COPIES)) for oid, ids in where.items())
                        and not any(holds_handoff(d) for d in up))

            with trio.move_on_after(600) as scope:
                while not await settled():
                    await trio.sleep(1)
            where = await served(up, live.vid)
            wrong = {f"{oid:016x}": (sorted(ids), sorted(placement(new, oid, COPIES)))
                     for oid, ids in where.items() if ids != set(placement(new, oid, COPIES))}
            assert not scope.cancelled_caught, (
                f"recovery did not settle (seed {seed}, {net.lost} messages lost): {len(where)} objects, "
                f"misplaced {wrong}, handoff left on {[d.state.peer_id for d in up if holds_handoff(d)]}, "
                f"states {[vars(d.recovery.state) for d in up]}")
            assert net.lost > 20  # the loss really happened
            for oid in content:
                if vid_of(oid) != live.vid:
                    continue
                for d in up:
                    if d.state.peer_id in placement(new, oid, COPIES):
                        assert bytes(await d.state.store.read(oid, 0, 3000)) == content[oid]
            # nothing of the deleted VDI was copied anywhere new
            after = await served(up, gone.vid)
            assert all(after[oid] <= gone_before[oid] for oid in after)
            nursery.cancel_scope.cancel()

    # Deterministic in what this test controls: the network's seeded Random
    # (delays, losses) and the MockClock. trio's own order of ready tasks is
    # not seeded (that would reach into trio's private run state), so the
    # schedule may differ between runs; the outcome must not.
    # Not 0: the stores run in worker threads, and a clock that jumps whenever
    # every task waits for a thread would time out rounds that are not late.
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.02))
    return net


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_recovery_settles_under_message_loss(tmp_path, seed):
    run_scenario(tmp_path, seed)


def test_recovery_lists_each_peer_once_for_every_vdi(tmp_path):
    """A pass asks each peer for the objects of every live VDI in one
    request, not one per VDI: with a request per VDI, a pass over twenty
    VDIs and three peers needs 60 answers in a row, and at a fifth of
    messages lost it almost never gets them (the pass starts over at the
    first loss), so recovery did not settle; at scale it was 10^7 requests
    per peer and epoch."""
    net = run_scenario(tmp_path, 4, more_vdis=20)
    assert net.lists and all(form == "vids" for _, form in net.lists)


def test_a_peer_from_before_batched_lists_is_asked_per_vdi(tmp_path):
    net = run_scenario(tmp_path, 5, more_vdis=1, old_peer=True)
    assert all(form == "vids" for address, form in net.lists if address not in net.old_peers)
    assert any(form == "vid" for address, form in net.lists if address in net.old_peers)
