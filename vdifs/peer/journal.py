"""Which objects changed at which epoch: what makes delta resync possible.

A peer that was away (killed, restarted, marked down) must not trust the
objects that changed while it was gone, but all the others are current.
Every peer records, per epoch of its map, the ids of the objects it wrote,
created or deleted (once per object and epoch); a returning peer asks the
others for everything changed after the last epoch it saw and re-fetches
only that, instead of everything it holds (Sheepdog and Longhorn recopy
everything).

On disk: `STORE/journal/<epoch:012d>` files of 8-byte big-endian ids,
appended; `STORE/journal/since`, the first epoch the journal is complete
from; `STORE/journal/clean`, present only while the peer is stopped
cleanly. After an unclean stop the entries not yet synced may be lost, so
the journal restarts as complete only from the epoch after the one it
died in. It is synced with the objects (`obj.sync`) and at a clean stop.
Only the newest KEEP_EPOCHS epochs are kept; older ones move `since` up.
"""

from __future__ import annotations

import os
import struct

import trio

from vdifs.meta.atomic import atomic_write

KEEP_EPOCHS = 256
_ID = struct.Struct(">Q")


class ChangeJournal:
    def __init__(self, root: str) -> None:
        self.dir = os.path.join(root, "journal")
        self.since = 0  # the journal lists every change at epochs >= since
        self._seen: dict[int, set[int]] = {}  # epoch -> ids recorded (on disk or pending)
        self._pending: dict[int, list[int]] = {}  # epoch -> ids not yet appended to the file
        self._lock = trio.Lock()

    # -- opening and closing (blocking: call from a worker thread) ---------------------

    def open(self, current_epoch: int) -> bool:
        """Load the journal; True if the last stop was clean."""
        os.makedirs(self.dir, exist_ok=True)
        clean_marker = os.path.join(self.dir, "clean")
        clean = os.path.exists(clean_marker)
        try:
            with open(os.path.join(self.dir, "since")) as f:
                self.since = int(f.read().strip())
        except (FileNotFoundError, ValueError):
            self.since = current_epoch  # a new store: nothing happened before
            clean = clean or not self._epoch_files()
        for epoch in self._epoch_files():
            with open(os.path.join(self.dir, f"{epoch:012d}"), "rb") as f:
                raw = f.read()
            raw = raw[:len(raw) - len(raw) % 8]  # a torn last append
            self._seen[epoch] = {i for (i,) in _ID.iter_unpack(raw)}
        if not clean:
            self.since = max(self.since, current_epoch + 1)
        atomic_write(os.path.join(self.dir, "since"), f"{self.since}\n".encode())
        if os.path.exists(clean_marker):
            os.unlink(clean_marker)  # from now on a crash must be noticed
        return clean

    def _epoch_files(self) -> list[int]:
        return sorted(int(n) for n in os.listdir(self.dir) if n.isdigit())

    def _append(self, batches: dict[int, list[int]], sync: bool) -> None:
        for epoch, ids in batches.items():
            fd = os.open(os.path.join(self.dir, f"{epoch:012d}"),
                         os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, b"".join(_ID.pack(i) for i in ids))
                if sync:
                    os.fdatasync(fd)
            finally:
                os.close(fd)

    def _prune(self) -> None:
        epochs = self._epoch_files()
        for epoch in epochs[:-KEEP_EPOCHS]:
            os.unlink(os.path.join(self.dir, f"{epoch:012d}"))
            self._seen.pop(epoch, None)
            self.since = max(self.since, epoch + 1)
        atomic_write(os.path.join(self.dir, "since"), f"{self.since}\n".encode())

    # -- recording ---------------------------------------------------------------

    def record(self, epoch: int, oid: int) -> None:
        """Note that `oid` changes at `epoch` (before the change is made)."""
        seen = self._seen.setdefault(epoch, set())
        if oid not in seen:
            seen.add(oid)
            self._pending.setdefault(epoch, []).append(oid)

    async def flush(self, *, sync: bool = True) -> None:
        """Append what was recorded; with `sync`, make it durable."""
        async with self._lock:
            batches, self._pending = self._pending, {}
            if batches or sync:
                try:
                    await trio.to_thread.run_sync(self._append, batches, sync)
                except BaseException:
                    for epoch, ids in batches.items():  # try again next time
                        self._pending.setdefault(epoch, []).extend(ids)
                    raise
            if len(self._seen) > KEEP_EPOCHS:
                await trio.to_thread.run_sync(self._prune)

    async def close_cleanly(self) -> None:
        await self.flush(sync=True)
        await trio.to_thread.run_sync(atomic_write, os.path.join(self.dir, "clean"), b"")

    # -- asking --------------------------------------------------------------------

    def changed_after(self, epoch: int) -> list[int] | None:
        """Sorted ids changed at any epoch after `epoch`, or None if the journal
        does not reach back that far (the asker must resync fully)."""
        if self.since > epoch + 1:
            return None
        out: set[int] = set()
        for e, ids in self._seen.items():
            if e > epoch:
                out |= ids
        return sorted(out)
