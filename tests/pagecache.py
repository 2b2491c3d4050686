"""What the page cache holds of a file, asked without reading it in.

A read, even a NOWAIT one, would not do: it may start a readahead of what
it finds missing (and a read of a hole fills pages with zeros), so a test
that checks what a store left uncached would fill the cache itself."""

from __future__ import annotations

import ctypes
import mmap
import os
import time


def pages_cached(path: str, offset: int, length: int) -> int:
    """How many pages of the range the page cache holds (mincore(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
        assert addr not in (None, ctypes.c_void_p(-1).value)
        try:
            vec = ctypes.create_string_buffer(-(-length // mmap.PAGESIZE))
            assert libc.mincore(addr, length, vec) == 0, ctypes.get_errno()
            return sum(b & 1 for b in vec.raw)
        finally:
            libc.munmap(addr, length)
    finally:
        os.close(fd)



def all_cached(path: str, offset: int, length: int) -> bool:
    """Whether the page cache holds every page of the range."""
    return pages_cached(path, offset, length) == -(-length // mmap.PAGESIZE)

def evict(path: str) -> None:
    """Drop a file's pages from the page cache, and make sure they are gone.

    POSIX_FADV_DONTNEED is advice: a page still under writeback, or held
    for a moment by another CPU's LRU batch, stays. A test that needs a
    cold file asks again until mincore shows none, and fails plainly
    (not later, in what it meant to test) if they never go."""
    size = os.stat(path).st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        for _ in range(200):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if size == 0 or pages_cached(path, 0, size) == 0:
                return
            time.sleep(0.01)
    finally:
        os.close(fd)
    raise AssertionError(f"{path}: the page cache kept {pages_cached(path, 0, size)} pages through DONTNEED")
