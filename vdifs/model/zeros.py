"""Fast all-zero checks for write buffers (zero detection)."""

from __future__ import annotations

from functools import lru_cache

from vdifs.model.ids import OBJECT_SIZE

_ZEROS = bytes(OBJECT_SIZE)


@lru_cache(maxsize=64)
def zeros(n: int) -> bytes:
    """An immutable zero buffer of n bytes (cached: common sizes repeat)."""
    return _ZEROS[:n] if n <= len(_ZEROS) else bytes(n)


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """True if every byte is zero; one memcmp, with an early exit for data."""
    n = len(data)
    if n == 0:
        return True
    if data[0] or data[n - 1]:
        return False
    if isinstance(data, memoryview):
        data = data.tobytes()
    return data == zeros(n)
