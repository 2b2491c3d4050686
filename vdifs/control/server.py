"""Control server: a unix socket (mode 0600) in the store, served by the mount.

Requests and replies are wire frames (`vdifs.wire.frames`). Only root and
the mount's own user may connect (checked with SO_PEERCRED). A bad frame
closes that connection; a failed operation answers with its errno and a
one-line message.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from vdifs import __version__
from vdifs.client.catalog import Catalog
from vdifs.errors import InvalidArgument, VdifsError
from vdifs.wire.frames import ConnectionClosed, FrameStream, ProtocolError, check_request

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
#: (event, vid, names) -> tell the kernel to drop what it cached.
Invalidate = Callable[[str, int, list[str]], None]


def _arg(args: dict[str, Any], key: str, kind: type) -> Any:
    value = args.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidArgument(f"argument {key!r} must be {kind.__name__}")
    return value


class ControlServer:
    def __init__(self, catalog: Catalog, path: str, status: dict[str, Any],
                 invalidate: Invalidate | None = None) -> None:
        self.catalog = catalog
        self.path = path
        self.status_info = status
        self.invalidate = invalidate or (lambda event, vid, names: None)
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
                        raise InvalidArgument(f"unknown control operation {op!r}")
                    result = await handler(args)
                    reply = [rid, 0, result]
                except VdifsError as e:
                    reply = [rid, e.errno, str(e)]
                except Exception as e:
                    log.exception("control: %s failed", op)
                    reply = [rid, 5, f"internal error: {e}"]
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
        return {**self.status_info, "version": __version__, "pid": os.getpid(),
                "vdis": len(self.catalog.current.vdis), "deleting": self.catalog.pending_purges,
                "total": space.total, "free": space.free, "copies": space.copies,
                "io": self.catalog.pool.io_stats()}

    async def op_flush(self, args: dict[str, Any]) -> None:
        await self.catalog.flush_all()

    async def op_list(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return [await self._summary(name) for name, _ in self.catalog.listing()]

    async def op_info(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self._summary(_arg(args, "name", str))

    async def op_create(self, args: dict[str, Any]) -> dict[str, Any]:
        name, size = _arg(args, "name", str), _arg(args, "size", int)
        copies = args.get("copies")
        if copies is not None:
            copies = _arg(args, "copies", int)
        await self.catalog.create(name, size, copies=copies, mode=0o644, shared=bool(args.get("shared")))
        return await self._summary(name)

    async def op_delete(self, args: dict[str, Any]) -> None:
        name = _arg(args, "name", str)
        snaps = [f"{name}@{s}" for s in self.catalog.current.get(name).snapshots]
        vid = await self.catalog.delete(name, with_snapshots=bool(args.get("snapshots")))
        self.invalidate("delete", vid, [name])
        self.invalidate("snapshot-delete", 0, snaps)

    async def op_resize(self, args: dict[str, Any]) -> dict[str, Any]:
        name, size = _arg(args, "name", str), _arg(args, "size", int)
        rec = await self.catalog.resize(name, size)
        self.invalidate("resize", rec.vid, [])
        return await self._summary(name)

    async def op_rename(self, args: dict[str, Any]) -> None:
        old, new = _arg(args, "old", str), _arg(args, "new", str)
        vid = self.catalog.lookup(old).vid
        await self.catalog.rename(old, new)
        self.invalidate("rename", vid, [old, new])

    async def op_snapshot(self, args: dict[str, Any]) -> dict[str, Any]:
        name, snap = _arg(args, "name", str), _arg(args, "snapshot", str)
        ident = None if args.get("id") is None else _arg(args, "id", str)
        s = await self.catalog.snapshot(name, snap, ident)
        self.invalidate("snapshot", 0, [f"{name}@{snap}"])
        return {"name": name, "snapshot": snap, "data_vid": s.vid, "size": s.size, "ctime": s.ctime, "id": s.id}

    async def op_snapshot_delete(self, args: dict[str, Any]) -> None:
        name, snap = _arg(args, "name", str), _arg(args, "snapshot", str)
        await self.catalog.delete_snapshot(name, snap)
        self.invalidate("snapshot-delete", 0, [f"{name}@{snap}"])

    async def op_clone(self, args: dict[str, Any]) -> dict[str, Any]:
        name, snap, new = _arg(args, "name", str), _arg(args, "snapshot", str), _arg(args, "new", str)
        copies = args.get("copies")
        if copies is not None:
            copies = _arg(args, "copies", int)
        await self.catalog.clone(name, snap, new, copies=copies)
        self.invalidate("clone", 0, [new])
        return await self._summary(new)

    async def op_rollback(self, args: dict[str, Any]) -> dict[str, Any]:
        name, snap = _arg(args, "name", str), _arg(args, "snapshot", str)
        rec = await self.catalog.rollback(name, snap)
        self.invalidate("rollback", rec.vid, [])
        return await self._summary(name)

    async def op_flatten(self, args: dict[str, Any]) -> dict[str, Any]:
        name = _arg(args, "name", str)
        rate = args.get("rate")
        copied = await self.catalog.flatten(name, **({} if rate is None else {"rate": _arg(args, "rate", int)}))
        return {**await self._summary(name), "copied": copied}

    async def op_diff(self, args: dict[str, Any]) -> dict[str, Any]:
        name = _arg(args, "name", str)
        snap = None if args.get("snapshot") is None else _arg(args, "snapshot", str)
        since = None if args.get("from") is None else _arg(args, "from", str)
        return await self.catalog.diff(name, snap, since)

    async def op_du(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return await self.catalog.usage(_arg(args, "name", str))

    async def op_jobs(self, args: dict[str, Any]) -> dict[str, Any]:
        return dict(self.catalog.jobs)

    async def op_tree(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return self.catalog.family_tree()

    async def op_lock_info(self, args: dict[str, Any]) -> dict[str, Any]:
        name = _arg(args, "name", str)
        lease = await self.catalog.lock_info(name)
        return {"name": name, "holder": lease.holder, "generation": lease.generation,
                "since": lease.since, "renewed": lease.renewed, "beat": lease.beat}

    async def op_break_lock(self, args: dict[str, Any]) -> dict[str, Any]:
        name = _arg(args, "name", str)
        before = await self.catalog.break_lock(name)
        return {"name": name, "holder": before.holder, "generation": before.generation + 1}
