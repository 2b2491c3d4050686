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
    """

    def __init__(self, register: Register) -> None:
        self.register = register
        self._version = -1
        self._current = Directory()
        self._lock = trio.Lock()

    async def refresh(self) -> Directory:
        """Read the directory through the register (linearizable)."""
        return self._take(*await self.register.get())

    async def refresh_hint(self) -> bool:
        """A cheap, possibly stale read (for watching); True if it changed."""
        peek = getattr(self.register, "peek", None)
        before = self._version
        self._take(*(await peek() if peek is not None else await self.register.get()))
        return self._version != before

    def _take(self, version: int, raw: bytes) -> Directory:
        if version > self._version:
            self._current = Directory.decode(raw)
            self._version = version
        return self._current

    @property
    def current(self) -> Directory:
        """The last directory read or written (read-only: do not mutate)."""
        return self._current

    async def update(self, fn: Callable[[Directory], T]) -> T:
        """Apply fn to the directory and store it; fn's errors are only
        believed on a freshly read directory (a cached one may be stale)."""
        async with self._lock:
            if self._version < 0:
                await self.refresh()
            fresh = False
            for _ in range(MAX_CAS_ATTEMPTS):
                draft = self._current.clone()
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
                    self._current = draft
                    return result
                await self.refresh()
                fresh = True
            raise ConflictError("the directory kept changing under us; try again")
