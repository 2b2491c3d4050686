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

from vdifs.errors import VdifsError
from vdifs.meta.credentials import Credentials, default_secret_file, read_credentials, write_credentials
from vdifs.model.cluster import ClusterMap
from vdifs.model.ids import ObjectKind, data_oid, map_oid, unpack_oid
from vdifs.model.sizes import format_size
from vdifs.wire import objlist
from vdifs.wire.rpc import RpcClient, RpcPool

T = TypeVar("T")


def cluster_addresses(text: str | None) -> list[str]:
    text = text or os.environ.get("VDIFS_CLUSTER", "")
    addresses = [a.strip() for a in text.split(",") if a.strip()]
    if not addresses:
        raise VdifsError("no cluster address: pass --cluster HOST:PORT[,...] or set VDIFS_CLUSTER",
                         code=errno.EINVAL)
    return addresses


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("peer", help="run a storage peer (foreground)",
                       description="Run a storage peer: serves the objects in --store and takes part "
                                   "in membership and consensus. Without a cluster yet, --join ADDR "
                                   "waits at ADDR for 'vdifs cluster format'; to join a formatted "
                                   "cluster pass --join and --secret-file.")
    p.add_argument("--store", required=True, metavar="DIR", help="directory holding this peer's objects")
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to serve on")
    p.add_argument("--join", metavar="HOST:PORT", help="a peer of the cluster to join")
    p.add_argument("--zone", default="", metavar="Z", help="failure zone (replicas go to distinct zones)")
    p.add_argument("--weight", type=float, default=1.0, metavar="W", help="relative share of data (default 1)")
    p.add_argument("--secret-file", metavar="F", help="cluster secret file, to join a formatted cluster")
    p.add_argument("--recovery-rate", type=float, default=100.0, metavar="MB/S",
                   help="limit for copying objects after a peer failure or join (default 100 MB/s)")
    p.add_argument("--recovery-reserve", default="1G", metavar="SIZE",
                   help="free space recovery never uses (default 1G)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    c = sub.add_parser("cluster", help="administer a cluster",
                       description="Administer a cluster of peers. --cluster (or VDIFS_CLUSTER) names "
                                   "any of its peers; --secret-file the secret 'format' wrote.")
    cs = c.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)

    def common(q: argparse.ArgumentParser, *, cluster: bool = True) -> None:
        if cluster:
            q.add_argument("--cluster", metavar="ADDR[,ADDR...]", help="peers of the cluster (default: $VDIFS_CLUSTER)")
        q.add_argument("--secret-file", default=default_secret_file(), metavar="F",
                       help=f"cluster secret file (default: {default_secret_file()})")

    f = cs.add_parser("format", help="create a cluster from a peer and the peers waiting at it")
    f.add_argument("address", metavar="ADDR", help="a running peer; the peers that --join'ed it come along")
    f.add_argument("--copies", type=int, default=3, metavar="N", help="default replicas per object (default 3)")
    f.add_argument("--min-copies", type=int, metavar="M", help="replicas needed to accept writes (default: majority of N)")
    f.add_argument("--force", action="store_true", help="overwrite an existing secret file")
    common(f, cluster=False)
    i = cs.add_parser("info", help="epoch, peers, zones, capacity and use")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    common(i)
    ck = cs.add_parser("check", help="verify every object's replicas (places and content)",
                       description="Check that every object of every VDI has its copies on the peers "
                                   "placement names, with identical content (sha256 of each replica). "
                                   "Exit status 1 if problems remain.")
    ck.add_argument("--repair", action="store_true",
                    help="replace missing or differing replicas with the majority's copy")
    ck.add_argument("--json", action="store_true", help="machine-readable output")
    common(ck)
    ss = cs.add_parser("status", help="peers up/down and recovery progress")
    ss.add_argument("--json", action="store_true", help="machine-readable output")
    ss.add_argument("--watch", action="store_true", help="refresh every second until recovery is done")
    common(ss)
    j = cs.add_parser("join", help="add a running peer that has no cluster yet")
    j.add_argument("peer", metavar="PEER_ADDR")
    common(j)
    lv = cs.add_parser("leave", help="remove a peer from the cluster map")
    lv.add_argument("peer", metavar="PEER", help="peer id or address")
    common(lv)
    rm = cs.add_parser("replace-meta", help="swap a dead meta (consensus) peer for a live one",
                       description="Swap a meta peer that the cluster marked down, and that must never "
                                   "come back, for a live peer that is not meta yet; the new one gets a "
                                   "copy of every register. OLD and NEW are peer ids or addresses.")
    rm.add_argument("old", metavar="OLD")
    rm.add_argument("new", metavar="NEW")
    common(rm)
    st = cs.add_parser("set", help="change cluster settings")
    st.add_argument("--copies", type=int, metavar="N")
    st.add_argument("--min-copies", type=int, metavar="M")
    common(st)


def _run(fn: Callable[[RpcPool], Awaitable[T]], secret: bytes | None, cluster_id: str | None = None) -> T:
    """Run fn with a connection pool; its error comes out as itself (not
    wrapped in an exception group), so the CLI can print it as one line."""
    async def main() -> T:
        outcome: list[T] = []
        error: Exception | None = None
        async with trio.open_nursery() as nursery:
            pool = RpcPool(secret, nursery, cluster_id=cluster_id)
            try:
                outcome.append(await fn(pool))
            except Exception as e:
                error = e
            finally:
                await pool.aclose()
                nursery.cancel_scope.cancel()
        if error is not None:
            raise error
        return outcome[0]
    return trio.run(main)


async def _first(pool: RpcPool, addresses: list[str], op: str, args: dict[str, Any] | None = None,
                 timeout: float = 30.0) -> Any:
    errors = []
    for a in addresses:
        try:
            return await pool.call(a, op, args, timeout=timeout)
        except VdifsError as e:
            errors.append(f"{a}: {e}")
    raise VdifsError("no peer answered: " + "; ".join(errors), code=errno.EHOSTUNREACH)


def cmd_peer(args: argparse.Namespace) -> int:
    from vdifs.cli.main import setup_logging
    from vdifs.peer.daemon import PeerDaemon

    setup_logging(args.log_level, sys.stderr)
    from vdifs.model.sizes import parse_size

    try:
        reserve = parse_size(args.recovery_reserve)
    except ValueError as e:
        raise VdifsError(f"--recovery-reserve: {e}", code=errno.EINVAL) from None
    daemon = PeerDaemon(args.store, args.listen, join=args.join, zone=args.zone, weight=args.weight,
                        secret_file=args.secret_file, recovery_rate=args.recovery_rate * 1e6,
                        recovery_reserve=reserve)
    trio.run(daemon.run)
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    action = args.cluster_command
    if action == "format":
        return _format(args)
    creds = read_credentials(args.secret_file)
    addresses = cluster_addresses(args.cluster)
    if action == "info":
        info = _run(lambda pool: _info(pool, addresses), creds.secret, creds.cluster_id)
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            print(_info_table(info))
    elif action == "check":
        report = _run(lambda pool: _check(pool, addresses, creds, args.repair), creds.secret, creds.cluster_id)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print(_check_text(report))
        return 1 if report["problems_left"] else 0
    elif action == "status":
        while True:
            info = _run(lambda pool: _info(pool, addresses), creds.secret, creds.cluster_id)
            if args.json:
                print(json.dumps(info, indent=2))
                break
            print(_status_text(info), flush=True)
            busy = any(r.get("recovery", {}).get("running") for r in info["peers"])
            if not args.watch or not busy:
                break
            time.sleep(1)
            print()
    elif action == "join":
        cmap = _run(lambda pool: _join(pool, addresses, args.peer, creds), creds.secret, creds.cluster_id)
        print(f"added {args.peer}: epoch {cmap.epoch}, {len(cmap.peers)} peers")
    elif action == "leave":
        d = _run(lambda pool: _first(pool, addresses, "cluster.remove_peer", {"peer": args.peer}),
                 creds.secret, creds.cluster_id)
        print(f"removed {args.peer}: epoch {d['epoch']}, {len(d['peers'])} peers")
    elif action == "replace-meta":
        d = _run(lambda pool: _first(pool, addresses, "cluster.replace_meta", {"old": args.old, "new": args.new},
                                     timeout=300), creds.secret, creds.cluster_id)
        print(f"epoch {d['epoch']}: meta peers {', '.join(d['meta'])}; "
              f"{d['copied']} of {d['registers']} registers copied to {args.new}")
    elif action == "set":
        if args.copies is None and args.min_copies is None:
            raise VdifsError("nothing to set: give --copies and/or --min-copies", code=errno.EINVAL)
        d = _run(lambda pool: _first(pool, addresses, "cluster.set",
                                     {"copies": args.copies, "min_copies": args.min_copies}),
                 creds.secret, creds.cluster_id)
        print(f"epoch {d['epoch']}: copies {d['copies']}, min_copies {d['min_copies']}")
    return 0


def _format(args: argparse.Namespace) -> int:
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
                                   "copies": args.copies, "min_copies": min_copies}, timeout=60)
            return result
        finally:
            await client.aclose()

    cmap = ClusterMap.from_dict(_run(go, None))
    write_credentials(args.secret_file, creds)
    print(f"formatted cluster {cmap.cluster_id}: {len(cmap.peers)} peers, copies {cmap.copies}, "
          f"min_copies {cmap.min_copies}, meta peers {len(cmap.meta)}")
    print(f"secret written to {args.secret_file} (copy it to every hypervisor and new peer)")
    return 0


async def _info(pool: RpcPool, addresses: list[str]) -> dict[str, Any]:
    cmap = ClusterMap.from_dict(await _first(pool, addresses, "cluster.map"))
    peers: list[dict[str, Any]] = []

    async def one(p: Any) -> None:
        row = {**p.to_dict(), "meta": p.peer_id in cmap.meta, "reachable": False,
               "total": 0, "free": 0}
        try:
            info = await pool.call(p.address, "peer.info", timeout=5)
            row.update(reachable=True, total=info["total"], free=info["free"], epoch=info["epoch"],
                       recovery=info.get("recovery", {}))
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


def _bar(done: int, total: int, width: int = 24) -> str:
    frac = 1.0 if total == 0 else done / total
    fill = int(frac * width)
    return "[" + "#" * fill + "." * (width - fill) + f"] {frac:4.0%}"


def _rate_eta(r: dict[str, Any]) -> str:
    """'  12.0 MB/s  ETA 0:42' from a peer's recovery state (empty until it has a rate)."""
    elapsed, done, total = r.get("elapsed", 0.0), r.get("done", 0), r.get("total", 0)
    if elapsed <= 0 or done <= 0:
        return ""
    eta = int((total - done) * elapsed / done)
    return f"  {r.get('bytes', 0) / elapsed / 1e6:.1f} MB/s  ETA {eta // 60}:{eta % 60:02d}"


def _status_text(info: dict[str, Any]) -> str:
    from vdifs.cli.main import _table

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
            state = f"recovering {_bar(r.get('done', 0), r.get('total', 0))} {r.get('done', 0)}/{r.get('total', 0)}"
            state += _rate_eta(r)
        else:
            state = f"clean (epoch {r.get('epoch', '?')}, {r.get('recovered_total', 0)} objects recovered so far)"
        rows.append([p["peer_id"], p["address"], p["state"], state])
    return head + "\n\n" + _table(rows, ["PEER", "ADDRESS", "MAP", "RECOVERY"])


def _info_table(info: dict[str, Any]) -> str:
    from vdifs.cli.main import _table

    head = (f"cluster {info['cluster']}  epoch {info['epoch']}  copies {info['copies']} "
            f"(min {info['min_copies']})\n"
            f"capacity {format_size(info['capacity'])}, available {format_size(info['available'])} "
            f"(raw {format_size(info['raw_total'])} / {format_size(info['raw_free'])} free, divided by copies)\n")
    rows = [[r["peer_id"], r["address"], r["zone"] or "-", f"{r['weight']:g}",
             r["state"] if r["reachable"] else f"{r['state']} (unreachable)", "yes" if r["meta"] else "",
             format_size(r["total"]) if r["reachable"] else "-",
             format_size(r["total"] - r["free"]) if r["reachable"] else "-"] for r in info["peers"]]
    return head + "\n" + _table(rows, ["PEER", "ADDRESS", "ZONE", "WEIGHT", "STATE", "META", "SIZE", "USED"])


async def _join(pool: RpcPool, addresses: list[str], peer_addr: str, creds: Credentials) -> ClusterMap:
    newcomer = RpcClient(peer_addr, None, pool.nursery)
    try:
        hello = await newcomer.call("peer.hello", timeout=10)
        if hello["cluster"] is not None:
            raise VdifsError(f"{peer_addr} already belongs to cluster {hello['cluster']}", code=errno.EEXIST)
        info = {"peer_id": hello["peer"], "address": peer_addr, "zone": "", "weight": 1.0, "state": "up"}
        cmap = ClusterMap.from_dict(await _first(pool, addresses, "cluster.add_peer", {"peer": info}))
        await newcomer.call("cluster.adopt", {"cluster_id": creds.cluster_id, "secret": creds.secret,
                                              "map": cmap.to_dict()}, timeout=30)
        return cmap
    finally:
        await newcomer.aclose()


async def _check(pool: RpcPool, addresses: list[str], creds: Credentials, repair: bool) -> dict[str, Any]:
    from vdifs.meta.consensus import DIRECTORY_KEY, MetaClient
    from vdifs.model.directory import Directory
    from vdifs.model.placement import placement

    cmap = ClusterMap.from_dict(await _first(pool, addresses, "cluster.map"))
    meta = MetaClient("check", pool, cmap.meta_addresses())
    _version, raw = await meta.register(DIRECTORY_KEY).get()
    directory = Directory.decode(raw)
    up = {p.peer_id: p for p in cmap.up_peers()}
    problems: list[dict[str, Any]] = []
    checked = 0
    show = sys.stderr.isatty()
    present: dict[int, tuple[str, dict[int, set[str]]]] = {}  # data vid -> (label, oid -> holders)
    for name, data_vid, copies in directory.data_vids():
        holders: dict[int, set[str]] = {}
        present[data_vid] = (name, holders)
        for pid, p in up.items():
            async def call(args: dict[str, Any], address: str = p.address) -> dict[str, Any]:
                reply: dict[str, Any] = await pool.call(address, "obj.list", {**args, "epoch": cmap.epoch},
                                                        timeout=60)
                return reply

            for oid in await objlist.list_all(call, data_vid):
                holders.setdefault(oid, set()).add(pid)
        digests: dict[int, dict[str, str | None]] = {oid: {} for oid in holders}
        for pid, p in up.items():
            mine = [oid for oid, hs in holders.items() if pid in hs]
            for i in range(0, len(mine), 256):
                got = await pool.call(p.address, "obj.digest", {"oids": mine[i:i + 256]}, timeout=120)
                for oid, d in got.items():
                    digests[int(oid, 16)][pid] = d
        for oid in sorted(holders):
            checked += 1
            if show and checked % 64 == 0:
                print(f"\rchecked {checked} objects", end="", file=sys.stderr, flush=True)
            want = placement(cmap, oid, copies)
            ds = digests[oid]
            counts: dict[str, int] = {}
            for d in ds.values():
                if d is not None:
                    counts[d] = counts.get(d, 0) + 1
            good = max(counts, key=lambda d: counts[d]) if counts else None
            bad = [pid for pid in want if ds.get(pid) != good]
            if bad:
                problems.append({"vdi": name, "oid": f"{oid:016x}", "expected": want,
                                 "missing": [pid for pid in bad if pid not in ds],
                                 "differing": [pid for pid in bad if pid in ds],
                                 "source": next((pid for pid, d in ds.items() if d == good), None),
                                 "repaired": False})
    if show and checked:
        print(file=sys.stderr)
    if repair:
        for prob in problems:
            if prob["source"] is None:
                continue
            source = up[prob["source"]].address
            for pid in prob["missing"] + prob["differing"]:
                await pool.call(up[pid].address, "obj.pull", {"oid": int(prob["oid"], 16), "source": source,
                                                            "epoch": cmap.epoch}, timeout=120)
            prob["repaired"] = True
    left = [p for p in problems if not p["repaired"]]
    refs = await _referenced(pool, directory, present, up)
    unreferenced, lost = [], []
    for data_vid, (label, holders) in present.items():
        for oid in sorted(holders):
            kind, _, index = unpack_oid(oid)
            if kind == ObjectKind.DATA and (data_vid, index) not in refs:
                unreferenced.append({"vdi": label, "oid": f"{oid:016x}"})
    for vid, index in sorted(refs):
        if vid not in present or data_oid(vid, index) not in present[vid][1]:
            lost.append({"oid": f"{data_oid(vid, index):016x}"})
    keep = {vid for _, vid, _ in directory.data_vids()} | directory.deleting | set(directory.reserved)
    stray: set[int] = set()
    for p in up.values():
        stray |= {int(v) for v in await pool.call(p.address, "obj.vids", {"epoch": cmap.epoch}, timeout=60)} - keep
    return {"epoch": cmap.epoch, "vdis": len(directory.vdis), "objects": checked,
            "problems": problems, "problems_left": len(left) + len(lost) + len(unreferenced) + len(stray),
            "unreferenced": unreferenced, "lost": lost, "stray_vids": sorted(stray)}


async def _referenced(pool: RpcPool, directory: Any, present: dict[int, tuple[str, dict[int, set[str]]]],
                      up: dict[str, Any]) -> set[tuple[int, int]]:
    """(data vid, index) of every object some live map (VDI or snapshot)
    points at, from the map objects themselves."""
    from vdifs.model.objmap import ObjectMap, is_allocated, map_chunks

    refs: set[tuple[int, int]] = set()
    sizes = {vid: size for family in {r.family for r in directory.vdis.values()}
             for vid, size in directory.live_maps(family)}
    for data_vid, size in sizes.items():
        objmap = ObjectMap()
        for chunk, length in map_chunks(size, directory.object_size_of(data_vid)):
            oid = map_oid(data_vid, chunk)
            holders = present.get(data_vid, ("", {}))[1].get(oid, set())
            for pid in sorted(holders):
                try:
                    raw = await pool.call(up[pid].address, "obj.fetch", {"oid": oid}, timeout=120)
                except VdifsError:
                    continue
                objmap.load_chunk(chunk, raw[:length])
                break
        refs.update((e, i) for i, e in objmap.entries() if is_allocated(e))
    return refs


def _check_text(report: dict[str, Any]) -> str:
    from vdifs.cli.main import _table

    head = (f"checked {report['objects']} objects of {report['vdis']} VDIs at epoch {report['epoch']}: "
            f"{len(report['problems'])} with missing or differing replicas")
    if not report["problems"]:
        head += " - all replicas where placement says, identical"
    out = [head]
    if report["problems"]:
        rows = [[p["vdi"], p["oid"], ",".join(p["missing"]) or "-", ",".join(p["differing"]) or "-",
                 "repaired" if p["repaired"] else ("no good copy" if p["source"] is None else "needs --repair")]
                for p in report["problems"]]
        out.append("\n" + _table(rows, ["VDI", "OBJECT", "MISSING ON", "DIFFERS ON", "STATE"]))
    if report["lost"]:
        out.append(f"LOST: {len(report['lost'])} objects a map points at exist on no peer: "
                   + ", ".join(p["oid"] for p in report["lost"][:20]))
    if report["unreferenced"]:
        out.append(f"{len(report['unreferenced'])} objects no map points at (leaked, or being written or "
                   "freed right now: run again when quiet): "
                   + ", ".join(f"{p['vdi']}:{p['oid']}" for p in report["unreferenced"][:20]))
    if report["stray_vids"]:
        out.append(f"objects of vids the directory does not know: {report['stray_vids'][:20]}")
    if not (report["lost"] or report["unreferenced"] or report["stray_vids"]):
        out.append("every object is referenced by a map, and every referenced object exists")
    return "\n".join(out)
