"""Leases and fencing under message loss, pauses and clock jumps (deterministic).

Two mounts (A, B) contend for one VDI's lease kept in a CASPaxos register on
five simulated acceptors; three simulated storage peers keep fence tables and
accept writes only from the newest fenced generation. The network drops and
delays messages; A is paused (as by SIGSTOP) and resumed; B's clock jumps.
Whatever happens: every lease taken has its own generation, and once a
generation is fenced no peer accepts a write from an older one.
"""

import random

import pytest
import trio
import trio.testing

from vdifs.errors import VdifsError
from vdifs.meta.lease import LeaseBusy, LeaseManager
from vdifs.meta.paxos import Acceptor, PaxosRegister, Proposer

from .test_caspaxos import SeededStreams, SimNetwork, SyncedStorage

VID = 7
TERM = 9.0


class SimPeer:
    def __init__(self, name: str) -> None:
        self.name = name
        self.fence = 0
        self.data: dict[int, tuple[int, str]] = {}  # block -> (generation, writer)
        self.accepted: list[tuple[int, str, float]] = []  # (generation, writer, time)
        self.fence_history: list[tuple[int, float]] = []


class World:
    def __init__(self, seed: int) -> None:
        self.net = SimNetwork(seed, drop=0.15, max_delay=0.2)
        self.rng = SeededStreams(seed + 1)
        self.names = [f"acc{i}" for i in range(5)]
        for n in self.names:
            self.net.add(n)
        self.peers = [SimPeer(f"peer{i}") for i in range(3)]
        self.taken: list[tuple[str, int]] = []

    async def lossy(self, link: str) -> None:
        rng = self.rng(link)
        await trio.sleep(rng.uniform(0, 0.2))
        if rng.random() < 0.15:
            await trio.sleep(5)
            raise ConnectionError("lost")

    def fence_fn(self, owner: str):
        async def fence(vid: int, gen: int) -> None:
            for peer in self.peers:  # must reach every peer before the first write
                while True:
                    try:
                        with trio.fail_after(1):
                            await self.lossy(f"{owner}->{peer.name}")
                            if gen > peer.fence:
                                peer.fence = gen
                                peer.fence_history.append((gen, trio.current_time()))
                            await self.lossy(f"{owner}->{peer.name}")
                        break
                    except (ConnectionError, trio.TooSlowError):
                        continue
        return fence

    async def write(self, writer: str, gen: int, block: int) -> bool:
        ok = True
        for peer in self.peers:
            try:
                with trio.fail_after(1):
                    await self.lossy(f"{writer}->{peer.name}")
                    if gen < peer.fence:
                        ok = False  # fenced
                        continue
                    peer.data[block] = (gen, writer)
                    peer.accepted.append((gen, writer, trio.current_time()))
            except (ConnectionError, trio.TooSlowError):
                ok = False
        return ok

    def manager(self, name: str, clock_offset: list[float]) -> LeaseManager:
        proposer = Proposer(name, self.names, self.net.sender(name), round_timeout=1.0, give_up_after=60)
        return LeaseManager(name, {"host": name, "pid": 1, "mountpoint": f"/{name}"},
                            lambda vid: PaxosRegister(proposer, f"lock/{vid}"), self.fence_fn(name),
                            term=TERM, clock=lambda: trio.current_time() + clock_offset[0])


class Pause:
    """SIGSTOP/SIGCONT for a simulated mount.

    Its writer and its renewals resume at the same instant. Which of them runs
    first is drawn from the seed (the one that goes second waits a
    microsecond): trio's order of tasks woken together is not seeded, and
    either order must be safe."""

    def __init__(self, rng: random.Random) -> None:
        self._running = trio.Event()
        self._running.set()
        self.second = rng.choice(["writer", "renewals"])

    def stop(self) -> None:
        self._running = trio.Event()

    def cont(self) -> None:
        self._running.set()

    async def gate(self, who: str) -> None:
        paused = not self._running.is_set()
        await self._running.wait()
        if paused and who == self.second:
            await trio.sleep(1e-6)


async def writer_loop(world: World, mgr: LeaseManager, name: str, pause: Pause | None,
                      stop_at: float) -> None:
    block = 0
    while trio.current_time() < stop_at:
        if pause is not None:
            await pause.gate("writer")
        try:
            gen = await mgr.acquire(VID)
        except (LeaseBusy, VdifsError):
            await trio.sleep(1)
            continue
        world.taken.append((name, gen))
        if mgr.holds(VID):
            await world.write(name, gen, block % 4)
            block += 1
        await trio.sleep(0.5)


def run_world(seed: int, *, jump_b: float = 0.0):
    world = World(seed)
    a_off, b_off = [0.0], [0.0]
    a, b = world.manager("A", a_off), world.manager("B", b_off)
    a_pause = Pause(world.rng("sigcont"))

    async def main():
        async with trio.open_nursery() as n:
            async def renewals(mgr, pause):
                while True:
                    await trio.sleep(TERM / 3)
                    if pause is not None:
                        await pause.gate("renewals")  # paused: no renewals either
                    for vid in list(mgr.held):
                        await mgr.renew_once(vid)

            n.start_soon(renewals, a, a_pause)
            n.start_soon(renewals, b, None)
            n.start_soon(writer_loop, world, a, "A", a_pause, 200)
            await trio.sleep(3)
            n.start_soon(writer_loop, world, b, "B", None, 200)
            await trio.sleep(30)
            a_pause.stop()  # SIGSTOP: A neither renews nor writes
            if jump_b:
                b_off[0] += jump_b  # B's clock jumps forward
            await trio.sleep(60)
            a_pause.cont()  # SIGCONT
            await trio.sleep(140)
            n.cancel_scope.cancel()

    # Deterministic in what the simulation controls: its own seeded Random
    # (delays, drops) and the MockClock. trio's order of ready tasks within a
    # batch is not seeded (that is trio's private run state), so runs of one
    # seed may interleave differently; every interleaving must pass.
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return world, a, b


def check_fencing(world: World) -> None:
    # a generation belongs to exactly one holder
    owners: dict[int, set[str]] = {}
    for name, gen in world.taken:
        owners.setdefault(gen, set()).add(name)
    assert all(len(v) == 1 for v in owners.values()), owners
    for peer in world.peers:
        for gen, writer, t in peer.accepted:
            fenced_before = [g for g, ft in peer.fence_history if ft <= t]
            assert gen >= max(fenced_before, default=0), (peer.name, gen, writer, t)


@pytest.mark.parametrize("seed", range(4))
def test_takeover_after_pause_fences_the_old_holder(seed):
    world, a, b = run_world(seed)
    check_fencing(world)
    [g for _, g in world.taken]
    holders = [n for n, _ in world.taken]
    assert "A" in holders and "B" in holders  # A held it first, B took over during the pause
    b_gen = max(g for n, g in world.taken if n == "B")
    assert b_gen > max(g for n, g in world.taken if n == "A" and g < b_gen)
    # after B's takeover every peer refuses A's old generation ...
    for peer in world.peers:
        assert peer.fence >= b_gen
        assert not [w for w in peer.accepted if w[1] == "A" and w[0] < b_gen
                    and w[2] > max(t for g, t in peer.fence_history if g == b_gen)]
    # ... and A, resumed, learnt that it lost the lease (B kept renewing it)
    assert a.held[VID].lost is not None and "taken over" in a.held[VID].lost


@pytest.mark.parametrize("seed", range(3))
def test_clock_jump_on_the_waiter_is_still_safe(seed):
    world, a, b = run_world(seed, jump_b=1000.0)
    check_fencing(world)


def test_lease_world_is_deterministic():
    w1, _, _ = run_world(11)
    w2, _, _ = run_world(11)
    assert w1.taken == w2.taken
    assert [p.accepted for p in w1.peers] == [p.accepted for p in w2.peers]


class MemRegister:
    """A linearizable register in memory (the protocol of meta.register)."""

    def __init__(self) -> None:
        self.version, self.value = 0, b""

    async def get(self) -> tuple[int, bytes]:
        await trio.sleep(0.001)
        return self.version, self.value

    async def read(self) -> tuple[int, bytes]:
        return await self.get()

    async def cas(self, version: int, value: bytes) -> bool:
        await trio.sleep(0.001)
        if version != self.version:
            return False
        self.version, self.value = version + 1, value
        return True


def two_managers() -> tuple[LeaseManager, LeaseManager]:
    reg = MemRegister()

    async def fence(vid: int, gen: int) -> None:
        pass

    return tuple(LeaseManager(name, {"host": "h", "pid": 1, "mountpoint": name}, lambda vid: reg, fence,
                              term=TERM) for name in ("A", "B"))  # type: ignore[return-value]


async def test_an_open_waits_for_a_closing_holder_and_not_for_a_writing_one(autojump_clock):
    from vdifs.meta.lease import CLOSING_WAIT

    a, b = two_managers()
    await a.acquire(VID)
    start = trio.current_time()
    with pytest.raises(LeaseBusy):  # held and written: EBUSY at once
        await b.acquire(VID)
    assert trio.current_time() - start < 0.1
    await a.mark_closing(VID, True)  # the last writable handle's flush

    async def release_later() -> None:
        await trio.sleep(1.0)  # the kernel's release, sent after close() returned
        await a.release(VID)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(release_later)
        start = trio.current_time()
        gen = await b.acquire(VID)
    assert 1.0 <= trio.current_time() - start < 2.0 and gen == 2 and b.holds(VID)
    # a closing holder that never releases (its file stays open through a dup): EBUSY after the wait
    await b.mark_closing(VID, True)
    start = trio.current_time()
    with pytest.raises(LeaseBusy):
        await a.acquire(VID)
    assert CLOSING_WAIT <= trio.current_time() - start < CLOSING_WAIT + 1
    # a new writer on the holder's side takes the mark back: EBUSY at once again
    await b.acquire(VID)
    assert b.closing(VID)
    await b.mark_closing(VID, False)
    start = trio.current_time()
    with pytest.raises(LeaseBusy):
        await a.acquire(VID)
    assert trio.current_time() - start < 0.1



@pytest.mark.parametrize("retaken_first", [True, False])
async def test_a_renewal_that_waited_out_a_release_does_not_lose_the_next_lease(autojump_clock, retaken_first):
    """A renewal picks the held lease, then waits for the VDI's lock while
    the last writer releases it (and, maybe first, a new open takes it again
    with a new generation). It must not judge what it finds by the released
    lease: that reported our own new lease as "taken over" or "broken" and
    fenced the new writer (EIO on its close; seen under load in CI)."""
    a, _b = two_managers()
    lost: list[str] = []
    a.on_lost = lambda vid, why: lost.append(why)
    first = await a.acquire(VID)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.release, VID)  # takes the lock first (the lock is fair: FIFO)
        await trio.testing.wait_all_tasks_blocked()
        for task in ((a.acquire, a.renew_once) if retaken_first else (a.renew_once, a.acquire)):
            nursery.start_soon(task, VID)
            await trio.testing.wait_all_tasks_blocked()
    assert a.holds(VID) and a.held[VID].generation == first + 1
    assert lost == []


async def test_a_restarted_mount_takes_its_earlier_runs_lease_at_once_and_nobody_elses(autojump_clock):
    """The same store (and credential) is this mount's earlier process, which
    the store's lock proves gone: its lease is taken over at once, with a new
    generation (fenced). Another store, or another credential, waits a term."""
    reg = MemRegister()
    fenced: list[int] = []

    async def fence(vid: int, gen: int) -> None:
        fenced.append(gen)

    def manager(name: str, store: str, credential: str = "hv1", host: str = "h") -> LeaseManager:
        return LeaseManager(name, {"host": host, "pid": 1, "mountpoint": "/m", "credential": credential,
                                   "store": store}, lambda vid: reg, fence, term=TERM)

    first = manager("run1", "s1")
    assert await first.acquire(VID) == 1  # then killed: it never releases
    start = trio.current_time()
    with pytest.raises(LeaseBusy):
        await manager("other-store", "s2").acquire(VID)
    with pytest.raises(LeaseBusy):
        await manager("other-cred", "s1", credential="hv2").acquire(VID)
    with pytest.raises(LeaseBusy):  # the same store id on another host: a copied store, not us
        await manager("other-host", "s1", host="h2").acquire(VID)
    second = manager("run2", "s1")
    assert await second.acquire(VID) == 2 and fenced == [1, 2]
    assert trio.current_time() - start < 0.1
    with pytest.raises(LeaseBusy):  # and the earlier run, were it alive, is the other one now
        await manager("run1-again", "s3").acquire(VID)


@pytest.mark.parametrize("seed", range(2))
def test_lock_info_polled_through_one_proposer_never_costs_the_holder_its_lease(seed):
    """A mount's users and scripts poll `vdifs vdi lock-info` (64 of them,
    every half second, through the mount's one proposer) while another mount
    holds the lease and renews it, with one acceptor of three gone and
    4 ms fsyncs. A lock-info is a read that takes no ballot, so the holder's
    renewals are never pre-empted: it holds the lease throughout, at the
    generation it took, and every read saw it as the holder. (Made as
    changes, `get`, the reads kept the renewals from ever landing.) A
    renewal takes one ballot: its read of the lease takes none."""
    net = SimNetwork(seed, 0.0, max_delay=0.001)
    names = [f"a{i}" for i in range(3)]
    for n in names:
        net.acceptors[n] = Acceptor(SyncedStorage())
    net.down = {"a2"}

    async def fence(vid: int, gen: int) -> None:
        pass

    prepares = {"holder": 0, "watcher": 0}  # ballots each proposer took (prepares sent to a0)

    def manager(name: str) -> LeaseManager:
        send = net.sender(name)

        async def counted(dst: str, op: str, args: dict) -> dict:
            if op == "prepare" and dst == "a0":
                prepares[name] += 1
            return await send(dst, op, args)

        proposer = Proposer(name, names, counted, round_timeout=1.0)
        return LeaseManager(name, {"host": name, "pid": 1, "mountpoint": f"/{name}"},
                            lambda vid: PaxosRegister(proposer, f"lock/{vid}"), fence, term=TERM)

    holder, watcher = manager("holder"), manager("watcher")
    seen: list[str | None] = []

    async def poll(i: int) -> None:
        await trio.sleep(net.rng(f"p{i}").uniform(0, 0.5))
        while True:
            lease = await watcher.info(VID)
            seen.append(lease.holder["mount"] if lease.holder else None)
            await trio.sleep(0.5)

    async def main() -> tuple[int, bool, str | None]:
        generation = await holder.acquire(VID)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder.run)
            for i in range(64):
                nursery.start_soon(poll, i)
            await trio.sleep(6 * TERM)
            nursery.cancel_scope.cancel()
        return generation, holder.holds(VID), holder.held[VID].lost, (await watcher.info(VID)).beat

    generation, holds, lost, renewals = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert lost is None and holds and holder.generation_held(VID) == generation
    assert len(seen) > 64 * 6 * TERM and set(seen) == {"holder"}
    # a renewal reads without a ballot, then changes the lease: one ballot
    # each (and one to take the lease); a read takes one only when it met a
    # change in flight
    assert renewals >= 6 * 3 - 1 and prepares["holder"] == renewals + 1, (renewals, prepares)
    assert prepares["watcher"] <= len(seen) // 100, (len(seen), prepares)
