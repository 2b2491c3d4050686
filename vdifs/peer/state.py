"""What one storage peer is and knows: identity, credentials, the cluster map, the gate.

Every other part of the peer (membership, the data plane, recovery, failure
detection) reads and changes the peer through this object, never through
the daemon that wires them together, so none of them depends on another's
internals. Map changes are announced to subscribers (recovery wakes up on
them) instead of the state knowing who cares.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
from collections.abc import Callable

import trio

from vdifs.errors import VdifsError
from vdifs.fsutil import atomic_write
from vdifs.meta.consensus import MetaClient
from vdifs.meta.credentials import Credentials, read_credentials
from vdifs.model.cluster import UP, ClusterMap, PeerInfo
from vdifs.peer.journal import ChangeJournal
from vdifs.store.objects import ObjectStore
from vdifs.wire.rpc import ClientKey, RpcPool, RpcServer

log = logging.getLogger("vdifs.peer")


class PeerState:
    def __init__(self, store_dir: str, listen: str, *, zone: str = "", weight: float = 1.0,
                 secret_file: str | None = None, reserve: int | None = None, direct: bool = True) -> None:
        """`direct`: large writes of replicas that serve no reads go past the
        page cache (the default; off with `vdifs peer --cached-replica-writes`)."""
        self.root = os.path.abspath(store_dir)
        self.listen = listen
        self.zone = zone
        self.weight = weight
        self.secret_file = secret_file
        self.peer_id = ""
        self.store = ObjectStore(self.root, reserve, direct=direct)
        self.meta_dir = os.path.join(self.root, "meta")
        self.journal = ChangeJournal(self.root)
        self.creds: Credentials | None = None
        self.rotated: tuple[bytes, float] | None = None  # (old secret, accepted until) after a rotation
        self.cmap: ClusterMap | None = None
        self.clean_start = True  # False after a crash: we may have missed writes
        self.up_epoch = 0  # the last epoch whose map had us up (we hold its data)
        # Connections, set when the daemon runs (tests set their own).
        self.rpc: RpcPool | None = None
        self.meta: MetaClient | None = None
        self.server: RpcServer | None = None
        self._map_lock = trio.Lock()
        self._map_moved = trio.Event()  # set (and replaced) whenever we adopt a newer map
        self._catching_up: trio.Event | None = None  # set while a returning peer sorts out stale objects
        self._on_map_change: list[Callable[[], None]] = []

    # -- local state ---------------------------------------------------------------

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def load(self) -> None:
        """Open the store and read what the peer knows of itself (blocking I/O:
        run in a worker thread)."""
        os.makedirs(self.meta_dir, mode=0o700, exist_ok=True)
        self.store.open()
        ident = self.path("peer.id")
        if os.path.exists(ident):
            with open(ident) as f:
                self.peer_id = f.read().strip()
        else:
            self.peer_id = secrets.token_hex(6)
            atomic_write(ident, self.peer_id.encode() + b"\n")
        if os.path.exists(self.path("secret")):
            with open(self.path("secret"), "rb") as f:
                self.creds = Credentials.decode(f.read(), self.path("secret"))
        if self.secret_file:
            given = read_credentials(self.secret_file)
            if not given.is_cluster_secret:
                raise VdifsError(f"{self.secret_file} holds the credential {given.credential}; a peer needs "
                                 "the cluster secret itself (the file 'vdifs cluster format' wrote)",
                                 code=errno.EINVAL)
            if self.creds is not None and given.cluster_id != self.creds.cluster_id:
                raise VdifsError(f"store {self.root} belongs to cluster {self.creds.cluster_id}, "
                                 f"not to {given.cluster_id} of {self.secret_file}", code=errno.EPERM)
            if self.creds is None:
                self.creds = given
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

    def old_secrets(self) -> list[bytes]:
        """The secret before the last rotation, while it is still accepted."""
        if self.rotated is None or trio.current_time() >= self.rotated[1]:
            return []
        return [self.rotated[0]]

    async def rotate_secret(self, secret: bytes, grace: float) -> None:
        """Make `secret` the cluster secret; the old one is still accepted for
        `grace` seconds, while the other peers and the mounts move over."""
        assert self.creds is not None
        old = self.creds.secret
        await self.save_creds(Credentials(self.creds.cluster_id, secret))
        self.rotated = (old, trio.current_time() + grace)
        self.reset_pools()

    def client_key(self) -> ClientKey | None:
        """What this peer proves when it calls another: the cluster secret,
        which it holds anyway (to check every credential). Relayed requests
        ride these connections too; the relay forwards only what the
        sender's own role may send."""
        return ClientKey(self.creds.secret) if self.creds is not None else None

    def reset_pools(self) -> None:
        """New credentials: connections made from now on use them."""
        if self.rpc is not None:
            self.rpc.reset(self.client_key())

    async def save_creds(self, creds: Credentials) -> None:
        await trio.to_thread.run_sync(atomic_write, self.path("secret"), creds.encode())
        os.chmod(self.path("secret"), 0o600)
        self.creds = creds

    async def save_up_epoch(self, epoch: int) -> None:
        """Remember the last epoch we were up in and current (a returning peer
        asks for the changes after it). Not while catching up: a crash then
        must ask again from the older epoch."""
        await trio.to_thread.run_sync(atomic_write, os.path.join(self.meta_dir, "up_epoch"), f"{epoch}\n".encode())
        self.up_epoch = epoch

    def me(self) -> PeerInfo:
        return PeerInfo(self.peer_id, self.listen, self.zone, self.weight, UP)

    # -- the cluster map -------------------------------------------------------------

    def need_map(self) -> ClusterMap:
        if self.cmap is None:
            raise VdifsError("this peer has no cluster yet (run 'vdifs cluster format')", code=errno.ENOTCONN)
        return self.cmap

    def epoch(self) -> int:
        return self.cmap.epoch if self.cmap else 0

    def on_map_change(self, fn: Callable[[], None]) -> None:
        """Call `fn` (it must not block) whenever a newer map is adopted."""
        self._on_map_change.append(fn)

    @property
    def map_moved(self) -> trio.Event:
        """Set when the next newer map is adopted (each map has its own event)."""
        return self._map_moved

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
                await self.save_up_epoch(cmap.epoch)
            old_map, old = self.cmap, self.epoch()
            self.cmap = cmap
            if old_map is not None and self.rpc is not None:
                # A peer that hangs keeps its connection open: what we (or a
                # mount through our relay) have in flight to it would wait out
                # its timeout although it is replaced now. Fail it at once.
                for p in old_map.no_longer_up(cmap):
                    self.rpc.drop_soon(p.address)
            if self.meta is not None:
                self.meta.set_meta(cmap.meta_addresses())
            log.info("cluster map epoch %d -> %d: %d peers (%d up), copies %d", old, cmap.epoch,
                     len(cmap.peers), len(cmap.up_peers()), cmap.copies)
            for fn in self._on_map_change:
                fn()
            self._map_moved.set()
            self._map_moved = trio.Event()
            return True

    async def refresh_map(self) -> None:
        """Adopt the map consensus holds now (never an unchosen one)."""
        if self.meta is not None:
            latest = await self.meta.read_map()
            if latest is not None:
                await self.adopt_map(latest)

    # -- the gate --------------------------------------------------------------------

    @property
    def catching_up(self) -> bool:
        """True while the gate is shut."""
        return self._catching_up is not None

    def shut_gate(self) -> None:
        """Hold data requests at caught_up() until open_gate()."""
        if self._catching_up is None:
            self._catching_up = trio.Event()

    def open_gate(self) -> None:
        gate, self._catching_up = self._catching_up, None
        if gate is not None:
            gate.set()

    async def caught_up(self) -> None:
        """Wait until the peer knows its objects are current: from start until
        rejoin() has read the map, and while a returning peer sets aside what
        changed in its absence."""
        if self._catching_up is not None:
            await self._catching_up.wait()
