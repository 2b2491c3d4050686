"""Finding vdifs mounts in the mount table, and the store behind each.

A mount names its store in the mount source (`vdifs:/var/lib/vdifs`, what
`df` and `findmnt` show), so the command line finds a mount's control
socket from the mount table alone. (It used to read an extended attribute
of the mount point; the mount answers no getxattr now: design change 24.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MOUNTS_FILE = "/proc/mounts"
FSTYPE = "fuse.vdifs"  # what /proc/mounts says of a vdifs mount
SOURCE_PREFIX = "vdifs:"  # the mount source is this and the store's absolute path


@dataclass(frozen=True)
class MountEntry:
    source: str
    mountpoint: str
    fstype: str

    @property
    def store(self) -> str | None:
        """The store a vdifs mount runs on, if its source names one."""
        if self.fstype != FSTYPE or not self.source.startswith(SOURCE_PREFIX + "/"):
            return None
        return self.source[len(SOURCE_PREFIX):]


def unescape_mount_field(field: str) -> str:
    r"""The kernel writes space, tab, newline and backslash in /proc/mounts
    fields as octal escapes (`\040`); undo them."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mounts(text: str) -> list[MountEntry]:
    """The entries of a /proc/mounts text (lines it cannot read are skipped)."""
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            entries.append(MountEntry(*(unescape_mount_field(f) for f in fields[:3])))
    return entries


def read_mounts(path: str = MOUNTS_FILE) -> list[MountEntry]:
    """This machine's mount table (empty when it cannot be read)."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return parse_mounts(f.read())
    except OSError:
        return []


def vdifs_mounts(entries: list[MountEntry]) -> list[MountEntry]:
    return [e for e in entries if e.fstype == FSTYPE]
