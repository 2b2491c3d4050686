"""The directory service: read-modify-CAS loops over the directory register."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

from vdifs.errors import ConflictError
from vdifs.meta.register import Register
from vdifs.model.directory import Directory

T = TypeVar("T")
MAX_CAS_ATTEMPTS = 100


class DirectoryService:
    """Holds the last known directory and applies changes with compare-and-set.

    `update(fn)` runs the pure function `fn` on a copy of the directory; if
    `fn` raises, nothing is written. Changes are serialised in this process
    by a lock, and against other processes by the register's CAS.

    Two copies are kept. The *base* comes only from a consensus read or our
    own successful CAS: it is a chosen value, and only it is ever the base
    of a CAS. The *hint* comes from cheap peeks (watching other mounts); a
    peek may return a value that was accepted somewhere but never chosen,
    with a version number a different chosen value also has, so a CAS built
    on it could apply an update to the wrong directory. The hint is shown
    (`current`) when newer, and makes the next update read the base first.
    """

    def __init__(self, register: Register) -> None:
        self.register = register
        self._version = -1  # version of the base
        self._base = Directory()
        self._hint_version = -1
        self._hint = Directory()
        self._lock = trio.Lock()

    async def refresh(self) -> Directory:
        """Read the directory through the register (linearizable)."""
        version, raw = await self.register.get()
        if version >= self._version:
            self._base = Directory.decode(raw)
            self._version = version
        return self.current

    async def refresh_hint(self) -> bool:
        """A cheap, possibly stale or unchosen read (for watching); True if
        what `current` shows changed."""
        peek = getattr(self.register, "peek", None)
        if peek is None:
            before = self._version
            await self.refresh()
            return self._version != before
        version, raw = await peek()
        if version > max(self._version, self._hint_version):
            self._hint = Directory.decode(raw)
            self._hint_version = version
            return True
        return False

    @property
    def current(self) -> Directory:
        """The newest directory known, for lookups and listings (read-only: do not mutate)."""
        return self._hint if self._hint_version > self._version else self._base

    async def update(self, fn: Callable[[Directory], T]) -> T:
        """Apply fn to the directory and store it; fn's errors are only
        believed on a freshly read directory (a cached one may be stale)."""
        async with self._lock:
            fresh = False
            if self._version < 0 or self._hint_version > self._version:
                await self.refresh()
                fresh = True
            for _ in range(MAX_CAS_ATTEMPTS):
                draft = self._base.clone()
                try:
                    result = fn(draft)
                except Exception:
                    if fresh:
                        raise
                    await self.refresh()
                    fresh = True
                    continue
                if await self.register.cas(self._version, draft.encode()):
                    self._version += 1
                    self._base = draft
                    return result
                await self.refresh()
                fresh = True
            raise ConflictError("the directory kept changing under us; try again")
