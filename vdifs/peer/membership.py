"""Membership: how a peer gets into the cluster map, leaves it, and changes it.

Formatting a cluster, adopting one, joining, rejoining after an absence
(with the delta resync that sets aside what changed meanwhile), removing a
peer, changing settings, replacing a dead meta peer; and this peer's CASPaxos
acceptor, which holds the registers every such change goes through.
"""

from __future__ import annotations

import errno
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import msgpack
import trio

from vdifs.errors import InvalidArgument, VdifsError
from vdifs.meta.consensus import CLUSTER_KEY
from vdifs.meta.credentials import GRACE_MAX, ROTATION_GRACE, Credentials
from vdifs.meta.paxos import PEEK_MANY_MAX, Acceptor, Ballot, ConsensusUnavailable, FileAcceptorStorage
from vdifs.meta.register_rules import LEASE_PREFIX, check_change
from vdifs.model.cluster import COPIES_MAX, DOWN, UP, ClusterMap, PeerInfo, check_cluster_id, choose_meta
from vdifs.peer.state import PeerState
from vdifs.wire import args as arg
from vdifs.wire import objlist
from vdifs.wire.rpc import ADMIN, Session
from vdifs.wire.seal import unwrap_secret

log = logging.getLogger("vdifs.peer")

#: bytes of a register key (its acceptor file is named by the key's hex: 2 x 120 < NAME_MAX)
KEY_MAX = 120
BALLOT_MAX = (1 << 63) - 1
SECRET_MIN, SECRET_MAX = 16, 128  # bytes of a cluster secret (format makes 32)
PROPOSER_MAX = 256  # characters of a proposer id (a peer id, or a mount id that holds a host name)

MapChange = Callable[[ClusterMap], "ClusterMap | None"]


def _peer_info(args: dict[str, Any]) -> PeerInfo:
    return PeerInfo.from_dict(arg.mapping(args, "peer"))


def _cluster_map(args: dict[str, Any]) -> ClusterMap:
    return ClusterMap.from_dict(arg.mapping(args, "map"))


def _credentials(args: dict[str, Any]) -> Credentials:
    secret = bytes(arg.blob(args, "secret", max_len=SECRET_MAX))
    if len(secret) < SECRET_MIN:
        raise InvalidArgument(f"secret must be at least {SECRET_MIN} bytes")
    return Credentials(check_cluster_id(args.get("cluster_id")), secret)


def _ballot(args: dict[str, Any]) -> Ballot:
    b = args.get("ballot")
    if not (isinstance(b, (list, tuple)) and len(b) == 2 and type(b[0]) is int and isinstance(b[1], str)
            and 0 <= b[0] <= BALLOT_MAX and len(b[1]) <= PROPOSER_MAX):
        raise InvalidArgument(f"ballot must be [counter 0..{BALLOT_MAX}, proposer id of at most "
                              f"{PROPOSER_MAX} characters]")
    return b[0], b[1]


def _register_key(args: dict[str, Any]) -> str:
    """A register's key: it names the acceptor's file (hex of its UTF-8), so it is short."""
    key = arg.text(args, "key", max_len=KEY_MAX)
    if not 0 < len(key.encode("utf-8", "surrogatepass")) <= KEY_MAX:
        raise InvalidArgument(f"key must be 1 to {KEY_MAX} bytes long")
    return key


def add_peer_change(info: PeerInfo) -> MapChange:
    """The map change that puts `info` in the map as it is (None if it is already)."""
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


def peer_state_change(peer_id: str, state: str) -> MapChange:
    """The map change that marks a peer up or down."""
    return lambda cmap: cmap.with_peer_state(peer_id, state)


def find_peer(cmap: ClusterMap, name: str) -> PeerInfo:
    for p in cmap.peers.values():
        if name in (p.peer_id, p.address):
            return p
    raise VdifsError(f"no peer {name!r} in the cluster map", code=errno.ENOENT)


class Membership:
    def __init__(self, peer: PeerState) -> None:
        self.peer = peer
        self.acceptor = Acceptor(FileAcceptorStorage(peer.path("meta/acceptor")))
        self.pending: dict[str, PeerInfo] = {}  # peers that registered here before the format
        self._lease_versions: dict[str, tuple[int, float]] = {}  # lease key -> (version, since when held)

    # -- changing the map ---------------------------------------------------------------

    async def change_map(self, fn: MapChange, within: float | None = None) -> ClusterMap:
        """Apply `fn` through consensus, adopt the result and tell everyone.
        With `within`, give up (ConsensusUnavailable, nothing more proposed) if consensus
        has not taken the change in that many seconds."""
        p = self.peer
        assert p.meta is not None and p.cmap is not None
        with trio.move_on_after(math.inf if within is None else within) as waited:
            new = await p.meta.change_map(fn)
        if waited.cancelled_caught:
            raise ConsensusUnavailable(f"the meta peers did not take the map change within {within:.0f} s")
        await p.adopt_map(new)
        await self.notify_all(new)
        return new

    async def notify_all(self, cmap: ClusterMap) -> None:
        assert self.peer.rpc is not None
        rpc = self.peer.rpc

        async def one(address: str) -> None:
            try:
                await rpc.call(address, "cluster.notify", {"map": cmap.to_dict()}, timeout=5)
            except VdifsError:
                pass  # it will poll the register

        async with trio.open_nursery() as nursery:
            for p in cmap.peers.values():
                if p.peer_id != self.peer.peer_id:
                    nursery.start_soon(one, p.address)

    # -- joining and coming back ------------------------------------------------------------

    async def join_via(self, address: str) -> None:
        p = self.peer
        assert p.rpc is not None
        if p.creds is None:
            reply = await p.rpc.call(address, "peer.register_pending", {"peer": p.me().to_dict()})
            log.info("peer %s: waiting at %s for 'vdifs cluster format' (%s)", p.peer_id, address, reply)
            return
        cmap = ClusterMap.from_dict(await p.rpc.call(address, "cluster.add_peer", {"peer": p.me().to_dict()}))
        await p.save_creds(p.creds)  # the store belongs to this cluster from now on
        await p.adopt_map(cmap)

    async def rejoin(self) -> None:
        """We are alive: make the map say so again (after setting aside what may be stale)."""
        p = self.peer
        assert p.meta is not None
        current = await p.meta.read_map()
        me = current.peers.get(p.peer_id) if current else None
        if me is None:
            # Removed from the map meanwhile: join again, and trust none of our
            # old copies (since=0 asks for a full resync).
            log.warning("peer %s is no longer in the cluster map: joining again", p.peer_id)
            cmap = await self.change_map(add_peer_change(p.me()))
            await self._return_from_down(0, cmap.epoch)
            await p.save_up_epoch(cmap.epoch)
            p.open_gate()
            return
        if me.state == UP:
            # We stopped (cleanly or not) and came back before anyone noticed:
            # writes may have gone to the others but not to us, and their writers
            # wait for an epoch without us. Leave first.
            log.warning("peer %s restarted before the cluster marked it down%s: leaving the map before "
                        "rejoining", p.peer_id, "" if p.clean_start else " (after a crash)")
            await self.change_map(peer_state_change(p.peer_id, DOWN))
        # Back in the map, but every data request waits at the gate until we
        # know what changed while we were away. The delta is asked for only
        # once every peer has our new epoch: from then on nobody accepts a
        # write of the old epoch, so the journals hold every change we missed.
        since = p.up_epoch
        p.shut_gate()
        cmap = await self.change_map(add_peer_change(p.me()))
        await self._return_from_down(since, cmap.epoch)
        await p.save_up_epoch(cmap.epoch)
        p.clean_start = True
        p.open_gate()  # only now: on an error above it stays shut and the caller tries again

    async def _return_from_down(self, since: int, epoch: int) -> None:
        """We were away (marked down, or crashed) since epoch `since`: writes
        went around us. Set aside what changed meanwhile, per the other
        peers' change journals (delta resync); if they cannot tell (a journal
        does not reach back that far, a peer does not answer, not every peer
        has reached `epoch` yet), set aside everything (full resync).
        Recovery fetches current copies of what we should hold; our old copy
        is only a last resort."""
        store = self.peer.store
        label = f"epoch-{epoch}-{int(time.time())}"
        changed = None
        try:
            if since and await self._all_peers_at(epoch):
                changed = await self._changed_after(since)
        except VdifsError as e:
            log.warning("cannot learn what changed while we were away (%s)", e)
        if changed is None:
            dest = await store.quarantine(label)
            log.warning("peer %s was away since epoch %d and the others cannot say what changed since: "
                        "all its objects moved to %s (full resync)", self.peer.peer_id, since, dest)
            return
        held = set()
        for vid in await store.list_vids():
            held.update(await store.list_objects(vid))
        stale = sorted(held.intersection(changed))
        await store.set_aside_stale(stale, label)
        log.warning("peer %s was away since epoch %d: %d of its %d objects changed meanwhile and were set "
                    "aside (delta resync); the rest are current", self.peer.peer_id, since, len(stale), len(held))

    async def _all_peers_at(self, epoch: int, timeout: float = 30.0) -> bool:
        """True once every up peer has adopted `epoch` (so it refuses older writes)."""
        p = self.peer
        assert p.rpc is not None and p.cmap is not None
        with trio.move_on_after(timeout):
            while True:
                behind = []
                for other in p.cmap.up_peers():
                    if other.peer_id == p.peer_id:
                        continue
                    try:  # ping: the epoch and nothing else (peer.info would stat the store)
                        info = await p.rpc.call(other.address, "peer.ping", {}, timeout=5)
                    except VdifsError:
                        behind.append(other.peer_id)
                        continue
                    if int(info.get("epoch", 0)) < epoch:
                        behind.append(other.peer_id)
                if not behind:
                    return True
                await trio.sleep(0.2)
        log.warning("peers did not all reach epoch %d within %.0f s", epoch, timeout)
        return False

    async def _changed_after(self, epoch: int) -> set[int] | None:
        """Ids every other up peer changed after `epoch`, or None if any cannot say."""
        p = self.peer
        assert p.rpc is not None and p.meta is not None
        cmap = await p.meta.read_map()
        if cmap is None:
            return None
        out: set[int] = set()
        for other in cmap.up_peers():
            if other.peer_id == p.peer_id:
                continue
            after = None
            while True:
                try:
                    reply = await p.rpc.call(other.address, "obj.changed_after",
                                             {"since": epoch, "after": after}, timeout=30)
                except VdifsError as e:
                    log.info("peer %s cannot list its changes (%s): full resync", other.peer_id, e)
                    return None
                if not reply.get("covered"):
                    log.info("peer %s's change journal does not reach back to epoch %d", other.peer_id, epoch)
                    return None
                out.update(reply["oids"])
                if not reply["more"] or not reply["oids"]:
                    break
                after = reply["oids"][-1]
        return out

    # -- request handlers --------------------------------------------------------------------

    async def h_ping(self, args: dict[str, Any], s: Session) -> dict[str, Any]:
        return {"peer": self.peer.peer_id, "epoch": self.peer.epoch()}

    async def h_hello(self, args: dict[str, Any], s: Session) -> dict[str, Any]:
        p = self.peer
        return {"peer": p.peer_id, "address": p.listen,
                "cluster": p.creds.cluster_id if p.creds else None,
                "epoch": p.epoch(), "pending": sorted(self.pending)}

    async def h_register_pending(self, args: dict[str, Any], s: Session) -> str:
        info = _peer_info(args)
        p = self.peer
        if p.creds is not None:
            raise VdifsError("this peer already belongs to a cluster: start the new peer with "
                             "--secret-file to join it", code=errno.EEXIST)
        self.pending[info.peer_id] = info
        log.info("peer %s at %s will join at format time", info.peer_id, info.address)
        return f"registered with {p.peer_id}; run 'vdifs cluster format {p.listen}'"

    async def h_format(self, args: dict[str, Any], s: Session) -> dict[str, Any]:
        creds = _credentials(args)
        copies = arg.integer(args, "copies", 1, COPIES_MAX)
        min_copies = arg.integer(args, "min_copies", 1, copies)
        p = self.peer
        if p.creds is not None:
            raise VdifsError(f"peer {p.peer_id} already belongs to cluster {p.creds.cluster_id}",
                             code=errno.EEXIST)
        peers = {p.peer_id: p.me(), **self.pending}
        if copies > len(peers):
            raise VdifsError(f"copies={copies} needs at least {copies} peers; {len(peers)} have joined "
                             f"({', '.join(sorted(x.address for x in peers.values()))})", code=errno.EINVAL)
        cmap = ClusterMap(creds.cluster_id, epoch=1, copies=copies, min_copies=min_copies, peers=peers,
                          meta=choose_meta(list(peers)))
        assert p.rpc is not None
        for info in peers.values():  # the map's peers: more may register while we await
            if info.peer_id != p.peer_id:
                await p.rpc.call(info.address, "cluster.adopt",
                                 {"cluster_id": creds.cluster_id, "secret": creds.secret, "map": cmap.to_dict()})
        await self._adopt(creds, cmap, s)
        assert p.meta is not None
        if not await p.meta.register(CLUSTER_KEY).cas(0, cmap.encode()):
            raise VdifsError("the cluster register was already written", code=errno.EEXIST)
        for peer_id in peers:
            self.pending.pop(peer_id, None)
        log.info("formatted cluster %s: %d peers, copies %d, meta %s", creds.cluster_id, len(peers),
                 copies, ",".join(cmap.meta))
        return cmap.to_dict()

    async def _adopt(self, creds: Credentials, cmap: ClusterMap, session: Session | None = None) -> None:
        p = self.peer
        await p.save_creds(creds)
        assert p.rpc is not None
        p.reset_pools()  # future connections authenticate with the new secret
        await p.adopt_map(cmap)
        if p.server is not None:
            await p.server.close_unauthenticated(keep=session)

    async def h_rotate_secret(self, args: dict[str, Any], s: Session) -> bool:
        """Take a new cluster secret, sent wrapped for the admin credential
        that sends it (`cluster rotate-secret`). Every credential derived
        from the old secret is refused for new connections after `grace`
        seconds (ROTATION_GRACE unless given)."""
        p = self.peer
        creds = p.creds
        assert creds is not None  # an authenticated session implies a cluster
        wrapped = bytes(arg.blob(args, "wrapped", max_len=SECRET_MAX + 64))
        grace = arg.integer(args, "grace", 0, GRACE_MAX, default=int(ROTATION_GRACE))
        # wrapped for the key the handshake proved (the current or, in a grace, the old secret's)
        # (a session made by hand, in simulations, stands for the secret's holder)
        secret = unwrap_secret(s.key if s.key is not None else creds.secret, wrapped, creds.cluster_id.encode())
        if secret is None or not SECRET_MIN <= len(secret) <= SECRET_MAX:
            raise InvalidArgument("the new secret is not wrapped for this session's credential")
        if secret == creds.secret:
            return False  # a retry: already ours
        await p.rotate_secret(secret, grace)
        log.warning("peer %s: cluster secret rotated by %s from %s; the old one is accepted for %d s more",
                    p.peer_id, s.credential, s.remote, grace)
        return True

    async def h_adopt(self, args: dict[str, Any], s: Session) -> str:
        creds, cmap = _credentials(args), _cluster_map(args)
        p = self.peer
        if p.creds is not None:
            raise VdifsError(f"peer {p.peer_id} already belongs to cluster {p.creds.cluster_id}",
                             code=errno.EEXIST)
        await self._adopt(creds, cmap, s)
        return p.peer_id

    async def h_map(self, args: dict[str, Any], s: Session) -> dict[str, Any]:
        return self.peer.need_map().to_dict()

    async def h_notify(self, args: dict[str, Any], s: Session) -> bool:
        """A newer map was chosen, says the sender: adopt the map the cluster
        register holds, never the one sent (any client could forge that)."""
        claimed = _cluster_map(args)
        before = self.peer.epoch()
        if claimed.epoch > before:
            if self.peer.cmap is None and self.peer.meta is not None:  # joining: whom to ask
                self.peer.meta.set_meta(claimed.meta_addresses())  # they must prove the secret
            await self.peer.refresh_map()
        return self.peer.epoch() > before

    async def h_add_peer(self, args: dict[str, Any], s: Session) -> dict[str, Any]:
        info = _peer_info(args)
        self.peer.need_map()
        new = await self.change_map(add_peer_change(info))
        log.info("peer %s at %s joined (epoch %d)", info.peer_id, info.address, new.epoch)
        return new.to_dict()

    async def h_remove_peer(self, args: dict[str, Any], s: Session) -> dict[str, Any]:
        target = arg.text(args, "peer")
        cmap = self.peer.need_map()
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
        # absent, None or 0: keep the current value
        want_copies = arg.integer(args, "copies", 0, COPIES_MAX, default=None)
        want_min = arg.integer(args, "min_copies", 0, COPIES_MAX, default=None)
        self.peer.need_map()

        def fn(m: ClusterMap) -> ClusterMap | None:
            copies = want_copies or m.copies
            min_copies = want_min or m.min_copies
            if not 1 <= min_copies <= copies:
                raise VdifsError("need 1 <= min_copies <= copies", code=errno.EINVAL)
            if copies > len(m.up_peers()):
                raise VdifsError(f"copies={copies} needs {copies} peers; {len(m.up_peers())} are up",
                                 code=errno.EINVAL)
            if (copies, min_copies) == (m.copies, m.min_copies):
                return None
            return m.with_changes(copies=copies, min_copies=min_copies)

        return (await self.change_map(fn)).to_dict()

    async def h_replace_meta(self, args: dict[str, Any], s: Session) -> dict[str, Any]:
        """Swap a dead meta peer for a live one (`vdifs cluster replace-meta`).

        Safe while the old one stays dead: every write of the old set needed
        all its live members, and every majority of the new set contains one
        of them, so no chosen value is lost and no two quorums miss each
        other. Then the new member gets a copy of every register."""
        old_name, new_name = arg.text(args, "old"), arg.text(args, "new")
        p = self.peer
        assert p.rpc is not None and p.meta is not None
        current = await p.meta.read_map()
        if current is None:
            raise VdifsError("no cluster map", code=errno.ENOENT)
        old, new = find_peer(current, old_name), find_peer(current, new_name)
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
            await p.rpc.call(old.address, "peer.info", {}, timeout=3)
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
            return m.with_changes(meta=[new.peer_id if x == old.peer_id else x for x in m.meta])

        cmap = await self.change_map(fn)
        log.warning("meta peer %s replaced by %s (epoch %d)", old.peer_id, new.peer_id, cmap.epoch)
        members = [cmap.peers[x] for x in cmap.meta if x != new.peer_id and cmap.peers[x].state == UP]
        keys: set[str] = set()
        for m in members:
            keys.update(await p.rpc.call(m.address, "paxos.keys", {}, timeout=30))
        copied = 0
        for key in sorted(keys):
            best: dict[str, Any] | None = None
            for m in members:
                got = await p.rpc.call(m.address, "paxos.peek", {"key": key}, timeout=30)
                if best is None or tuple(got["accepted"]) > tuple(best["accepted"]):
                    best = got
            assert best is not None
            if await p.rpc.call(new.address, "paxos.install", {"key": key, "ballot": best["accepted"],
                                                               "value": best["value"]}, timeout=30):
                copied += 1
        log.info("copied %d of %d registers to the new meta peer %s", copied, len(keys), new.peer_id)
        return {"epoch": cmap.epoch, "meta": cmap.meta, "registers": len(keys), "copied": copied}

    async def h_changed_after(self, args: dict[str, Any], s: Session) -> dict[str, Any]:
        """A page of the ids this peer changed at epochs after `since` (delta resync)."""
        since = arg.integer(args, "since")
        after = arg.integer(args, "after", default=None)
        limit = arg.integer(args, "limit", default=None)
        changed = self.peer.journal.changed_after(since)
        if changed is None:
            return {"covered": False, "oids": [], "more": False}
        return {"covered": True, **objlist.page(changed, after, limit)}

    # -- the consensus acceptor ------------------------------------------------------------

    def _check_acceptor(self) -> None:
        """A peer that the map no longer lists as meta (replaced after it was
        declared dead) must never vote again: its votes could form a quorum
        that misses the new members'."""
        cmap = self.peer.cmap
        if cmap is not None and self.peer.peer_id not in cmap.meta:
            raise VdifsError(f"peer {self.peer.peer_id} is not a meta peer at epoch {cmap.epoch}",
                             code=errno.EPERM)

    async def h_prepare(self, args: dict[str, Any], s: Session) -> dict[str, Any]:
        key, ballot = _register_key(args), _ballot(args)
        self._check_acceptor()
        return await self.acceptor.prepare(key, ballot)

    async def h_accept(self, args: dict[str, Any], s: Session) -> dict[str, Any]:
        key, ballot = _register_key(args), _ballot(args)
        value = bytes(arg.blob(args, "value"))  # a value sent as a blob arrives as a bytearray
        self._check_acceptor()

        def check(current: bytes | None) -> None:
            check_change(s.role, s.credential, key, current, value, self._unchanged_for(key, current))

        result = await self.acceptor.accept(key, ballot, value, None if s.role == ADMIN else check)
        if result.get("ok") and key.startswith(LEASE_PREFIX):
            self._unchanged_for(key, value)
        return result

    def _unchanged_for(self, key: str, value: bytes | None) -> float:
        """How long this acceptor has held a lease register at `value`'s
        version (0 for a version it had not seen; remembered in memory, so
        after a restart every holder gets a full term again)."""
        if not key.startswith(LEASE_PREFIX):
            return 0.0
        try:
            version = msgpack.unpackb(value)["v"] if value is not None else 0
        except Exception:
            return 0.0
        now = trio.current_time()
        seen = self._lease_versions.get(key)
        if seen is None or seen[0] != version:
            self._lease_versions[key] = (version, now)
            return 0.0
        return now - seen[1]

    async def h_peek(self, args: dict[str, Any], s: Session) -> dict[str, Any]:
        unless = _ballot({"ballot": args["unless"]}) if args.get("unless") is not None else None
        return await self.acceptor.peek(_register_key(args), unless)

    async def h_peek_many(self, args: dict[str, Any], s: Session) -> dict[str, Any]:
        keys, unless = args.get("keys"), args.get("unless")
        if not (isinstance(keys, list) and isinstance(unless, list) and len(keys) == len(unless)
                and 0 < len(keys) <= PEEK_MANY_MAX):
            raise InvalidArgument(f"keys and unless must be lists of the same length, 1 to {PEEK_MANY_MAX}")
        checked = [(_register_key({"key": k}), _ballot({"ballot": u}) if u is not None else None)
                   for k, u in zip(keys, unless)]
        return await self.acceptor.peek_many([k for k, _ in checked], [u for _, u in checked])

    async def h_keys(self, args: dict[str, Any], s: Session) -> list[str]:
        return await self.acceptor.storage.keys()

    async def h_install(self, args: dict[str, Any], s: Session) -> bool:
        key, ballot = _register_key(args), _ballot(args)
        if "value" not in args:
            raise InvalidArgument("missing argument 'value'")
        value = arg.blob(args, "value", default=None)  # None: the register was never written
        return await self.acceptor.install(key, ballot, None if value is None else bytes(value))
