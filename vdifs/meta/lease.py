"""Leases: one writer per VDI across mounts, made safe by fencing.

Each VDI has a `lock/<vid>` register holding its lease: the holder (mount id,
host, pid, mount point), a generation, and a beat counter the holder bumps
every third of the term. Nobody compares clocks across hosts:

- A mount that finds the lease held watches the register on its *own*
  monotonic clock. Only when the value has not changed for a whole term
  does it conclude the holder stopped renewing, and take over.
- Taking a lease always bumps the generation, and the taker fences every
  peer with it (durably) before its first write; peers refuse writes that
  carry an older generation. A holder that was paused, partitioned or
  simply slow can therefore never change a byte after a takeover, however
  wrong its own idea of time is: its writes fail with EIO.
- A holder that cannot renew for a whole term stops writing on its own
  too (belt and braces; the fence is what makes it safe).
- A holder whose last writable handle is closing says so in the lease
  (`closing`), in the synchronous part of the close; the release itself
  comes later, when the kernel sends it. A writable open elsewhere that
  meets a closing lease waits for it (up to CLOSING_WAIT) instead of
  failing: live migration opens the disk on the destination the moment
  close() returns on the source. A lease that is held and not closing is
  still EBUSY at once.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import msgpack
import trio

from vdifs.errors import VdifsError
from vdifs.meta.register import Register

log = logging.getLogger(__name__)

DEFAULT_TERM = 15.0
CLOSING_WAIT = 5.0  # seconds a writable open waits for a closing holder's release


def lease_key(vid: int) -> str:
    """The register of a VDI's lease."""
    return f"lock/{vid}"


class LeaseBusy(VdifsError):
    errno = errno.EBUSY


@dataclass
class Lease:
    holder: dict[str, Any] | None = None  # {"mount", "term", "host", "pid", "mountpoint", "credential"}
    generation: int = 0
    since: float = 0.0  # wall clock when taken: for people, never for expiry
    renewed: float = 0.0  # wall clock of the last renewal: for people
    beat: int = 0
    closing: bool = False  # the holder's last writable handle is being closed

    def encode(self) -> bytes:
        return msgpack.packb(asdict(self))

    @classmethod
    def decode(cls, raw: bytes) -> Lease:
        if not raw:
            return cls()
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in msgpack.unpackb(raw).items() if k in known})

    def describe(self) -> str:
        if self.holder is None:
            return "free"
        h = self.holder
        who = f" ({h['credential']})" if isinstance(h.get("credential"), str) else ""
        return (f"mount {h.get('mountpoint')} on {h.get('host')} (pid {h.get('pid')}){who} since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.since))}")


@dataclass
class Held:
    generation: int
    last_ok: float  # trio clock of the last successful renewal (or the take)
    lost: str | None = None
    closing: bool = False  # as we last wrote it in the register


@dataclass
class _Watch:
    version: int
    first_seen: float


RegisterFor = Callable[[int], Register]
Fence = Callable[[int, int], Awaitable[None]]


@dataclass
class LeaseManager:
    mount_id: str
    identity: dict[str, Any]  # host, pid, mountpoint
    register_for: RegisterFor
    fence: Fence
    term: float = DEFAULT_TERM
    on_lost: Callable[[int, str], None] = lambda vid, why: None
    clock: Callable[[], float] = trio.current_time  # this mount's monotonic clock
    held: dict[int, Held] = field(default_factory=dict)
    _watching: dict[int, _Watch] = field(default_factory=dict)
    _locks: dict[int, trio.Lock] = field(default_factory=dict)

    def _me(self) -> dict[str, Any]:
        # the term tells the acceptors how long we may go without renewing (`register_rules`)
        return {"mount": self.mount_id, "term": self.term, **self.identity}

    def is_ours(self, lease: Lease) -> bool:
        return lease.holder is not None and lease.holder.get("mount") == self.mount_id

    def left_by_an_earlier_run(self, lease: Lease) -> bool:
        """The holder is an earlier process of this mount: the same store
        (whose lock we hold, so that process is gone) on the same host (a
        store directory copied elsewhere, or shared over a network file
        system whose locks do not reach across hosts, is not the same
        mount) and the same credential (the acceptors let a credential
        take over its own lease at once). A mount restarted under a VM's
        disk gets it back without waiting a term (nor for a closing mark
        that process left); the fence still cuts off anything it left in
        flight."""
        h = lease.holder
        mine = self.identity.get("store")
        return (h is not None and bool(mine) and h.get("store") == mine and not self.is_ours(lease)
                and h.get("host") == self.identity.get("host")  # a store copied to another host is not it
                and h.get("credential") == self.identity.get("credential"))

    def _lock(self, vid: int) -> trio.Lock:
        return self._locks.setdefault(vid, trio.Lock())

    async def info(self, vid: int) -> Lease:
        """The lease as the register holds it now, read without a ballot (a
        user's lock-info, a check before maintenance): polled often, reads
        made as changes would pre-empt the holder's renewals."""
        _version, raw = await self.register_for(vid).read()
        return Lease.decode(raw)

    async def acquire(self, vid: int) -> int:
        """Take the lease (or confirm we hold it); return its generation.

        Raises LeaseBusy while another mount holds it and has renewed within
        the last term as seen from here."""
        async with self._lock(vid):
            held = self.held.get(vid)
            if held is not None and held.lost is None:
                return held.generation
            reg = self.register_for(vid)
            version, raw = await reg.read()
            lease = Lease.decode(raw)
            earlier = lease.holder is not None and self.left_by_an_earlier_run(lease)
            if lease.holder is not None and lease.closing and not self.is_ours(lease) and not earlier:
                version, lease = await self._wait_for_closing(reg, version, lease)
            now = self.clock()
            if earlier:
                log.warning("vid %d: %s was an earlier run of this mount (same store, now locked by us): "
                            "taking its lease over at once", vid, lease.describe())
            elif lease.holder is not None and not self.is_ours(lease):
                watch = self._watching.get(vid)
                if watch is None or watch.version != version:
                    self._watching[vid] = _Watch(version, now)  # it moved: the holder is alive
                    raise LeaseBusy(f"VDI is in use by {lease.describe()}")
                if now - watch.first_seen < self.term:
                    raise LeaseBusy(f"VDI is in use by {lease.describe()}")
                log.warning("vid %d: %s has not renewed its lease for %.0f s; taking it over",
                            vid, lease.describe(), now - watch.first_seen)
            wall = time.time()
            new = Lease(self._me(), lease.generation + 1, wall, wall, 0)
            if not await reg.cas(version, new.encode()):
                raise LeaseBusy("another mount took the lease at the same moment; try again")
            self._watching.pop(vid, None)
            # Fence before the first write: from now on peers refuse every older generation.
            await self.fence(vid, new.generation)
            self.held[vid] = Held(new.generation, self.clock())
            log.info("vid %d: lease taken, generation %d", vid, new.generation)
            return new.generation

    async def _wait_for_closing(self, reg: Register, version: int, lease: Lease) -> tuple[int, Lease]:
        """Wait (up to CLOSING_WAIT) while the holder is closing its last
        writable handle: until the lease is free or not closing any more."""
        deadline = self.clock() + CLOSING_WAIT
        pause = 0.01
        while lease.holder is not None and lease.closing and self.clock() < deadline:
            await trio.sleep(pause)
            pause = min(pause * 2, 0.2)
            version, raw = await reg.read()
            lease = Lease.decode(raw)
        return version, lease

    def closing(self, vid: int) -> bool:
        """Whether we said in the register that our last writer is closing."""
        held = self.held.get(vid)
        return held is not None and held.closing

    async def mark_closing(self, vid: int, closing: bool) -> None:
        """Say in our lease whether our last writable handle is closing (see
        the module docstring). Nothing if we do not hold it or said so already."""
        async with self._lock(vid):
            held = self.held.get(vid)
            if held is None or held.lost is not None or held.closing == closing:
                return
            def mark(lease: Lease) -> None:
                lease.closing = closing

            if await self._change_own(vid, held, mark):  # else taken over or broken: renewal says so
                held.closing = closing

    async def release(self, vid: int, unused: Callable[[], bool] = lambda: True) -> None:
        """Give the lease back, if `unused()` still says nobody needs it once we
        hold the per-VDI lock (a writable open may have come in meanwhile)."""
        async with self._lock(vid):
            held = self.held.get(vid)
            if held is None or not unused():
                return
            try:
                if held.lost is not None:
                    return

                def free(lease: Lease) -> None:
                    lease.holder, lease.closing = None, False

                if await self._change_own(vid, held, free):  # else someone broke it meanwhile
                    log.info("vid %d: lease released (generation %d)", vid, held.generation)
            finally:
                # Forgotten only now: until the register says free, it is ours.
                self.held.pop(vid, None)

    async def _change_own(self, vid: int, held: Held, change: Callable[[Lease], None]) -> bool:
        """Apply `change` to our lease in the register (compare-and-set, a few
        tries); False if the lease is no longer the one we hold."""
        reg = self.register_for(vid)
        for _ in range(10):
            version, raw = await reg.read()
            lease = Lease.decode(raw)
            if not self.is_ours(lease) or lease.generation != held.generation:
                return False
            change(lease)
            if await reg.cas(version, lease.encode()):
                return True
        return False

    async def break_lock(self, vid: int) -> Lease:
        """Free a lease whatever its holder says, fencing the holder off."""
        async with self._lock(vid):
            reg = self.register_for(vid)
            while True:
                version, raw = await reg.read()
                lease = Lease.decode(raw)
                new = Lease(None, lease.generation + 1, lease.since, time.time(), 0)
                if await reg.cas(version, new.encode()):
                    break
            await self.fence(vid, new.generation)
            self.held.pop(vid, None)
            log.warning("vid %d: lock broken (was %s); generation %d fenced", vid, lease.describe(),
                        new.generation)
            return lease

    def holds(self, vid: int) -> bool:
        return self.generation_held(vid) is not None

    def generation_held(self, vid: int) -> int | None:
        """The generation of the lease we hold on `vid` and have not lost."""
        held = self.held.get(vid)
        return held.generation if held is not None and held.lost is None else None

    def _lose(self, vid: int, held: Held, why: str) -> None:
        if held.lost is None:
            held.lost = why
            log.error("vid %d: lease lost (%s); writes to it fail from now on", vid, why)
            self.on_lost(vid, why)

    async def renew_once(self, vid: int) -> None:
        held = self.held.get(vid)
        if held is None or held.lost is not None:
            return
        started = self.clock()
        async with self._lock(vid):
            if self.held.get(vid) is not held:  # released (and maybe retaken) while we waited
                return
            reg = self.register_for(vid)
            try:
                version, raw = await reg.read()
                lease = Lease.decode(raw)
                if not self.is_ours(lease) or lease.generation != held.generation:
                    self._lose(vid, held, f"taken over by {lease.describe()} (generation {lease.generation})"
                               if lease.holder else f"broken (generation {lease.generation})")
                    return
                lease.beat += 1
                lease.renewed = time.time()
                if await reg.cas(version, lease.encode()):
                    held.last_ok = started
                    return
            except VdifsError as e:
                log.warning("vid %d: cannot renew the lease: %s", vid, e)
            if self.clock() - held.last_ok >= self.term:
                self._lose(vid, held, f"not renewed for {self.term:.0f} s")

    async def run(self) -> None:
        """Renew every held lease every third of the term."""
        while True:
            await trio.sleep(self.term / 3)
            for vid in list(self.held):
                await self.renew_once(vid)
