"""Which objects changed at which epoch: what makes delta resync possible.

A peer that was away (killed, restarted, marked down) must not trust the
objects that changed while it was gone, but all the others are current.
Every peer records, per epoch of its map, the ids of the objects it wrote,
created or deleted (once per object and epoch); a returning peer asks the
others for everything changed after the last epoch it saw and re-fetches
only that, instead of everything it holds (Sheepdog and Longhorn recopy
everything).

The journal lives in memory and is written out only at a clean stop: after
a crash nothing says whether the last changes were recorded, so the journal
restarts as complete only from the epoch after the one it died in, and
anything written before the crash would be useless. Writing it on the I/O
path (every `obj.sync`) would cost time for nothing.

On disk: `STORE/journal/<epoch:012d>` files of 8-byte big-endian ids;
`STORE/journal/since`, the first epoch the journal is complete from;
`STORE/journal/clean`, present only while the peer is stopped cleanly.
Only the newest KEEP_EPOCHS epochs are kept; older ones move `since` up.
"""

from __future__ import annotations

import os
import struct

import trio

from vdifs.fsutil import atomic_write, fsync_dir

KEEP_EPOCHS = 256
_ID = struct.Struct(">Q")


class ChangeJournal:
    def __init__(self, root: str) -> None:
        self.dir = os.path.join(root, "journal")
        self.since = 0  # the journal lists every change at epochs >= since
        self._seen: dict[int, set[int]] = {}  # epoch -> ids changed at it
        self._changed: set[int] = set()  # epochs whose file is out of date

    def open(self, current_epoch: int) -> bool:
        """Load the journal (blocking: call from a worker thread); True if the
        last stop was clean."""
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
            path = os.path.join(self.dir, f"{epoch:012d}")
            if clean:
                with open(path, "rb") as f:
                    raw = f.read()
                self._seen[epoch] = {i for (i,) in _ID.iter_unpack(raw[:len(raw) - len(raw) % 8])}
            else:
                os.unlink(path)
        if not clean:
            self.since = max(self.since, current_epoch + 1)
        atomic_write(os.path.join(self.dir, "since"), f"{self.since}\n".encode())
        if os.path.exists(clean_marker):
            os.unlink(clean_marker)  # from now on a crash must be noticed
            fsync_dir(self.dir)
        return clean

    def _epoch_files(self) -> list[int]:
        return sorted(int(n) for n in os.listdir(self.dir) if n.isdigit())

    def record(self, epoch: int, oid: int) -> None:
        """Note that `oid` changes at `epoch` (before the change is made)."""
        seen = self._seen.setdefault(epoch, set())
        if oid not in seen:
            seen.add(oid)
            self._changed.add(epoch)
            if len(self._seen) > KEEP_EPOCHS:
                oldest = min(self._seen)
                del self._seen[oldest]
                self.since = max(self.since, oldest + 1)

    def _save(self) -> None:
        for epoch in sorted(self._changed):
            if epoch in self._seen:
                atomic_write(os.path.join(self.dir, f"{epoch:012d}"),
                             b"".join(_ID.pack(i) for i in sorted(self._seen[epoch])))
        for epoch in self._epoch_files():
            if epoch not in self._seen:  # pruned
                os.unlink(os.path.join(self.dir, f"{epoch:012d}"))
        atomic_write(os.path.join(self.dir, "since"), f"{self.since}\n".encode())
        atomic_write(os.path.join(self.dir, "clean"), b"")  # last: the files before it are complete
        self._changed.clear()

    async def close_cleanly(self) -> None:
        await trio.to_thread.run_sync(self._save)

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
