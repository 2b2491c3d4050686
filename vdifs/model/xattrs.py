"""Extended attributes a VDI keeps: the labels libvirt and the security
modules put on disk images.

libvirt's DAC and SELinux drivers label an image before QEMU opens it
(`security.selinux`, and `trusted.libvirt.security.*` to remember the owner
and label to restore); refusing them made sVirt fail. A VDI keeps the
`security.*` and `trusted.*` attributes in its directory record, so every
mount of the cluster sees them and they survive restarts. They are few and
short, and the directory is rewritten whole on every change, so each VDI's
set is bounded. `security.capability` is refused: a VDI is never run, and
keeping none means no write ever has capabilities to drop.
`system.posix_acl_*` are refused too: access is the mode's.
"""

from __future__ import annotations

import errno

from vdifs.errors import InvalidArgument, NoAttribute, NoSpace, NotSupported, VdifsError

#: prefixes of the names a VDI stores
STORED_PREFIXES = ("security.", "trusted.")
#: never stored (see the module docstring)
REFUSED = ("security.capability",)
NAME_MAX = 255  # bytes, as XATTR_NAME_MAX
VALUE_MAX = 4096  # bytes of one value
PER_VDI = 16  # names
BYTES_PER_VDI = 8192  # names and values together

XATTR_CREATE, XATTR_REPLACE = 1, 2  # setxattr(2) flags


def stored(name: str) -> bool:
    """Whether a name is one a VDI keeps (else: not supported here)."""
    return name.startswith(STORED_PREFIXES) and name not in REFUSED


def check_name(name: str) -> None:
    if not stored(name):
        raise NotSupported(f"extended attribute {name!r} is not kept on VDIs "
                           f"(only {', '.join(p + '*' for p in STORED_PREFIXES)}, not {', '.join(REFUSED)})")
    if len(name.encode()) > NAME_MAX:
        raise InvalidArgument(f"extended attribute name longer than {NAME_MAX} bytes")


def set_in(attrs: dict[str, bytes], name: str, value: bytes, flags: int = 0) -> None:
    """Set `name` in a VDI's `attrs` as setxattr(2) would, checking first:
    a refused call changes nothing."""
    check_name(name)
    if flags & ~(XATTR_CREATE | XATTR_REPLACE) or flags == XATTR_CREATE | XATTR_REPLACE:
        raise InvalidArgument(f"setxattr flags {flags:#x} are not valid")
    if flags & XATTR_CREATE and name in attrs:
        raise VdifsError(f"extended attribute {name!r} exists", code=errno.EEXIST)
    if flags & XATTR_REPLACE and name not in attrs:
        raise NoAttribute(f"no extended attribute {name!r}")
    if len(value) > VALUE_MAX:
        raise NoSpace(f"extended attribute {name!r}: {len(value)} bytes, at most {VALUE_MAX} are kept")
    after = {**attrs, name: bytes(value)}
    if len(after) > PER_VDI or sum(len(n.encode()) + len(v) for n, v in after.items()) > BYTES_PER_VDI:
        raise NoSpace(f"a VDI keeps at most {PER_VDI} extended attributes of {BYTES_PER_VDI} bytes together")
    attrs[name] = bytes(value)


def remove_from(attrs: dict[str, bytes], name: str) -> None:
    check_name(name)
    if name not in attrs:
        raise NoAttribute(f"no extended attribute {name!r}")
    del attrs[name]
