"""`vdifs peer`: a storage daemon.

A peer owns one store directory and serves, over authenticated RPC:
objects (read/write/create/delete/sync/list), its CASPaxos acceptor (if it
is a meta peer), and cluster membership (format, join, leave, settings).
Nodes are symmetric: a peer joins by itself with --join and needs no role
configuration. Every data request carries the sender's epoch: an older one
is refused with this peer's map (ESTALE), a newer one makes this peer
refresh its map before it answers.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from typing import IO, Any, TypeVar

import msgpack
import trio

from vdifs.errors import ChecksumError, NoSpace, ObjectNotFound, VdifsError
from vdifs.fsutil import atomic_write, lock_store
from vdifs.meta.consensus import CLUSTER_KEY, MetaClient
from vdifs.meta.credentials import Credentials, read_credentials
from vdifs.meta.paxos import Acceptor, FileAcceptorStorage
from vdifs.model.cluster import DOWN, UP, ClusterMap, PeerInfo, choose_meta
from vdifs.model.ids import OBJECT_SIZE, vid_of
from vdifs.peer.health import FailureDetector
from vdifs.peer.journal import ChangeJournal
from vdifs.peer.recovery import Recovery
from vdifs.store.objects import ObjectStore
from vdifs.wire import objlist
from vdifs.wire.rpc import ESTALE_EPOCH, RemoteError, RpcPool, RpcServer, Session, split_address

log = logging.getLogger("vdifs.peer")
T = TypeVar("T")

OPEN_OPS = frozenset({"peer.hello", "peer.register_pending", "cluster.format", "cluster.adopt"})


class PeerDaemon:
    def __init__(self, store_dir: str, listen: str, *, join: str | None = None, zone: str = "",
                 weight: float = 1.0, secret_file: str | None = None, recovery_rate: float = 100e6,
                 recovery_reserve: int = 1 << 30) -> None:
        self.root = os.path.abspath(store_dir)
        self.listen = listen
        self.join = join
        self.zone = zone
        self.weight = weight
        self.secret_file = secret_file
        self.store = ObjectStore(self.root)
        self.meta_dir = os.path.join(self.root, "meta")
        self.acceptor = Acceptor(FileAcceptorStorage(os.path.join(self.meta_dir, "acceptor")))
        self.creds: Credentials | None = None
        self.cmap: ClusterMap | None = None
        self.peer_id = ""
        self._pending: dict[str, PeerInfo] = {}
        self._lock_file: IO[str] | None = None
        self.rpc: RpcPool | None = None
        self.server: RpcServer | None = None
        self.meta: MetaClient | None = None
        self._map_lock = trio.Lock()
        self.health = FailureDetector(self)
        self.recovery = Recovery(self, rate=recovery_rate, reserve=recovery_reserve)
        self._recovering: dict[int, trio.Lock] = {}
        self.recovered = 0  # objects copied from other peers
        self.journal = ChangeJournal(self.root)
        self.clean_start = True  # False after a crash: we may have missed writes
        self.up_epoch = 0  # the last epoch whose map had us up (we hold its data)
        self._catching_up: trio.Event | None = None  # set while a returning peer sorts out stale objects
        self._changing: dict[int, int] = {}  # epoch -> object changes admitted at it and still running
        self._landed: trio.Event | None = None  # set when an epoch's last change lands, if anyone waits
        self._map_moved = trio.Event()  # set (and replaced) whenever we adopt a newer map
        self.fences: dict[int, int] = {}  # vid -> lowest lease generation still allowed to write
        self._fence_lock = trio.Lock()

    # -- local state -------------------------------------------------------------

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def _load_local_state(self) -> None:
        os.makedirs(self.meta_dir, mode=0o700, exist_ok=True)
        self.store.open()
        ident = self._path("peer.id")
        if os.path.exists(ident):
            with open(ident) as f:
                self.peer_id = f.read().strip()
        else:
            self.peer_id = secrets.token_hex(6)
            atomic_write(ident, self.peer_id.encode() + b"\n")
        if os.path.exists(self._path("secret")):
            with open(self._path("secret"), "rb") as f:
                self.creds = Credentials.decode(f.read(), self._path("secret"))
        if self.secret_file:
            given = read_credentials(self.secret_file)
            if self.creds is not None and given.cluster_id != self.creds.cluster_id:
                raise VdifsError(f"store {self.root} belongs to cluster {self.creds.cluster_id}, "
                                 f"not to {given.cluster_id} of {self.secret_file}", code=errno.EPERM)
            if self.creds is None:
                self.creds = given
        fences = os.path.join(self.meta_dir, "fences")
        if os.path.exists(fences):
            with open(fences, "rb") as f:
                self.fences = {int(k): int(v) for k, v in msgpack.unpackb(f.read(), strict_map_key=False).items()}
        map_path = os.path.join(self.meta_dir, "cluster_map")
        if os.path.exists(map_path):
            with open(map_path, "rb") as f:
                self.cmap = ClusterMap.decode(f.read())
            if self.creds is None or self.cmap.cluster_id != self.creds.cluster_id:
                raise VdifsError(f"store {self.root} holds a map of cluster {self.cmap.cluster_id} "
                                 "but not its secret", code=errno.EPERM)
        try:
            with open(os.path.join(self.meta_dir, "up_epoch")) as f:
                self.up_epoch = int(f.read())
        except (FileNotFoundError, ValueError):
            self.up_epoch = 0  # unknown: a returning peer then resyncs fully
        self.clean_start = self.journal.open(self.cmap.epoch if self.cmap else 0)

    async def _save_creds(self, creds: Credentials) -> None:
        await trio.to_thread.run_sync(atomic_write, self._path("secret"), creds.encode())
        os.chmod(self._path("secret"), 0o600)
        self.creds = creds

    async def adopt_map(self, cmap: ClusterMap) -> bool:
        """Take a map if it is newer than ours; keep a durable local copy."""
        async with self._map_lock:
            if self.cmap is not None and cmap.epoch <= self.cmap.epoch:
                return False
            if self.creds is None or cmap.cluster_id != self.creds.cluster_id:
                return False
            await trio.to_thread.run_sync(atomic_write, os.path.join(self.meta_dir, "cluster_map"), cmap.encode())
            me = cmap.peers.get(self.peer_id)
            if me is not None and me.state == UP and self._catching_up is None:
                await self._save_up_epoch(cmap.epoch)
            old = self.cmap.epoch if self.cmap else 0
            self.cmap = cmap
            if self.meta is not None:
                self.meta.set_meta(cmap.meta_addresses())
            log.info("cluster map epoch %d -> %d: %d peers (%d up), copies %d", old, cmap.epoch,
                     len(cmap.peers), len(cmap.up_peers()), cmap.copies)
            self.recovery.epoch_changed()
            self._map_moved.set()
            self._map_moved = trio.Event()
            return True

    # -- running -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        self._lock_file = await trio.to_thread.run_sync(lock_store, self.root)
        try:
            await trio.to_thread.run_sync(self._load_local_state)
            host, port = split_address(self.listen)
            server = self.server = RpcServer(f"peer {self.peer_id}", self._handlers(),
                               secret=lambda: self.creds.secret if self.creds else None,
                               cluster_id=lambda: self.creds.cluster_id if self.creds else None,
                               peer_id=self.peer_id, open_ops=OPEN_OPS)
            if self.cmap is not None:
                # Until the map says what became of us while we were stopped (we
                # may have been marked down, and writes gone around us), no data
                # request is served: rejoin() opens the gate.
                self._catching_up = trio.Event()
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(server.serve, host, port)
                bound = listeners[0].socket.getsockname()[1]
                if port == 0:
                    self.listen = f"{host}:{bound}"
                self._start_clients(nursery)
                log.info("peer %s serving store %s on %s (%s)", self.peer_id, self.root, self.listen,
                         f"cluster {self.creds.cluster_id}, epoch {self.cmap.epoch}" if self.cmap and self.creds
                         else "no cluster yet")
                nursery.start_soon(self._signals, nursery.cancel_scope)
                nursery.start_soon(self._announce)
                nursery.start_soon(self._watch_map)
                nursery.start_soon(self.health.run)
                nursery.start_soon(self.recovery.run)
                nursery.start_soon(self.store.keep_checksums_durable)
                if self.cmap is not None and self.clean_start:
                    self.recovery.epoch_changed()  # catch up (after a crash, rejoining does this)
                task_status.started(bound)
            with trio.CancelScope(shield=True):
                await self.journal.close_cleanly()  # only on an orderly stop: a crash skips this
        finally:
            self.store.close()
            self._lock_file.close()

    def _start_clients(self, nursery: trio.Nursery) -> None:
        self.rpc = RpcPool(self.creds.secret if self.creds else None, nursery)
        self.meta = MetaClient(self.peer_id, self.rpc, self.cmap.meta_addresses() if self.cmap else [])

    def _reset_clients(self) -> None:
        """New credentials: future connections authenticate with them."""
        assert self.rpc is not None
        self.rpc.secret = self.creds.secret if self.creds else None
        self.rpc._clients.clear()

    async def _signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("%s: peer %s stopping", signal.Signals(signum).name, self.peer_id)
                scope.cancel()
                return

    async def _announce(self) -> None:
        """Make sure the map lists us, up, at our address (retrying until it does)."""
        while True:
            try:
                if self.cmap is not None:
                    await self.rejoin()  # the map may have marked us down while we were away
                    return
                if self.join:
                    await self._join_via(self.join)
                    if self.cmap is not None or not self.creds:
                        return
                else:
                    return
            except VdifsError as e:
                log.warning("peer %s: cannot join yet: %s; retrying", self.peer_id, e)
            await trio.sleep(2)

    async def rejoin(self) -> None:
        """We are alive: make the map say so again (after setting aside what may be stale)."""
        assert self.meta is not None
        current = await self.meta.read_map()
        me = current.peers.get(self.peer_id) if current else None
        if me is None:
            # Removed from the map meanwhile: join again, and trust none of our
            # old copies (since=0 asks for a full resync).
            log.warning("peer %s is no longer in the cluster map: joining again", self.peer_id)
            cmap = await self.change_map(self._add_peer_fn(self._me()))
            await self._return_from_down(0, cmap.epoch)
            await self._save_up_epoch(cmap.epoch)
            self._open_gate()
            return
        if me.state == UP:
            # We stopped (cleanly or not) and came back before anyone noticed:
            # writes may have gone to the others but not to us, and their writers
            # wait for an epoch without us. Leave first.
            log.warning("peer %s restarted before the cluster marked it down%s: leaving the map before "
                        "rejoining", self.peer_id, "" if self.clean_start else " (after a crash)")
            await self.change_map(self._state_fn(self.peer_id, DOWN))
        # Back in the map, but every data request waits at the gate until we
        # know what changed while we were away. The delta is asked for only
        # once every peer has our new epoch: from then on nobody accepts a
        # write of the old epoch, so the journals hold every change we missed.
        since = self.up_epoch
        if self._catching_up is None:
            self._catching_up = trio.Event()
        cmap = await self.change_map(self._add_peer_fn(self._me()))
        await self._return_from_down(since, cmap.epoch)
        await self._save_up_epoch(cmap.epoch)
        self.clean_start = True
        self._open_gate()  # only now: on an error above it stays shut and _announce tries again

    def _open_gate(self) -> None:
        gate, self._catching_up = self._catching_up, None
        if gate is not None:
            gate.set()

    async def _save_up_epoch(self, epoch: int) -> None:
        """Remember the last epoch we were up in and current (a returning peer
        asks for the changes after it). Not while catching up: a crash then
        must ask again from the older epoch."""
        await trio.to_thread.run_sync(atomic_write, os.path.join(self.meta_dir, "up_epoch"), f"{epoch}\n".encode())
        self.up_epoch = epoch

    async def caught_up(self) -> None:
        """Wait until the peer knows its objects are current: from start until
        rejoin() has read the map, and while a returning peer sets aside what
        changed in its absence."""
        if self._catching_up is not None:
            await self._catching_up.wait()

    @staticmethod
    def _state_fn(peer_id: str, state: str):  # type: ignore[no-untyped-def]
        def fn(cmap: ClusterMap) -> ClusterMap | None:
            p = cmap.peers.get(peer_id)
            if p is None or p.state == state:
                return None
            peers = dict(cmap.peers)
            peers[peer_id] = PeerInfo(**{**p.to_dict(), "state": state})
            return cmap.with_changes(peers=peers)
        return fn

    def _me(self) -> PeerInfo:
        return PeerInfo(self.peer_id, self.listen, self.zone, self.weight, UP)

    async def _join_via(self, address: str) -> None:
        assert self.rpc is not None
        if self.creds is None:
            reply = await self.rpc.call(address, "peer.register_pending", {"peer": self._me().to_dict()})
            log.info("peer %s: waiting at %s for 'vdifs cluster format' (%s)", self.peer_id, address, reply)
            return
        cmap = ClusterMap.from_dict(await self.rpc.call(address, "cluster.add_peer", {"peer": self._me().to_dict()}))
        await self._save_creds(self.creds)  # the store belongs to this cluster from now on
        await self.adopt_map(cmap)

    async def _watch_map(self) -> None:
        assert self.meta is not None
        await self.meta.follow_map(self.adopt_map, lambda: self.cmap.epoch if self.cmap else 0)

    # -- cluster map changes -----------------------------------------------------------

    @staticmethod
    def _add_peer_fn(info: PeerInfo):  # type: ignore[no-untyped-def]
        def fn(cmap: ClusterMap) -> ClusterMap | None:
            cur = cmap.peers.get(info.peer_id)
            if cur is not None and cur.to_dict() == info.to_dict():
                return None
            for other in cmap.peers.values():
                if other.address == info.address and other.peer_id != info.peer_id and other.state == UP:
                    raise VdifsError(f"address {info.address} is already used by peer {other.peer_id}",
                                     code=errno.EADDRINUSE)
            peers = dict(cmap.peers)
            peers[info.peer_id] = info
            return cmap.with_changes(peers=peers)
        return fn

    async def change_map(self, fn) -> ClusterMap:  # type: ignore[no-untyped-def]
        assert self.meta is not None and self.cmap is not None
        new = await self.meta.change_map(fn)
        await self.adopt_map(new)
        await self._notify_all(new)
        return new

    async def _notify_all(self, cmap: ClusterMap) -> None:
        assert self.rpc is not None
        rpc = self.rpc

        async def one(address: str) -> None:
            try:
                await rpc.call(address, "cluster.notify", {"map": cmap.to_dict()}, timeout=5)
            except VdifsError:
                pass  # it will poll the register

        async with trio.open_nursery() as nursery:
            for p in cmap.peers.values():
                if p.peer_id != self.peer_id:
                    nursery.start_soon(one, p.address)

    # -- request handlers ----------------------------------------------------------------

    def _handlers(self) -> dict[str, Any]:
        return {
            "peer.hello": self.h_hello,
            "peer.register_pending": self.h_register_pending,
            "peer.info": self.h_info,
            "cluster.format": self.h_format,
            "cluster.adopt": self.h_adopt,
            "cluster.map": self.h_map,
            "cluster.notify": self.h_notify,
            "cluster.add_peer": self.h_add_peer,
            "cluster.remove_peer": self.h_remove_peer,
            "cluster.set": self.h_set,
            "paxos.prepare": self.h_prepare,
            "paxos.accept": self.h_accept,
            "paxos.peek": self.h_peek,
            "paxos.keys": self.h_keys,
            "paxos.install": self.h_install,
            "cluster.replace_meta": self.h_replace_meta,
            "obj.read": self.h_read,
            "obj.write": self.h_write,
            "obj.create": self.h_create,
            "obj.delete": self.h_delete,
            "obj.sync": self.h_sync,
            "obj.list": self.h_list,
            "obj.vids": self.h_vids,
            "obj.finish_vid": self.h_finish_vid,
            "lease.fence": self.h_fence,
            "peer.ping": self.h_ping,
            "obj.fetch": self.h_fetch,
            "obj.changed_after": self.h_changed_after,
            "obj.digest": self.h_digest,
            "obj.pull": self.h_pull,
            "peer.probe": self.h_probe,
        }

    async def h_hello(self, args: dict[str, Any], s: Session) -> dict[str, Any]:
        return {"peer": self.peer_id, "address": self.listen,
                "cluster": self.creds.cluster_id if self.creds else None,
                "epoch": self.cmap.epoch if self.cmap else 0,
                "pending": sorted(self._pending)}

    async def h_register_pending(self, args: dict[str, Any], s: Session) -> str:
        if self.creds is not None:
            raise VdifsError("this peer already belongs to a cluster: start the new peer with "
                             "--secret-file to join it", code=errno.EEXIST)
        info = PeerInfo(**args["peer"])
        self._pending[info.peer_id] = info
        log.info("peer %s at %s will join at format time", info.peer_id, info.address)
        return f"registered with {self.peer_id}; run 'vdifs cluster format {self.listen}'"

    async def h_info(self, args: dict[str, Any], s: Session) -> dict[str, Any]:
        total, free = await self.store.space()
        r = self.recovery.state
        return {"peer": self.peer_id, "address": self.listen, "zone": self.zone,
                "recovery": {"epoch": r.epoch, "running": r.running, "total": r.total, "done": r.done,
                             "bytes": r.bytes, "stopped": r.stopped, "recovered_total": self.recovered,
                             "elapsed": trio.current_time() - r.started if r.running else 0.0},
                "epoch": self.cmap.epoch if self.cmap else 0, "total": total, "free": free,
                "vids": len(await self.store.list_vids()), "meta": bool(self.cmap and self.peer_id in self.cmap.meta)}

    async def h_format(self, args: dict[str, Any], s: Session) -> dict[str, Any]:
        if self.creds is not None:
            raise VdifsError(f"peer {self.peer_id} already belongs to cluster {self.creds.cluster_id}",
                             code=errno.EEXIST)
        creds = Credentials(args["cluster_id"], args["secret"])
        copies, min_copies = int(args["copies"]), int(args["min_copies"])
        peers = {self.peer_id: self._me(), **self._pending}
        if copies > len(peers):
            raise VdifsError(f"copies={copies} needs at least {copies} peers; {len(peers)} have joined "
                             f"({', '.join(sorted(p.address for p in peers.values()))})", code=errno.EINVAL)
        cmap = ClusterMap(creds.cluster_id, epoch=1, copies=copies, min_copies=min_copies, peers=peers,
                          meta=choose_meta(list(peers)))
        assert self.rpc is not None
        for info in self._pending.values():
            await self.rpc.call(info.address, "cluster.adopt",
                                {"cluster_id": creds.cluster_id, "secret": creds.secret, "map": cmap.to_dict()})
        await self._adopt(creds, cmap, s)
        assert self.meta is not None
        if not await self.meta.register(CLUSTER_KEY).cas(0, cmap.encode()):
            raise VdifsError("the cluster register was already written", code=errno.EEXIST)
        self._pending.clear()
        log.info("formatted cluster %s: %d peers, copies %d, meta %s", creds.cluster_id, len(peers),
                 copies, ",".join(cmap.meta))
        return cmap.to_dict()

    async def _adopt(self, creds: Credentials, cmap: ClusterMap, session: Session | None = None) -> None:
        await self._save_creds(creds)
        self._reset_clients()
        await self.adopt_map(cmap)
        if self.server is not None:
            await self.server.close_unauthenticated(keep=session)

    async def h_adopt(self, args: dict[str, Any], s: Session) -> str:
        if self.creds is not None:
            raise VdifsError(f"peer {self.peer_id} already belongs to cluster {self.creds.cluster_id}",
                             code=errno.EEXIST)
        await self._adopt(Credentials(args["cluster_id"], args["secret"]), ClusterMap.from_dict(args["map"]), s)
        return self.peer_id

    def _need_map(self) -> ClusterMap:
        if self.cmap is None:
            raise VdifsError("this peer has no cluster yet (run 'vdifs cluster format')", code=errno.ENOTCONN)
        return self.cmap

    async def h_map(self, args: dict[str, Any], s: Session) -> dict[str, Any]:
        return self._need_map().to_dict()

    async def h_notify(self, args: dict[str, Any], s: Session) -> bool:
        return await self.adopt_map(ClusterMap.from_dict(args["map"]))

    async def h_add_peer(self, args: dict[str, Any], s: Session) -> dict[str, Any]:
        self._need_map()
        info = PeerInfo(**args["peer"])
        new = await self.change_map(self._add_peer_fn(info))
        log.info("peer %s at %s joined (epoch %d)", info.peer_id, info.address, new.epoch)
        return new.to_dict()

    async def h_remove_peer(self, args: dict[str, Any], s: Session) -> dict[str, Any]:
        cmap = self._need_map()
        target = args["peer"]
        found = [p for p in cmap.peers.values() if target in (p.peer_id, p.address)]
        if not found:
            raise VdifsError(f"no peer {target!r} in the cluster", code=errno.ENOENT)
        victim = found[0]
        if victim.peer_id in cmap.meta:
            raise VdifsError(f"peer {victim.peer_id} is a meta peer (consensus member); it cannot "
                             "leave until meta peers can be replaced", code=errno.EBUSY)

        def fn(m: ClusterMap) -> ClusterMap | None:
            if victim.peer_id not in m.peers:
                return None
            peers = {k: v for k, v in m.peers.items() if k != victim.peer_id}
            if len(peers) < m.copies:
                raise VdifsError(f"only {len(peers)} peers would remain for copies={m.copies}", code=errno.EINVAL)
            return m.with_changes(peers=peers)

        new = await self.change_map(fn)
        log.info("peer %s at %s left (epoch %d)", victim.peer_id, victim.address, new.epoch)
        return new.to_dict()

    async def h_set(self, args: dict[str, Any], s: Session) -> dict[str, Any]:
        self._need_map()

        def fn(m: ClusterMap) -> ClusterMap | None:
            copies = int(args.get("copies") or m.copies)
            min_copies = int(args.get("min_copies") or m.min_copies)
            if not 1 <= min_copies <= copies:
                raise VdifsError("need 1 <= min_copies <= copies", code=errno.EINVAL)
            if copies > len(m.up_peers()):
                raise VdifsError(f"copies={copies} needs {copies} peers; {len(m.up_peers())} are up",
                                 code=errno.EINVAL)
            if (copies, min_copies) == (m.copies, m.min_copies):
                return None
            return m.with_changes(copies=copies, min_copies=min_copies)

        return (await self.change_map(fn)).to_dict()

    def _check_acceptor(self) -> None:
        """A peer that the map no longer lists as meta (replaced after it was
        declared dead) must never vote again: its votes could form a quorum
        that misses the new members'."""
        if self.cmap is not None and self.peer_id not in self.cmap.meta:
            raise VdifsError(f"peer {self.peer_id} is not a meta peer at epoch {self.cmap.epoch}",
                             code=errno.EPERM)

    async def h_prepare(self, args: dict[str, Any], s: Session) -> dict[str, Any]:
        self._check_acceptor()
        return await self.acceptor.prepare(str(args["key"]), (int(args["ballot"][0]), str(args["ballot"][1])))

    async def h_accept(self, args: dict[str, Any], s: Session) -> dict[str, Any]:
        value = args["value"]
        if isinstance(value, bytearray):
            value = bytes(value)  # an accepted value sent as a blob
        if not isinstance(value, bytes):
            raise TypeError("value must be bytes")
        self._check_acceptor()
        return await self.acceptor.accept(str(args["key"]), (int(args["ballot"][0]), str(args["ballot"][1])), value)

    async def h_keys(self, args: dict[str, Any], s: Session) -> list[str]:
        return await self.acceptor.storage.keys()

    async def h_install(self, args: dict[str, Any], s: Session) -> bool:
        value = args["value"]
        if value is not None and not isinstance(value, (bytes, bytearray)):
            raise TypeError("value must be bytes")
        return await self.acceptor.install(str(args["key"]), (int(args["ballot"][0]), str(args["ballot"][1])),
                                           None if value is None else bytes(value))

    async def h_replace_meta(self, args: dict[str, Any], s: Session) -> dict[str, Any]:
        """Swap a dead meta peer for a live one (`vdifs cluster replace-meta`).

        Safe while the old one stays dead: every write of the old set needed
        all its live members, and every majority of the new set contains one
        of them, so no chosen value is lost and no two quorums miss each
        other. Then the new member gets a copy of every register."""
        assert self.rpc is not None and self.meta is not None
        current = await self.meta.read_map()
        if current is None:
            raise VdifsError("no cluster map", code=errno.ENOENT)
        old, new = self._find_peer(current, str(args["old"])), self._find_peer(current, str(args["new"]))
        if old.peer_id not in current.meta:
            raise VdifsError(f"peer {old.peer_id} is not a meta peer (meta: {', '.join(current.meta)})",
                             code=errno.EINVAL)
        if new.peer_id in current.meta:
            raise VdifsError(f"peer {new.peer_id} is already a meta peer", code=errno.EEXIST)
        if new.state != UP:
            raise VdifsError(f"peer {new.peer_id} is not up", code=errno.EINVAL)
        if old.state == UP:
            raise VdifsError(f"peer {old.peer_id} is up: replace-meta only replaces a peer the cluster "
                             "marked down (stop it for good first)", code=errno.EBUSY)
        try:
            await self.rpc.call(old.address, "peer.info", {}, timeout=3)
        except VdifsError:
            pass
        else:
            raise VdifsError(f"peer {old.peer_id} at {old.address} still answers: stop it for good first",
                             code=errno.EBUSY)

        def fn(m: ClusterMap) -> ClusterMap | None:
            if old.peer_id not in m.meta:
                return None
            if m.peers[old.peer_id].state == UP:
                raise VdifsError(f"peer {old.peer_id} came back up", code=errno.EBUSY)
            return m.with_changes(meta=[new.peer_id if p == old.peer_id else p for p in m.meta])

        cmap = await self.change_map(fn)
        log.warning("meta peer %s replaced by %s (epoch %d)", old.peer_id, new.peer_id, cmap.epoch)
        members = [cmap.peers[p] for p in cmap.meta if p != new.peer_id and cmap.peers[p].state == UP]
        keys: set[str] = set()
        for p in members:
            keys.update(await self.rpc.call(p.address, "paxos.keys", {}, timeout=30))
        copied = 0
        for key in sorted(keys):
            best: dict[str, Any] | None = None
            for p in members:
                got = await self.rpc.call(p.address, "paxos.peek", {"key": key}, timeout=30)
                if best is None or tuple(got["accepted"]) > tuple(best["accepted"]):
                    best = got
            assert best is not None
            if await self.rpc.call(new.address, "paxos.install", {"key": key, "ballot": best["accepted"],
                                                                  "value": best["value"]}, timeout=30):
                copied += 1
        log.info("copied %d of %d registers to the new meta peer %s", copied, len(keys), new.peer_id)
        return {"epoch": cmap.epoch, "meta": cmap.meta, "registers": len(keys), "copied": copied}

    @staticmethod
    def _find_peer(cmap: ClusterMap, name: str) -> PeerInfo:
        for p in cmap.peers.values():
            if name in (p.peer_id, p.address):
                return p
        raise VdifsError(f"no peer {name!r} in the cluster map", code=errno.ENOENT)

    async def h_peek(self, args: dict[str, Any], s: Session) -> dict[str, Any]:
        return await self.acceptor.peek(str(args["key"]))

    # -- data --------------------------------------------------------------------------

    async def _check_epoch(self, args: dict[str, Any]) -> None:
        cmap = self._need_map()
        epoch = int(args["epoch"])
        if epoch < cmap.epoch:
            raise RemoteError(ESTALE_EPOCH, {"message": f"stale epoch {epoch} < {cmap.epoch}",
                                             "map": cmap.to_dict()})
        if epoch > cmap.epoch:
            await self._refresh_map()

    async def h_ping(self, args: dict[str, Any], s: Session) -> dict[str, Any]:
        return {"peer": self.peer_id, "epoch": self.cmap.epoch if self.cmap else 0}

    async def h_probe(self, args: dict[str, Any], s: Session) -> bool:
        return await self.health.probe(str(args["address"]))

    async def h_fence(self, args: dict[str, Any], s: Session) -> int:
        """From now on refuse writes to vid from generations below gen (durable first)."""
        vid, gen = int(args["vid"]), int(args["gen"])
        async with self._fence_lock:
            if gen > self.fences.get(vid, 0):
                fences = {**self.fences, vid: gen}
                await trio.to_thread.run_sync(atomic_write, os.path.join(self.meta_dir, "fences"),
                                              msgpack.packb(fences))
                self.fences = fences
                log.info("vid %d fenced at lease generation %d", vid, gen)
            return self.fences[vid]

    def _check_fence(self, args: dict[str, Any], oid: int) -> None:
        gen = args.get("gen")
        if gen is None:
            return  # embedded-style or shared VDI: no lease
        vid = args.get("lvid", vid_of(oid))  # the lease's vid, if not the object's
        if not isinstance(vid, int) or not isinstance(gen, int):
            raise ValueError("gen and lvid must be integers")
        if gen < self.fences.get(vid, 0):
            raise VdifsError(f"vid {vid} is fenced at lease generation {self.fences[vid]}; "
                             f"a write of generation {gen} is refused", code=errno.EPERM)

    @staticmethod
    def _oid(args: dict[str, Any]) -> int:
        oid = args["oid"]
        if not isinstance(oid, int) or not 0 <= oid < 1 << 64:
            raise ValueError("oid must be a 64-bit unsigned integer")
        return oid

    @staticmethod
    def _range(args: dict[str, Any], key: str) -> int:
        v = args[key]
        if not isinstance(v, int) or not 0 <= v <= 1 << 23:  # within one object (plus slack)
            raise ValueError(f"{key} out of range")
        return v

    async def h_fetch(self, args: dict[str, Any], s: Session) -> bytes:
        """A whole object, for a peer that recovers it; with `handoff`, also a
        copy this peer handed off (when no peer serves the object any more)."""
        oid = self._oid(args)
        await self.caught_up()  # never hand out a copy that may be stale
        if "epoch" in args:  # recovery at that epoch: older writes must have landed first
            await self._check_epoch(args)
            await self._older_changes_landed(int(args["epoch"]))
        try:
            return await self.store.read_all(oid)
        except ObjectNotFound:
            if not args.get("handoff"):
                raise
        return await self.store.read_handoff(oid)

    async def h_digest(self, args: dict[str, Any], s: Session) -> dict[str, str | None]:
        """sha256 of whole objects (for `cluster check`), keyed by the oid in hex
        (frames only carry string keys); None for a missing one."""
        oids = args["oids"]
        if not isinstance(oids, list) or len(oids) > 1024:
            raise ValueError("oids must be a list of at most 1024 object ids")
        out: dict[str, str | None] = {}
        for oid in oids:
            try:
                data = await self.store.read_all(int(oid))
            except ObjectNotFound:
                out[f"{oid:016x}"] = None
                continue
            except ChecksumError as e:
                out[f"{oid:016x}"] = f"corrupt: {e}"  # never equal to a good replica's digest
                continue
            out[f"{oid:016x}"] = await trio.to_thread.run_sync(_sha256_hex, data)
        return out

    async def h_pull(self, args: dict[str, Any], s: Session) -> int:
        """Replace our copy of an object with the one `source` holds (repair)."""
        assert self.rpc is not None
        oid = self._oid(args)
        data = await self.rpc.call(str(args["source"]), "obj.fetch", {"oid": oid}, timeout=60)
        await self.store.install(oid, data)  # durable and whole before we say so
        log.warning("object %016x replaced by the copy on %s (repair)", oid, args["source"])
        return len(data)

    async def recover(self, oid: int, *, stale_ok: bool = True) -> bool:
        """Copy an object we should hold but lack from any up peer that has it.

        Used before serving a read or write of an object this peer took over
        in a new epoch and has not recovered yet, and to replace a rotten
        replica. True if we hold it now."""
        lock = self._recovering.setdefault(oid, trio.Lock())
        try:
            async with lock:
                return await self._recover_locked(oid, stale_ok)
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._recovering.pop(oid, None)  # one lock per object being recovered, not ever

    async def _recover_locked(self, oid: int, stale_ok: bool) -> bool:
        if await self.store.exists(oid):
            return True
        for _ in range(3):
            found, all_said_missing, stale_epoch = await self._fetch_from_others(oid)
            if found:
                return True
            if not stale_epoch:
                break
            # A source was at a newer epoch than our request: catch up and ask again.
            await self._refresh_map()
        # Our own old copy only when every peer said it has none: a peer that
        # failed otherwise (newer epoch, timeout) may hold the current one.
        if stale_ok and all_said_missing and await self.store.take_stale(oid):
            log.warning("object %016x: no other peer has it; took back our own copy from before "
                        "we were marked down", oid)
            return True
        return False

    async def _fetch_from_others(self, oid: int) -> tuple[bool, bool, bool]:
        """Fetch and install a copy: (installed, every peer said it has none,
        some peer refused our epoch as stale). Served copies first; a copy
        handed off at an epoch change only when no peer serves the object."""
        assert self.rpc is not None and self.cmap is not None
        all_said_missing, stale_epoch = True, False
        for handoff in (False, True):
            for p in self.cmap.up_peers():
                if p.peer_id == self.peer_id:
                    continue
                try:
                    data = await self.rpc.call(p.address, "obj.fetch", {"oid": oid, "handoff": handoff,
                                                                        "epoch": self.cmap.epoch}, timeout=30)
                except VdifsError as e:
                    if getattr(e, "errno", None) != errno.ENOENT:
                        all_said_missing = False
                        stale_epoch |= isinstance(e, RemoteError) and e.errno == ESTALE_EPOCH
                    continue
                _total, free = await self.store.space()
                if free < self.recovery.reserve + len(data):
                    raise NoSpace(f"object {oid:016x}: not recovered here, only {free >> 20} MiB free and "
                                  f"the recovery reserve is {self.recovery.reserve >> 20} MiB")
                await self.store.install(oid, data)  # durable and whole before it counts as a replica
                self.recovered += 1
                log.info("recovered object %016x from peer %s%s", oid, p.peer_id,
                         " (a handed-off copy)" if handoff else "")
                return True, False, False
        return False, all_said_missing, stale_epoch

    async def _refresh_map(self) -> None:
        if self.meta is not None:
            latest = await self.meta.read_map()  # consensus: never adopt an unchosen map
            if latest is not None:
                await self.adopt_map(latest)

    async def _return_from_down(self, since: int, epoch: int) -> None:
        """We were away (marked down, or crashed) since epoch `since`: writes
        went around us. Set aside what changed meanwhile, per the other
        peers' change journals (delta resync); if they cannot tell (a journal
        does not reach back that far, a peer does not answer, not every peer
        has reached `epoch` yet), set aside everything (full resync).
        Recovery fetches current copies of what we should hold; our old copy
        is only a last resort."""
        label = f"epoch-{epoch}-{int(time.time())}"
        changed = None
        try:
            if since and await self._all_peers_at(epoch):
                changed = await self._changed_after(since)
        except VdifsError as e:
            log.warning("cannot learn what changed while we were away (%s)", e)
        if changed is None:
            dest = await self.store.quarantine(label)
            log.warning("peer %s was away since epoch %d and the others cannot say what changed since: "
                        "all its objects moved to %s (full resync)", self.peer_id, since, dest)
            return
        held = set()
        for vid in await self.store.list_vids():
            held.update(await self.store.list_objects(vid))
        stale = sorted(held.intersection(changed))
        await self.store.set_aside_stale(stale, label)
        log.warning("peer %s was away since epoch %d: %d of its %d objects changed meanwhile and were set "
                    "aside (delta resync); the rest are current", self.peer_id, since, len(stale), len(held))

    async def _all_peers_at(self, epoch: int, timeout: float = 30.0) -> bool:
        """True once every up peer has adopted `epoch` (so it refuses older writes)."""
        assert self.rpc is not None and self.cmap is not None
        with trio.move_on_after(timeout):
            while True:
                behind = []
                for p in self.cmap.up_peers():
                    if p.peer_id == self.peer_id:
                        continue
                    try:  # ping: the epoch and nothing else (peer.info would stat the store)
                        info = await self.rpc.call(p.address, "peer.ping", {}, timeout=5)
                    except VdifsError:
                        behind.append(p.peer_id)
                        continue
                    if int(info.get("epoch", 0)) < epoch:
                        behind.append(p.peer_id)
                if not behind:
                    return True
                await trio.sleep(0.2)
        log.warning("peers did not all reach epoch %d within %.0f s", epoch, timeout)
        return False

    async def _changed_after(self, epoch: int) -> set[int] | None:
        """Ids every other up peer changed after `epoch`, or None if any cannot say."""
        assert self.rpc is not None and self.meta is not None
        cmap = await self.meta.read_map()
        if cmap is None:
            return None
        out: set[int] = set()
        for p in cmap.up_peers():
            if p.peer_id == self.peer_id:
                continue
            after = None
            while True:
                try:
                    reply = await self.rpc.call(p.address, "obj.changed_after",
                                                {"since": epoch, "after": after}, timeout=30)
                except VdifsError as e:
                    log.info("peer %s cannot list its changes (%s): full resync", p.peer_id, e)
                    return None
                if not reply.get("covered"):
                    log.info("peer %s's change journal does not reach back to epoch %d", p.peer_id, epoch)
                    return None
                out.update(reply["oids"])
                if not reply["more"] or not reply["oids"]:
                    break
                after = reply["oids"][-1]
        return out

    async def h_changed_after(self, args: dict[str, Any], s: Session) -> dict[str, Any]:
        """A page of the ids this peer changed at epochs after `since` (delta resync)."""
        changed = self.journal.changed_after(int(args["since"]))
        if changed is None:
            return {"covered": False, "oids": [], "more": False}
        return {"covered": True, **objlist.page(changed, args.get("after"), args.get("limit"))}

    async def _recovering_first(self, oid: int, op: Callable[[], Awaitable[T]], *,
                                admitted: int | None = None) -> T:
        """Run `op` on an object; if we lack it (we took it over in a new epoch
        and recovery has not reached it yet), recover it first and run `op`
        again. Trying first keeps the common case at one store call.

        `admitted`: the epoch a change was admitted at. Its recovery gives up
        (stale epoch: the writer retries on the new map) once our map moves
        past it: recovery copies wait for the source's older-epoch changes to
        land, so an older-epoch change waiting on a recovery could end up
        waiting on itself through the other replicas (the soak test caught
        every peer stalled until the 30 s timeout)."""
        try:
            return await op()
        except ObjectNotFound:
            if not await self._recover_within(oid, admitted):
                raise
        except ChecksumError as e:
            await self._repair_rotten(oid, e)
        return await op()

    async def _recover_within(self, oid: int, epoch: int | None) -> bool:
        if epoch is None:
            return await self.recover(oid)
        found = False
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                async def watch() -> None:
                    while self._need_map().epoch == epoch:
                        await self._map_moved.wait()
                    scope.cancel()

                nursery.start_soon(watch)
                found = await self.recover(oid)
                nursery.cancel_scope.cancel()
        if scope.cancelled_caught:
            cmap = self._need_map()
            raise RemoteError(ESTALE_EPOCH, {"message": f"the map moved to epoch {cmap.epoch} while object "
                                                        f"{oid:016x} was being recovered for a change of "
                                                        f"epoch {epoch}", "map": cmap.to_dict()})
        return found

    async def _repair_rotten(self, oid: int, error: ChecksumError) -> None:
        """Our replica failed its checksums: set it aside and fetch a good copy
        (the other peers verify theirs before sending). Raises if none exists."""
        dest = await self.store.set_aside(oid)
        log.error("object %016x: our replica is corrupt (%s); moved to %s, fetching a good copy",
                  oid, error, dest)
        if not await self.recover(oid, stale_ok=False):
            raise ChecksumError(f"object {oid:016x}: our replica is corrupt and no other peer "
                                f"has a good copy") from None
        log.warning("object %016x: repaired from another peer", oid)

    async def h_read(self, args: dict[str, Any], s: Session) -> bytes | bytearray:
        await self.caught_up()
        await self._check_epoch(args)
        oid, offset, length = self._oid(args), self._range(args, "offset"), self._range(args, "length")
        return await self._recovering_first(oid, lambda: self.store.read(oid, offset, length))

    async def _mutation(self, args: dict[str, Any], *, with_data: bool) -> tuple[int, int, bytes | bytearray]:
        """Checks every change of an object passes first: epoch, lease fence, and
        an offset and data that stay inside one object. Returns (oid, offset, data)."""
        await self.caught_up()
        await self._check_epoch(args)
        oid = self._oid(args)
        self._check_fence(args, oid)
        assert self.cmap is not None
        self.journal.record(self.cmap.epoch, oid)  # before the change: a returning peer must learn of it
        if not with_data:
            return oid, 0, b""
        data = args["data"]
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError("data must be bytes")
        offset = self._range(args, "offset")
        if offset + len(data) > OBJECT_SIZE:
            raise ValueError(f"offset {offset} + {len(data)} bytes runs past the {OBJECT_SIZE} byte object")
        return oid, offset, data

    # Every change is counted while it runs, under the epoch it was admitted
    # at: a peer recovering at a newer epoch copies an object from us only
    # after the changes admitted under older epochs have landed (else its
    # copy could miss a write its writer saw succeed here). On the hot path:
    # a dict update per change, and an Event only while someone waits.

    def _admit(self) -> int:
        assert self.cmap is not None
        epoch = self.cmap.epoch
        self._changing[epoch] = self._changing.get(epoch, 0) + 1
        return epoch

    def _land(self, epoch: int) -> None:
        left = self._changing[epoch] - 1
        if left:
            self._changing[epoch] = left
            return
        del self._changing[epoch]
        if self._landed is not None:
            self._landed.set()
            self._landed = None

    async def _older_changes_landed(self, epoch: int) -> None:
        while any(e < epoch for e in self._changing):
            if self._landed is None:
                self._landed = trio.Event()
            await self._landed.wait()

    async def h_write(self, args: dict[str, Any], s: Session) -> None:
        oid, offset, data = await self._mutation(args, with_data=True)
        epoch = self._admit()
        try:
            await self._recovering_first(oid, lambda: self.store.write(oid, offset, data), admitted=epoch)
        finally:
            self._land(epoch)

    async def h_create(self, args: dict[str, Any], s: Session) -> None:
        oid, offset, data = await self._mutation(args, with_data=True)
        size = self._range(args, "size")
        if not offset + len(data) <= size <= OBJECT_SIZE:
            raise ValueError(f"object size {size} must hold the data and be at most {OBJECT_SIZE}")
        epoch = self._admit()
        try:
            await self.store.create(oid, offset, data, size, exclusive=bool(args.get("exclusive", False)))
        finally:
            self._land(epoch)

    async def h_delete(self, args: dict[str, Any], s: Session) -> None:
        oid, _, _ = await self._mutation(args, with_data=False)
        epoch = self._admit()
        try:
            await self.store.delete(oid)
        finally:
            self._land(epoch)

    async def h_sync(self, args: dict[str, Any], s: Session) -> None:
        oids = args["oids"]
        if not isinstance(oids, list) or not all(isinstance(o, int) and 0 <= o < 1 << 64 for o in oids):
            raise ValueError("oids must be a list of object ids")
        await self.store.sync(oids)

    async def h_list(self, args: dict[str, Any], s: Session) -> dict[str, Any]:
        """One page of a vid's object ids, after `after`: a 4 TiB VDI has a million
        objects, more than one frame holds, so lists come in pages."""
        kind = args.get("kind")
        oids = await self.store.list_objects(int(args["vid"]), None if kind is None else int(kind))
        if args.get("handoff"):  # recovery: what was handed off here is still to be copied
            oids = sorted(set(oids).union(await self.store.list_handoff(int(args["vid"]))))
        return objlist.page(oids, args.get("after"), args.get("limit"))

    async def h_vids(self, args: dict[str, Any], s: Session) -> list[int]:
        return await self.store.list_vids()

    async def h_finish_vid(self, args: dict[str, Any], s: Session) -> None:
        await self.store.remove_vid_dir(int(args["vid"]))
        await self.store.sync([])


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()




