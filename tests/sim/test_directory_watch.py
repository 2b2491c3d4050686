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


async def test_an_unchanged_directory_costs_a_poll_a_few_bytes_and_a_change_reaches_every_mount(autojump_clock):
    acceptors = {name: Acceptor(MemoryAcceptorStorage()) for name in ("m1", "m2", "m3")}
    answered: list[int] = []  # bytes of each register's answer to a peek
    requests: list[str] = []  # the ops the acceptors were sent

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
