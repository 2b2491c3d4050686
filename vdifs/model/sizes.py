"""Human-readable sizes: parsing `10G` and printing `10.0 GiB`."""

from __future__ import annotations

import re

_UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse a byte count with an optional binary suffix (K, M, G, T, P).

    `10G`, `10GiB` and `10g` all mean 10 * 2^30. Fractions are allowed when
    they come out to whole bytes (`1.5K`). Negative numbers are refused.
    """
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"invalid size {text!r}: use a number with an optional K/M/G/T/P suffix")
    number, unit = m.group(1), m.group(2).upper()
    scale = 1024 ** _UNITS[unit]
    if "." in number:
        whole, frac = number.split(".")
        value = int(whole) * scale + int(frac) * scale // 10 ** len(frac)
        if (int(frac) * scale) % 10 ** len(frac):
            raise ValueError(f"invalid size {text!r}: not a whole number of bytes")
        return value
    return int(number) * scale


def format_size(n: int) -> str:
    """`4194304` -> `4.0 MiB`; exact small values stay in bytes."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        value /= 1024
        if value < 1024 or unit == "EiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")
