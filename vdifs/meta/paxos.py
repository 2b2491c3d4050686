"""CASPaxos (Rystsov 2018): leaderless replicated registers with compare-and-set.

Every register (the cluster map, the directory, the per-VDI leases `lock/<vid>`) is
changed by running a function on its current value through two phases on a
majority of the acceptors (the meta peers):

1. prepare(ballot): each acceptor promises to ignore lower ballots and
   returns what it accepted last; the proposer takes the value with the
   highest accepted ballot as the current one.
2. accept(ballot, f(current)): each acceptor stores it unless it promised
   a higher ballot meanwhile.

A change is done when a majority accepted it. Acceptors make their state
durable before they answer. Reads are changes by the identity function, so
they are linearizable; `peek` is a cheap, possibly stale read for watching.

The transport is a function, so the same proposer runs over real RPC and
over the in-memory network of the simulation tests.
"""

from __future__ import annotations

import errno
import logging
import os
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack
import trio

from vdifs.errors import ConflictError, VdifsError
from vdifs.fsutil import atomic_write

log = logging.getLogger(__name__)

Ballot = tuple[int, str]  # (counter, proposer id): totally ordered, unique per proposer
ZERO: Ballot = (0, "")


class ConsensusUnavailable(VdifsError):
    errno = errno.EAGAIN


#: Registers one `peek_many` request may ask about (the acceptor refuses more):
#: `PaxosRegister.read_many` and `peek_many` ask in requests of up to this many.
PEEK_MANY_MAX = 1024
#: An acceptor that answers an accept with one of these refused the change
#: itself (`register_rules`), not the ballot: retrying cannot help.
REFUSALS = frozenset({errno.EACCES, errno.EBUSY, errno.EINVAL})


# -- acceptor -------------------------------------------------------------------


@dataclass
class AcceptorState:
    promise: Ballot = ZERO
    accepted: Ballot = ZERO
    value: bytes | None = None


class AcceptorStorage(Protocol):
    async def load(self, key: str) -> AcceptorState: ...

    async def save(self, key: str, state: AcceptorState) -> None: ...

    async def keys(self) -> list[str]: ...


class MemoryAcceptorStorage:
    def __init__(self) -> None:
        self.states: dict[str, AcceptorState] = {}

    async def load(self, key: str) -> AcceptorState:
        s = self.states.get(key, AcceptorState())
        return AcceptorState(s.promise, s.accepted, s.value)

    async def save(self, key: str, state: AcceptorState) -> None:
        self.states[key] = AcceptorState(state.promise, state.accepted, state.value)

    async def keys(self) -> list[str]:
        return sorted(self.states)


class FileAcceptorStorage:
    """One file per register, replaced atomically and fsynced before answering.

    What was loaded or saved is kept in memory too (this process is the
    only writer of these files: it holds the store's lock), so a peek, the
    read every other peer and mount polls with, costs no thread and no file
    read. A save that fails forgets the key: the next load reads the file."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._known: dict[str, AcceptorState] = {}

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, key.encode().hex())

    def _load(self, key: str) -> AcceptorState:
        try:
            with open(self._path(key), "rb") as f:
                d = msgpack.unpackb(f.read())
        except FileNotFoundError:
            return AcceptorState()
        return AcceptorState(tuple(d["promise"]), tuple(d["accepted"]), d["value"])  # type: ignore[arg-type]

    async def load(self, key: str) -> AcceptorState:
        s = self._known.get(key)
        if s is None:
            s = await trio.to_thread.run_sync(self._load, key)
            self._known.setdefault(key, s)  # unless a save came meanwhile
            s = self._known[key]
        return AcceptorState(s.promise, s.accepted, s.value)  # a copy: callers change theirs

    async def save(self, key: str, state: AcceptorState) -> None:
        raw = msgpack.packb({"promise": list(state.promise), "accepted": list(state.accepted), "value": state.value})
        try:
            await trio.to_thread.run_sync(atomic_write, self._path(key), raw)
        except BaseException:
            self._known.pop(key, None)  # the file may hold either state now
            raise
        self._known[key] = AcceptorState(state.promise, state.accepted, state.value)

    def _keys(self) -> list[str]:
        out = []
        for name in os.listdir(self.directory):
            try:
                out.append(bytes.fromhex(name).decode())
            except ValueError:
                continue  # a temporary file of atomic_write
        return sorted(out)

    async def keys(self) -> list[str]:
        return await trio.to_thread.run_sync(self._keys)


class Acceptor:
    def __init__(self, storage: AcceptorStorage) -> None:
        self.storage = storage
        self._locks: dict[str, trio.Lock] = {}

    def _lock(self, key: str) -> trio.Lock:
        return self._locks.setdefault(key, trio.Lock())

    async def prepare(self, key: str, ballot: Ballot) -> dict[str, Any]:
        async with self._lock(key):
            s = await self.storage.load(key)
            if ballot <= s.promise or ballot <= s.accepted:
                return {"ok": False, "seen": list(max(s.promise, s.accepted))}
            s.promise = ballot
            await self.storage.save(key, s)
            return {"ok": True, "accepted": list(s.accepted), "value": s.value}

    async def accept(self, key: str, ballot: Ballot, value: bytes,
                     check: Callable[[bytes | None], None] | None = None) -> dict[str, Any]:
        """`check(current value)` raises if the sender may not make this
        change (`register_rules`): nothing is stored then."""
        async with self._lock(key):
            s = await self.storage.load(key)
            if ballot < s.promise or ballot <= s.accepted:
                return {"ok": False, "seen": list(max(s.promise, s.accepted))}
            if check is not None:
                check(s.value)
            s.promise, s.accepted, s.value = ballot, ballot, value
            await self.storage.save(key, s)
            return {"ok": True}

    async def peek(self, key: str, unless: Ballot | None = None) -> dict[str, Any]:
        """The accepted ballot and value; the value is left out (`same`) when
        the asker already has the value of ballot `unless` or a newer one: a
        poll of an unchanged register moves a few bytes, however large the
        value, and an acceptor that is behind sends no old value."""
        s = await self.storage.load(key)
        if unless is not None and s.accepted <= unless:
            return {"accepted": list(s.accepted), "same": True}
        return {"accepted": list(s.accepted), "value": s.value}

    async def peek_many(self, keys: list[str], unless: list[Ballot | None]) -> dict[str, Any]:
        """`peek` of many registers in one request (a split directory's parts)."""
        return {"peeks": [await self.peek(key, u) for key, u in zip(keys, unless)]}

    async def install(self, key: str, ballot: Ballot, value: bytes | None) -> bool:
        """Take a value another acceptor accepted at `ballot`, if it is newer than
        ours: how a new acceptor that replaces a dead one gets the registers.
        Safe at any time: it only ever moves this acceptor forward."""
        async with self._lock(key):
            s = await self.storage.load(key)
            if ballot <= s.accepted:
                return False
            s.accepted, s.value, s.promise = ballot, value, max(s.promise, ballot)
            await self.storage.save(key, s)
            return True


async def _in_requests(read: Callable[[list[PaxosRegister]], Awaitable[list[tuple[int, bytes]]]],
                       registers: list[PaxosRegister]) -> list[tuple[int, bytes]]:
    """`read` of the registers, PEEK_MANY_MAX at a time, one after another."""
    out: list[tuple[int, bytes]] = []
    for at in range(0, len(registers), PEEK_MANY_MAX):
        out += await read(registers[at:at + PEEK_MANY_MAX])
    return out


# -- proposer -------------------------------------------------------------------

#: send(acceptor, op, args) -> reply dict; raises on loss or timeout
Send = Callable[[str, str, dict[str, Any]], Awaitable[dict[str, Any]]]


class Proposer:
    def __init__(self, proposer_id: str, acceptors: list[str], send: Send, *,
                 round_timeout: float = 2.0, give_up_after: float = 30.0) -> None:
        self.proposer_id = proposer_id
        self.acceptors = list(acceptors)
        self.send = send
        self.round_timeout = round_timeout
        self.give_up_after = give_up_after
        self._counter = 0
        self._random = random.Random(proposer_id)

    @property
    def majority(self) -> int:
        return len(self.acceptors) // 2 + 1

    async def _broadcast(self, op: str, args: dict[str, Any], *, any_reply: bool = False,
                         refusals: list[VdifsError] | None = None) -> list[dict[str, Any]]:
        """Replies from the acceptors until a majority said ok or cannot (with
        `any_reply`: until a majority replied at all, or every one answered or
        failed, so a read never ends empty-handed while one acceptor is alive).
        Acceptors that refused the change itself (`REFUSALS`) go to `refusals`."""
        replies: list[dict[str, Any]] = []
        done = trio.Event()
        answered = 0

        async def one(acceptor: str) -> None:
            nonlocal answered
            try:
                reply = await self.send(acceptor, op, args)
            except VdifsError as e:
                if refusals is not None and e.errno in REFUSALS:
                    refusals.append(e)
                log.debug("%s to %s failed: %s", op, acceptor, e)
                reply = None
            except Exception as e:  # lost, refused, timed out: no vote
                log.debug("%s to %s failed: %s", op, acceptor, e)
                reply = None
            answered += 1
            if reply is not None:
                replies.append(reply)
            oks = len(replies) if any_reply else sum(1 for r in replies if r.get("ok"))
            if oks >= self.majority or (not any_reply and answered - oks > len(self.acceptors) - self.majority):
                done.set()
            if answered == len(self.acceptors):
                done.set()

        async with trio.open_nursery() as nursery:
            for a in self.acceptors:
                nursery.start_soon(one, a)
            with trio.move_on_after(self.round_timeout):
                await done.wait()
            nursery.cancel_scope.cancel()
        return replies

    def _next_ballot(self, replies: list[dict[str, Any]]) -> None:
        for r in replies:
            if not r.get("ok") and "seen" in r:
                self._counter = max(self._counter, int(r["seen"][0]))

    async def change(self, key: str, fn: Callable[[bytes | None], bytes]) -> bytes:
        """Apply fn to the register's current value; return what was stored."""
        attempt = 0
        with trio.move_on_after(self.give_up_after):
            while True:
                attempt += 1
                self._counter += 1
                ballot: Ballot = (self._counter, self.proposer_id)
                replies = await self._broadcast("prepare", {"key": key, "ballot": list(ballot)})
                oks = [r for r in replies if r.get("ok")]
                if len(oks) >= self.majority:
                    best = max(oks, key=lambda r: tuple(r["accepted"]))
                    new = fn(best["value"])
                    refusals: list[VdifsError] = []
                    replies = await self._broadcast("accept", {"key": key, "ballot": list(ballot), "value": new},
                                                    refusals=refusals)
                    if sum(1 for r in replies if r.get("ok")) >= self.majority:
                        return new
                    if len(refusals) > len(self.acceptors) - self.majority:  # no majority will take it
                        raise refusals[0]
                self._next_ballot(replies)
                # Back off with jitter so duelling proposers stop colliding.
                await trio.sleep(self._random.uniform(0, min(0.5, 0.01 * 2 ** min(attempt, 6))))
        raise ConsensusUnavailable(
            f"no majority of the {len(self.acceptors)} meta peers agreed on {key!r} "
            f"within {self.give_up_after:.0f} s")

    async def peek(self, key: str, known: tuple[Ballot, bytes | None] | None = None
                   ) -> tuple[Ballot, bytes | None]:
        """A cheap read: the ballot and value of the highest ballot any
        acceptor answered. `known`: a ballot and value this proposer peeked
        before; acceptors still at that ballot answer without the value."""
        args: dict[str, Any] = {"key": key}
        if known is not None:
            args["unless"] = list(known[0])
        replies = await self._broadcast("peek", args, any_reply=True)
        return _newest_peeked(key, replies, known)

    async def peek_many(self, keys: list[str], known: list[tuple[Ballot, bytes | None] | None]
                        ) -> list[tuple[Ballot, bytes | None]]:
        """`peek` of many registers, one request per acceptor."""
        args = {"keys": keys, "unless": [list(k[0]) if k is not None else None for k in known]}
        replies = await self._broadcast("peek_many", args, any_reply=True)
        if not replies:
            raise ConsensusUnavailable(f"no meta peer answered a read of {len(keys)} registers")
        peeks = [r.get("peeks") for r in replies]
        if any(not isinstance(p, list) or len(p) != len(keys) for p in peeks):
            raise ConsensusUnavailable("a meta peer answered a read of many registers with something else")
        return [_newest_peeked(key, [p[i] for p in peeks], known[i])  # type: ignore[index]
                for i, key in enumerate(keys)]


def _newest_peeked(key: str, replies: list[dict[str, Any]], known: tuple[Ballot, bytes | None] | None
                   ) -> tuple[Ballot, bytes | None]:
    """The ballot and value of the highest ballot any acceptor answered a peek with."""
    if not replies:
        raise ConsensusUnavailable(f"no meta peer answered a read of {key!r}")
    best = max(replies, key=lambda r: tuple(r["accepted"]))
    ballot: Ballot = (int(best["accepted"][0]), str(best["accepted"][1]))
    if best.get("same"):
        if known is None or ballot > known[0]:  # an answer to a question we did not ask
            raise ConsensusUnavailable(f"a meta peer answered a read of {key!r} without its value")
        return known  # what we have is as new as anything they answered
    return ballot, best["value"]


# -- registers --------------------------------------------------------------------


#: Writer tokens remembered in the value, so that a writer whose replies were
#: lost can still tell that its write won even after others wrote on top. It
#: must outlast the writes others make while one writer is stalled: with 32,
#: a mount whose first directory CAS went through but stalled for 3 s while
#: another mount created 50 VDIs saw its token pushed out, was told "lost",
#: retried and got EEXIST for the VDI it had just created. 256 tokens is
#: about 4.6 KiB per value; a window is still a bound, not a proof.
RECENT_WRITERS = 256


class PaxosRegister:
    """A versioned value with compare-and-set on top of CASPaxos (see `Register`)."""

    def __init__(self, proposer: Proposer, key: str) -> None:
        self.proposer = proposer
        self.key = key
        self._peeked: tuple[Ballot, bytes | None] | None = None  # what the last peek saw

    @staticmethod
    def _decode(raw: bytes | None) -> dict[str, Any]:
        return {"v": 0, "d": b"", "w": []} if raw is None else msgpack.unpackb(raw)

    async def get(self) -> tuple[int, bytes]:
        d = self._decode(await self.proposer.change(self.key, lambda raw: raw if raw is not None else
                                                     msgpack.packb({"v": 0, "d": b"", "w": []})))
        return d["v"], d["d"]

    async def read(self) -> tuple[int, bytes]:
        """Like `get`, linearizable, but in one peek round when the acceptors
        agree (`read_many`). `get` is a change (by the identity function): it
        takes a ballot, and many readers polling a register that way pre-empt
        the very change they wait for (a mount's requests waiting for a dead
        replica to be marked down kept three peers from marking it down)."""
        return (await PaxosRegister.read_many([self]))[0]

    async def peek(self) -> tuple[int, bytes]:
        """A cheap, possibly stale read (see `Proposer.peek`); unchanged since
        the last peek, it costs the acceptors no value sent."""
        self._peeked = await self.proposer.peek(self.key, self._peeked)
        d = self._decode(self._peeked[1])
        return d["v"], d["d"]

    def token(self) -> bytes:
        return os.urandom(16)

    @staticmethod
    async def read_many(registers: list[PaxosRegister]) -> list[tuple[int, bytes]]:
        """Linearizable reads of registers of one proposer, in one peek
        round when it can: a value a majority of acceptors report at the
        same ballot was chosen (a majority accepted it), and it is at least
        as new as any change that ended before the read began (that change's
        majority meets ours). A register whose answers differ (a change in
        flight, an acceptor behind) is read the full way (`get`). Registers
        past PEEK_MANY_MAX go in further rounds."""
        if len(registers) > PEEK_MANY_MAX:
            return await _in_requests(PaxosRegister.read_many, registers)
        proposer = registers[0].proposer
        assert all(r.proposer is proposer for r in registers)
        known = [r._peeked for r in registers]
        args = {"keys": [r.key for r in registers],
                "unless": [list(k[0]) if k is not None else None for k in known]}
        replies = await proposer._broadcast("peek_many", args, any_reply=True)
        peeks = [r.get("peeks") for r in replies]
        if len(peeks) < proposer.majority or any(not isinstance(p, list) or len(p) != len(registers) for p in peeks):
            return [await r.get() for r in registers]
        out = []
        for i, reg in enumerate(registers):
            answers = [p[i] for p in peeks]  # type: ignore[index]
            ballot: Ballot = (int(answers[0]["accepted"][0]), str(answers[0]["accepted"][1]))
            if all(tuple(a["accepted"]) == ballot for a in answers):
                sent = [a for a in answers if not a.get("same")]
                seen = known[i]
                if sent or (seen is not None and seen[0] == ballot):
                    reg._peeked = (ballot, sent[0]["value"] if sent else seen[1])  # type: ignore[index]
                    d = reg._decode(reg._peeked[1])
                    out.append((d["v"], d["d"]))
                    continue
            out.append(await reg.get())
        return out

    @staticmethod
    async def peek_many(registers: list[PaxosRegister]) -> list[tuple[int, bytes]]:
        """`peek` of registers of one proposer, in one request per acceptor
        (per PEEK_MANY_MAX of them)."""
        if len(registers) > PEEK_MANY_MAX:
            return await _in_requests(PaxosRegister.peek_many, registers)
        proposer = registers[0].proposer
        assert all(r.proposer is proposer for r in registers)
        peeked = await proposer.peek_many([r.key for r in registers], [r._peeked for r in registers])
        out = []
        for reg, seen in zip(registers, peeked):
            reg._peeked = seen
            d = reg._decode(seen[1])
            out.append((d["v"], d["d"]))
        return out

    async def cas(self, version: int, value: bytes) -> bool:
        token = self.token()

        def fn(raw: bytes | None) -> bytes:
            cur = self._decode(raw)
            if cur["v"] != version:
                return msgpack.packb(cur)
            return msgpack.packb({"v": version + 1, "d": value, "w": (cur["w"] + [token])[-RECENT_WRITERS:]})

        try:
            result = self._decode(await self.proposer.change(self.key, fn))
        except ConflictError:
            return False
        return token in result["w"]
