"""VDI name rules.

Names are 1-255 bytes of UTF-8 without '/', NUL or '@' ('@' separates a VDI
from a snapshot: NAME@SNAP). `.snapshots` and names starting with `.vdifs`
are reserved for the file system itself.
"""

from __future__ import annotations

from vdifs.errors import InvalidArgument

MAX_NAME_BYTES = 255
SNAPSHOT_DIR = ".snapshots"
RESERVED_PREFIX = ".vdifs"


class InvalidName(InvalidArgument, ValueError):
    """A name that can never be a VDI name (EINVAL wherever it is reported)."""


class ReservedName(InvalidName):
    """A well-formed name that vdifs keeps for itself."""


def validate_name(raw: bytes | str) -> str:
    """Return the name as str, or raise InvalidName / ReservedName saying why."""
    if isinstance(raw, str):
        text = raw
        raw = raw.encode("utf-8", "surrogateescape")
    else:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidName("VDI names must be valid UTF-8") from None
    if not raw:
        raise InvalidName("VDI name is empty")
    if len(raw) > MAX_NAME_BYTES:
        raise InvalidName(f"VDI name is {len(raw)} bytes long, the limit is {MAX_NAME_BYTES}")
    for bad, label in ((b"/", "'/'"), (b"\0", "NUL"), (b"@", "'@' (it separates NAME@SNAPSHOT)")):
        if bad in raw:
            raise InvalidName(f"VDI names must not contain {label}")
    if text in (".", ".."):
        raise InvalidName(f"{text!r} is not a VDI name")
    if text == SNAPSHOT_DIR or text.startswith(RESERVED_PREFIX):
        raise ReservedName(f"{text!r} is reserved for vdifs itself")
    return text
