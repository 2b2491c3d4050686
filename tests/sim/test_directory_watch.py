"""Mounts watching the directory (issue 17): twenty mounts poll a
1,000-VDI directory through real proposers and acceptors on an in-memory
network, under MockClock. An unchanged directory costs the meta peers a
few bytes per poll, not the directory; a change still reaches every mount
within a second."""

from __future__ import annotations

from typing import Any

import msgpack
import trio

from vdifs.meta.directory_service import DirectoryService
from vdifs.meta.paxos import Acceptor, MemoryAcceptorStorage, PaxosRegister, Proposer
from vdifs.model.directory import Directory


def network(acceptors: dict[str, Acceptor], requests: list[str], answered: list[int]):
    """A proposer's send to `acceptors` in memory (1 ms a request): the op
    of each request goes to `requests`, the bytes of each register's answer
    to a peek to `answered`."""
    async def send(dst: str, op: str, args: dict[str, Any]) -> dict[str, Any]:
        await trio.sleep(0.001)
        requests.append(op)
        acc = acceptors[dst]
        if op == "peek":
            reply = await acc.peek(args["key"], tuple(args["unless"]) if args.get("unless") else None)
            answered.append(len(msgpack.packb(reply)))
        elif op == "peek_many":
            unless = [tuple(u) if u else None for u in args["unless"]]
            reply = await acc.peek_many(args["keys"], unless)  # type: ignore[arg-type]
            answered.extend(len(msgpack.packb(p)) for p in reply["peeks"])
        elif op == "prepare":
            reply = await acc.prepare(args["key"], tuple(args["ballot"]))
        else:
            reply = await acc.accept(args["key"], tuple(args["ballot"]), args["value"])
        return reply
    return send


async def test_an_unchanged_directory_costs_a_poll_a_few_bytes_and_a_change_reaches_every_mount(autojump_clock):
    acceptors = {name: Acceptor(MemoryAcceptorStorage()) for name in ("m1", "m2", "m3")}
    answered: list[int] = []  # bytes of each register's answer to a peek
    requests: list[str] = []  # the ops the acceptors were sent
    send = network(acceptors, requests, answered)

    def service(i: int) -> DirectoryService:
        proposer = Proposer(f"mount{i}", list(acceptors), send)
        return DirectoryService(lambda key: PaxosRegister(proposer, key))

    mounts = [service(i) for i in range(20)]
    for i in range(1000):
        name = f"vm-{i:04d}"
        await mounts[0].update_name(name, lambda d, n=name: d.create(n, 10 << 30, copies=3))
    size = len(Directory(vdis=mounts[0].current.vdis).encode())
    for _ in range(2):  # each mount's first looks fetch the root, then each part
        for m in mounts:
            await m.refresh_hint()
    answered.clear()
    requests.clear()
    for _ in range(10):  # five seconds of polls, every 0.5 s, nothing changing
        for m in mounts:
            assert not await m.refresh_hint()
        await trio.sleep(0.5)
    polls = 10 * 20 * (1 + mounts[0].parts)  # the root and every part
    assert mounts[0].parts == 64
    assert len(answered) >= polls * 2  # a majority of the acceptors answered every poll
    assert requests == ["peek_many"] * len(requests) and len(requests) <= 10 * 20 * 3  # one per meta peer
    assert max(answered) < 100 < size // 1000  # without the directory in them

    await mounts[7].update_name("new", lambda d: d.create("new", 1 << 30, copies=3))
    made = trio.current_time()
    seen: dict[int, float] = {}
    while len(seen) < len(mounts) and trio.current_time() - made < 5:
        for i, m in enumerate(mounts):
            if i not in seen and (await m.refresh_hint() or "new" in m.current.vdis):
                assert "new" in m.current.vdis
                seen[i] = trio.current_time() - made
        await trio.sleep(0.5)
    assert len(seen) == len(mounts) and max(seen.values()) <= 1.0


async def test_reading_the_directory_takes_no_ballot(autojump_clock):
    """A read of the directory, of one part (a VDI's, `refresh_vid`) or of a
    directory in one part (format 1), is a peek round when nothing is in
    flight: no prepare, so mounts reading it do not hold off a mount
    changing it (design change 67). Their reads see every change made."""
    acceptors = {name: Acceptor(MemoryAcceptorStorage()) for name in ("m1", "m2", "m3")}
    requests: list[str] = []
    send = network(acceptors, requests, [])

    for parts in (1, 64):
        acceptors.update({name: Acceptor(MemoryAcceptorStorage()) for name in acceptors})  # a new cluster
        writer, reader = (DirectoryService(lambda key, p=Proposer(f"{who}{parts}", list(acceptors), send):
                                           PaxosRegister(p, key), parts=parts) for who in ("w", "r"))
        for i in range(20):
            name = f"vm-{i:02d}"
            await writer.update_name(name, lambda d, n=name: d.create(n, 1 << 30, copies=3))
        await reader.refresh()
        vid = reader.current.vdis["vm-07"].vid
        requests.clear()
        for i in range(5):
            await reader.refresh()
            await reader.refresh_vid(vid)
            assert set(reader.current.vdis) == {f"vm-{k:02d}" for k in range(20)}
        assert requests and "prepare" not in requests, (parts, sorted(set(requests)))
