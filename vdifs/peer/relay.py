"""Relaying: a mount's request to a peer it cannot reach, through one it can.

A link can break between a mount and one peer while the peers still reach
each other (a partial partition). The failure detector then rightly keeps
that peer up, so a mount that waited for the map that replaces it would wait
forever. Instead the mount sends the request to another up peer, which
forwards it (`peer.relay`), as Sheepdog's gateways forward every request.
The target checks the request exactly as if it came directly (epoch, fence,
gate), so a relayed write is no weaker than a direct one.

Only the data-path operations a mount sends are relayed, only those the
sender's credential may send itself (the relay forwards them with the
cluster secret), and only to a peer that is up in this peer's map: a relay
is not an open proxy to any address, and a relayed request cannot be
relayed again.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

from vdifs.errors import InvalidArgument, VdifsError
from vdifs.peer.state import PeerState
from vdifs.wire import args as arg
from vdifs.wire.rpc import ESTALE_EPOCH, RELAYED_OPS, PeerUnavailable, RemoteError, Session

log = logging.getLogger("vdifs.peer.relay")

RELAY_TIMEOUT_MAX = 60.0


class Relay:
    def __init__(self, peer: PeerState) -> None:
        self.peer = peer
        self.relayed = 0  # requests forwarded (peer.info)

    async def h_relay(self, args: dict[str, Any], s: Session) -> Any:
        """Forward `op` with `args` to the up peer at `to`; answer what it answers.

        Object data rides as this request's blob ("data") and is forwarded as
        the inner request's. A target that is not up here is refused with our
        map when the sender's epoch is older (it learns the news), else with
        EHOSTUNREACH; one that does not answer us either is EHOSTUNREACH too,
        which the mount treats as an unreachable replica."""
        to = arg.text(args, "to", max_len=300)
        op = arg.text(args, "op", max_len=64)
        inner = dict(arg.mapping(args, "args"))
        timeout = arg.integer(args, "timeout", 1, int(RELAY_TIMEOUT_MAX), default=30)
        if op not in RELAYED_OPS:
            raise InvalidArgument(f"{op} cannot be relayed")
        if op not in s.ops:  # we forward with more authority than the sender may have
            raise VdifsError(f"{op} is refused to {s.credential} (role {s.role}), relayed or not", code=errno.EACCES)
        data = args.get("data")
        if data is not None:
            inner["data"] = arg.blob(args, "data")
        cmap = self.peer.need_map()
        epoch = inner.get("epoch")
        if type(epoch) is int and epoch > cmap.epoch:  # the sender knows a newer map: take it first
            await self.peer.refresh_map()
            cmap = self.peer.need_map()
        target = next((p for p in cmap.up_peers() if p.address == to), None)
        if target is None or target.peer_id == self.peer.peer_id:
            if type(epoch) is int and epoch < cmap.epoch:
                raise RemoteError(ESTALE_EPOCH, {"message": f"stale epoch {epoch} < {cmap.epoch}",
                                                 "map": cmap.to_dict()})
            why = "is this peer" if target is not None else f"is not an up peer in epoch {cmap.epoch}"
            raise VdifsError(f"cannot relay {op} to {to}: it {why}", code=errno.EHOSTUNREACH)
        assert self.peer.rpc is not None
        self.relayed += 1
        try:
            return await self.peer.rpc.call(to, op, inner, timeout=timeout)
        except PeerUnavailable as e:
            log.info("relaying %s from %s to peer %s: %s", op, s.remote, target.peer_id, e)
            raise VdifsError(f"relay {self.peer.peer_id} cannot reach {to} either: {e}",
                             code=errno.EHOSTUNREACH) from None
