"""`vdifs peer` and `vdifs cluster ...`: running peers and administering a cluster."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from vdifs.cli import access, check
from vdifs.cli.common import (LOG_LEVELS, PEER_TIMEOUT, CliError, Parser, first_answer, progress_text,
                              run_with_pool, setup_logging, size_arg, table)
from vdifs.cli.heap import keep_freed_buffers
from vdifs.errors import VdifsError
from vdifs.fsutil import raise_open_files_limit
from vdifs.meta.credentials import Credentials, default_secret_file, read_credentials, write_credentials
from vdifs.model.cluster import DEFAULT_COPIES as FORMAT_COPIES
from vdifs.model.cluster import DEFAULT_WEIGHT as PEER_WEIGHT
from vdifs.model.cluster import ClusterMap
from vdifs.model.sizes import format_size
from vdifs.peer.cpu import CPU_POLICIES, set_cpu_policy
from vdifs.peer.recovery import DEFAULT_RATE as RECOVERY_RATE
from vdifs.peer.recovery import DEFAULT_RESERVE as RECOVERY_RESERVE
from vdifs.peer.sweep import LEAK_GRACE, LEAK_GRACE_MIN, SWEEP_INTERVAL
from vdifs.wire.rpc import IDLE_TIMEOUT, RpcClient, RpcPool

T = TypeVar("T")


STATUS_REFRESH = 1.0  # seconds between `status --watch` refreshes
PEER_INFO_TIMEOUT = 5.0  # a peer that does not answer this fast is shown unreachable
HELLO_TIMEOUT = 10.0
FORMAT_TIMEOUT = 60.0
REPLACE_META_TIMEOUT = 300.0  # copies every register to the new meta peer


def cluster_addresses(text: str | None) -> list[str]:
    """The peer addresses in `text` (ADDR,ADDR...), else in $VDIFS_CLUSTER."""
    text = text or os.environ.get("VDIFS_CLUSTER", "")
    addresses = [a.strip() for a in text.split(",") if a.strip()]
    if not addresses:
        raise VdifsError("no cluster address: pass --cluster HOST:PORT[,...] or set VDIFS_CLUSTER",
                         code=errno.EINVAL)
    return addresses


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The `peer` command and the `cluster` group."""
    p = sub.add_parser("peer", help="run a storage peer (foreground)",
                       description="Run a storage peer: serves the objects in --store and takes part "
                                   "in membership and consensus. Without a cluster yet, --join ADDR "
                                   "waits at ADDR for 'vdifs cluster format'; to join a formatted "
                                   "cluster pass --join and --secret-file.")
    p.add_argument("--store", required=True, metavar="DIR", help="directory holding this peer's objects")
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to serve on")
    p.add_argument("--join", metavar="HOST:PORT", help="a peer of the cluster to join")
    p.add_argument("--zone", default="", metavar="Z", help="failure zone (replicas go to distinct zones)")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (store space, recovery, "
                        "map, peers' round trips; docs/operations.md)")
    p.add_argument("--weight", type=float, default=PEER_WEIGHT, metavar="W",
                   help=f"relative share of data (default {PEER_WEIGHT:g})")
    p.add_argument("--secret-file", metavar="F", help="cluster secret file, to join a formatted cluster")
    p.add_argument("--recovery-rate", type=float, default=RECOVERY_RATE / 1e6, metavar="MB/S",
                   help="limit for copying objects after a peer failure or join "
                        f"(default {RECOVERY_RATE / 1e6:g} MB/s)")
    p.add_argument("--recovery-reserve", type=size_arg, default=RECOVERY_RESERVE, metavar="SIZE",
                   help=f"free space recovery never uses (default {format_size(RECOVERY_RESERVE)})")
    p.add_argument("--reserve", type=size_arg, default=None, metavar="SIZE",
                   help="free space VDI data never takes, kept for object maps, consensus and journals, "
                        "so a full pool still closes files and deletes VDIs (default: 2%% of the store's "
                        "file system, 1 MiB to 1 GiB)")
    p.add_argument("--leak-pass-interval", type=float, default=SWEEP_INTERVAL, metavar="SECONDS",
                   help="how often the cluster looks for leaked objects (no map points at them, or their "
                        "vid is unknown) and removes those left alone for --leak-grace; one peer at a time "
                        f"does it (default {SWEEP_INTERVAL}; 0: never, only `cluster check --repair`)")
    p.add_argument("--leak-grace", type=leak_grace_arg, default=LEAK_GRACE, metavar="SECONDS",
                   help=f"how long a leaked object must have been left alone before it is removed "
                        f"(default {LEAK_GRACE}, at least {LEAK_GRACE_MIN}: longer than a write may wait "
                        f"for a replica, see `vdifs mount --io-wait`)")
    p.add_argument("--idle-timeout", type=idle_timeout_arg, default=IDLE_TIMEOUT, metavar="SECONDS",
                   help="close a client connection that sent part of a request and then nothing for "
                        f"this long (default {IDLE_TIMEOUT:.0f})")
    p.add_argument("--cached-replica-writes", action="store_true",
                   help="keep large writes (256 KiB or more) in the page cache on every replica, not only "
                        "on an object's first, the one mounts read from: random writes into data written "
                        "sequentially find their pages cached, at the price of three cached copies instead "
                        "of one (and, where fresh pages are dear, as on VMs that give free memory back to "
                        "their host, more CPU per sequential write; see docs/operations.md)")
    p.add_argument("--cpu-policy", default="batch", choices=sorted(CPU_POLICIES),
                   help="Linux scheduling policy of the peer's threads (default: batch: a peer woken "
                        "by a request does not preempt the mount or guest that sent it; see "
                        "docs/architecture.md, design change 25)")
    p.add_argument("--encrypt", action="store_true",
                   help="require every client (mounts, admins, other peers) to encrypt its connection, and "
                        "encrypt our own (AES-GCM; connections are always authenticated and tamper-evident)")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="log verbosity (default: info)")

    secret_default = default_secret_file()
    c = sub.add_parser("cluster", help="administer a cluster",
                       description="Administer a cluster of peers. --cluster (or VDIFS_CLUSTER) names "
                                   "any of its peers; --secret-file the secret 'format' wrote. Both "
                                   "may come before or after the ACTION.")
    add_credentials(c, None, secret_default)
    with_cluster = Parser(add_help=False)
    add_credentials(with_cluster, argparse.SUPPRESS, secret_default)
    secret_only = Parser(add_help=False)
    add_credentials(secret_only, argparse.SUPPRESS, secret_default, cluster=False)
    cs = c.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)

    f = cs.add_parser("format", parents=[secret_only],
                      help="create a cluster from a peer and the peers waiting at it",
                      description="Create a cluster from the peer at ADDR and the peers waiting at it "
                                  "(started with --join ADDR), and write its secret file.")
    f.add_argument("address", metavar="ADDR", help="a running peer; the peers that --join'ed it come along")
    f.add_argument("--copies", type=int, default=FORMAT_COPIES, metavar="N",
                   help=f"default replicas per object (default {FORMAT_COPIES})")
    f.add_argument("--min-copies", type=int, metavar="M", help="replicas needed to accept writes (default: majority of N)")
    f.add_argument("--force", action="store_true", help="overwrite an existing secret file")
    i = cs.add_parser("info", parents=[with_cluster], help="epoch, peers, zones, capacity and use",
                      description="The cluster's epoch, settings, capacity, and each peer's zone, weight, "
                                  "state and use.")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    check.add_parser(cs, [with_cluster])
    ss = cs.add_parser("status", parents=[with_cluster], help="peers up/down and recovery progress",
                       description="Which peers are up or down, and each one's recovery progress.")
    ss.add_argument("--json", action="store_true", help="machine-readable output")
    ss.add_argument("--watch", action="store_true", help="refresh every second until recovery is done")
    j = cs.add_parser("join", parents=[with_cluster], help="add a running peer that has no cluster yet",
                      description="Add PEER_ADDR, a running peer that belongs to no cluster, to the cluster.")
    j.add_argument("peer", metavar="PEER_ADDR")
    lv = cs.add_parser("leave", parents=[with_cluster], help="remove a peer from the cluster map",
                       description="Remove PEER from the cluster map; its objects are recovered elsewhere.")
    lv.add_argument("peer", metavar="PEER", help="peer id or address")
    rm = cs.add_parser("replace-meta", parents=[with_cluster],
                       help="swap a dead meta (consensus) peer for a live one",
                       description="Swap a meta peer that the cluster marked down, and that must never "
                                   "come back, for a live peer that is not meta yet; the new one gets a "
                                   "copy of every register. OLD and NEW are peer ids or addresses.")
    rm.add_argument("old", metavar="OLD")
    rm.add_argument("new", metavar="NEW")
    st = cs.add_parser("set", parents=[with_cluster], help="change cluster settings",
                       description="Change the cluster's default copies and the copies needed to accept writes.")
    st.add_argument("--copies", type=int, metavar="N", help="default replicas per object")
    st.add_argument("--min-copies", type=int, metavar="M", help="replicas needed to accept writes")
    access.add_parsers(cs, secret_only, with_cluster)


def add_credentials(parser: argparse.ArgumentParser, default: Any, secret_default: str, *,
                    cluster: bool = True) -> None:
    """--cluster and --secret-file on `parser`. The cluster group and every
    action take them, so they work before and after the ACTION; the actions'
    default is SUPPRESS so that a value given before the action is not reset
    by it."""
    if cluster:
        parser.add_argument("--cluster", default=default, metavar="ADDR[,ADDR...]",
                            help="peers of the cluster (default: $VDIFS_CLUSTER)")
    parser.add_argument("--secret-file", default=secret_default if default is None else default, metavar="F",
                        help=f"cluster secret file (default: {secret_default})")


def idle_timeout_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 1 <= value <= 86400:
        raise argparse.ArgumentTypeError("must be 1 to 86400 seconds")
    return value


def leak_grace_arg(text: str) -> int:
    """--leak-grace: a writer's object is unnamed until its map page is
    written, which can wait out an unreachable replica (--io-wait)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value < LEAK_GRACE_MIN:
        raise argparse.ArgumentTypeError(f"must be at least {LEAK_GRACE_MIN} seconds")
    return value


def cmd_peer(args: argparse.Namespace) -> int:
    """Run a storage peer until it is stopped."""
    from vdifs.peer.daemon import PeerDaemon  # only this command needs the peer's code

    setup_logging(args.log_level, sys.stderr)
    set_cpu_policy(args.cpu_policy)  # before trio starts threads: they inherit it
    keep_freed_buffers()
    raise_open_files_limit()
    daemon = PeerDaemon(args.store, args.listen, join=args.join, zone=args.zone, weight=args.weight,
                        secret_file=args.secret_file, recovery_rate=args.recovery_rate * 1e6,
                        recovery_reserve=args.recovery_reserve, reserve=args.reserve,
                        cached_replica_writes=args.cached_replica_writes,
                        leak_pass_interval=args.leak_pass_interval, leak_grace=args.leak_grace,
                        idle_timeout=args.idle_timeout, encrypt=args.encrypt, metrics=args.metrics)
    trio.run(daemon.run)
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    """One `cluster` action; exit status 1 when `check` leaves problems."""
    action = args.cluster_command
    if action == "format":
        if args.cluster is not None:
            raise CliError("format makes a new cluster from ADDR: --cluster does not apply")
        return _format(args)
    creds = read_credentials(args.secret_file)
    if action == "credential":
        return access.run(action, args, creds, None)
    addresses = cluster_addresses(args.cluster)
    if action in access.ACTIONS:
        return access.run(action, args, creds, addresses)

    def run(fn: Callable[[RpcPool], Awaitable[T]]) -> T:
        return run_with_pool(fn, creds.client_key(), creds.cluster_id)

    if action == "info":
        info = run(lambda pool: cluster_info(pool, addresses))
        print(json.dumps(info, indent=2) if args.json else info_table(info))
    elif action == "check":
        report = run(lambda pool: check.check(pool, addresses, creds, args.repair, args.grace))
        print(json.dumps(report, indent=2) if args.json else check.check_text(report))
        return 1 if report["problems_left"] else 0
    elif action == "status":
        while True:
            info = run(lambda pool: cluster_info(pool, addresses))
            if args.json:
                print(json.dumps(info, indent=2))
                break
            print(status_text(info), flush=True)
            busy = any(r.get("recovery", {}).get("running") for r in info["peers"])
            if not args.watch or not busy:
                break
            time.sleep(STATUS_REFRESH)
            print()
    elif action == "join":
        if not creds.is_cluster_secret:  # the newcomer gets the secret from us
            raise VdifsError(f"joining a peer hands it the cluster secret: run with the secret file, not "
                             f"with {creds.credential}", code=errno.EACCES)
        cmap = run(lambda pool: join(pool, addresses, args.peer, creds))
        print(f"added {args.peer}: epoch {cmap.epoch}, {len(cmap.peers)} peers")
    elif action == "leave":
        d = run(lambda pool: first_answer(pool, addresses, "cluster.remove_peer", {"peer": args.peer}))
        print(f"removed {args.peer}: epoch {d['epoch']}, {len(d['peers'])} peers")
    elif action == "replace-meta":
        d = run(lambda pool: first_answer(pool, addresses, "cluster.replace_meta", {"old": args.old, "new": args.new},
                                          timeout=REPLACE_META_TIMEOUT))
        print(f"epoch {d['epoch']}: meta peers {', '.join(d['meta'])}; "
              f"{d['copied']} of {d['registers']} registers copied to {args.new}")
    elif action == "set":
        if args.copies is None and args.min_copies is None:
            raise VdifsError("nothing to set: give --copies and/or --min-copies", code=errno.EINVAL)
        d = run(lambda pool: first_answer(pool, addresses, "cluster.set",
                                          {"copies": args.copies, "min_copies": args.min_copies}))
        print(f"epoch {d['epoch']}: copies {d['copies']}, min_copies {d['min_copies']}")
    return 0


def _format(args: argparse.Namespace) -> int:
    """Format a cluster; the secret file is written only once the peers accepted it."""
    if os.path.exists(args.secret_file) and not args.force:
        raise VdifsError(f"{args.secret_file} exists (a cluster was formatted with it); "
                         "use --force or another --secret-file", code=errno.EEXIST)
    if args.copies < 1:
        raise VdifsError("--copies must be at least 1", code=errno.EINVAL)
    min_copies = args.min_copies or (args.copies // 2 + 1)
    if not 1 <= min_copies <= args.copies:
        raise VdifsError("--min-copies must be between 1 and --copies", code=errno.EINVAL)
    creds = Credentials.new()

    async def go(pool: RpcPool) -> dict[str, Any]:
        client = RpcClient(args.address, None, pool.nursery)
        try:
            result: dict[str, Any] = await client.call(
                "cluster.format", {"cluster_id": creds.cluster_id, "secret": creds.secret,
                                   "copies": args.copies, "min_copies": min_copies}, timeout=FORMAT_TIMEOUT)
            return result
        finally:
            await client.aclose()

    cmap = ClusterMap.from_dict(run_with_pool(go, None))
    write_credentials(args.secret_file, creds)
    print(f"formatted cluster {cmap.cluster_id}: {len(cmap.peers)} peers, copies {cmap.copies}, "
          f"min_copies {cmap.min_copies}, meta peers {len(cmap.meta)}")
    print(f"secret written to {args.secret_file}: keep it for administration and new peers; give each "
          "hypervisor a mount credential ('vdifs cluster credential mount NAME -o FILE')")
    return 0


async def cluster_info(pool: RpcPool, addresses: list[str]) -> dict[str, Any]:
    """The cluster map with each peer's space and recovery state, asked of every peer at once."""
    cmap = ClusterMap.from_dict(await first_answer(pool, addresses, "cluster.map"))
    peers: list[dict[str, Any]] = []

    async def one(p: Any) -> None:
        row = {**p.to_dict(), "meta": p.peer_id in cmap.meta, "reachable": False,
               "total": 0, "free": 0}
        try:
            info = await pool.call(p.address, "peer.info", timeout=PEER_INFO_TIMEOUT)
            row.update(reachable=True, total=info["total"], free=info["free"], epoch=info["epoch"],
                       recovery=info.get("recovery", {}), answered_at_once=info.get("answered_at_once", 0),
                       relayed=info.get("relayed", 0), bytes_read=info.get("bytes_read", 0), leak_passes=info.get("leak_passes", 0),
                       leaks_collected=info.get("leaks_collected", 0))
        except VdifsError as e:
            row["error"] = str(e)
        peers.append(row)

    async with trio.open_nursery() as nursery:
        for p in cmap.peers.values():
            nursery.start_soon(one, p)
    peers.sort(key=lambda r: r["address"])
    reachable = [r for r in peers if r["reachable"]]
    total = sum(r["total"] for r in reachable)
    free = sum(r["free"] for r in reachable)
    return {"cluster": cmap.cluster_id, "epoch": cmap.epoch, "copies": cmap.copies,
            "min_copies": cmap.min_copies, "peers": peers,
            "raw_total": total, "raw_free": free,
            "capacity": total // max(1, cmap.copies), "available": free // max(1, cmap.copies)}


def rate_eta(r: dict[str, Any]) -> str:
    """'  12.0 MB/s  ETA 0:42' from a peer's recovery state (empty until it has a rate)."""
    elapsed, done, total = r.get("elapsed", 0.0), r.get("done", 0), r.get("total", 0)
    if elapsed <= 0 or done <= 0:
        return ""
    eta = int((total - done) * elapsed / done)
    return f"  {r.get('bytes', 0) / elapsed / 1e6:.1f} MB/s  ETA {eta // 60}:{eta % 60:02d}"


def status_text(info: dict[str, Any]) -> str:
    """`cluster status` for people: peers up and down, what is left to recover."""
    peers = info["peers"]
    up = [p for p in peers if p["state"] == "up"]
    down = [p for p in peers if p["state"] != "up"]
    head = (f"cluster {info['cluster']}  epoch {info['epoch']}  peers {len(up)} up, {len(down)} down"
            f"{' (' + ', '.join(p['address'] for p in down) + ')' if down else ''}")
    recoveries = [p.get("recovery") or {} for p in peers]
    missing = sum(max(0, r.get("total", 0) - r.get("done", 0)) for r in recoveries
                  if r.get("running") or r.get("stopped"))
    if missing:
        head += f"\ndegraded: {missing} object replicas still to recover"
    rows = []
    for p in peers:
        r = p.get("recovery") or {}
        if not p["reachable"]:
            state = "unreachable"
        elif r.get("stopped"):
            state = r["stopped"]
        elif r.get("running"):
            state = f"recovering {progress_text(r.get('done', 0), r.get('total', 0))}"
            state += rate_eta(r)
        else:
            state = f"clean (epoch {r.get('epoch', '?')}, {r.get('recovered_total', 0)} objects recovered so far)"
        rows.append([p["peer_id"], p["address"], p["state"], state])
    return head + "\n\n" + table(rows, ["PEER", "ADDRESS", "MAP", "RECOVERY"])


def info_table(info: dict[str, Any]) -> str:
    """`cluster info` for people: settings, capacity, and a row per peer."""
    head = (f"cluster {info['cluster']}  epoch {info['epoch']}  copies {info['copies']} "
            f"(min {info['min_copies']})\n"
            f"capacity {format_size(info['capacity'])}, available {format_size(info['available'])} "
            f"(raw {format_size(info['raw_total'])} / {format_size(info['raw_free'])} free, divided by copies)\n")
    rows = [[r["peer_id"], r["address"], r["zone"] or "-", f"{r['weight']:g}",
             r["state"] if r["reachable"] else f"{r['state']} (unreachable)", "yes" if r["meta"] else "",
             format_size(r["total"]) if r["reachable"] else "-",
             format_size(r["total"] - r["free"]) if r["reachable"] else "-"] for r in info["peers"]]
    return head + "\n" + table(rows, ["PEER", "ADDRESS", "ZONE", "WEIGHT", "STATE", "META", "SIZE", "USED"])


async def join(pool: RpcPool, addresses: list[str], peer_addr: str, creds: Credentials) -> ClusterMap:
    """Add the peer at `peer_addr` to the map, then hand it the credentials and the map."""
    newcomer = RpcClient(peer_addr, None, pool.nursery)
    try:
        hello = await newcomer.call("peer.hello", timeout=HELLO_TIMEOUT)
        if hello["cluster"] is not None:
            raise VdifsError(f"{peer_addr} already belongs to cluster {hello['cluster']}", code=errno.EEXIST)
        info = {"peer_id": hello["peer"], "address": peer_addr, "zone": "", "weight": 1.0, "state": "up"}
        cmap = ClusterMap.from_dict(await first_answer(pool, addresses, "cluster.add_peer", {"peer": info}))
        await newcomer.call("cluster.adopt", {"cluster_id": creds.cluster_id, "secret": creds.secret,
                                              "map": cmap.to_dict()}, timeout=PEER_TIMEOUT)
        return cmap
    finally:
        await newcomer.aclose()


