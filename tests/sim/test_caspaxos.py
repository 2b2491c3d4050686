"""CASPaxos under a hostile network, deterministic (seeded RNGs + MockClock).

Acceptors and proposers run in one trio run; the network drops, delays
(and so reorders) and partitions messages. Proposers append (name, seq) to
a shared list with compare-and-set. Afterwards the register must hold every
acknowledged append exactly once, each proposer's appends in order, and
nothing that was never attempted: CAS is linearizable.
"""

import os
import random

import msgpack
import pytest
import trio
import trio.testing

from vdifs.meta.paxos import (
    PEEK_MANY_MAX, Acceptor, AcceptorState, ConsensusUnavailable, MemoryAcceptorStorage, PaxosRegister, Proposer,
)


class SeededStreams:
    """One Random per named stream (a link between two nodes), each seeded
    from the run's seed and its name. trio's order of ready tasks within a
    batch is not seeded (it is trio's private run state), so a Random shared
    by concurrent tasks would hand its draws out in an order that varies from
    run to run; a stream's own draws do not depend on how tasks interleave."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._streams: dict[str, random.Random] = {}

    def __call__(self, name: str) -> random.Random:
        rng = self._streams.get(name)
        if rng is None:
            rng = self._streams[name] = random.Random(f"{self.seed}/{name}")
        return rng


class SimNetwork:
    def __init__(self, seed: int, drop: float, max_delay: float) -> None:
        self.rng = SeededStreams(seed)
        self.drop = drop
        self.max_delay = max_delay
        self.acceptors: dict[str, Acceptor] = {}
        self.down: set[str] = set()  # partitioned away

    def add(self, name: str) -> None:
        self.acceptors[name] = Acceptor(MemoryAcceptorStorage())

    def sender(self, src: str):
        async def send(dst: str, op: str, args: dict) -> dict:
            rng = self.rng(f"{src}->{dst}")
            # request leg
            await trio.sleep(rng.uniform(0, self.max_delay))
            if dst in self.down or rng.random() < self.drop:
                await trio.sleep(10)  # lost: the caller's round timeout fires
                raise ConnectionError("lost")
            acc = self.acceptors[dst]
            if op == "prepare":
                reply = await acc.prepare(args["key"], tuple(args["ballot"]))
            elif op == "accept":
                reply = await acc.accept(args["key"], tuple(args["ballot"]), args["value"])
            elif op == "peek_many":
                reply = await acc.peek_many(args["keys"], [tuple(u) if u else None for u in args["unless"]])
            else:
                reply = await acc.peek(args["key"], tuple(args["unless"]) if args.get("unless") else None)
            # reply leg: the acceptor's state changed even if this is lost
            await trio.sleep(rng.uniform(0, self.max_delay))
            if dst in self.down or rng.random() < self.drop:
                await trio.sleep(10)
                raise ConnectionError("lost")
            return reply
        return send


def run_sim(seed: int, *, proposers: int = 4, appends: int = 6, drop: float = 0.1,
            partition: set[str] = frozenset(), heal_at: float | None = None):
    net = SimNetwork(seed, drop, max_delay=0.05)
    names = [f"a{i}" for i in range(5)]
    for n in names:
        net.add(n)
    net.down = set(partition)
    acked: dict[str, list[int]] = {}
    attempted: set[tuple[str, int]] = set()

    async def proposer(pname: str) -> None:
        reg = PaxosRegister(Proposer(pname, names, net.sender(pname), round_timeout=1.0, give_up_after=120),
                            "list")
        reg.token = lambda: f"{pname}-{seq}".encode()  # deterministic writer tokens
        seq = 0
        acked[pname] = []
        while seq < appends:
            try:
                version, raw = await reg.get()
                items = msgpack.unpackb(raw) if raw else []
                if [pname, seq] in items:  # an earlier attempt with unknown outcome went in
                    seq += 1
                    continue
                attempted.add((pname, seq))
                if await reg.cas(version, msgpack.packb(items + [[pname, seq]])):
                    acked[pname].append(seq)
                    seq += 1
            except ConsensusUnavailable:
                pass  # outcome unknown: the append may or may not have happened

    async def main():
        async with trio.open_nursery() as nursery:
            if heal_at is not None:
                async def heal():
                    await trio.sleep(heal_at)
                    net.down.clear()
                nursery.start_soon(heal)
            for i in range(proposers):
                nursery.start_soon(proposer, f"p{i}")
        net.drop = 0
        net.down.clear()
        reader = PaxosRegister(Proposer("reader", names, net.sender("reader")), "list")
        version, raw = await reader.get()
        return version, [tuple(x) for x in msgpack.unpackb(raw)]

    # Deterministic in what the simulation controls: its own seeded Random
    # (delays, drops) and the MockClock. trio's order of ready tasks within a
    # batch is not seeded (that is trio's private run state), so runs of one
    # seed may interleave differently; every interleaving must pass.
    version, final = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return version, final, acked, attempted


def check_linearizable(version, final, acked, attempted):
    assert len(final) == len(set(final)), "an append was applied twice"
    assert version == len(final), "every successful CAS bumps the version once"
    assert set(final) <= attempted, "something appeared that nobody wrote"
    for pname, seqs in acked.items():
        mine = [s for p, s in final if p == pname]
        assert mine == sorted(mine), "a proposer's appends out of order"
        assert set(seqs) <= set(mine), "an acknowledged append is missing"


@pytest.mark.parametrize("seed", range(6))
def test_cas_is_linearizable_with_drops_and_delays(seed):
    version, final, acked, attempted = run_sim(seed)
    check_linearizable(version, final, acked, attempted)
    assert sum(len(v) for v in acked.values()) == 4 * 6  # everyone finished


@pytest.mark.parametrize("seed", range(3))
def test_minority_of_acceptors_lost(seed):
    version, final, acked, attempted = run_sim(seed, partition={"a3", "a4"}, drop=0.05)
    check_linearizable(version, final, acked, attempted)
    assert sum(len(v) for v in acked.values()) == 4 * 6


def test_majority_lost_blocks_then_recovers_after_heal():
    version, final, acked, attempted = run_sim(7, partition={"a0", "a1", "a2"}, heal_at=60.0, drop=0.0)
    check_linearizable(version, final, acked, attempted)
    assert sum(len(v) for v in acked.values()) == 4 * 6


def test_simulation_is_deterministic():
    assert run_sim(3, appends=3) == run_sim(3, appends=3)


async def test_file_acceptor_state_survives_restart(tmp_path):
    from vdifs.meta.paxos import FileAcceptorStorage

    a = Acceptor(FileAcceptorStorage(str(tmp_path)))
    assert (await a.prepare("k", (5, "p")))["ok"]
    assert (await a.accept("k", (5, "p"), b"v"))["ok"]
    again = Acceptor(FileAcceptorStorage(str(tmp_path)))  # a restarted peer
    assert not (await again.prepare("k", (4, "q")))["ok"]  # the promise was durable
    reply = await again.prepare("k", (6, "q"))
    assert reply["ok"] and reply["value"] == b"v" and tuple(reply["accepted"]) == (5, "p")


async def test_a_file_acceptor_answers_from_memory_what_it_stored(tmp_path):
    """What an acceptor stored it answers from memory (a peek, the read
    every poll makes, costs no file read), a caller changing what it
    loaded changes nothing stored, and a restarted acceptor reads the file."""
    from vdifs.meta.paxos import FileAcceptorStorage

    storage = FileAcceptorStorage(str(tmp_path))
    a = Acceptor(storage)
    assert (await a.prepare("k", (5, "p")))["ok"] and (await a.accept("k", (5, "p"), b"v"))["ok"]
    again = Acceptor(FileAcceptorStorage(str(tmp_path)))  # restarted: from the file
    assert await again.peek("k") == {"accepted": [5, "p"], "value": b"v"}
    for name in os.listdir(tmp_path):
        os.remove(tmp_path / name)  # from now on only memory can answer
    s = await storage.load("k")
    s.promise, s.value = (99, "x"), b"changed by a caller"
    assert await a.peek("k") == {"accepted": [5, "p"], "value": b"v"}
    assert not (await a.prepare("k", (4, "q")))["ok"]  # the promise of ballot 5 still holds


async def test_a_peek_of_an_unchanged_register_moves_no_value():
    acceptors = {name: Acceptor(MemoryAcceptorStorage()) for name in ("a", "b", "c")}
    sent: list[dict] = []

    async def send(dst, op, args):
        reply = await getattr(acceptors[dst], op)(args["key"], tuple(args["unless"]) if args.get("unless") else None) \
            if op == "peek" else await getattr(acceptors[dst], op)(args["key"], tuple(args["ballot"]),
                                                                 *([args["value"]] if op == "accept" else []))
        sent.append(reply)
        return reply

    proposer = Proposer("p1", list(acceptors), send)
    reg = PaxosRegister(proposer, "dir")
    assert await reg.cas(0, b"x" * 100_000)
    sent.clear()
    assert await reg.peek() == (1, b"x" * 100_000)
    assert all("value" in r for r in sent)  # the first peek fetches the value
    sent.clear()
    assert await reg.peek() == (1, b"x" * 100_000)
    assert sent and all(r.get("same") and "value" not in r for r in sent)  # unchanged: no value moves
    assert await reg.cas(1, b"y")
    sent.clear()
    assert await reg.peek() == (2, b"y")  # changed: the new value comes
    assert any(r.get("value") for r in sent)


async def test_reads_of_more_registers_than_a_request_takes_go_in_several():
    """`read_many` and `peek_many` of 2,100 registers (a peer's leak pass
    reads every VDI's lease): requests of at most PEEK_MANY_MAX keys, as
    the acceptor allows, three of them per acceptor, and every value
    read back in order, also the never-written ones."""
    acceptors = {name: Acceptor(MemoryAcceptorStorage()) for name in ("a", "b", "c")}
    asked: list[int] = []  # keys per peek_many request

    async def send(dst, op, args):
        acc = acceptors[dst]
        if op == "peek_many":
            assert 0 < len(args["keys"]) <= PEEK_MANY_MAX  # what membership's handler refuses past
            asked.append(len(args["keys"]))
            return await acc.peek_many(args["keys"], [tuple(u) if u else None for u in args["unless"]])
        if op == "prepare":
            return await acc.prepare(args["key"], tuple(args["ballot"]))
        return await acc.accept(args["key"], tuple(args["ballot"]), args["value"])

    proposer = Proposer("p1", list(acceptors), send)
    registers = [PaxosRegister(proposer, f"lock/{i}") for i in range(2100)]
    for i in range(0, 2100, 7):
        assert await registers[i].cas(0, b"held %d" % i)
    want = [(1, b"held %d" % i) if i % 7 == 0 else (0, b"") for i in range(2100)]
    for read in (PaxosRegister.read_many, PaxosRegister.peek_many):
        asked.clear()
        assert await read(registers) == want
        assert sorted(asked) == sorted([PEEK_MANY_MAX, PEEK_MANY_MAX, 2100 - 2 * PEEK_MANY_MAX] * 3)


@pytest.mark.parametrize("seed", range(4))
def test_reads_in_one_peek_round_never_miss_a_change_that_ended_before_them(seed):
    """`PaxosRegister.read_many` (how a split directory is read) under drops
    and delays, while writers append: a read that starts after a CAS was
    acknowledged returns that version or a newer one, and a value it
    returns is the one the register holds at that version."""
    net = SimNetwork(seed, 0.1, max_delay=0.05)
    names = [f"a{i}" for i in range(3)]
    for n in names:
        net.add(n)
    acked: list[tuple[float, int, bytes]] = []  # (when, version, value) of each acknowledged CAS
    reads = {"one_round": 0, "checked": 0}

    async def writer(pname: str) -> None:
        reg = PaxosRegister(Proposer(pname, names, net.sender(pname), round_timeout=1.0, give_up_after=120),
                            "key")
        for i in range(30):
            try:
                version, raw = await reg.get()
                value = raw + f"{pname}{i};".encode()
                if await reg.cas(version, value):
                    acked.append((trio.current_time(), version + 1, value))
            except ConsensusUnavailable:
                pass

    async def reader() -> None:
        proposer = Proposer("reader", names, net.sender("reader"), round_timeout=1.0, give_up_after=120)
        regs = [PaxosRegister(proposer, key) for key in ("key", "other")]
        original = PaxosRegister.get
        full_reads = 0

        async def counting_get(self: PaxosRegister) -> tuple[int, bytes]:
            nonlocal full_reads
            full_reads += 1
            return await original(self)

        for _ in range(100):
            started = trio.current_time()
            before = max((v for t, v, _ in acked if t <= started), default=0)
            full_reads = 0
            PaxosRegister.get = counting_get  # type: ignore[method-assign]
            try:
                (version, value), _ = await PaxosRegister.read_many(regs)
            except ConsensusUnavailable:
                continue
            finally:
                PaxosRegister.get = original  # type: ignore[method-assign]
            assert version >= before, "a read missed a change acknowledged before it began"
            known = {v: val for _, v, val in acked}
            if version in known:
                assert value == known[version]
            reads["checked"] += 1
            reads["one_round"] += full_reads == 0
            await trio.sleep(0.01)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(writer, f"w{i}")
            nursery.start_soon(reader)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert reads["checked"] >= 50 and reads["one_round"] >= 20


def stored(version: int, data: bytes) -> bytes:
    return msgpack.packb({"v": version, "d": data, "w": []})


async def test_a_read_in_one_round_takes_only_a_value_its_majority_agrees_on():
    """a0 and a1 accepted version 2 (chosen); a2 missed it. With a1
    unreachable, the answering majority (a0, a2) disagree: the read must
    not take a2's version 1, and goes the full way."""
    net = SimNetwork(0, 0.0, max_delay=0.0)
    for n in ("a0", "a1", "a2"):
        net.add(n)
    states = {"a0": ((2, "w"), stored(2, b"new")), "a1": ((2, "w"), stored(2, b"new")),
              "a2": ((1, "w"), stored(1, b"old"))}
    for name, (ballot, value) in states.items():
        await net.acceptors[name].storage.save("key", AcceptorState(ballot, ballot, value))
    net.down = {"a1"}
    proposer = Proposer("reader", ["a0", "a1", "a2"], net.sender("reader"), round_timeout=1.0, give_up_after=60)
    regs = [PaxosRegister(proposer, "key"), PaxosRegister(proposer, "other")]
    assert await PaxosRegister.read_many(regs) == [(2, b"new"), (0, b"")]
    # a0 and a2 agree now (the full read wrote version 2 to a2 again): one round
    sent: list[str] = []
    send = proposer.send

    async def counting(dst: str, op: str, args: dict) -> dict:
        sent.append(op)
        return await send(dst, op, args)

    proposer.send = counting
    assert await PaxosRegister.read_many(regs) == [(2, b"new"), (0, b"")]
    assert set(sent) == {"peek_many"}


class SyncedStorage(MemoryAcceptorStorage):
    """An acceptor's state kept as a file acceptor keeps it: each save
    waits for an fsync (a few milliseconds)."""

    async def save(self, key: str, state: AcceptorState) -> None:
        await trio.sleep(0.004)
        await super().save(key, state)


@pytest.mark.parametrize("seed", range(3))
def test_readers_polling_a_register_do_not_hold_off_a_change(seed):
    """What a dead replica looks like to the cluster map: one acceptor of
    three is gone, 64 readers poll the register every half second (requests
    waiting for the map that replaces the replica), and three writers make
    the same change at once (the peers marking it down), each giving up
    after 5 s. A read takes no ballot while the acceptors agree, so the
    readers do not pre-empt the writers: every writer is done within its
    5 s. (With reads made as changes, `get`, the readers' ballots kept
    ahead of the writers' and at most one writer was done.)"""
    net = SimNetwork(seed, 0.0, max_delay=0.001)
    names = [f"a{i}" for i in range(3)]
    for n in names:
        net.acceptors[n] = Acceptor(SyncedStorage())
    net.down = {"a2"}
    done: dict[str, bool] = {}

    mount = Proposer("mount", names, net.sender("mount"), round_timeout=1.0)  # one for all its requests

    async def reader(i: int) -> None:
        reg = PaxosRegister(mount, "map")
        await trio.sleep(net.rng(f"r{i}").uniform(0, 0.01))  # failed together, they wait together
        while True:
            await reg.read()
            await trio.sleep(0.5)

    async def writer(i: int) -> None:
        reg = PaxosRegister(Proposer(f"w{i}", names, net.sender(f"w{i}"), round_timeout=1.0), "map")
        with trio.move_on_after(5.0):
            while True:
                version, raw = await reg.read()
                if raw == b"down" or await reg.cas(version, b"down"):
                    done[f"w{i}"] = True
                    return

    async def main() -> tuple[int, bytes]:
        async with trio.open_nursery() as readers:
            for i in range(64):
                readers.start_soon(reader, i)
            await trio.sleep(1.0)
            async with trio.open_nursery() as writers:
                for i in range(3):
                    writers.start_soon(writer, i)
            readers.cancel_scope.cancel()
        return await PaxosRegister(Proposer("check", names, net.sender("check"), round_timeout=1.0), "map").get()

    version, value = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert done == {"w0": True, "w1": True, "w2": True}
    assert (version, value) == (1, b"down")  # the same change, made once
