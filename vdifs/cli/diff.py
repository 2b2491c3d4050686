"""`vdifs vdi export-diff` and `import-diff`: backups as streams.

The mount says what changed (`vdi.diff`, from the object maps) and cuts or
rolls back snapshots; the bytes themselves travel through the mounted files
(`MOUNT/.snapshots/NAME@SNAP` to read, `MOUNT/NAME` to write), so the
stream passes through this process in pieces of at most one object and
memory stays bounded whatever the VDI's size. The format is
`vdifs.model.diffstream`.

An import changes nothing unless the whole stream checked out: a new VDI
(full import) is deleted again, and an existing one (incremental, which
must be unchanged since the base snapshot) is rolled back to that
snapshot, which restores its exact bytes.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from collections.abc import Callable
from typing import IO, Any

from vdifs.cli.common import MAP_TIMEOUT, RESIZE_TIMEOUT, Progress, format_bytes
from vdifs.errors import VdifsError
from vdifs.model.diffstream import MAX_DATA, DiffHeader, DiffReader, DiffWriter
from vdifs.model.sizes import format_size
from vdifs.model.zeros import is_zero

Call = Callable[..., Any]
ZERO_CHUNK = bytes(1 << 20)
DIFF_TIMEOUT = 600.0  # seconds for comparing, or rolling back, a whole VDI's map


def add_parsers(actions: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:  # type: ignore[type-arg]
    """The `vdi export-diff` and `vdi import-diff` actions."""
    ex = actions.add_parser("export-diff", parents=parents,
                            help="write a snapshot, or what changed since an older one, as a stream",
                            description="Write NAME@SNAP (whole, or only what changed since snapshot FROM) to "
                                        "FILE or stdout ('-') in the vdifs diff format (docs/diff-format.md): "
                                        "checksummed, in bounded memory, so any size streams through a pipe.")
    ex.add_argument("target", metavar="NAME@SNAP")
    ex.add_argument("file", metavar="FILE|-")
    ex.add_argument("--from", dest="since", metavar="FROM", help="an older snapshot of the same VDI")
    im = actions.add_parser("import-diff", parents=parents,
                            help="apply a diff stream to a VDI (a new one for a full stream)",
                            description="Read a stream from FILE or stdin ('-'). A full stream creates NAME; an "
                                        "incremental one applies to NAME, which must have the stream's base "
                                        "snapshot and be unchanged since. Either way NAME@SNAP is created. A "
                                        "corrupt or truncated stream changes nothing.")
    im.add_argument("file", metavar="FILE|-")
    im.add_argument("name", metavar="NAME")


class DiffError(VdifsError):
    """A stream that does not fit the VDI it is exported from or imported into."""


def snapshot_id(s: dict[str, Any]) -> str:
    """A snapshot's identity (snapshots from before ids existed: vid and time)."""
    return str(s.get("id") or f"vid{s['data_vid']}-{s['ctime']!r}")


def _snapshots(tree: list[dict[str, Any]], name: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    vdi = next((v for v in tree if v["name"] == name), None)
    if vdi is None:
        raise DiffError(f"no VDI named {name!r}")
    return vdi, {s["name"]: s for s in vdi["snapshots"]}


def export_diff(call: Call, mountpoint: str, target: str, since: str | None, dest: str) -> str:
    name, _, snap = target.partition("@")
    if not snap:
        raise DiffError(f"{target!r} is not NAME@SNAP: export a snapshot (vdifs vdi snapshot first)")
    _vdi, snaps = _snapshots(call("vdi.tree"), name)
    if snap not in snaps:
        raise DiffError(f"VDI {name!r} has no snapshot {snap!r}")
    if since is not None and since not in snaps:
        raise DiffError(f"VDI {name!r} has no snapshot {since!r} to start from")
    d = call("vdi.diff", {"name": name, "snapshot": snap, "from": since}, timeout=DIFF_TIMEOUT)
    header = DiffHeader(name=name, size=d["size"], object_size=d["object_size"], to=snap,
                        to_id=snapshot_id(snaps[snap]), created=time.time(), from_=since,
                        from_id=None if since is None else snapshot_id(snaps[since]))
    tmp = None
    out: IO[bytes]
    if dest == "-":
        out = sys.stdout.buffer
    else:
        tmp = f"{dest}.part"
        out = open(tmp, "wb")
    progress = Progress(f"export {target}", sum(n for _, n, kind in d["extents"] if kind == "data"),
                        amount=format_bytes)
    try:
        fd = os.open(os.path.join(mountpoint, ".snapshots", f"{name}@{snap}"), os.O_RDONLY)
        try:
            w = DiffWriter(out, header)
            data = 0
            for offset, length, kind in d["extents"]:
                if kind == "zero":
                    w.zero(offset, length)
                    continue
                for pos in range(offset, offset + length, MAX_DATA):
                    n = min(MAX_DATA, offset + length - pos)
                    chunk = os.pread(fd, n, pos)
                    if len(chunk) != n:
                        raise DiffError(f"{target} ended early at byte {pos + len(chunk)}")
                    for at, size, piece in _runs(chunk, pos):
                        if piece is not None:
                            w.data(at, piece)
                            data += size
                        elif since is not None:  # over a base, zeros must be written too
                            w.zero(at, size)
                    progress.add(n)
            w.finish()
        finally:
            os.close(fd)
        if tmp is not None:
            out.flush()
            os.fsync(out.fileno())
            out.close()
            os.replace(tmp, dest)  # a complete stream or none at all
    except BaseException:
        if tmp is not None:
            out.close()
            os.unlink(tmp)
        raise
    finally:
        progress.close()
    return (f"exported {target} since {since or 'empty'}: {format_size(data)} of data, "
            f"{format_size(w.written)} stream")


def _runs(chunk: bytes, base: int, grain: int = 64 << 10) -> list[tuple[int, int, bytes | None]]:
    """(offset, length, bytes) of the runs of `chunk` at `grain` resolution,
    bytes None for a run of zeros (a fresh VDI need not be sent those)."""
    out: list[tuple[int, int, bytes | None]] = []
    start, zero = 0, None
    view = memoryview(chunk)
    for at in range(0, len(chunk) + grain, grain):
        z = None if at >= len(chunk) else is_zero(view[at:at + grain])
        if z != zero:
            if zero is not None:
                end = min(at, len(chunk))
                out.append((base + start, end - start, None if zero else bytes(view[start:end])))
            start, zero = at, z
    return out


#: Seconds an undo waits for the mount to see our own writes' file closed.
RELEASE_WAIT = 5.0


def while_our_close_lands(undo: Callable[[], Any]) -> Any:
    """Run `undo`, again while it finds the VDI open for writing, for up to
    RELEASE_WAIT: close() returns once the kernel sent FLUSH, but it sends
    the RELEASE of our handle later, and until then the mount counts it as
    a writer (a rollback right after refused, under load)."""
    deadline = time.monotonic() + RELEASE_WAIT
    while True:
        try:
            return undo()
        except VdifsError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def import_diff(call: Call, mountpoint: str, source: str, name: str) -> str:
    src: IO[bytes] = sys.stdin.buffer if source == "-" else open(source, "rb")
    try:
        reader = DiffReader(src)
        h = reader.read_header()
        tree = call("vdi.tree")
        base_size = h.size
        if h.from_ is None:
            if any(v["name"] == name for v in tree):
                raise DiffError(f"a VDI named {name!r} exists: a full stream (no --from) imports into a new VDI")
        else:
            vdi, snaps = _snapshots(tree, name)
            base = snaps.get(h.from_)
            if base is None:
                raise DiffError(f"VDI {name!r} has no snapshot {h.from_!r}, which this diff applies on top of")
            if snapshot_id(base) != h.from_id:
                raise DiffError(f"{name}@{h.from_} is not the snapshot this diff was made from "
                                f"(id {snapshot_id(base)}, the diff wants {h.from_id})")
            if h.to in snaps:
                raise DiffError(f"VDI {name!r} already has a snapshot {h.to!r}")
            since = call("vdi.diff", {"name": name, "from": h.from_}, timeout=DIFF_TIMEOUT)
            base_size = base["size"]
            if since["extents"] or vdi["size"] != base_size:
                raise DiffError(f"VDI {name!r} changed since snapshot {h.from_!r}: roll it back first "
                                f"(vdifs vdi rollback {name}@{h.from_})")
        created = h.from_ is None
        if created:
            call("vdi.create", {"name": name, "size": h.size})
        try:
            if not created and h.size != base_size:
                call("vdi.resize", {"name": name, "size": h.size}, timeout=RESIZE_TIMEOUT)
            data = _apply(reader, os.path.join(mountpoint, name), fresh=created)
            call("vdi.snapshot", {"name": name, "snapshot": h.to, "id": h.to_id}, timeout=MAP_TIMEOUT)
        except BaseException as e:
            undo = (lambda: call("vdi.delete", {"name": name})) if created else \
                (lambda: call("vdi.rollback", {"name": name, "snapshot": h.from_}, timeout=DIFF_TIMEOUT))
            try:
                while_our_close_lands(undo)
            except VdifsError as again:
                raise DiffError(f"{e}; and undoing the import failed ({again}): check {name!r}") from None
            if isinstance(e, VdifsError):
                raise DiffError(f"{e}; {name!r} {'was not created' if created else 'is unchanged'}") from None
            raise
    finally:
        if src is not sys.stdin.buffer:
            src.close()
    return (f"imported {h.name}@{h.to} since {h.from_ or 'empty'} into {name}: {format_size(data)} of data; "
            f"{name}@{h.to} created")


def _apply(reader: DiffReader, path: str, *, fresh: bool) -> int:
    """Write the records into the VDI file; durable before returning."""
    fd = os.open(path, os.O_RDWR)
    data = 0
    try:
        for kind, offset, x in reader.records():
            if kind == "D":
                assert isinstance(x, bytes)
                view = memoryview(x)
                while view:
                    n = os.pwrite(fd, view, offset)
                    view, offset = view[n:], offset + n
                data += len(x)
            elif not fresh:  # a new VDI reads zeros already
                assert isinstance(x, int)
                end = offset + x
                while offset < end:
                    n = os.pwrite(fd, ZERO_CHUNK[:min(len(ZERO_CHUNK), end - offset)], offset)
                    offset += n
        os.fsync(fd)
    finally:
        os.close(fd)
    return data
