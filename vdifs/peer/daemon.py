"""`vdifs peer`: a storage daemon.

A peer owns one store directory and serves, over authenticated RPC:
objects (read/write/create/delete/sync/list), its CASPaxos acceptor (if it
is a meta peer), and cluster membership (format, join, leave, settings).
Nodes are symmetric: a peer joins by itself with --join and needs no role
configuration. Every data request carries the sender's epoch: an older one
is refused with this peer's map (ESTALE), a newer one makes this peer
refresh its map before it answers.

This module only wires the parts together and runs their tasks: `state`
(identity, map, gate), `membership`, `dataplane`, `recovery`, `health`, `relay`,
`sweep` (the background leak pass).
The op table says, for every operation, which handler serves it and what
that handler checks before it does anything (see `Op`).
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from typing import IO, Any

import trio

from vdifs.errors import VdifsError
from vdifs.fsutil import lock_store
from vdifs.meta.consensus import MetaClient, map_poll_interval
from vdifs.notify import Notifier
from vdifs.metrics.http import serve_metrics
from vdifs.peer.dataplane import DataPlane
from vdifs.peer.health import FailureDetector
from vdifs.peer.membership import Membership
from vdifs.peer.metrics import peer_metrics
from vdifs.model.cluster import DEFAULT_WEIGHT
from vdifs.peer.recovery import DEFAULT_RATE, DEFAULT_RESERVE, Recovery
from vdifs.peer.relay import Relay
from vdifs.peer.sweep import LEAK_GRACE, SWEEP_INTERVAL, Sweeper
from vdifs.peer.state import PeerState
from vdifs.model.ids import OBJECT_SIZE
from vdifs.wire.rpc import (
    ADMIN, IDLE_TIMEOUT, MOUNT, PEER, ROLES, FastHandler, Handler, RpcPool, RpcServer, Session, split_address,
)

log = logging.getLogger("vdifs.peer")

STATUS_INTERVAL = 2.0  # seconds between updates of the status line systemd shows

# Op.roles: who may send it. The admin role may send everything; mounts the
# data path, the directory and leases; peers what they ask each other.
ANY = frozenset(ROLES)
CLIENTS = frozenset({ADMIN, MOUNT})
ADMIN_PEER = frozenset({ADMIN, PEER})
ADMIN_ONLY = frozenset({ADMIN})

# Op.epoch: what a handler does with the sender's epoch
NO_EPOCH = "no"  # ignores it
EPOCH = "always"  # requires it: older is refused (ESTALE with our map), newer makes us refresh first
EPOCH_IF_SENT = "if sent"  # checks it only when the request carries one


def reply_size(op: str, args: dict[str, Any]) -> int:
    """How many bytes of object data a request's reply may carry (the RPC
    server holds them against its memory limits); 0 for small replies."""
    inner = args.get("args")
    if op == "peer.relay" and isinstance(inner, dict) and isinstance(args.get("op"), str):
        op, args = args["op"], inner
    if op == "obj.read":
        length = args.get("length")
        return length if type(length) is int else 0
    if op == "obj.fetch":
        return OBJECT_SIZE
    return 0


@dataclass(frozen=True)
class Op:
    """One operation a peer serves, and what its handler checks itself before
    it acts. The flags declare what the handlers do (a test holds them to
    it); `roles` and `open` are enforced from here, by the RPC server. The epoch
    check and the gate stay direct calls in the handlers: the hot path pays
    no wrapper."""

    handler: Handler
    roles: frozenset[str]  # the credentials' roles that may send it (the RPC server refuses the others)
    open: bool = False  # allowed before authentication (a peer of no cluster yet)
    epoch: str = NO_EPOCH  # NO_EPOCH, EPOCH or EPOCH_IF_SENT
    gate: bool = False  # waits at the gate (caught_up) while the peer sorts out stale objects
    fast: FastHandler | None = None  # tried first, in the connection's reader (see RpcServer)


class PeerDaemon:
    def __init__(self, store_dir: str, listen: str, *, join: str | None = None, zone: str = "",
                 weight: float = DEFAULT_WEIGHT, secret_file: str | None = None,
                 recovery_rate: float = DEFAULT_RATE, recovery_reserve: int = DEFAULT_RESERVE,
                 reserve: int | None = None, cached_replica_writes: bool = False,
                 leak_pass_interval: float = SWEEP_INTERVAL, leak_grace: int = LEAK_GRACE,
                 idle_timeout: float = IDLE_TIMEOUT, encrypt: bool = False, metrics: str | None = None) -> None:
        self.join = join
        self.metrics = metrics
        self.notifier = Notifier()
        if metrics is not None:
            split_address(metrics)  # a malformed address is said before anything starts
        self.encrypt = encrypt
        self.idle_timeout = idle_timeout
        self.state = PeerState(store_dir, listen, zone=zone, weight=weight, secret_file=secret_file,
                               reserve=reserve, direct=not cached_replica_writes)
        self.membership = Membership(self.state)
        self.recovery = Recovery(self.state, rate=recovery_rate, reserve=recovery_reserve)
        self.data = DataPlane(self.state, self.recovery)
        self.health = FailureDetector(self.state, self.membership)
        self.relay = Relay(self.state)
        self.sweeper = Sweeper(self.state, interval=leak_pass_interval, grace=leak_grace)
        self.ops = self._op_table()
        self._lock_file: IO[str] | None = None

    def _op_table(self) -> dict[str, Op]:
        m, d = self.membership, self.data
        return {
            # joining and formatting: checked by the handlers (only a peer of no cluster takes them)
            "peer.hello": Op(m.h_hello, ANY, open=True),
            "peer.register_pending": Op(m.h_register_pending, ANY, open=True),
            "cluster.format": Op(m.h_format, ANY, open=True),
            "cluster.adopt": Op(m.h_adopt, ANY, open=True),
            "peer.info": Op(self.h_info, ANY),
            "peer.ping": Op(m.h_ping, ANY),
            "peer.probe": Op(self.health.h_probe, ANY),
            "peer.relay": Op(self.relay.h_relay, CLIENTS),  # forwards only what a mount may send
            "cluster.map": Op(m.h_map, ANY),
            "cluster.notify": Op(m.h_notify, ANY),  # adopts only what consensus confirms
            "cluster.add_peer": Op(m.h_add_peer, ADMIN_PEER),
            "cluster.remove_peer": Op(m.h_remove_peer, ADMIN_ONLY),
            "cluster.set": Op(m.h_set, ADMIN_ONLY),
            "cluster.replace_meta": Op(m.h_replace_meta, ADMIN_ONLY),
            "cluster.rotate_secret": Op(m.h_rotate_secret, ADMIN_ONLY),
            # registers: which keys, and which changes, each role may make is the acceptor's
            # check (`meta.register_rules`)
            "paxos.prepare": Op(m.h_prepare, ANY),
            "paxos.accept": Op(m.h_accept, ANY),
            "paxos.peek": Op(m.h_peek, ANY),
            "paxos.peek_many": Op(m.h_peek_many, ANY),
            "paxos.keys": Op(m.h_keys, ADMIN_PEER),
            "paxos.install": Op(m.h_install, ADMIN_PEER),
            "obj.read": Op(d.h_read, ANY, epoch=EPOCH, gate=True, fast=d.read_now),
            "obj.write": Op(d.h_write, CLIENTS, epoch=EPOCH, gate=True, fast=d.write_now),
            "obj.writev": Op(d.h_writev, CLIENTS, epoch=EPOCH, gate=True, fast=d.writev_now),
            "obj.create": Op(d.h_create, CLIENTS, epoch=EPOCH, gate=True),
            "obj.delete": Op(d.h_delete, CLIENTS, epoch=EPOCH, gate=True),
            "obj.collect": Op(d.h_collect, ADMIN_PEER, epoch=EPOCH, gate=True),
            "obj.fetch": Op(d.h_fetch, ADMIN_PEER, epoch=EPOCH_IF_SENT, gate=True),
            "obj.sync": Op(d.h_sync, CLIENTS),
            "obj.list": Op(d.h_list, ANY, epoch=EPOCH_IF_SENT),
            "obj.vids": Op(d.h_vids, ANY),
            "obj.finish_vid": Op(d.h_finish_vid, CLIENTS, epoch=EPOCH_IF_SENT),
            "obj.digest": Op(d.h_digest, ADMIN_PEER),
            "obj.pull": Op(d.h_pull, ADMIN_PEER),
            "obj.changed_after": Op(m.h_changed_after, ADMIN_PEER),
            "lease.fence": Op(d.h_fence, CLIENTS),
        }

    def handlers(self) -> dict[str, Handler]:
        return {name: op.handler for name, op in self.ops.items()}

    def open_ops(self) -> frozenset[str]:
        return frozenset(name for name, op in self.ops.items() if op.open)

    def role_ops(self) -> dict[str, frozenset[str]]:
        return {role: frozenset(name for name, op in self.ops.items() if role in op.roles) for role in ROLES}

    def load(self) -> None:
        """Read the local state (blocking I/O)."""
        self.state.load()
        self.data.load_fences()

    # -- running -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        st = self.state
        self._lock_file = await trio.to_thread.run_sync(lock_store, st.root)
        try:
            await trio.to_thread.run_sync(self.load)
            host, port = split_address(st.listen)
            server = st.server = RpcServer(f"peer {st.peer_id}", self.handlers(),
                                           secret=lambda: st.creds.secret if st.creds else None,
                                           cluster_id=lambda: st.creds.cluster_id if st.creds else None,
                                           old_secrets=st.old_secrets, encrypt=self.encrypt,
                                           peer_id=st.peer_id, open_ops=self.open_ops(),
                                           role_ops=self.role_ops(),
                                           fast={n: op.fast for n, op in self.ops.items() if op.fast},
                                           reply_size=reply_size, idle_timeout=self.idle_timeout)
            if st.cmap is not None:
                # Until the map says what became of us while we were stopped (we
                # may have been marked down, and writes gone around us), no data
                # request is served: rejoin() opens the gate.
                st.shut_gate()
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(server.serve, host, port)
                bound = listeners[0].socket.getsockname()[1]
                if port == 0:
                    st.listen = f"{host}:{bound}"
                st.rpc = RpcPool(st.client_key(), nursery, encrypt=self.encrypt)
                st.meta = MetaClient(st.peer_id, st.rpc, st.cmap.meta_addresses() if st.cmap else [])
                log.info("peer %s serving store %s on %s (%s)", st.peer_id, st.root, st.listen,
                         f"cluster {st.creds.cluster_id}, epoch {st.cmap.epoch}" if st.cmap and st.creds
                         else "no cluster yet")
                if self.metrics is not None:
                    await nursery.start(serve_metrics, self.metrics, lambda: peer_metrics(self.state, self.recovery, self.data, self.relay, self.sweeper))
                nursery.start_soon(self._signals, nursery.cancel_scope)
                nursery.start_soon(self.notifier.keep_alive)
                nursery.start_soon(self._announce)
                nursery.start_soon(self._watch_map)
                nursery.start_soon(self.health.run)
                nursery.start_soon(self.recovery.run)
                nursery.start_soon(self.sweeper.run)
                nursery.start_soon(st.store.keep_checksums_durable)
                if st.cmap is not None and st.clean_start:
                    self.recovery.epoch_changed()  # catch up (after a crash, rejoining does this)
                task_status.started(bound)
            with trio.CancelScope(shield=True):
                await st.store.close_cleanly()  # checksum tables stored CLEAN: trusted at the next start
                await st.journal.close_cleanly()  # only on an orderly stop: a crash skips this
        finally:
            st.store.close()
            self._lock_file.close()

    async def _signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("%s: peer %s stopping", signal.Signals(signum).name, self.state.peer_id)
                self.notifier.stopping()
                scope.cancel()
                return

    async def _announce(self) -> None:
        """Make sure the map lists us, up, at our address (retrying until it
        does); then tell systemd we are ready and keep its status line."""
        await self._join()
        st = self.state
        if st.cmap is None:
            self.notifier.ready("serving; waiting for 'vdifs cluster format'")
            while st.cmap is None:
                await trio.sleep(STATUS_INTERVAL)
        else:
            self.notifier.ready(self._status_line())
        while True:
            self.notifier.status(self._status_line())
            await trio.sleep(STATUS_INTERVAL)

    def _status_line(self) -> str:
        """What `systemctl status` shows: recovery progress, else the epoch."""
        st, r = self.state, self.recovery.state
        if r.running:
            return f"recovering epoch {r.epoch}: {r.done}/{r.total} objects copied"
        return f"serving {st.store.root}, epoch {st.epoch()}, {len(st.cmap.up_peers()) if st.cmap else 0} peers up"

    async def _join(self) -> None:
        st = self.state
        while True:
            try:
                if st.cmap is not None:
                    await self.membership.rejoin()  # the map may have marked us down while we were away
                    return
                if self.join:
                    await self.membership.join_via(self.join)
                    if st.cmap is not None or not st.creds:
                        return
                else:
                    return
            except VdifsError as e:
                log.warning("peer %s: cannot join yet: %s; retrying", st.peer_id, e)
            await trio.sleep(2)

    async def _watch_map(self) -> None:
        st = self.state
        assert st.meta is not None
        await st.meta.follow_map(st.adopt_map, st.epoch,
                                 lambda: map_poll_interval(len(st.cmap.peers) if st.cmap is not None else 0))

    # -- the one handler that reports on every part ---------------------------------------

    async def h_info(self, args: dict[str, Any], s: Session) -> dict[str, Any]:
        st = self.state
        total, free = await st.store.space()
        r = self.recovery.state
        return {"peer": st.peer_id, "address": st.listen, "zone": st.zone,
                "recovery": {"epoch": r.epoch, "running": r.running, "total": r.total, "done": r.done,
                             "bytes": r.bytes, "stopped": r.stopped, "recovered_total": self.recovery.recovered,
                             "elapsed": trio.current_time() - r.started if r.running else 0.0},
                "epoch": st.epoch(), "total": total, "free": free,
                "reserve": st.store.reserve.reserve if st.store.reserve is not None else 0,
                "refused_for_space": st.store.space_refusals, "direct_writes": st.store.direct_writes,
                "vids": len(await st.store.list_vids()), "meta": bool(st.cmap and st.peer_id in st.cmap.meta),
                "answered_at_once": st.server.fast_answers if st.server is not None else 0,
                "relayed": self.relay.relayed, "bytes_read": self.data.bytes_read,
                "leak_passes": self.sweeper.passes, "leaks_collected": self.sweeper.collected}
