"""What mounts watching the directory cost the meta peers:
bench/directory_watch.py [VDIS] [MOUNTS] [SECONDS] [CREATES_PER_SECOND]

Simulated (in-memory acceptors, trio's MockClock): three meta peers hold a
directory of VDIS VDIs (default 10,000); MOUNTS mounts (default 100) watch it
the way a mount does (`DirectoryService.refresh_hint`, a peek every 0.5 s),
while one of them creates VDIs (default one a second; 0: an idle
cluster), with the directory in one register (format 1) and split in 64
parts (design change 55). Prints what the meta peers
sent per second (requests answered, bytes of answers) and how long a create
took to reach every mount, with peeks that leave out an unchanged value
(`unless`, as built) and with peeks that always carry it (as before).
"""

from __future__ import annotations

import statistics
import sys
from typing import Any

import msgpack
import trio
import trio.testing

from vdifs.meta.directory_service import DirectoryService
from vdifs.meta.paxos import Acceptor, MemoryAcceptorStorage, PaxosRegister, Proposer
from vdifs.model.directory import Directory

WATCH_INTERVAL = 0.5  # as the mount's directory watch


async def simulate(vdis: int, mounts: int, seconds: float, rate: float, conditional: bool,
                   parts: int) -> dict[str, float]:
    acceptors = {name: Acceptor(MemoryAcceptorStorage()) for name in ("m1", "m2", "m3")}
    served = {"requests": 0, "bytes": 0}

    async def send(dst: str, op: str, args: dict[str, Any]) -> dict[str, Any]:
        await trio.sleep(0.0002)
        acc = acceptors[dst]
        if op == "peek":
            unless = tuple(args["unless"]) if conditional and args.get("unless") else None
            reply = await acc.peek(args["key"], unless)  # type: ignore[arg-type]
        elif op == "peek_many":
            unless = [tuple(u) if u else None for u in args["unless"]]
            reply = await acc.peek_many(args["keys"], unless)  # type: ignore[arg-type]
        elif op == "prepare":
            reply = await acc.prepare(args["key"], tuple(args["ballot"]))  # type: ignore[arg-type]
        else:
            reply = await acc.accept(args["key"], tuple(args["ballot"]), args["value"])  # type: ignore[arg-type]
        served["requests"] += 1
        served["bytes"] += len(msgpack.packb(reply))
        await trio.sleep(0.0002)
        return reply

    def service(name: str, parts: int) -> DirectoryService:
        proposer = Proposer(name, list(acceptors), send)
        return DirectoryService(lambda key: PaxosRegister(proposer, key), parts=parts)

    services = [service(f"mount{i}", parts) for i in range(mounts)]
    first = Directory()
    for i in range(vdis):
        first.create(f"vm-{i:05d}", 10 << 30, copies=3)
    # written whole (format 1); a split service splits it at its first change
    await service("loader", 1).update_name("", lambda d: d.vdis.update(first.vdis) or setattr(d, "next_vid", first.next_vid))
    await services[0].update_name("seed", lambda d: d.create("seed", 1 << 30, copies=3))
    for s in services:
        await s.refresh()
    seen_at: dict[str, list[float]] = {}

    async def watch(s: DirectoryService) -> None:
        known: set[str] = set()
        while True:
            await trio.sleep(WATCH_INTERVAL)
            if await s.refresh_hint():
                now = trio.current_time()
                for name in created.keys() - known:
                    if name in s.current.vdis:
                        known.add(name)
                        seen_at.setdefault(name, []).append(now - created[name])

    created: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        for s in services:
            nursery.start_soon(watch, s)
        await trio.sleep(1)
        served["requests"] = served["bytes"] = 0
        start = trio.current_time()
        k = 0
        while trio.current_time() - start < seconds:
            if not rate:
                await trio.sleep(seconds)
                break
            name = f"new-{k}"
            created[name] = trio.current_time()
            await services[0].update_name(name, lambda d, n=name: d.create(n, 1 << 30, copies=3))
            k += 1
            await trio.sleep(1 / rate)
        elapsed = trio.current_time() - start
        nursery.cancel_scope.cancel()
    lags = [max(v) for name, v in seen_at.items() if len(v) >= mounts - 1]
    return {"requests_per_s": served["requests"] / elapsed, "bytes_per_s": served["bytes"] / elapsed,
            "directory_bytes": len(Directory(vdis=services[0].current.vdis).encode()),
            "lag_median": statistics.median(lags) if lags else float("nan"),
            "lag_max": max(lags) if lags else float("nan"), "creates": k}


def main() -> None:
    vdis = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    mounts = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 20
    rate = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
    print(f"{vdis} VDIs, {mounts} mounts watching every {WATCH_INTERVAL} s, {rate:g} creates a second, "
          f"{seconds:.0f} s")
    print("| parts | peeks | meta peers answer | bytes/s sent | directory | a create seen by every mount (median, max) |")
    print("|---:|---|---:|---:|---:|---|")
    for parts, conditional in ((1, False), (1, True), (64, True)):
        r = trio.run(simulate, vdis, mounts, seconds, rate, conditional, parts,
                     clock=trio.testing.MockClock(autojump_threshold=0))
        print(f"| {parts} | {'unless unchanged' if conditional else 'always the value'} | {r['requests_per_s']:.0f}/s "
              f"| {r['bytes_per_s'] / 1e6:.1f} MB/s | {r['directory_bytes'] / 1e6:.2f} MB "
              f"| {r['lag_median']:.2f} s, {r['lag_max']:.2f} s |", flush=True)


if __name__ == "__main__":
    main()
