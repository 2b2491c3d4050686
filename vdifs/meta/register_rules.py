"""Which changes of which registers each role may make: the acceptors' check.

A mount proposes changes to registers itself (CASPaxos has no leader), so
the role table of the RPC server cannot tell a lease renewal from a broken
lock: both are `paxos.accept`. Every acceptor therefore checks what a
change does before it accepts it from a mount or peer credential:

- The cluster map is changed by peers and admins; a mount may only write
  back the value the acceptor holds (a read is a change by the identity
  function).
- The directory (its root and its parts) and the leases are changed by mounts and admins; a peer
  (or a peer credential) only reads them.
- A mount may take a free lease, and change or give back its own (the
  holder names its credential). Another credential's lease it may take over
  only once this acceptor has seen it unchanged for the holder's term: the
  holder stopped renewing. Freeing another's lease is breaking the lock:
  admins only.

A change needs a majority of acceptors, and any majority includes one that
saw the holder's latest renewal, so a lease renewed within its term cannot
be taken over even if some acceptors lag. Two mounts sharing one credential
are one holder to these rules.

Pure functions: the acceptor (`peer.membership`) passes what it holds.
"""

from __future__ import annotations

import errno
from typing import Any

import msgpack

from vdifs.errors import VdifsError
from vdifs.meta.consensus import CLUSTER_KEY, DIRECTORY_KEY
from vdifs.meta.lease import DEFAULT_TERM, Lease
from vdifs.wire.rpc import ADMIN, MOUNT, PEER

LEASE_PREFIX = "lock/"
TERM_MAX = 3600.0  # a holder's claimed term is believed up to this


class Refused(VdifsError):
    errno = errno.EACCES


class NotExpired(VdifsError):
    errno = errno.EBUSY


def _content(raw: bytes | None) -> tuple[Any, Any]:
    """What a register value says (version, data), without the writer tokens."""
    if raw is None:
        return 0, b""
    try:
        d = msgpack.unpackb(raw)
        return d["v"], d["d"]
    except Exception:
        raise VdifsError("malformed register value", code=errno.EINVAL) from None


def is_directory_part(key: str) -> bool:
    """`directory/K`: a part of a split directory (`meta.directory_service`)."""
    prefix, _, k = key.partition("/")
    return prefix == DIRECTORY_KEY and k.isdigit() and str(int(k)) == k


def _lease(data: Any) -> Lease:
    if not isinstance(data, bytes):
        raise VdifsError("malformed lease", code=errno.EINVAL)
    try:
        lease = Lease.decode(data)
    except Exception:
        raise VdifsError("malformed lease", code=errno.EINVAL) from None
    if lease.holder is not None and not isinstance(lease.holder, dict):
        raise VdifsError("malformed lease holder", code=errno.EINVAL)
    return lease


def _credential_of(lease: Lease) -> Any:
    return lease.holder.get("credential") if lease.holder is not None else None


def _term_of(lease: Lease) -> float:
    term = lease.holder.get("term") if lease.holder is not None else None
    if isinstance(term, (int, float)) and not isinstance(term, bool) and 0 < term <= TERM_MAX:
        return float(term)
    return DEFAULT_TERM


def check_change(role: str | None, credential: str, key: str, current: bytes | None, new: bytes,
                 unchanged_for: float) -> None:
    """Raise unless `credential` (of `role`) may turn `current` into `new`;
    `unchanged_for`: seconds this acceptor has held `current`'s content."""
    if role == ADMIN or role is None:
        return
    if _content(new) == _content(current):
        return  # a read, or a compare-and-set that lost: writes back what is there
    if key == CLUSTER_KEY:
        if role != PEER:
            raise Refused(f"the cluster map is changed by peers and admins, not by {credential}")
        return
    directory = key == DIRECTORY_KEY or is_directory_part(key)
    if not directory and not key.startswith(LEASE_PREFIX):
        raise Refused(f"register {key!r} is not one {credential} may change")
    if role != MOUNT:
        raise Refused(f"the directory and the leases are changed by mounts and admins, not by {credential}")
    if directory:
        return
    before, after = _lease(_content(current)[1]), _lease(_content(new)[1])
    if after.holder is not None and _credential_of(after) != credential:
        raise Refused(f"{credential} may take a lease only for itself")
    if before.holder is None or _credential_of(before) == credential:
        return  # a free lease, or its own
    holder = before.describe()
    if after.holder is None:
        raise Refused(f"breaking the lease of {holder} needs an admin credential, not {credential} "
                      "('vdifs cluster break-lock')")
    term = _term_of(before)
    if unchanged_for < term:
        raise NotExpired(f"the lease of {holder} was renewed {unchanged_for:.0f} s ago; it may be taken "
                         f"over after {term:.0f} s without renewal")
