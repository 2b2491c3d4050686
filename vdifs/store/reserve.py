"""The space a store keeps back from VDI data.

A pool fills up one data write at a time. If data could take the last
byte, what must always be writable would fail with it: the object maps
that record where the written data is (so a close could not finish), the
consensus registers and journals (so `rm`, which frees space, could not
run), the checksum tables. So data writes stop at a reserve: below it they
fail with ENOSPC (QEMU pauses the VM), everything else goes on into the
reserve.

The free space is not measured on every write (a statvfs is a system call,
1.2 us here, cheap enough for the event loop but not for every 4 KiB
write): it is measured at most every REFRESH seconds, and the
bytes admitted since are subtracted from the measurement. That counts an
overwrite of allocated blocks as new space, so near the line the store
measures again (at most every RECHECK seconds) before it refuses.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

#: Seconds a measurement of the free space is trusted (less the bytes admitted since).
REFRESH = 1.0
#: Seconds between measurements while a write would dip into the reserve.
RECHECK = 0.05
#: The default reserve: this share of the file system, within the bounds below.
DEFAULT_SHARE = 0.02
DEFAULT_MIN = 1 << 20
DEFAULT_MAX = 1 << 30


def default_reserve(total: int) -> int:
    """2% of a file system of `total` bytes, at least 1 MiB and at most 1 GiB."""
    return max(DEFAULT_MIN, min(DEFAULT_MAX, int(total * DEFAULT_SHARE)))


class SpaceReserve:
    """Admits data writes while they leave `reserve` bytes free on the file
    system at `root`. `reserve=None`: the default for the file system's size.
    Single-threaded: called from the event loop only."""

    def __init__(self, root: str, reserve: int | None = None, *,
                 statvfs: Callable[[str], os.statvfs_result] = os.statvfs,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.root = root
        self._statvfs = statvfs
        self._clock = clock
        self.total = 0
        self._free = 0  # at the last measurement
        self._admitted = 0  # bytes admitted since it
        self._measured_at = -float("inf")
        self._measure()
        self.reserve = default_reserve(self.total) if reserve is None else reserve

    def _measure(self) -> None:
        st = self._statvfs(self.root)
        self.total, self._free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        self._admitted = 0
        self._measured_at = self._clock()

    @property
    def free(self) -> int:
        """The free space as last estimated (measured, less what was admitted since)."""
        return self._free - self._admitted

    @property
    def available(self) -> int:
        """What data writes may still take."""
        return max(0, self.free - self.reserve)

    def admit(self, nbytes: int) -> bool:
        """May a data write of `nbytes` go ahead? Counts it if so."""
        now = self._clock()
        if now - self._measured_at >= REFRESH:
            self._measure()
        if self.free - nbytes < self.reserve:
            if now - self._measured_at < RECHECK:
                return False
            self._measure()  # the estimate may have counted overwrites as new space
            if self._free - nbytes < self.reserve:
                return False
        self._admitted += nbytes
        return True

    def give_back(self, nbytes: int) -> None:
        """Un-count an admitted write that did not happen (call it before
        anything else is admitted or measured)."""
        self._admitted -= nbytes
