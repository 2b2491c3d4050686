"""The directory service: the directory's parts in registers, changed by
read-modify-CAS loops, and the steps of a change across two parts.

Layout (design change 55). The root register (`directory`) holds either
the whole directory (format 1, as before parts existed) or only the number
of parts P (format 2); part k is then the register `directory/k`
(`model.directory` says what a part holds). A change runs on a copy of the
one part it concerns and is one CAS of that part, so its cost does not grow
with the number of VDIs. A rename or a clone whose names live in two parts
is three CASes: the intent in the source part, the decision in the target
part, the intent's end in the source part. Whoever meets an unfinished
intent (a change of the frozen record, a watch that sees an old one)
finishes it; the target part keeps its decision, so every mount that
finishes an intent ends it the same way, and a crash after any step leaves
the VDI under exactly one name once the intent is finished.

Upgrade. A format-1 directory stays one register until this service makes
its first change with `parts` > 1: it writes every part (each marked as an
upgrade image), then CASes the root from the format-1 value it split to
the format-2 root, so a crash in between leaves format 1 in charge, and a
part that a format-2 change wrote since is never overwritten by a late
upgrader. Mounts of versions before parts cannot read a format-2
directory: upgrade every mount first.

Concurrency: one lock serialises this service's changes (a cross-part
change holds it for its three steps); other processes are kept out by the
registers' CAS. Reads do not take the lock.
"""

from __future__ import annotations

import errno
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgpack
import trio

from vdifs.errors import ConflictError, VdiExists, VdifsError, VdiNotFound, as_vdifs_error, leaf_errors
from vdifs.meta.paxos import ConsensusUnavailable, PaxosRegister
from vdifs.meta.register import Register
from vdifs.model.directory import (DEFAULT_PARTS, FORMAT_VERSION, PART_FORMAT, Directory, IntentPending,
                                   NeedsOtherParts, VdiRecord, part_of)

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_CAS_ATTEMPTS = 100
#: Intents older than this are finished by any mount that sees them (an
#: intent this young is probably still being finished by its own mount).
INTENT_AGE = 10.0
#: A consistent read gives up after this many collects that kept changing.
CONSISTENT_READS = 20
ROOT_KEY = "directory"

OpenRegister = Callable[[str], Register]


class LayoutChanged(VdifsError):
    """The directory was split under a change: run it again on the parts."""


def part_key(k: int) -> str:
    return f"{ROOT_KEY}/{k}"


def root_value(parts: int) -> bytes:
    return msgpack.packb({"format": PART_FORMAT, "parts": parts})


def parts_of_root(raw: bytes) -> int:
    """How many parts a root value names: 1 for a format-1 directory (or
    none yet), else the split's P."""
    if not raw:
        return 1
    d = msgpack.unpackb(raw)
    if d.get("format") == FORMAT_VERSION:
        return 1
    parts = d.get("parts")
    if d.get("format") != PART_FORMAT or "vdis" in d or not isinstance(parts, int) or parts < 2:
        raise ValueError(f"unknown directory format {d.get('format')!r}")
    return parts


class DirectoryService:
    """Holds the last known parts and applies changes with compare-and-set.

    The update methods run a pure function on a copy of one part; if it
    raises, nothing is written. Per part two copies are kept. The *base*
    comes only from a consensus read or our own successful CAS: it is a
    chosen value, and only it is ever the base of a CAS. The *hint* comes
    from cheap peeks (watching other mounts); a peek may return a value
    that was accepted somewhere but never chosen, with a version number a
    different chosen value also has, so a CAS built on it could apply an
    update to the wrong part. The hint is shown (`current`) when newer, and
    makes the next update of that part read its base first.
    """

    def __init__(self, open_register: OpenRegister, *, parts: int = DEFAULT_PARTS) -> None:
        """`open_register(key)`: the register of that key; `parts`: how many
        parts this service gives a directory it creates or upgrades (1: it
        keeps format 1)."""
        self._open = open_register
        self._registers: dict[str, Register] = {}
        self.new_parts = parts
        self.parts = 1  # as read from the root: 1 is format 1 (or nothing yet)
        self._root_version = -1
        self._reset(1)
        self._lock = trio.Lock()

    def _reset(self, parts: int) -> None:
        self.parts = parts
        self._base = [Directory(part=k, parts=parts) for k in range(parts)]
        self._version = [-1] * parts
        self._hint = list(self._base)
        self._hint_version = [-1] * parts
        self._view = self._base[0] if parts == 1 else Directory.merged(self._base)

    def _register(self, key: str) -> Register:
        reg = self._registers.get(key)
        if reg is None:
            reg = self._registers[key] = self._open(key)
        return reg

    def _part_register(self, k: int) -> Register:
        return self._register(ROOT_KEY if self.parts == 1 else part_key(k))

    # -- reading -------------------------------------------------------------

    @property
    def current(self) -> Directory:
        """The newest directory known, for lookups and listings (read-only: do not mutate)."""
        return self._view

    def _newest(self, k: int) -> Directory:
        return self._hint[k] if self._hint_version[k] > self._version[k] else self._base[k]

    def _rebuild_view(self) -> None:
        self._view = self._newest(0) if self.parts == 1 else Directory.merged(
            [self._newest(k) for k in range(self.parts)], self._view)

    def _adopt_root(self, version: int, raw: bytes) -> None:
        if version < self._root_version:
            return
        parts = parts_of_root(raw)
        self._root_version = version
        if parts != self.parts:
            log.info("the directory is stored in %d part(s)", parts)
            self._reset(parts)
        if parts == 1:
            self._set_base(0, version, raw)

    def _set_base(self, k: int, version: int, raw: bytes | Directory) -> None:
        if version >= self._version[k]:
            self._base[k] = (raw if isinstance(raw, Directory) else Directory.decode(
                raw, part=k, parts=self.parts)).commit()
            self._version[k] = version
            if self.parts == 1:
                self._root_version = version

    async def _read_part(self, k: int, expect: int | None = None) -> None:
        """Read part k; `expect`: the number of parts the caller works with
        (LayoutChanged if the directory was split meanwhile)."""
        [(version, raw)] = await _read_registers([self._part_register(k)])
        if self.parts == 1:
            self._adopt_root(version, raw)
            if self.parts != 1:  # split meanwhile
                await self._read_all()
        else:
            self._set_base(k, version, raw)
        if expect is not None and self.parts != expect:
            raise LayoutChanged("the directory was split meanwhile")

    async def _read_all(self) -> tuple[list[int], list[Directory]]:
        """Read the root and every part (linearizable each; in one round per
        meta peer when it can, `PaxosRegister.read_many`); returns the
        versions read (root first) and the parts as read."""
        parts = self.parts
        root = self._register(ROOT_KEY)
        read = await _read_registers([root] + ([self._part_register(k) for k in range(parts)] if parts > 1 else []))
        version, raw = read[0]
        self._adopt_root(version, raw)
        if self.parts == 1:
            return [version], [self._base[0] if self._version[0] == version else Directory.decode(raw).commit()]
        if self.parts != parts:  # split meanwhile
            read = [read[0]] + await _read_registers([self._part_register(k) for k in range(self.parts)])
        values = []
        for k, (v, r) in enumerate(read[1:]):
            # A version names one chosen value: a part read again unchanged
            # is not decoded again (a consistent read collects twice).
            value = self._base[k] if self._version[k] == v else Directory.decode(r, part=k, parts=self.parts).commit()
            self._set_base(k, v, value)
            values.append(value)
        return [v for v, _ in read], values

    async def refresh(self, *, consistent: bool = False) -> Directory:
        """Read the directory through the registers. `consistent`: as it was
        at one moment (`_read_consistent`, not the newest hints): what a
        reader that must not miss a live vid needs."""
        if not consistent:
            await self._read_all()
            self._rebuild_view()
            return self.current
        values = await self._read_consistent()
        self._rebuild_view()
        return values[0] if len(values) == 1 else Directory.merged(values)

    async def _read_consistent(self) -> list[Directory]:
        """Every part as it was at one moment: collected until two collects
        read the same versions (a record moving between parts could
        otherwise be read in neither); the last collect's values."""
        versions, values = await self._read_all()
        if self.parts == 1:
            return values
        for _ in range(CONSISTENT_READS):
            again, values = await self._read_all()
            if again == versions:
                return values
            versions = again
        raise ConflictError("the directory kept changing while it was read; try again")

    async def refresh_vid(self, vid: int) -> Directory:
        """Re-read the part that holds a VDI (all, if it is not known)."""
        found = self.current.by_vid(vid)
        if found is None or self.parts == 1:
            return await self.refresh()
        await self._read_part(part_of(found[0], self.parts))
        self._rebuild_view()
        return self.current

    async def refresh_hint(self) -> bool:
        """A cheap, possibly stale or unchosen read (for watching); True if
        what `current` shows changed."""
        root = self._register(ROOT_KEY)
        if getattr(root, "peek", None) is None:
            before = [self._root_version, *self._version]
            await self.refresh()
            return [self._root_version, *self._version] != before
        registers = [root] if self.parts == 1 else [root, *(self._part_register(k) for k in range(self.parts))]
        (version, raw), *peeked = await _peek_all(registers)
        if parts_of_root(raw) != self.parts:
            await self.refresh()
            return True
        if self.parts == 1:
            return self._take_hint(0, version, raw)
        changed = False
        for k, (v, r) in enumerate(peeked):
            changed |= self._take_hint(k, v, r, rebuild=False)
        if changed:
            self._rebuild_view()
        return changed

    def _take_hint(self, k: int, version: int, raw: bytes, *, rebuild: bool = True) -> bool:
        if version > max(self._version[k], self._hint_version[k]):
            self._hint[k] = Directory.decode(raw, part=k, parts=self.parts).commit()
            self._hint_version[k] = version
            if rebuild:
                self._rebuild_view()
            return True
        return False

    # -- changing one part ------------------------------------------------------

    async def _locked(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run a change under the lock, again if the directory was split under it."""
        async with self._lock:
            for _ in range(3):
                await self._prepare()
                try:
                    return await op()
                except LayoutChanged:
                    continue
            raise ConflictError("the directory's layout kept changing; try again")

    async def update_name(self, name: str, fn: Callable[[Directory], T]) -> T:
        """Apply fn to the part a VDI name lives in (a create, a delete)."""
        return await self._locked(lambda: self._change(part_of(name, self.parts), fn))

    async def update_vid(self, vid: int, fn: Callable[[Directory], T]) -> T:
        """Apply fn to the part that holds VDI `vid` (found again if it moved)."""
        return await self._locked(lambda: self._update_vid(vid, fn))

    async def _update_vid(self, vid: int, fn: Callable[[Directory], T]) -> T:
        for attempt in range(2):
            found = self.current.by_vid(vid)
            if found is not None:
                try:
                    return await self._change(part_of(found[0], self.parts), _holding(vid, fn))
                except VdiNotFound:
                    if attempt:
                        raise
            await self.refresh()
        raise VdiNotFound(f"no VDI with vid {vid}")

    async def update_entry(self, vid: int, fn: Callable[[Directory], T]) -> T | None:
        """Apply fn to the part that holds vid as a tombstone, a retired
        snapshot or a reservation; None (and nothing written) if none does."""
        return await self._locked(lambda: self._update_entry(vid, fn))

    async def _update_entry(self, vid: int, fn: Callable[[Directory], T]) -> T | None:
        for attempt in range(2):
            k = next((k for k in range(self.parts) if _has_entry(self._newest(k), vid)), None)
            if k is not None:
                try:
                    return await self._change(k, _holding_entry(vid, fn))
                except VdiNotFound:
                    pass
            if attempt == 0:
                await self.refresh()
        return None

    async def _prepare(self) -> None:
        """Before a change: know the layout; split a format-1 directory if
        this service makes parts."""
        if self._root_version < 0:
            await self.refresh()
        if self.parts == 1 and self.new_parts > 1:
            await self._upgrade()

    async def _change(self, k: int, fn: Callable[[Directory], T], *, finish: bool = True) -> T:
        """One CAS of part k with fn applied to a copy of its base; fn's
        errors are only believed on a freshly read part. An intent fn meets
        is finished first (`finish`), then fn runs again."""
        parts = self.parts
        fresh = False
        if self._version[k] < 0 or self._hint_version[k] > self._version[k]:
            await self._read_part(k, parts)
            fresh = True
        others: set[int] | None = None
        for _ in range(MAX_CAS_ATTEMPTS):
            draft = self._base[k].clone()
            if others is not None:
                draft.others_in_use = functools.partial(set, others)
            try:
                result = fn(draft)
            except NeedsOtherParts:
                others = await self._others_in_use(k)  # reads every part, this one too
                fresh = True
                continue
            except IntentPending as e:
                if not fresh:
                    await self._read_part(k, parts)
                    fresh = True
                    continue
                if not finish:
                    raise
                await self._finish_intent(e.part, e.key)
                await self._read_part(k, parts)
                continue
            except Exception:
                if fresh:
                    raise
                await self._read_part(k, parts)
                fresh = True
                continue
            version = self._version[k]
            if await self._part_register(k).cas(version, draft.encode()):
                self._set_base(k, version + 1, draft)
                self._rebuild_view()
                return result
            await self._read_part(k, parts)
            fresh = True
        raise ConflictError("the directory kept changing under us; try again")

    async def _others_in_use(self, k: int) -> set[int]:
        """Every vid the other parts use, read consistently (for a part whose
        counter wrapped: `Directory._allocate_vid`)."""
        values = await self._read_consistent()
        self._rebuild_view()
        used: set[int] = set()
        for j, p in enumerate(values):
            if j != k:
                used |= p.vids_in_use()
        return used

    # -- changes across two parts -------------------------------------------------

    async def rename(self, old: str, new: str, *, replace: bool = True) -> int | None:
        """Rename a VDI; returns the vid of a replaced target, if any."""
        return await self._locked(lambda: self._rename(old, new, replace))

    async def _rename(self, old: str, new: str, replace: bool) -> int | None:
        k1, k2 = part_of(old, self.parts), part_of(new, self.parts)
        if k1 == k2 or old == new:
            return await self._change(k1, lambda d: d.rename(old, new, replace=replace))
        key, intent = await self._change(k1, lambda d: _with_intent(d, d.begin_rename(old, new, replace=replace)))
        _taken, replaced = await self._finish_intent(k1, key, intent)
        return replaced

    async def clone(self, name: str, snap: str, new_name: str, new_vid: int, *,
                    copies: int | None = None) -> VdiRecord:
        """Commit a clone whose map is copied to the reserved `new_vid`."""
        return await self._locked(lambda: self._clone(name, snap, new_name, new_vid, copies))

    async def _clone(self, name: str, snap: str, new_name: str, new_vid: int, copies: int | None) -> VdiRecord:
        k1, k2 = part_of(name, self.parts), part_of(new_name, self.parts)
        if k1 == k2:
            return await self._change(k1, lambda d: d.clone_snapshot(name, snap, new_name, new_vid,
                                                                     copies=copies))
        key, intent = await self._change(
            k1, lambda d: _with_intent(d, d.begin_clone(name, snap, new_name, new_vid, copies=copies)))
        await self._finish_intent(k1, key, intent)
        return VdiRecord.from_dict(intent["record"])

    async def _finish_intent(self, k1: int, key: str, intent: dict[str, Any] | None = None
                             ) -> tuple[bool, int | None]:
        """Steps 2 and 3 of an intent of part k1: the target part's decision,
        then the intent's end. Returns (taken, replaced vid); raises the
        target part's refusal for the caller that began it (`intent` given)."""
        mine = intent is not None
        if intent is None:
            await self._read_part(k1)
            intent = self._base[k1].intents.get(key)
            if intent is None:
                return False, None
        k2 = part_of(intent["target"], self.parts)
        token = intent["token"]
        taken, replaced = await self._change(k2, lambda d: d.arrive(intent), finish=False)
        await self._change(k1, lambda d: d.settle(key, token) if taken else d.abandon(key, token), finish=False)
        what = f"{intent['kind']} of {intent['source']!r} to {intent['target']!r}"
        if taken:
            log.info("directory: %s done%s", what, "" if mine else " (finished for a mount that began it)")
            return True, replaced
        _, _, code, why = self._base[k2].arrivals.get(token, [False, 0, 0, "refused"])
        log.info("directory: %s refused: %s", what, why)
        if mine:
            raise VdiExists(why) if code == errno.EEXIST else VdifsError(why, code=code or None)
        return False, None

    async def finish_intents(self, older_than: float = INTENT_AGE) -> int:
        """Finish every intent older than `older_than` seconds that the
        current view shows (a mount that began it died, or stalled);
        returns how many."""
        if self.parts == 1:
            return 0
        now = time.time()
        todo = [(int(k.split(":", 1)[0]), k.split(":", 1)[1]) for k, i in self.current.intents.items()
                if now - float(i.get("at", 0)) >= older_than]
        done = 0
        for k1, key in todo:
            async with self._lock:
                try:
                    await self._finish_intent(k1, key)
                    done += 1
                except VdifsError as e:
                    log.warning("directory: could not finish %s in part %d: %s", key, k1, e)
        return done

    # -- upgrade ---------------------------------------------------------------------

    async def _upgrade(self) -> None:
        """Split a format-1 directory (or start an empty one) into
        `new_parts` parts; see the module docstring."""
        parts = self.new_parts
        for _ in range(MAX_CAS_ATTEMPTS):
            version, raw = await self._register(ROOT_KEY).get()
            self._adopt_root(version, raw)
            if self.parts != 1:
                await self.refresh()
                return
            whole = self._base[0]
            if raw:
                images = whole.split(parts)
                for image in images:
                    image.upgrade_of = version
                if not await self._write_images(images):
                    await self.refresh()
                    return
            if await self._register(ROOT_KEY).cas(version, root_value(parts)):
                if raw:
                    log.warning("directory: split into %d parts (%d VDIs); mounts of vdifs versions "
                                "without parts can no longer read it", parts, len(whole.vdis))
                await self.refresh()
                return
        raise ConflictError("the directory kept changing while it was split; try again")

    async def _write_images(self, images: list[Directory]) -> bool:
        """Write every part's upgrade image over empty parts and images of
        older versions; False if some part is in use already, or holds the
        image of a newer version (another mount split first)."""
        live = False

        async def one(image: Directory) -> None:
            nonlocal live
            reg = self._register(part_key(image.part))
            for _ in range(MAX_CAS_ATTEMPTS):
                v, r = await reg.get()
                there = Directory.decode(r, part=image.part, parts=image.parts).upgrade_of if r else -1
                if there == image.upgrade_of:
                    return  # the same split of the same version, by another mount
                if there == 0 or there > image.upgrade_of:
                    live = True  # in use since a split, or split from a newer version
                    return
                if await reg.cas(v, image.encode()):
                    return
            raise ConflictError(f"directory part {image.part} kept changing while it was split")

        await _concurrently([functools.partial(one, image) for image in images])
        return not live


async def _read_registers(registers: list[Register]) -> list[tuple[int, bytes]]:
    """(version, value) of registers, each read linearizably: in one round
    per meta peer when they are a cluster's and no change is in flight
    (also one alone: a read made as a change takes a ballot, and readers
    that poll that way hold off the writers, design change 67)."""
    if registers and all(isinstance(r, PaxosRegister) for r in registers):
        try:
            return await PaxosRegister.read_many(registers)  # type: ignore[arg-type]
        except ConsensusUnavailable as e:
            log.debug("directory: reading all parts at once failed (%s); one by one", e)
    out: list[tuple[int, bytes]] = [(0, b"")] * len(registers)

    async def one(i: int) -> None:
        out[i] = await registers[i].get()

    await _concurrently([functools.partial(one, i) for i in range(len(registers))])
    return out


async def _peek_all(registers: list[Register]) -> list[tuple[int, bytes]]:
    """(version, value) of registers, peeked: in one request per meta peer
    when they are a cluster's (else one peek each)."""
    if len(registers) > 1 and all(isinstance(r, PaxosRegister) for r in registers):
        try:
            return await PaxosRegister.peek_many(registers)  # type: ignore[arg-type]
        except ConsensusUnavailable as e:  # meta peers of a version without paxos.peek_many
            log.debug("directory: peeking all parts at once failed (%s); one by one", e)
    out: list[tuple[int, bytes]] = [(0, b"")] * len(registers)

    async def one(i: int) -> None:
        out[i] = await registers[i].peek()  # type: ignore[attr-defined]

    await _concurrently([functools.partial(one, i) for i in range(len(registers))])
    return out


async def _concurrently(jobs: list[Callable[[], Awaitable[None]]]) -> None:
    """Run jobs at once; a failure comes out as the error that says most
    (`as_vdifs_error`), or as itself if it is the only one: callers of the
    directory expect a VdifsError, not an exception group."""
    try:
        async with trio.open_nursery() as nursery:
            for job in jobs:
                nursery.start_soon(job)
    except BaseExceptionGroup as group:
        err = as_vdifs_error(group)
        if err is not None:
            raise err from group
        leaves = leaf_errors(group)
        if len(leaves) == 1:
            raise leaves[0] from group
        raise


def _holding(vid: int, fn: Callable[[Directory], T]) -> Callable[[Directory], T]:
    """fn, run only in the part that holds VDI `vid` (VdiNotFound elsewhere),
    and only while no intent freezes it (`by_vid` raises IntentPending): a
    reservation made beside a VDI being renamed away would be left behind."""
    def run(d: Directory) -> T:
        if d.by_vid(vid) is None:
            raise VdiNotFound(f"no VDI with vid {vid}")
        return fn(d)
    return run


def _with_intent(d: Directory, key: str) -> tuple[str, dict[str, Any]]:
    """An intent's key and the intent, as the change that began it stored them."""
    return key, d.intents[key]


def _has_entry(d: Directory, vid: int) -> bool:
    return vid in d.deleting or vid in d.retired or vid in d.reserved


def _holding_entry(vid: int, fn: Callable[[Directory], T]) -> Callable[[Directory], T]:
    def run(d: Directory) -> T:
        if not _has_entry(d, vid):
            raise VdiNotFound(f"no entry for vid {vid}")
        return fn(d)
    return run


class DirectoryReader:
    """Reads of the whole directory as it was at one moment
    (`refresh(consistent=True)`), for readers that decide from it what is
    garbage, again and again (a peer's recovery passes, leak passes and
    checks of set-aside objects). One service is kept across reads, so a
    read decodes only the parts that changed since the one before: a fresh
    service decodes all of them (about 100 ms of CPU at 10,000 VDIs)."""

    def __init__(self, open_register: OpenRegister) -> None:
        self._service = DirectoryService(open_register, parts=1)

    async def read(self) -> Directory:
        return await self._service.refresh(consistent=True)


async def read_directory(open_register: OpenRegister) -> Directory:
    """One read of a `DirectoryReader`, for a process that reads once (a command)."""
    return await DirectoryReader(open_register).read()

