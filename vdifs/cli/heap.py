"""How the daemons' C allocator keeps the memory of freed data buffers.

Every request that carries data gets a fresh buffer (a `bytearray` of up
to 4 MiB). By default glibc serves such sizes with a fresh mmap, or trims
them off the heap's top when freed, so each new buffer comes back as
untouched pages: a page fault and a page of zeros from the kernel per 4
KiB, and on a virtual machine whose freed memory is handed back to the
host, a fault in the host too. A 1 MiB sequential read through a cluster
mount spent an eighth of the mount's time there (docs/benchmarks.md).
Keeping big buffers on the heap and not trimming its top makes a freed
buffer's pages the next one's, already mapped. The cost is that the
process keeps its peak of buffers in flight resident, which the request
limits bound."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
#: allocations up to this size come from the heap (glibc's largest allowed value on 64-bit)
MMAP_THRESHOLD = 32 << 20
#: free memory at the top of a heap beyond this is given back to the kernel
TRIM_THRESHOLD = 32 << 20


def keep_freed_buffers() -> bool:
    """Tune glibc's malloc as above; False (and nothing changed) elsewhere."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not done:
        log.debug("mallopt refused the buffer settings; keeping the allocator's defaults")
    return done
