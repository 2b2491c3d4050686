"""Small blocking file-system helpers shared by every layer: crash-safe
replacement of metadata files, whole-file-system syncs and the store lock
(run in a worker thread)."""

from __future__ import annotations

import ctypes
import fcntl
import os
import resource
import secrets
from typing import IO

from vdifs.errors import StoreBusy


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path: str) -> None:
    """syncfs(2) of the file system holding `path`: every dirty page and
    metadata change on it durable, in one journal commit and one cache
    flush (Python 3.11 has no os.syncfs). Since Linux 5.8 it reports a
    writeback error of any file on the file system; OSError then."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), path)
    finally:
        os.close(fd)


def machine_dirty_bytes(meminfo: str = "/proc/meminfo") -> int:
    """Bytes of page cache the whole machine has yet to write (Dirty plus
    Writeback): what a syncfs could have to wait for beyond our own."""
    total = 0
    with open(meminfo, "rb") as f:
        for line in f:
            if line.startswith((b"Dirty:", b"Writeback:")):
                total += int(line.split()[1]) << 10  # kB
    return total


def atomic_write(path: str, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new file.

    Write a temp file, fsync it, rename it over the target, fsync the
    directory: after return the new content is durable.
    """
    directory = os.path.dirname(path) or "."
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(directory)


def lock_store(store: str) -> IO[str]:
    """Take the store's lock for this process, or say who holds it."""
    os.makedirs(store, mode=0o700, exist_ok=True)
    f = open(os.path.join(store, "lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise StoreBusy(f"store {store} is in use by another vdifs process (pid {holder})") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def store_id(store: str) -> str:
    """This store's random id, made at its first use: who "this mount" is
    across restarts. With the store's lock held, a lease whose holder names
    this id was left by an earlier process of this very mount, which is
    gone (the lock is released only when its holder dies or exits)."""
    path = os.path.join(store, "store.id")
    try:
        with open(path) as f:
            found = f.read().strip()
        if found:
            return found
    except FileNotFoundError:
        pass
    new = secrets.token_hex(16)
    atomic_write(path, (new + "\n").encode())
    return new


#: The most descriptors a daemon asks for: what systemd's default hard limit
#: allows (524288) is more than any store here keeps open.
OPEN_FILES_WANTED = 1 << 16


def raise_open_files_limit() -> int:
    """Raise this process's soft limit of open files towards its hard limit
    (to OPEN_FILES_WANTED at most) and return the soft limit now in force.
    A shell's default soft limit (1,024) would cap a store's open objects,
    and so its page-cache reads without a thread, at a few hundred; the
    units in contrib/systemd set both limits themselves."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES_WANTED)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass  # a container may forbid it: the stores size themselves from what is left
    return soft


def open_files_limit() -> int:
    """The soft limit of open files of this process."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return OPEN_FILES_WANTED if soft == resource.RLIM_INFINITY else soft
