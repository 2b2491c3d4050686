"""`vdifs cluster credential | rotate-secret | break-lock`: who may do what.

Credentials are derived from the cluster secret (`meta.credentials`), so
issuing one needs the secret file and no peer. Rotating the secret needs
every peer of the map up: each takes the new secret, wrapped for the
admin's key, and accepts the old one for ROTATION_GRACE more seconds while
the others follow. Breaking a lock is an admin's act: the peers refuse it
to mount credentials (`meta.register_rules`).
"""

from __future__ import annotations

import argparse
import errno
import os
import secrets
import socket
from typing import Any

import trio

from vdifs.cli.common import PEER_TIMEOUT, first_answer, run_with_pool
from vdifs.errors import VdifsError
from vdifs.meta.consensus import MetaClient
from vdifs.meta.credentials import GRACE_MAX, ROTATION_GRACE, Credentials, describe, write_credentials
from vdifs.meta.lease import Lease, LeaseManager, lease_key
from vdifs.model.cluster import UP, ClusterMap
from vdifs.wire.rpc import ADMIN, ROLES, RpcPool
from vdifs.wire.seal import wrap_secret

ACTIONS = ("credential", "rotate-secret", "break-lock")
ROTATE_TRIES = 3


def add_parsers(actions: argparse._SubParsersAction, secret_only: argparse.ArgumentParser,  # type: ignore[type-arg]
                with_cluster: argparse.ArgumentParser) -> None:
    cr = actions.add_parser(
        "credential", parents=[secret_only], help="issue a credential (mount, peer or admin) into a file",
        description="Derive the credential ROLE.NAME from the cluster secret (--secret-file) and write it "
                    "to FILE (mode 0600). A mount credential lets a hypervisor mount the cluster: data, "
                    "directory and its own leases, no administration. An admin credential may do "
                    "everything but issue credentials. A peer credential may do what peers ask each other, "
                    "and cannot open VDIs. Rotating the secret revokes every credential.")
    cr.add_argument("role", choices=ROLES, metavar="ROLE", help=f"one of {', '.join(ROLES)}")
    cr.add_argument("name", metavar="NAME", help="who holds it, e.g. the hypervisor's host name")
    cr.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write the credential")
    cr.add_argument("--force", action="store_true", help="overwrite FILE")
    rs = actions.add_parser(
        "rotate-secret", parents=[with_cluster], help="replace the cluster secret (revokes every credential)",
        description="Give every peer a new cluster secret and write it to --secret-file (the old file is "
                    "kept as FILE.old). Peers accept the old secret for --grace seconds more; after "
                    "that, every credential issued before is refused: issue new ones. Every peer in "
                    "the map must be up.")
    rs.add_argument("--grace", type=int, default=int(ROTATION_GRACE), metavar="SECONDS",
                    help=f"how long peers still accept the old secret and its credentials, for new "
                         f"connections (default {ROTATION_GRACE:.0f}; 0 after a leak)")
    bl = actions.add_parser(
        "break-lock", parents=[with_cluster], help="free a VDI's lease whoever holds it (admins)",
        description="Fence the mount that holds NAME's lease (its writes fail from now on) and free the "
                    "lease, so another mount can open NAME for writing. For a mount that died with the "
                    "file open and whose lease will not expire by itself soon enough.")
    bl.add_argument("name", metavar="NAME", help="the VDI")


def run(action: str, args: argparse.Namespace, creds: Credentials, addresses: list[str] | None) -> int:
    if action == "credential":
        return _issue(args, creds)
    assert addresses is not None
    if action == "rotate-secret":
        return _rotate(args, creds, addresses)
    before = run_with_pool(lambda pool: break_lock(pool, addresses, args.name), creds.client_key(),
                           creds.cluster_id)
    print(f"lock of {args.name} broken (it was {before.describe()}); its generation {before.generation} "
          "is fenced")
    return 0


def _issue(args: argparse.Namespace, creds: Credentials) -> int:
    if os.path.exists(args.output) and not args.force:
        raise VdifsError(f"{args.output} exists; use --force to overwrite it", code=errno.EEXIST)
    issued = creds.derive(args.role, args.name)
    write_credentials(args.output, issued)
    print(f"credential {issued.credential} of cluster {creds.cluster_id} written to {args.output}")
    return 0


def _rotate(args: argparse.Namespace, creds: Credentials, addresses: list[str]) -> int:
    if creds.role != ADMIN:
        raise VdifsError(f"rotating the secret needs an admin credential, not {creds.credential}", code=errno.EACCES)
    if not 0 <= args.grace <= GRACE_MAX:
        raise VdifsError(f"--grace must be 0 to {GRACE_MAX} seconds", code=errno.EINVAL)
    new = Credentials(creds.cluster_id, secrets.token_bytes(32))
    wrapped = wrap_secret(creds.secret, new.secret, creds.cluster_id.encode())
    pending = args.secret_file + ".new"
    write_credentials(pending, new)  # first: whatever happens next, the new secret is not lost

    async def go(pool: RpcPool) -> None:
        cmap = ClusterMap.from_dict(await first_answer(pool, addresses, "cluster.map"))
        down = [p.address for p in cmap.peers.values() if p.state != UP]
        if down:
            raise VdifsError(f"every peer must be up to take the new secret; down: {', '.join(down)} "
                             "(bring them up, or remove them with 'vdifs cluster leave')", code=errno.EAGAIN)
        for p in sorted(cmap.peers.values(), key=lambda p: p.address):
            for attempt in range(ROTATE_TRIES):
                try:
                    await pool.call(p.address, "cluster.rotate_secret", {"wrapped": wrapped, "grace": args.grace},
                                    timeout=PEER_TIMEOUT)
                    taken.append(p.peer_id)
                    break
                except VdifsError as e:
                    if not taken and e.errno == errno.EACCES:
                        raise  # refused to our credential before any peer changed
                    if attempt == ROTATE_TRIES - 1 or e.errno == errno.EACCES:
                        failed.append(f"peer {p.peer_id} ({p.address}) did not take the new secret: {e}")
                        break
                    await trio.sleep(1)

    taken: list[str] = []
    failed: list[str] = []
    try:
        run_with_pool(go, creds.client_key(), creds.cluster_id)
    except BaseException:
        if not taken:  # no peer has it: the old secret stays the secret
            os.unlink(pending)
            raise
        # Some peers hold the new secret now: it must not be lost, whatever went wrong.
        failed.append(f"the rotation stopped after {len(taken)} peers took the new secret; the others did not")
    if os.path.exists(args.secret_file):
        os.replace(args.secret_file, args.secret_file + ".old")
    os.replace(pending, args.secret_file)
    print(f"new cluster secret written to {args.secret_file} ({describe(creds)} kept as {args.secret_file}.old)")
    print(f"peers accept the old secret and its credentials for {args.grace} s more: issue new "
          "credentials ('vdifs cluster credential') and install them on the hypervisors")
    for line in failed:
        print(f"warning: {line}; remove such a peer ('vdifs cluster leave') and add it again "
              "('vdifs cluster join')")
    return 1 if failed else 0


async def break_lock(pool: RpcPool, addresses: list[str], name: str) -> Lease:
    """Break NAME's lock as LeaseManager.break_lock does in a mount: a new
    generation in the lease register, fenced on every up peer."""
    cmap = ClusterMap.from_dict(await first_answer(pool, addresses, "cluster.map"))
    meta = MetaClient(f"admin-{socket.gethostname()}-{os.getpid()}", pool, cmap.meta_addresses())
    rec = (await meta.read_directory()).get(name)

    async def fence(vid: int, generation: int) -> None:
        args: dict[str, Any] = {"vid": vid, "gen": generation}
        if rec.data_vid != vid:
            args["also"] = [rec.data_vid]
        async def one(address: str) -> None:
            await pool.call(address, "lease.fence", args, timeout=PEER_TIMEOUT)

        async with trio.open_nursery() as nursery:
            for p in cmap.up_peers():
                nursery.start_soon(one, p.address)

    leases = LeaseManager(meta.node_id, {}, lambda vid: meta.register(lease_key(vid)), fence)
    return await leases.break_lock(rec.vid)
