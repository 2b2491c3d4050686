"""Control server: a unix socket (mode 0600) in the store, served by the mount.

Requests and replies are wire frames (`vdifs.wire.frames`). Only root and
the mount's own user may connect (checked with SO_PEERCRED). A bad frame
closes that connection; a failed operation answers with its errno and a
one-line message.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from vdifs import __version__
from vdifs.client.catalog import Catalog
from vdifs.client.reports import Reports
from vdifs.client.snapshots import Snapshots
from vdifs.errors import InvalidArgument, VdifsError
from vdifs.wire import args as arg
from vdifs.wire.frames import DEFAULT_MAX_FRAME, ConnectionClosed, FrameStream, ProtocolError, check_request, cut_text
from vdifs.wire.rpc import MAX_ERROR_TEXT, MAX_OP_NAME

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
#: (event, vid, names) -> tell the kernel to drop what it cached; returns
#: once it has (the reply then never precedes it).
Invalidate = Callable[[str, int, list[str]], Awaitable[None]]


#: Strings and integers are taken as long or as large as a frame can carry
#: them; what they name is checked where they are used.
_ANY_INT = (-(1 << 63), (1 << 64) - 1)


def _text(args: dict[str, Any], key: str, *, optional: bool = False) -> Any:
    """A string argument; `optional`: absent or nil is None."""
    if optional:
        return arg.text(args, key, max_len=DEFAULT_MAX_FRAME, default=None)
    return arg.text(args, key, max_len=DEFAULT_MAX_FRAME)


def _int(args: dict[str, Any], key: str, *, optional: bool = False) -> Any:
    """An integer argument; `optional`: absent or nil is None."""
    lo, hi = _ANY_INT
    if optional:
        return arg.integer(args, key, lo, hi, default=None)
    return arg.integer(args, key, lo, hi)


def _flag(args: dict[str, Any], key: str) -> bool:
    """A flag: any true value sets it, as it always has (older callers may send 1 or nil)."""
    return bool(args.get(key))


async def _nothing_to_invalidate(event: str, vid: int, names: list[str]) -> None:
    pass


class ControlServer:
    def __init__(self, catalog: Catalog, path: str, status: dict[str, Any],
                 invalidate: Invalidate | None = None) -> None:
        self.catalog = catalog
        self.snapshots = Snapshots(catalog)
        self.reports = Reports(catalog)
        self.path = path
        self.status_info = status
        self.invalidate = invalidate or _nothing_to_invalidate
        self.ops: dict[str, Handler] = {
            "status": self.op_status,
            "flush": self.op_flush,
            "vdi.list": self.op_list,
            "vdi.info": self.op_info,
            "vdi.create": self.op_create,
            "vdi.delete": self.op_delete,
            "vdi.resize": self.op_resize,
            "vdi.rename": self.op_rename,
            "vdi.lock_info": self.op_lock_info,
            "vdi.break_lock": self.op_break_lock,
            "vdi.snapshot": self.op_snapshot,
            "vdi.snapshot_delete": self.op_snapshot_delete,
            "vdi.clone": self.op_clone,
            "vdi.rollback": self.op_rollback,
            "vdi.tree": self.op_tree,
            "vdi.flatten": self.op_flatten,
            "vdi.diff": self.op_diff,
            "vdi.du": self.op_du,
            "vdi.jobs": self.op_jobs,
        }

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(self.path)
        os.chmod(self.path, 0o600)  # before listen(): nobody can connect yet
        sock.listen(16)
        task_status.started()
        try:
            await trio.serve_listeners(self._handle, [trio.SocketListener(sock)])
        finally:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def _peer_allowed(self, stream: trio.SocketStream) -> bool:
        creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        return uid in (0, os.getuid())

    async def _handle(self, stream: trio.SocketStream) -> None:
        if not self._peer_allowed(stream):
            log.warning("control: refused a connection from another user")
            await stream.aclose()
            return
        frames = FrameStream(stream)
        try:
            while True:
                try:
                    rid, op, args = check_request(await frames.receive())
                except ConnectionClosed:
                    return
                handler = self.ops.get(op)
                try:
                    if handler is None:
                        raise InvalidArgument(f"unknown control operation {cut_text(op, MAX_OP_NAME)!r}")
                    result = await handler(args)
                    reply = [rid, 0, result]
                except VdifsError as e:
                    reply = [rid, e.errno, cut_text(str(e), MAX_ERROR_TEXT)]
                except Exception as e:
                    log.exception("control: %s failed", op)
                    reply = [rid, errno.EIO, cut_text(f"internal error: {e}", MAX_ERROR_TEXT)]
                await frames.send(reply)
        except ProtocolError as e:
            log.warning("control: dropped a connection: %s", e)
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()

    # -- operations ---------------------------------------------------------------

    async def _summary(self, name: str) -> dict[str, Any]:
        rec = self.catalog.lookup(name)
        vol = await self.catalog.volume(rec.vid)
        r = vol.record
        stored = self.catalog.current.get(name)
        own = sum(1 for _, e in vol.map.entries() if e == vol.data_vid)
        return {"name": name, "vid": r.vid, "data_vid": vol.data_vid, "size": r.size,
                "allocated": vol.allocated_bytes, "own_objects": own,
                "snapshots": sorted(stored.snapshots, key=lambda s: stored.snapshots[s].ctime),
                "objects": vol.map.allocated, "object_size": vol.object_size, "copies": r.copies,
                "shared": r.shared, "ctime": r.ctime, "mtime": r.mtime, "mode": r.mode,
                "uid": r.uid, "gid": r.gid}

    async def op_status(self, args: dict[str, Any]) -> dict[str, Any]:
        space = await self.catalog.pool.space()
        cmap = self.catalog.pool.cluster_map()
        return {**self.status_info, "version": __version__, "pid": os.getpid(),
                "vdis": len(self.catalog.current.vdis), "deleting": self.catalog.purger.pending,
                "total": space.total, "free": space.free, "copies": space.copies,
                "epoch": cmap.epoch if cmap is not None else None,
                "peers": len(cmap.peers) if cmap is not None else None,
                "peers_up": len(cmap.up_peers()) if cmap is not None else None,
                "open": self._open_vdis(),
                "io": self.catalog.pool.io_stats(), "cache": self.catalog.pool.cache_status()}

    def _open_vdis(self) -> list[dict[str, Any]]:
        """Each VDI used through this mount: its requests so far, its lease,
        write-behind window and open handles."""
        out = []
        for name, vid, io in self.catalog.io_by_vdi():
            vol = self.catalog.loaded(vid)
            leases = self.catalog.leases
            out.append({"name": name, "vid": vid, "handles": vol.handles if vol is not None else 0,
                        "lease": (leases.holds(vid) if leases is not None else None),
                        "window": vol.window.bytes if vol is not None else 0,
                        "syncs": vol.syncs if vol is not None else 0, **io.as_dict()})
        return out

    async def op_flush(self, args: dict[str, Any]) -> None:
        await self.catalog.flush_all()

    async def op_list(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return [await self._summary(name) for name, _ in self.catalog.listing()]

    async def op_info(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self._summary(_text(args, "name"))

    async def op_create(self, args: dict[str, Any]) -> dict[str, Any]:
        name, size = _text(args, "name"), _int(args, "size")
        copies = _int(args, "copies", optional=True)
        await self.catalog.create(name, size, copies=copies, mode=0o644, shared=_flag(args, "shared"))
        return await self._summary(name)

    async def op_delete(self, args: dict[str, Any]) -> None:
        name = _text(args, "name")
        snaps = [f"{name}@{s}" for s in self.catalog.current.get(name).snapshots]
        vid = await self.catalog.delete(name, with_snapshots=_flag(args, "snapshots"))
        await self.invalidate("delete", vid, [name])
        await self.invalidate("snapshot-delete", 0, snaps)

    async def op_resize(self, args: dict[str, Any]) -> dict[str, Any]:
        name, size = _text(args, "name"), _int(args, "size")
        rec = await self.catalog.resize(name, size)
        await self.invalidate("resize", rec.vid, [])
        return await self._summary(name)

    async def op_rename(self, args: dict[str, Any]) -> None:
        old, new = _text(args, "old"), _text(args, "new")
        vid = self.catalog.lookup(old).vid
        await self.catalog.rename(old, new)
        await self.invalidate("rename", vid, [old, new])

    async def op_snapshot(self, args: dict[str, Any]) -> dict[str, Any]:
        name, snap = _text(args, "name"), _text(args, "snapshot")
        ident = _text(args, "id", optional=True)
        s = await self.snapshots.snapshot(name, snap, ident)
        await self.invalidate("snapshot", 0, [f"{name}@{snap}"])
        return {"name": name, "snapshot": snap, "data_vid": s.vid, "size": s.size, "ctime": s.ctime, "id": s.id}

    async def op_snapshot_delete(self, args: dict[str, Any]) -> None:
        name, snap = _text(args, "name"), _text(args, "snapshot")
        await self.snapshots.delete_snapshot(name, snap)
        await self.invalidate("snapshot-delete", 0, [f"{name}@{snap}"])

    async def op_clone(self, args: dict[str, Any]) -> dict[str, Any]:
        name, snap, new = _text(args, "name"), _text(args, "snapshot"), _text(args, "new")
        copies = _int(args, "copies", optional=True)
        await self.snapshots.clone(name, snap, new, copies=copies)
        await self.invalidate("clone", 0, [new])
        return await self._summary(new)

    async def op_rollback(self, args: dict[str, Any]) -> dict[str, Any]:
        name, snap = _text(args, "name"), _text(args, "snapshot")
        rec = await self.snapshots.rollback(name, snap)
        await self.invalidate("rollback", rec.vid, [])
        return await self._summary(name)

    async def op_flatten(self, args: dict[str, Any]) -> dict[str, Any]:
        name = _text(args, "name")
        rate = _int(args, "rate", optional=True)
        copied = await self.snapshots.flatten(name, **({} if rate is None else {"rate": rate}))
        return {**await self._summary(name), "copied": copied}

    async def op_diff(self, args: dict[str, Any]) -> dict[str, Any]:
        name = _text(args, "name")
        snap, since = _text(args, "snapshot", optional=True), _text(args, "from", optional=True)
        return await self.reports.diff(name, snap, since)

    async def op_du(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return await self.reports.usage(_text(args, "name"))

    async def op_jobs(self, args: dict[str, Any]) -> dict[str, Any]:
        return dict(self.snapshots.jobs)

    async def op_tree(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return self.reports.family_tree()

    async def op_lock_info(self, args: dict[str, Any]) -> dict[str, Any]:
        name = _text(args, "name")
        lease = await self.catalog.lock_info(name)
        return {"name": name, "holder": lease.holder, "generation": lease.generation,
                "since": lease.since, "renewed": lease.renewed, "beat": lease.beat}

    async def op_break_lock(self, args: dict[str, Any]) -> dict[str, Any]:
        name = _text(args, "name")
        before = await self.catalog.break_lock(name)
        return {"name": name, "holder": before.holder, "generation": before.generation + 1}
