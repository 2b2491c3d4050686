"""`vdifs cluster check [--repair]`: is every replica where placement says,
identical, and referenced by a map?"""

from __future__ import annotations

import argparse
from typing import Any

from vdifs.cli.common import Progress, first_answer, table
from vdifs.meta.consensus import MetaClient
from vdifs.meta.credentials import Credentials
from vdifs.model.cluster import ClusterMap
from vdifs.model.ids import ObjectKind, data_oid, unpack_oid
from vdifs.model.placement import placement
from vdifs.peer.recovery import recovery_settled
from vdifs.peer.sweep import (LEAK_GRACE, LIST_TIMEOUT, OBJECT_TIMEOUT, Holdings, find_and_collect, list_holders,
                              referenced)
from vdifs.wire.rpc import RpcPool

DIGEST_BATCH = 256  # objects per obj.digest request


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
    `repair`, remove the leaked ones left alone for `grace` seconds (the
    background leak pass's steps, `vdifs.peer.sweep`, which says why that is
    safe against writers)."""
    cmap = ClusterMap.from_dict(await first_answer(pool, addresses, "cluster.map"))
    meta = MetaClient("check", pool, cmap.meta_addresses())
    directory = await meta.read_directory()
    up = {p.peer_id: p for p in cmap.up_peers()}
    problems: list[dict[str, Any]] = []
    checked = 0
    progress = Progress("checked", None, amount=lambda done, _total: f"{done} objects")
    present: Holdings = {}
    for name, data_vid, copies in directory.data_vids():
        holders = await list_holders(pool, cmap, up, data_vid)
        present[data_vid] = (name, holders)
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
    # A peer back from down is up in the map before its recovery pass fetched
    # what changed meanwhile: its missing replicas are on their way.
    settling = not await recovery_settled(pool, cmap, timeout=LIST_TIMEOUT)
    refs = await referenced(pool, directory, present, up)

    def leaked(oid: int) -> bool:
        kind, vid, index = unpack_oid(oid)
        return kind == ObjectKind.DATA and (vid, index) not in refs.refs and vid not in refs.unread

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
    lost = [{"oid": f"{data_oid(vid, index):016x}"} for vid, index in sorted(refs.refs)
            if vid not in present or data_oid(vid, index) not in present[vid][1]]
    leaks = await find_and_collect(pool, cmap, meta, directory, present, refs, grace, repair=repair)
    leaks_left = [u for u in leaks.unreferenced if not u.get("collected")]
    stray_left = len(leaks.stray_vids) if leaks.kept_young or not repair else 0
    return {"epoch": cmap.epoch, "vdis": len(directory.vdis), "objects": checked,
            "problems": problems,
            "problems_left": len(left) + len(lost) + len(leaks_left) + stray_left + len(refs.unread),
            "unreferenced": leaks.unreferenced, "lost": lost, "stray_vids": leaks.stray_vids,
            "unread_maps": sorted(refs.unread),
            "collected": leaks.collected, "kept_young": leaks.kept_young, "kept_in_use": leaks.kept_in_use,
            "recovering": settling or leaks.unsettled, "grace": grace}


def problem_state(problem: dict[str, Any], recovering: bool) -> str:
    """What became of (or is to be done about) one object's bad replicas."""
    if problem["repaired"]:
        return "repaired"
    if problem["source"] is None:
        return "no good copy"
    if recovering and not problem["differing"]:
        return "recovering"
    return "needs --repair"


def check_text(report: dict[str, Any]) -> str:
    """The report of `check` for people."""
    head = (f"checked {report['objects']} objects of {report['vdis']} VDIs at epoch {report['epoch']}: "
            f"{len(report['problems'])} with missing or differing replicas")
    if not report["problems"]:
        head += " - all replicas where placement says, identical"
    out = [head]
    if report["problems"]:
        rows = [[p["vdi"], p["oid"], ",".join(p["missing"]) or "-", ",".join(p["differing"]) or "-",
                 problem_state(p, report.get("recovering", False))] for p in report["problems"]]
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
    if report.get("unread_maps"):
        out.append(f"some map objects could not be read: references unknown, no leak judged "
                   f"(vids {report['unread_maps'][:20]})")
    if report.get("collected") or report.get("kept_young"):
        out.append(f"removed {report['collected']} leaked object replicas; kept {report['kept_young']} "
                   f"changed within the last {report['grace']} s (run again later)")
    if report.get("kept_in_use"):
        out.append(f"kept {report['kept_in_use']} leaked objects of VDIs open for writing or shared (a writer's "
                   "map may not be stored yet): run again when they are closed")
    if report.get("recovering"):
        out.append("recovery is still running: replicas may be missing until it ends, and no leak is removed "
                   "(run again when `cluster status` is clean)")
    if not (report["lost"] or report["unreferenced"] or report["stray_vids"] or report.get("unread_maps")):
        out.append("every object is referenced by a map, and every referenced object exists")
    return "\n".join(out)
