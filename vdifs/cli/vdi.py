"""`vdifs vdi ...`: managing VDIs through the control socket of a running mount."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import trio

from vdifs.cli import diff
from vdifs.cli.common import (MAP_TIMEOUT, RESIZE_TIMEOUT, CliError, Parser, Progress, control_socket, format_time,
                               size_arg, table)
from vdifs.client.snapshots import FLATTEN_RATE
from vdifs.control import caller
from vdifs.errors import VdifsError
from vdifs.model.sizes import format_size

JOB_TIMEOUT = 7 * 24 * 3600.0  # a background job at its rate (flatten): as long as it takes
JOB_POLL = 0.5  # seconds between progress reports of a job
JOB_POLL_TIMEOUT = 10.0


def add_parser(sub: argparse._SubParsersAction, store_default: str) -> None:  # type: ignore[type-arg]
    where_help = (f"the one running vdifs mount; with none, the mount of the store {store_default}")
    v = sub.add_parser("vdi", help="manage VDIs through a running mount",
                       description="Manage VDIs through the control channel of a running mount: the "
                                   "one named by -m or --store (before or after the ACTION), else the "
                                   f"one running vdifs mount, else the mount of {store_default}.")
    add_where(v, None, where_help)
    where = Parser(add_help=False)
    add_where(where, argparse.SUPPRESS, where_help)
    vs = v.add_subparsers(dest="vdi_command", metavar="ACTION", required=True)

    def action(name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
        return vs.add_parser(name, help=help, description=description or help[:1].upper() + help[1:] + ".",
                             parents=[where])

    vl = action("list", "list VDIs")
    vl.add_argument("--json", action="store_true", help="machine-readable output")
    vi = action("info", "show one VDI")
    vi.add_argument("name", metavar="NAME")
    vi.add_argument("--json", action="store_true", help="machine-readable output")
    vc = action("create", "create an empty (sparse) VDI")
    vc.add_argument("name", metavar="NAME")
    vc.add_argument("size", metavar="SIZE", type=size_arg, help="size with optional K/M/G/T suffix")
    vc.add_argument("--copies", type=int, metavar="N", help="replicas of each object (default: the pool's)")
    vc.add_argument("--shared", action="store_true",
                    help="any number of writers on any mounts, no lease (for cluster file systems: OCFS2, GFS2)")
    vd = action("delete", "delete a VDI and free its space",
                "Delete a VDI. One with snapshots is refused unless --snapshots says to "
                "delete them too; clones made from them keep working.")
    vd.add_argument("name", metavar="NAME")
    vd.add_argument("--snapshots", action="store_true", help="delete its snapshots as well")
    vr = action("resize", "grow or shrink a VDI (shrinking frees the objects past the end)")
    vr.add_argument("name", metavar="NAME")
    vr.add_argument("size", metavar="SIZE", type=size_arg, help="new size with optional K/M/G/T suffix")
    vk = action("lock-info", "who holds a VDI's write lease (clusters)")
    vk.add_argument("name", metavar="NAME")
    vk.add_argument("--json", action="store_true", help="machine-readable output")
    vb = action("break-lock", "fence a VDI's lease holder and free the lease (clusters)",
                "For an operator who knows the holder is dead: the holder is fenced "
                "on every peer (its writes fail from now on) and the lease is freed.")
    vb.add_argument("name", metavar="NAME")
    vn = action("rename", "rename a VDI (replaces an existing NEW)")
    vn.add_argument("old", metavar="OLD")
    vn.add_argument("new", metavar="NEW")
    vsn = action("snapshot", "take a crash-consistent snapshot of a VDI (no data copied)",
                 "Freeze NAME as it is now, also while a VM writes to it through this "
                 "mount (its writes pause for the cut). The snapshot appears read-only "
                 "as MOUNT/.snapshots/NAME@SNAP; later writes copy only the objects they "
                 "touch.")
    vsn.add_argument("name", metavar="NAME")
    vsn.add_argument("snapshot", metavar="SNAP")
    vsd = action("snapshot-delete", "delete a snapshot (NAME@SNAP)",
                 "Delete a snapshot. Objects that clones or other snapshots still share "
                 "stay; the rest are freed in the background.")
    vsd.add_argument("target", metavar="NAME@SNAP")
    vcl = action("clone", "create a VDI that starts as a snapshot and shares its objects",
                 "Create NEW, a writable VDI whose content is NAME@SNAP. Nothing is "
                 "copied: NEW shares the snapshot's objects until it writes them.")
    vcl.add_argument("source", metavar="NAME@SNAP")
    vcl.add_argument("new", metavar="NEW")
    vcl.add_argument("--copies", type=int, metavar="N", help="replicas of NEW's own objects "
                                                             "(default: the snapshot's)")
    vrb = action("rollback", "make a VDI a snapshot's content again (not while in use)",
                 "Replace NAME's content with NAME@SNAP's. Refused while the VDI is open "
                 "for writing anywhere. Writes since the snapshot are lost.")
    vrb.add_argument("target", metavar="NAME@SNAP")
    vf = action("flatten", "copy a clone's shared objects into it, so it stands alone",
                "Copy every object NAME still shares with the snapshot it was cloned "
                "from into NAME, at most --rate per second, while NAME stays in use.")
    vf.add_argument("name", metavar="NAME")
    vf.add_argument("--rate", type=size_arg, default=FLATTEN_RATE, metavar="BYTES",
                    help=f"copy at most this much per second (default: {format_size(FLATTEN_RATE)})")
    vdf = action("diff", "list what changed between two snapshots (from the object maps)",
                 "The extents of NAME (or NAME@SNAP) that differ from snapshot FROM of "
                 "the same VDI (or from an empty VDI), object by object, read from the "
                 "object maps without reading data.")
    vdf.add_argument("target", metavar="NAME[@SNAP]")
    vdf.add_argument("--from", dest="since", metavar="SNAP", help="an older snapshot of the same VDI")
    vdf.add_argument("--json", action="store_true", help="machine-readable output")
    vdu = action("du", "space used by a VDI and each of its snapshots")
    vdu.add_argument("name", metavar="NAME")
    vdu.add_argument("--json", action="store_true", help="machine-readable output")
    diff.add_parsers(vs, [where])
    vt = action("tree", "show VDIs with their snapshots and clones")
    vt.add_argument("--json", action="store_true", help="machine-readable output")


def add_where(parser: argparse.ArgumentParser, default: Any, where_help: str) -> None:
    """-m/--store on `parser`. The vdi parser and every action take them, so
    they work before and after the ACTION; the actions' default is
    SUPPRESS so that a value given before the action is not reset by it."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--mount", "-m", default=default, metavar="MOUNTPOINT",
                       help=f"the mount to talk to (default: {where_help})")
    where.add_argument("--store", default=default, metavar="DIR",
                       help="the store of the mount to talk to")


class Control:
    """Requests to one mount's control socket, each in its own trio run."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, op: str, params: dict[str, Any] | None = None,
                 timeout: float = caller.DEFAULT_TIMEOUT) -> Any:
        return trio.run(lambda: caller.call(self.path, op, params, timeout=timeout))

    def with_progress(self, op: str, params: dict[str, Any], job: str) -> Any:
        """Run a long operation; while it runs, show the mount's progress
        of `job` (when stderr is a terminal)."""
        result: dict[str, Any] = {}
        progress = Progress(job, amount=lambda done, total: f"{done}/{total} objects", interval=0)

        async def watch() -> None:
            while True:
                await trio.sleep(JOB_POLL)
                try:
                    state = (await caller.call(self.path, "vdi.jobs", timeout=JOB_POLL_TIMEOUT)).get(job)
                except (VdifsError, trio.TooSlowError):
                    continue
                if state:
                    progress.label = f"{state['op']} {job}"
                    progress.update(state["done"], state["total"])

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                if progress.show:
                    nursery.start_soon(watch)
                result["value"] = await caller.call(self.path, op, params, timeout=JOB_TIMEOUT)
                nursery.cancel_scope.cancel()

        try:
            trio.run(main)
        finally:
            progress.close()
        return result["value"]


def split_snapshot(text: str) -> tuple[str, str]:
    """NAME@SNAP as (NAME, SNAP)."""
    name, at, snap = text.partition("@")
    if not at or not name or not snap:
        raise CliError(f"{text!r} is not NAME@SNAP")
    return name, snap


def tree_lines(tree: list[dict[str, Any]]) -> list[str]:
    """VDIs under the snapshots they were cloned from, snapshots under their VDI."""
    children: dict[str | None, list[dict[str, Any]]] = {}
    for v in tree:
        children.setdefault(v["parent"] if v["parent"] and "@" in v["parent"] and
                            not v["parent"].startswith("(") else None, []).append(v)
    lines: list[str] = []

    def vdi(v: dict[str, Any], depth: int) -> None:
        lines.append(f"{'    ' * depth}{v['name']}  ({format_size(v['size'])}"
                     f"{', from ' + v['parent'] if v['parent'] else ''})")
        for s in v["snapshots"]:
            full = f"{v['name']}@{s['name']}"
            lines.append(f"{'    ' * (depth + 1)}@{s['name']}  ({format_size(s['size'])}, {format_time(s['ctime'])})")
            for c in children.get(full, []):
                vdi(c, depth + 2)

    for v in children.get(None, []):
        vdi(v, 0)
    return lines


def show_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def do_list(call: Control, args: argparse.Namespace) -> None:
    vdis = call("vdi.list")
    if args.json:
        show_json(vdis)
    elif not vdis:
        print("no VDIs")
    else:
        print(table([[v["name"], str(v["vid"]), format_size(v["size"]), format_size(v["allocated"]),
                      str(v["copies"]), format_time(v["mtime"])] for v in vdis],
                    ["NAME", "VID", "SIZE", "ALLOCATED", "COPIES", "MODIFIED"]))


def do_info(call: Control, args: argparse.Namespace) -> None:
    v = call("vdi.info", {"name": args.name})
    if args.json:
        show_json(v)
        return
    print(table([
        ["name", v["name"]], ["vid", str(v["vid"])],
        ["size", f"{format_size(v['size'])} ({v['size']} bytes)"],
        ["allocated", f"{format_size(v['allocated'])} ({v['objects']} objects of {format_size(v['object_size'])})"],
        ["shared with snapshots", f"{v['objects'] - v['own_objects']} objects"],
        ["snapshots", ", ".join(v["snapshots"]) or "none"],
        ["copies", str(v["copies"])], ["shared", "yes" if v["shared"] else "no"],
        ["created", format_time(v["ctime"])], ["modified", format_time(v["mtime"])],
    ], ["FIELD", "VALUE"]))


def do_create(call: Control, args: argparse.Namespace) -> None:
    v = call("vdi.create", {"name": args.name, "size": args.size, "copies": args.copies, "shared": args.shared})
    print(f"created {v['name']} (vid {v['vid']}, {format_size(v['size'])})")


def do_delete(call: Control, args: argparse.Namespace) -> None:
    call("vdi.delete", {"name": args.name, "snapshots": args.snapshots})
    print(f"deleted {args.name}")


def do_snapshot(call: Control, args: argparse.Namespace) -> None:
    s = call("vdi.snapshot", {"name": args.name, "snapshot": args.snapshot}, timeout=MAP_TIMEOUT)
    print(f"snapshot {args.name}@{args.snapshot} taken ({format_size(s['size'])})")


def do_snapshot_delete(call: Control, args: argparse.Namespace) -> None:
    name, snap = split_snapshot(args.target)
    call("vdi.snapshot_delete", {"name": name, "snapshot": snap})
    print(f"deleted snapshot {name}@{snap}")


def do_clone(call: Control, args: argparse.Namespace) -> None:
    name, snap = split_snapshot(args.source)
    v = call("vdi.clone", {"name": name, "snapshot": snap, "new": args.new, "copies": args.copies},
             timeout=MAP_TIMEOUT)
    print(f"cloned {name}@{snap} as {v['name']} (vid {v['vid']}, {format_size(v['size'])})")


def do_rollback(call: Control, args: argparse.Namespace) -> None:
    name, snap = split_snapshot(args.target)
    call("vdi.rollback", {"name": name, "snapshot": snap}, timeout=MAP_TIMEOUT)
    print(f"rolled {name} back to {snap}")


def do_flatten(call: Control, args: argparse.Namespace) -> None:
    v = call.with_progress("vdi.flatten", {"name": args.name, "rate": args.rate}, args.name)
    print(f"flattened {args.name}: {v['copied']} objects copied")


def do_diff(call: Control, args: argparse.Namespace) -> None:
    name, _, snap = args.target.partition("@")
    d = call("vdi.diff", {"name": name, "snapshot": snap or None, "from": args.since}, timeout=MAP_TIMEOUT)
    if args.json:
        show_json(d)
        return
    changed = sum(n for _, n, kind in d["extents"] if kind == "data")
    zeroed = sum(n for _, n, kind in d["extents"] if kind == "zero")
    if d["extents"]:
        print(table([[str(o), format_size(n), kind] for o, n, kind in d["extents"]],
                    ["OFFSET", "LENGTH", "TYPE"]))
    print(f"{args.target} since {args.since or 'empty'}: {format_size(changed)} changed, "
          f"{format_size(zeroed)} zeroed, of {format_size(d['size'])}")


def do_du(call: Control, args: argparse.Namespace) -> None:
    rows = call("vdi.du", {"name": args.name}, timeout=MAP_TIMEOUT)
    if args.json:
        show_json(rows)
        return
    print(table([[r["name"], format_size(r["size"]), format_size(r["allocated"]),
                  format_size(r["exclusive"]), format_size(r["shared"])] for r in rows],
                ["NAME", "SIZE", "ALLOCATED", "EXCLUSIVE", "SHARED"]))


def do_export_diff(call: Control, args: argparse.Namespace) -> None:
    done = diff.export_diff(call, args.mount or call("status")["mountpoint"], args.target, args.since, args.file)
    print(done, file=sys.stderr if args.file == "-" else sys.stdout)  # stdout may be the stream


def do_import_diff(call: Control, args: argparse.Namespace) -> None:
    print(diff.import_diff(call, args.mount or call("status")["mountpoint"], args.file, args.name))


def do_tree(call: Control, args: argparse.Namespace) -> None:
    tree = call("vdi.tree")
    if args.json:
        show_json(tree)
    else:
        print("\n".join(tree_lines(tree)) if tree else "no VDIs")


def do_resize(call: Control, args: argparse.Namespace) -> None:
    v = call("vdi.resize", {"name": args.name, "size": args.size}, timeout=RESIZE_TIMEOUT)
    print(f"resized {v['name']} to {format_size(v['size'])}")


def do_rename(call: Control, args: argparse.Namespace) -> None:
    call("vdi.rename", {"old": args.old, "new": args.new})
    print(f"renamed {args.old} to {args.new}")


def do_lock_info(call: Control, args: argparse.Namespace) -> None:
    info = call("vdi.lock_info", {"name": args.name})
    if args.json:
        show_json(info)
    elif info["holder"] is None:
        print(f"{args.name}: no writer (generation {info['generation']})")
    else:
        h = info["holder"]
        print(table([["holder", f"{h['mountpoint']} on {h['host']} (pid {h['pid']}, mount {h['mount']})"],
                     ["generation", str(info["generation"])], ["since", format_time(info["since"])],
                     ["last renewal", format_time(info["renewed"])], ["renewals", str(info["beat"])]],
                    ["FIELD", "VALUE"]))


def do_break_lock(call: Control, args: argparse.Namespace) -> None:
    info = call("vdi.break_lock", {"name": args.name})
    holder = info["holder"]
    who = f"{holder['mountpoint']} on {holder['host']} (pid {holder['pid']})" if holder else "nobody"
    print(f"broke the lock of {args.name}: {who} fenced, generation {info['generation']}")


ACTIONS: dict[str, Callable[[Control, argparse.Namespace], None]] = {
    "list": do_list, "info": do_info, "create": do_create, "delete": do_delete, "resize": do_resize,
    "rename": do_rename, "lock-info": do_lock_info, "break-lock": do_break_lock,
    "snapshot": do_snapshot, "snapshot-delete": do_snapshot_delete, "clone": do_clone,
    "rollback": do_rollback, "tree": do_tree, "flatten": do_flatten, "diff": do_diff, "du": do_du,
    "export-diff": do_export_diff, "import-diff": do_import_diff,
}


def cmd_vdi(args: argparse.Namespace) -> int:
    ACTIONS[args.vdi_command](Control(control_socket(args.mount, args.store)), args)
    return 0
