"""Errors that carry their own errno, so FUSE, the control channel and the
CLI report the same thing in the same words."""

from __future__ import annotations

import errno


class VdifsError(Exception):
    """An expected failure with a one-line message for the user."""

    errno: int = errno.EIO

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.errno = code


class VdiNotFound(VdifsError):
    errno = errno.ENOENT


class VdiExists(VdifsError):
    errno = errno.EEXIST


class InvalidArgument(VdifsError):
    errno = errno.EINVAL


class TooLarge(VdifsError):
    errno = errno.EFBIG


class NoSpace(VdifsError):
    errno = errno.ENOSPC


class NoAttribute(VdifsError):
    """No such extended attribute (ENODATA, which is ENOATTR)."""

    errno = errno.ENODATA


class NotSupported(VdifsError):
    """Not something a VDI has or does (EOPNOTSUPP)."""

    errno = errno.EOPNOTSUPP


class ObjectNotFound(VdifsError):
    """The pool holds no such object (a normal answer, not a failure)."""

    errno = errno.ENOENT


class ObjectExists(VdifsError):
    """An exclusive create found the object already there."""

    errno = errno.EEXIST


class StoreBusy(VdifsError):
    errno = errno.EBUSY


class PoolError(VdifsError):
    """The object pool failed an operation; data was not changed as asked."""

    errno = errno.EIO


class ConflictError(VdifsError):
    """A compare-and-set lost against a concurrent update (retry)."""

    errno = errno.EAGAIN


def error_from_wire(code: int, message: str) -> VdifsError:
    """Rebuild a typed error from the (errno, message) pair sent over a socket."""
    for cls in (VdiNotFound, VdiExists, InvalidArgument, TooLarge, NoSpace, StoreBusy):
        if cls.errno == code:
            return cls(message)
    return VdifsError(message, code=code)


class ChecksumError(VdifsError):
    """A replica's bytes do not match its block checksums: it rotted on disk."""

    errno = errno.EBADMSG


def leaf_errors(e: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or `e` itself."""
    if isinstance(e, BaseExceptionGroup):
        return [leaf for sub in e.exceptions for leaf in leaf_errors(sub)]
    return [e]


def as_vdifs_error(e: BaseException) -> VdifsError | None:
    """The one error to report for `e`: itself if it is a VdifsError; for an
    exception group (parallel work, each piece failing on its own) made
    only of VdifsErrors, the one that says most (ENOSPC first: QEMU pauses
    the guest on it instead of failing it), else None (a bug)."""
    leaves = leaf_errors(e)
    if not leaves or not all(isinstance(x, VdifsError) for x in leaves):
        return None
    errors: list[VdifsError] = [x for x in leaves if isinstance(x, VdifsError)]
    return next((x for x in errors if isinstance(x, NoSpace)), errors[0])
