"""The `vdifs` command line."""

from __future__ import annotations

import argparse
import json
import re
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import trio

from vdifs import __version__
from vdifs.cli import cluster as cluster_cli, diff as diff_cli
from vdifs.control import caller
from vdifs.errors import VdifsError
from vdifs.model.sizes import format_size, parse_size

log = logging.getLogger("vdifs")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class CliError(Exception):
    """An expected failure: printed as one line, exit status 1."""


def size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


#: `-5G` is a (bad) size, not an option: let it reach size_arg, which says why.
_NEGATIVE_SIZE = re.compile(r"^-\d+(\.\d+)?[KMGTPkmgtp]?(i?B)?$")


def _sizes_may_be_negative(parser: argparse.ArgumentParser) -> None:
    parser._negative_number_matcher = _NEGATIVE_SIZE  # argparse's hook for this
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _sizes_may_be_negative(sub)


def build_parser() -> argparse.ArgumentParser:
    from vdifs.fuse.mount import default_store

    store_default = default_store()
    p = argparse.ArgumentParser(
        prog="vdifs",
        description="vdifs: virtual disk images as sparse files, stored in a replicated object pool.",
        epilog="Run 'vdifs COMMAND --help' for the options of a command.",
    )
    p.add_argument("--version", action="version", version=f"vdifs {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    m = sub.add_parser("mount", help="mount the VDIs of a pool as files",
                       description="Mount every VDI of the pool as a sparse file under MOUNTPOINT. "
                                   "Without --cluster an embedded single-node pool on --store is used.")
    m.add_argument("mountpoint", metavar="MOUNTPOINT")
    m.add_argument("--store", default=store_default, metavar="DIR",
                   help=f"directory of the embedded pool (default: {store_default})")
    m.add_argument("--foreground", "-f", action="store_true", help="stay in the foreground, log to stderr")
    m.add_argument("--allow-other", action="store_true", help="let other users access the mount (for QEMU run as another user)")
    m.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log verbosity (default: info)")
    m.add_argument("--log-file", metavar="FILE",
                   help="log file when running in the background (default: STORE/mount.log)")
    m.add_argument("--cluster", metavar="ADDR[,ADDR...]",
                   help="mount a cluster's pool (peers to contact; also $VDIFS_CLUSTER) instead of the "
                        "embedded one; --store then only holds the lock, control socket and log")
    m.add_argument("--secret-file", metavar="F", help="the cluster's secret file (with --cluster)")
    m.add_argument("--copies", type=int, metavar="N", help="default copies of VDIs created through this mount")
    m.add_argument("--io-wait", type=float, default=60.0, metavar="SECONDS",
                   help="how long a write waits for the cluster to replace unreachable replicas "
                        "before it fails with EIO (default 60)")
    m.add_argument("--lease-term", type=float, default=15.0, metavar="SECONDS",
                   help="a writer that stops renewing loses its VDI lease after this long (default 15)")

    u = sub.add_parser("umount", help="flush and unmount a vdifs mount",
                       description="Flush everything to the pool, unmount, and wait for the mount process to exit.")
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    u.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="how long to wait for the mount process to finish (default: 60)")

    v = sub.add_parser("vdi", help="manage VDIs through a running mount",
                       description="Manage VDIs through the control channel of a running mount.")
    where = v.add_mutually_exclusive_group()
    where.add_argument("--mount", "-m", metavar="MOUNTPOINT", help="the mount to talk to")
    where.add_argument("--store", default=None, metavar="DIR",
                       help=f"store of the mount to talk to (default: {store_default})")
    vs = v.add_subparsers(dest="vdi_command", metavar="ACTION", required=True)
    vl = vs.add_parser("list", help="list VDIs")
    vl.add_argument("--json", action="store_true", help="machine-readable output")
    vi = vs.add_parser("info", help="show one VDI")
    vi.add_argument("name", metavar="NAME")
    vi.add_argument("--json", action="store_true", help="machine-readable output")
    vc = vs.add_parser("create", help="create an empty (sparse) VDI")
    vc.add_argument("name", metavar="NAME")
    vc.add_argument("size", metavar="SIZE", type=size_arg, help="size with optional K/M/G/T suffix")
    vc.add_argument("--copies", type=int, metavar="N", help="replicas of each object (default: the pool's)")
    vc.add_argument("--shared", action="store_true",
                    help="any number of writers on any mounts, no lease (for cluster file systems: OCFS2, GFS2)")
    vd = vs.add_parser("delete", help="delete a VDI and free its space",
                       description="Delete a VDI. One with snapshots is refused unless --snapshots says to "
                                   "delete them too; clones made from them keep working.")
    vd.add_argument("name", metavar="NAME")
    vd.add_argument("--snapshots", action="store_true", help="delete its snapshots as well")
    vr = vs.add_parser("resize", help="grow or shrink a VDI (shrinking frees the objects past the end)")
    vr.add_argument("name", metavar="NAME")
    vr.add_argument("size", metavar="SIZE", type=size_arg, help="new size with optional K/M/G/T suffix")
    vk = vs.add_parser("lock-info", help="who holds a VDI's write lease (clusters)")
    vk.add_argument("name", metavar="NAME")
    vk.add_argument("--json", action="store_true", help="machine-readable output")
    vb = vs.add_parser("break-lock", help="fence a VDI's lease holder and free the lease (clusters)",
                       description="For an operator who knows the holder is dead: the holder is fenced "
                                   "on every peer (its writes fail from now on) and the lease is freed.")
    vb.add_argument("name", metavar="NAME")
    vn = vs.add_parser("rename", help="rename a VDI (replaces an existing NEW)")
    vn.add_argument("old", metavar="OLD")
    vn.add_argument("new", metavar="NEW")
    vsn = vs.add_parser("snapshot", help="take a crash-consistent snapshot of a VDI (no data copied)",
                        description="Freeze NAME as it is now, also while a VM writes to it through this "
                                    "mount (its writes pause for the cut). The snapshot appears read-only "
                                    "as MOUNT/.snapshots/NAME@SNAP; later writes copy only the objects they "
                                    "touch.")
    vsn.add_argument("name", metavar="NAME")
    vsn.add_argument("snapshot", metavar="SNAP")
    vsd = vs.add_parser("snapshot-delete", help="delete a snapshot (NAME@SNAP)",
                        description="Delete a snapshot. Objects that clones or other snapshots still share "
                                    "stay; the rest are freed in the background.")
    vsd.add_argument("target", metavar="NAME@SNAP")
    vcl = vs.add_parser("clone", help="create a VDI that starts as a snapshot and shares its objects",
                        description="Create NEW, a writable VDI whose content is NAME@SNAP. Nothing is "
                                    "copied: NEW shares the snapshot's objects until it writes them.")
    vcl.add_argument("source", metavar="NAME@SNAP")
    vcl.add_argument("new", metavar="NEW")
    vcl.add_argument("--copies", type=int, metavar="N", help="replicas of NEW's own objects "
                                                             "(default: the snapshot's)")
    vrb = vs.add_parser("rollback", help="make a VDI a snapshot's content again (not while in use)",
                        description="Replace NAME's content with NAME@SNAP's. Refused while the VDI is open "
                                    "for writing anywhere. Writes since the snapshot are lost.")
    vrb.add_argument("target", metavar="NAME@SNAP")
    vf = vs.add_parser("flatten", help="copy a clone's shared objects into it, so it stands alone",
                       description="Copy every object NAME still shares with the snapshot it was cloned "
                                   "from into NAME, at most --rate per second, while NAME stays in use.")
    vf.add_argument("name", metavar="NAME")
    vf.add_argument("--rate", type=size_arg, default=64 << 20, metavar="BYTES",
                    help="copy at most this much per second (default: 64M)")
    vdf = vs.add_parser("diff", help="list what changed between two snapshots (from the object maps)",
                        description="The extents of NAME (or NAME@SNAP) that differ from snapshot FROM of "
                                    "the same VDI (or from an empty VDI), object by object, read from the "
                                    "object maps without reading data.")
    vdf.add_argument("target", metavar="NAME[@SNAP]")
    vdf.add_argument("--from", dest="since", metavar="SNAP", help="an older snapshot of the same VDI")
    vdf.add_argument("--json", action="store_true", help="machine-readable output")
    vdu = vs.add_parser("du", help="space used by a VDI and each of its snapshots")
    vdu.add_argument("name", metavar="NAME")
    vdu.add_argument("--json", action="store_true", help="machine-readable output")
    vex = vs.add_parser("export-diff", help="write a snapshot, or what changed since an older one, as a stream",
                        description="Write NAME@SNAP (whole, or only what changed since snapshot FROM) to FILE "
                                    "or stdout ('-') in the vdifs diff format (docs/diff-format.md): "
                                    "checksummed, in bounded memory, so any size streams through a pipe.")
    vex.add_argument("target", metavar="NAME@SNAP")
    vex.add_argument("file", metavar="FILE|-")
    vex.add_argument("--from", dest="since", metavar="FROM", help="an older snapshot of the same VDI")
    vim = vs.add_parser("import-diff", help="apply a diff stream to a VDI (a new one for a full stream)",
                        description="Read a stream from FILE or stdin ('-'). A full stream creates NAME; an "
                                    "incremental one applies to NAME, which must have the stream's base "
                                    "snapshot and be unchanged since. Either way NAME@SNAP is created. A "
                                    "corrupt or truncated stream changes nothing.")
    vim.add_argument("file", metavar="FILE|-")
    vim.add_argument("name", metavar="NAME")
    vt = vs.add_parser("tree", help="show VDIs with their snapshots and clones")
    vt.add_argument("--json", action="store_true", help="machine-readable output")
    cluster_cli.add_parsers(sub)
    _sizes_may_be_negative(p)
    return p


def setup_logging(level: str, stream: Any = None, filename: str | None = None) -> None:
    handler: logging.Handler = logging.FileHandler(filename) if filename else logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("pyfuse3").setLevel(max(logging.INFO, root.level))


# -- mount / umount ----------------------------------------------------------------


def cmd_mount(args: argparse.Namespace) -> int:
    from vdifs.fuse.mount import Mount, check_mountpoint
    from vdifs.fsutil import lock_store

    store = os.path.abspath(args.store)
    mountpoint = os.path.abspath(args.mountpoint)
    check_mountpoint(mountpoint)
    if not os.path.exists("/dev/fuse"):
        raise CliError("/dev/fuse is missing: load the fuse kernel module (modprobe fuse)")
    cluster = cluster_cli.cluster_addresses(args.cluster) if (args.cluster or os.environ.get("VDIFS_CLUSTER")) else None
    mount = Mount(mountpoint, store, allow_other=args.allow_other, cluster=cluster,
                  secret_file=args.secret_file, copies=args.copies, lease_term=args.lease_term,
                  io_wait=args.io_wait)
    lock = lock_store(store)
    if args.foreground:
        setup_logging(args.log_level, sys.stderr)
        trio.run(mount.run)
        lock.close()
        return 0

    # Background: fork, let the child mount, and report its verdict here.
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        lock.close()  # the child keeps its own copy of the locked descriptor
        with os.fdopen(read_fd, "rb") as r:
            verdict = r.read().decode(errors="replace").strip()
        if verdict == "ok":
            return 0
        raise CliError(verdict or f"the mount process failed before mounting; see {args.log_file or os.path.join(store, 'mount.log')}")
    os.close(read_fd)
    os.setsid()
    logfile = args.log_file or os.path.join(store, "mount.log")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    log_fd = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    setup_logging(args.log_level, sys.stderr)
    ready = os.fdopen(write_fd, "wb", buffering=0)
    status = 0
    try:
        trio.run(mount.run, ready)
    except BaseException as e:
        log.exception("mount failed")
        if not ready.closed:
            ready.write(f"mount failed: {e}".encode())
        status = 1
    finally:
        lock.close()
        os._exit(status)


def _process_alive(pid: int) -> bool:
    """True while pid runs; a zombie (exited, not yet reaped by its parent) is done."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def cmd_umount(args: argparse.Namespace) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    path = caller.socket_for_mount(mountpoint)
    status = trio.run(caller.call, path, "status")
    trio.run(lambda: caller.call(path, "flush", timeout=args.timeout))
    res = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
    if res.returncode != 0:
        raise CliError(f"could not unmount {mountpoint}: {res.stderr.strip() or 'fusermount3 failed'}")
    pid = status["pid"]
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if not _process_alive(pid):
            return 0
        time.sleep(0.05)
    raise CliError(f"unmounted, but the mount process {pid} has not exited after {args.timeout:.0f} s")


# -- vdi ---------------------------------------------------------------------------------


def _control_path(args: argparse.Namespace) -> str:
    from vdifs.fuse.mount import default_store

    if args.mount:
        return caller.socket_for_mount(os.path.abspath(args.mount))
    return caller.socket_for_store(os.path.abspath(args.store or default_store()))


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def _fmt_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _split_snapshot(text: str) -> tuple[str, str]:
    name, at, snap = text.partition("@")
    if not at or not name or not snap:
        raise CliError(f"{text!r} is not NAME@SNAP")
    return name, snap


def _with_progress(path: str, op: str, params: dict[str, Any], job: str) -> Any:
    """Run a long control operation; while it runs, draw the mount's progress
    for `job` on stderr (when it is a terminal)."""
    show = sys.stderr.isatty()
    result: dict[str, Any] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            async def watch() -> None:
                while True:
                    await trio.sleep(0.5)
                    try:
                        state = (await caller.call(path, "vdi.jobs", timeout=10)).get(job)
                    except (VdifsError, trio.TooSlowError):
                        continue
                    if state and show:
                        print(f"\r{state['op']} {job}: {cluster_cli._bar(state['done'], state['total'])} "
                              f"{state['done']}/{state['total']} objects", end="", file=sys.stderr, flush=True)

            if show:
                nursery.start_soon(watch)
            result["value"] = await caller.call(path, op, params, timeout=7 * 24 * 3600)
            nursery.cancel_scope.cancel()
        if show:
            print(file=sys.stderr)

    trio.run(main)
    return result["value"]


def _tree_lines(tree: list[dict[str, Any]]) -> list[str]:
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
            lines.append(f"{'    ' * (depth + 1)}@{s['name']}  ({format_size(s['size'])}, {_fmt_time(s['ctime'])})")
            for c in children.get(full, []):
                vdi(c, depth + 2)

    for v in children.get(None, []):
        vdi(v, 0)
    return lines


def cmd_vdi(args: argparse.Namespace) -> int:
    path = _control_path(args)
    action = args.vdi_command

    def call(op: str, params: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        return trio.run(lambda: caller.call(path, op, params, timeout=timeout))

    if action == "list":
        vdis = call("vdi.list")
        if args.json:
            print(json.dumps(vdis, indent=2))
        elif not vdis:
            print("no VDIs")
        else:
            print(_table([[v["name"], str(v["vid"]), format_size(v["size"]), format_size(v["allocated"]),
                           str(v["copies"]), _fmt_time(v["mtime"])] for v in vdis],
                         ["NAME", "VID", "SIZE", "ALLOCATED", "COPIES", "MODIFIED"]))
    elif action == "info":
        v = call("vdi.info", {"name": args.name})
        if args.json:
            print(json.dumps(v, indent=2))
        else:
            print(_table([
                ["name", v["name"]], ["vid", str(v["vid"])],
                ["size", f"{format_size(v['size'])} ({v['size']} bytes)"],
                ["allocated", f"{format_size(v['allocated'])} ({v['objects']} objects of {format_size(v['object_size'])})"],
                ["shared with snapshots", f"{v['objects'] - v['own_objects']} objects"],
                ["snapshots", ", ".join(v["snapshots"]) or "none"],
                ["copies", str(v["copies"])], ["shared", "yes" if v["shared"] else "no"],
                ["created", _fmt_time(v["ctime"])], ["modified", _fmt_time(v["mtime"])],
            ], ["FIELD", "VALUE"]))
    elif action == "create":
        v = call("vdi.create", {"name": args.name, "size": args.size, "copies": args.copies,
                                "shared": args.shared})
        print(f"created {v['name']} (vid {v['vid']}, {format_size(v['size'])})")
    elif action == "delete":
        call("vdi.delete", {"name": args.name, "snapshots": args.snapshots})
        print(f"deleted {args.name}")
    elif action == "snapshot":
        s = call("vdi.snapshot", {"name": args.name, "snapshot": args.snapshot}, timeout=300)
        print(f"snapshot {args.name}@{args.snapshot} taken ({format_size(s['size'])})")
    elif action == "snapshot-delete":
        name, snap = _split_snapshot(args.target)
        call("vdi.snapshot_delete", {"name": name, "snapshot": snap})
        print(f"deleted snapshot {name}@{snap}")
    elif action == "clone":
        name, snap = _split_snapshot(args.source)
        v = call("vdi.clone", {"name": name, "snapshot": snap, "new": args.new, "copies": args.copies},
                 timeout=300)
        print(f"cloned {name}@{snap} as {v['name']} (vid {v['vid']}, {format_size(v['size'])})")
    elif action == "rollback":
        name, snap = _split_snapshot(args.target)
        call("vdi.rollback", {"name": name, "snapshot": snap}, timeout=300)
        print(f"rolled {name} back to {snap}")
    elif action == "flatten":
        v = _with_progress(path, "vdi.flatten", {"name": args.name, "rate": args.rate}, args.name)
        print(f"flattened {args.name}: {v['copied']} objects copied")
    elif action == "diff":
        name, _, snap = args.target.partition("@")
        d = call("vdi.diff", {"name": name, "snapshot": snap or None, "from": args.since}, timeout=300)
        if args.json:
            print(json.dumps(d, indent=2))
        else:
            changed = sum(n for _, n, kind in d["extents"] if kind == "data")
            zeroed = sum(n for _, n, kind in d["extents"] if kind == "zero")
            if d["extents"]:
                print(_table([[str(o), format_size(n), kind] for o, n, kind in d["extents"]],
                             ["OFFSET", "LENGTH", "TYPE"]))
            print(f"{args.target} since {args.since or 'empty'}: {format_size(changed)} changed, "
                  f"{format_size(zeroed)} zeroed, of {format_size(d['size'])}")
    elif action == "du":
        rows = call("vdi.du", {"name": args.name}, timeout=300)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(_table([[r["name"], format_size(r["size"]), format_size(r["allocated"]),
                           format_size(r["exclusive"]), format_size(r["shared"])] for r in rows],
                         ["NAME", "SIZE", "ALLOCATED", "EXCLUSIVE", "SHARED"]))
    elif action in ("export-diff", "import-diff"):
        mountpoint = args.mount or call("status")["mountpoint"]
        if action == "export-diff":
            done = diff_cli.export_diff(call, mountpoint, args.target, args.since, args.file)
        else:
            done = diff_cli.import_diff(call, mountpoint, args.file, args.name)
        print(done, file=sys.stderr if action == "export-diff" and args.file == "-" else sys.stdout)
    elif action == "tree":
        tree = call("vdi.tree")
        if args.json:
            print(json.dumps(tree, indent=2))
        else:
            print("\n".join(_tree_lines(tree)) if tree else "no VDIs")
    elif action == "resize":
        v = call("vdi.resize", {"name": args.name, "size": args.size}, timeout=3600)
        print(f"resized {v['name']} to {format_size(v['size'])}")
    elif action == "rename":
        call("vdi.rename", {"old": args.old, "new": args.new})
        print(f"renamed {args.old} to {args.new}")
    elif action == "lock-info":
        info = call("vdi.lock_info", {"name": args.name})
        if args.json:
            print(json.dumps(info, indent=2))
        elif info["holder"] is None:
            print(f"{args.name}: no writer (generation {info['generation']})")
        else:
            h = info["holder"]
            print(_table([["holder", f"{h['mountpoint']} on {h['host']} (pid {h['pid']}, mount {h['mount']})"],
                          ["generation", str(info["generation"])], ["since", _fmt_time(info["since"])],
                          ["last renewal", _fmt_time(info["renewed"])], ["renewals", str(info["beat"])]],
                         ["FIELD", "VALUE"]))
    elif action == "break-lock":
        info = call("vdi.break_lock", {"name": args.name})
        holder = info["holder"]
        who = f"{holder['mountpoint']} on {holder['host']} (pid {holder['pid']})" if holder else "nobody"
        print(f"broke the lock of {args.name}: {who} fenced, generation {info['generation']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"mount": cmd_mount, "umount": cmd_umount, "vdi": cmd_vdi,
                "peer": cluster_cli.cmd_peer, "cluster": cluster_cli.cmd_cluster}
    try:
        return handlers[args.command](args)
    except (CliError, VdifsError) as e:
        print(f"vdifs: {e}", file=sys.stderr)
        return 1
    except trio.TooSlowError:
        print("vdifs: the mount did not answer in time", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
