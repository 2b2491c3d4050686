"""What the page cache holds of a file, asked without reading it in.

A read, even a NOWAIT one, would not do: it may start a readahead of what
it finds missing (and a read of a hole fills pages with zeros), so a test
that checks what a store left uncached would fill the cache itself."""

from __future__ import annotations

import ctypes
import mmap
import os


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
