"""Registers: one versioned value with compare-and-set.

`Register` is the interface the directory service and the leases are
written against (the cluster map is read and changed through `MetaClient`
directly). `FileRegister` keeps the value in a local file,
which is what the embedded single-node pool uses; the cluster puts a
CASPaxos register behind the same interface.
"""

from __future__ import annotations

from typing import Protocol

import msgpack
import trio

from vdifs.fsutil import atomic_write


class Register(Protocol):
    async def get(self) -> tuple[int, bytes]:
        """Current (version, value); version 0 and b'' for a never-written register."""
        ...

    async def read(self) -> tuple[int, bytes]:
        """`get` for a reader that changes nothing: as current, and taking no
        ballot where the register can avoid it (a CASPaxos `get` is a change
        by the identity function, and many readers polling that way hold off
        the writers, design change 67)."""
        ...

    async def cas(self, version: int, value: bytes) -> bool:
        """Store `value` as version+1 if the current version is `version`.

        Returns False (and changes nothing) if someone else got there first.
        The new value is durable when this returns True.
        """
        ...


class FileRegister:
    """A register in one file, replaced atomically; for a single process."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = trio.Lock()
        self._cached: tuple[int, bytes] | None = None

    def _load(self) -> tuple[int, bytes]:
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return 0, b""
        d = msgpack.unpackb(raw)
        return d["version"], d["value"]

    async def get(self) -> tuple[int, bytes]:
        async with self._lock:
            if self._cached is None:
                self._cached = await trio.to_thread.run_sync(self._load)
            return self._cached

    async def read(self) -> tuple[int, bytes]:
        return await self.get()  # one process: nobody to hold off

    async def cas(self, version: int, value: bytes) -> bool:
        async with self._lock:
            if self._cached is None:
                self._cached = await trio.to_thread.run_sync(self._load)
            if self._cached[0] != version:
                return False
            new = (version + 1, value)
            raw = msgpack.packb({"version": new[0], "value": value})
            await trio.to_thread.run_sync(atomic_write, self.path, raw)
            self._cached = new
            return True
