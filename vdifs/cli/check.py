"""`vdifs cluster check [--repair]`: is every replica where placement says,
identical, and referenced by a map?"""

from __future__ import annotations

import argparse
from typing import Any

from vdifs.cli.common import Progress, first_answer, table
from vdifs.errors import VdifsError
from vdifs.meta.consensus import DIRECTORY_KEY, MetaClient
from vdifs.meta.credentials import Credentials
from vdifs.model.cluster import ClusterMap, PeerInfo
from vdifs.model.directory import Directory
from vdifs.model.ids import ObjectKind, data_oid, map_oid, unpack_oid
from vdifs.model.objmap import ObjectMap, is_allocated, map_chunks
from vdifs.model.placement import placement
from vdifs.wire import objlist
from vdifs.wire.rpc import RpcPool

LIST_TIMEOUT = 60.0  # seconds for a page of a peer's object list
OBJECT_TIMEOUT = 120.0  # seconds for digests of, fetching or pulling objects
DIGEST_BATCH = 256  # objects per obj.digest request
#: Seconds an object nobody points at must have been left unchanged before
#: --repair removes it: a writer creates an object before a map names it.
LEAK_GRACE = 3600


def add_parser(actions: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:  # type: ignore[type-arg]
    """The `cluster check` action."""
    ck = actions.add_parser("check", parents=parents, help="verify every object's replicas (places and content)",
                            description="Check that every object of every VDI has its copies on the peers "
                                        "placement names, with identical content (sha256 of each replica), "
                                        "and that every object is referenced by a map and every referenced "
                                        "one exists. Exit status 1 if problems remain.")
    ck.add_argument("--repair", action="store_true",
                    help="replace missing or differing replicas with the majority's copy, and remove "
                         "leaked objects (no map points at them, or their vid is unknown) that have not "
                         "changed for --grace seconds")
    ck.add_argument("--grace", type=int, default=LEAK_GRACE, metavar="SECONDS",
                    help=f"how long a leaked object must have been left alone before --repair removes it "
                         f"(default {LEAK_GRACE})")
    ck.add_argument("--json", action="store_true", help="machine-readable output")


async def check(pool: RpcPool, addresses: list[str], creds: Credentials, repair: bool,
                grace: int = LEAK_GRACE) -> dict[str, Any]:
    """Every object of every VDI: on the peers placement names, identical
    everywhere (sha256 of each replica); with `repair`, replace the missing
    and differing replicas with the majority's copy. Then whether every
    object is referenced by a map and every referenced object exists; with
    `repair`, remove the leaked ones left alone for `grace` seconds.

    Leaks are judged from what was read after the objects were listed (the
    maps; the directory again for stray vids), so an object a writer made
    meanwhile either is named there or is younger than the listing; the
    peer checks the age again when it deletes (`obj.collect`)."""
    cmap = ClusterMap.from_dict(await first_answer(pool, addresses, "cluster.map"))
    meta = MetaClient("check", pool, cmap.meta_addresses())
    _version, raw = await meta.register(DIRECTORY_KEY).get()
    directory = Directory.decode(raw)
    up = {p.peer_id: p for p in cmap.up_peers()}
    problems: list[dict[str, Any]] = []
    checked = 0
    progress = Progress("checked", None, amount=lambda done, _total: f"{done} objects")
    present: dict[int, tuple[str, dict[int, set[str]]]] = {}  # data vid -> (label, oid -> holders)
    for name, data_vid, copies in directory.data_vids():
        holders: dict[int, set[str]] = {}
        present[data_vid] = (name, holders)
        for pid, p in up.items():
            async def call(args: dict[str, Any], address: str = p.address) -> dict[str, Any]:
                reply: dict[str, Any] = await pool.call(address, "obj.list", {**args, "epoch": cmap.epoch},
                                                        timeout=LIST_TIMEOUT)
                return reply

            for oid in await objlist.list_all(call, data_vid):
                holders.setdefault(oid, set()).add(pid)
        digests: dict[int, dict[str, str | None]] = {oid: {} for oid in holders}
        for pid, p in up.items():
            mine = [oid for oid, hs in holders.items() if pid in hs]
            for i in range(0, len(mine), DIGEST_BATCH):
                got = await pool.call(p.address, "obj.digest", {"oids": mine[i:i + DIGEST_BATCH]},
                                      timeout=OBJECT_TIMEOUT)
                for oid, d in got.items():
                    digests[int(oid, 16)][pid] = d
        for oid in sorted(holders):
            checked += 1
            progress.update(checked)
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
    progress.close()
    refs = await referenced(pool, directory, present, up)

    def leaked(oid: int) -> bool:
        kind, vid, index = unpack_oid(oid)
        return kind == ObjectKind.DATA and (vid, index) not in refs

    if repair:
        for prob in problems:
            if prob["source"] is None or leaked(int(prob["oid"], 16)):
                continue  # a leak is removed below, not copied to more peers
            source = up[prob["source"]].address
            for pid in prob["missing"] + prob["differing"]:
                await pool.call(up[pid].address, "obj.pull", {"oid": int(prob["oid"], 16), "source": source,
                                                            "epoch": cmap.epoch}, timeout=OBJECT_TIMEOUT)
            prob["repaired"] = True
    left = [p for p in problems if not p["repaired"] and not leaked(int(p["oid"], 16))]
    unreferenced: list[dict[str, Any]] = []
    lost: list[dict[str, Any]] = []
    for data_vid, (label, holders) in present.items():
        for oid in sorted(holders):
            if leaked(oid):
                unreferenced.append({"vdi": label, "oid": f"{oid:016x}", "collected": False})
    for vid, index in sorted(refs):
        if vid not in present or data_oid(vid, index) not in present[vid][1]:
            lost.append({"oid": f"{data_oid(vid, index):016x}"})
    holding: dict[int, set[str]] = {}  # vid -> peers with objects of it
    for pid, p in up.items():
        for v in await pool.call(p.address, "obj.vids", {"epoch": cmap.epoch}, timeout=LIST_TIMEOUT):
            holding.setdefault(int(v), set()).add(pid)
    _version, raw = await meta.register(DIRECTORY_KEY).get()  # after the listing: see above
    in_use = Directory.decode(raw).vids_in_use() | directory.vids_in_use()
    stray = sorted(set(holding) - in_use)
    collected = kept = 0
    if repair:
        for leak in unreferenced:
            oid = int(leak["oid"], 16)
            done = [await collect(pool, up[pid].address, oid, grace, cmap.epoch)
                    for pid in sorted(present[unpack_oid(oid)[1]][1][oid])]
            leak["collected"] = all(done)
            collected, kept = collected + sum(done), kept + done.count(False)
        for vid in stray:
            for pid in sorted(holding[vid]):
                async def call(args: dict[str, Any], address: str = up[pid].address) -> dict[str, Any]:
                    reply: dict[str, Any] = await pool.call(address, "obj.list", {**args, "epoch": cmap.epoch},
                                                            timeout=LIST_TIMEOUT)
                    return reply

                for oid in await objlist.list_all(call, vid):
                    ok = await collect(pool, up[pid].address, oid, grace, cmap.epoch)
                    collected, kept = collected + ok, kept + (not ok)
    leaks_left = [u for u in unreferenced if not u.get("collected")]
    return {"epoch": cmap.epoch, "vdis": len(directory.vdis), "objects": checked,
            "problems": problems,
            "problems_left": len(left) + len(lost) + len(leaks_left) + (len(stray) if kept or not repair else 0),
            "unreferenced": unreferenced, "lost": lost, "stray_vids": stray,
            "collected": collected, "kept_young": kept, "grace": grace}


async def collect(pool: RpcPool, address: str, oid: int, grace: int, epoch: int) -> bool:
    """Ask one peer to remove a leaked object older than `grace` seconds."""
    done: bool = await pool.call(address, "obj.collect", {"oid": oid, "older_than": grace, "epoch": epoch},
                                 timeout=OBJECT_TIMEOUT)
    return done


async def referenced(pool: RpcPool, directory: Directory, present: dict[int, tuple[str, dict[int, set[str]]]],
                     up: dict[str, PeerInfo]) -> set[tuple[int, int]]:
    """(data vid, index) of every object some live map (VDI or snapshot)
    points at, from the map objects themselves."""
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
                    raw = await pool.call(up[pid].address, "obj.fetch", {"oid": oid}, timeout=OBJECT_TIMEOUT)
                except VdifsError:
                    continue
                objmap.load_chunk(chunk, raw[:length])
                break
        refs.update((e, i) for i, e in objmap.entries() if is_allocated(e))
    return refs


def check_text(report: dict[str, Any]) -> str:
    """The report of `check` for people."""
    head = (f"checked {report['objects']} objects of {report['vdis']} VDIs at epoch {report['epoch']}: "
            f"{len(report['problems'])} with missing or differing replicas")
    if not report["problems"]:
        head += " - all replicas where placement says, identical"
    out = [head]
    if report["problems"]:
        rows = [[p["vdi"], p["oid"], ",".join(p["missing"]) or "-", ",".join(p["differing"]) or "-",
                 "repaired" if p["repaired"] else ("no good copy" if p["source"] is None else "needs --repair")]
                for p in report["problems"]]
        out.append("\n" + table(rows, ["VDI", "OBJECT", "MISSING ON", "DIFFERS ON", "STATE"]))
    if report["lost"]:
        out.append(f"LOST: {len(report['lost'])} objects a map points at exist on no peer: "
                   + ", ".join(p["oid"] for p in report["lost"][:20]))
    if report["unreferenced"]:
        out.append(f"{len(report['unreferenced'])} objects no map points at (leaked, or being written or "
                   "freed right now: run again when quiet): "
                   + ", ".join(f"{p['vdi']}:{p['oid']}" for p in report["unreferenced"][:20]))
    if report["stray_vids"]:
        out.append(f"objects of vids the directory does not know: {report['stray_vids'][:20]}")
    if report.get("collected") or report.get("kept_young"):
        out.append(f"removed {report['collected']} leaked object replicas; kept {report['kept_young']} "
                   f"changed within the last {report['grace']} s (run again later)")
    if not (report["lost"] or report["unreferenced"] or report["stray_vids"]):
        out.append("every object is referenced by a map, and every referenced object exists")
    return "\n".join(out)
