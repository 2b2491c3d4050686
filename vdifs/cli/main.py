"""The `vdifs` command line: the parser root, `mount` and `umount`, and the
dispatch to the command modules (vdi, cluster, check, diff)."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence

import trio

from vdifs import __version__
from vdifs.cli import cache, cluster, status, vdi
from vdifs.cli.cluster import cluster_addresses
from vdifs.cli.heap import keep_freed_buffers
from vdifs.cli.common import LOG_LEVELS, CliError, Parser, setup_logging, size_arg
from vdifs.client.cache import TTL
from vdifs.client.catalog import WRITE_BEHIND
from vdifs.client.remote import REPLICA_WAIT
from vdifs.control import caller
from vdifs.errors import VdifsError, as_vdifs_error
from vdifs.fsutil import lock_store, raise_open_files_limit
from vdifs.fuse.mount import Mount, check_mountpoint, default_store
from vdifs.meta.lease import DEFAULT_TERM

log = logging.getLogger("vdifs")
UMOUNT_TIMEOUT = 60.0  # seconds umount waits for the flush and for the mount process to exit


def build_parser() -> argparse.ArgumentParser:
    store_default = default_store()
    p = Parser(
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
    m.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="log verbosity (default: info)")
    m.add_argument("--log-file", metavar="FILE",
                   help="log file when running in the background (default: STORE/mount.log)")
    m.add_argument("--cluster", metavar="ADDR[,ADDR...]",
                   help="mount a cluster's pool (peers to contact; also $VDIFS_CLUSTER) instead of the "
                        "embedded one; --store then only holds the lock, control socket and log")
    m.add_argument("--secret-file", metavar="F",
                   help="the cluster's secret file, or this hypervisor's mount credential (with --cluster)")
    m.add_argument("--encrypt", action="store_true",
                   help="encrypt the connections to the peers, data included (AES-GCM; they are always "
                        "authenticated and tamper-evident; costs CPU: docs/benchmarks.md)")
    m.add_argument("--copies", type=int, metavar="N", help="default copies of VDIs created through this mount")
    m.add_argument("--io-wait", type=float, default=REPLICA_WAIT, metavar="SECONDS",
                   help="how long a write waits for the cluster to replace unreachable replicas "
                        f"before it fails with EIO (default {REPLICA_WAIT:g})")
    m.add_argument("--lease-term", type=float, default=DEFAULT_TERM, metavar="SECONDS",
                   help=f"a writer that stops renewing loses its VDI lease after this long (default {DEFAULT_TERM:g})")
    m.add_argument("--write-behind", type=size_arg, default=WRITE_BEHIND, metavar="SIZE",
                   help="once a file handle has sent an fsync (as QEMU with cache=none does), acknowledge its "
                        "writes from a window of up to SIZE per VDI that is written back in the background; "
                        "fsync returns when all of it is durable, a kill -9 loses only what no fsync covered "
                        f"(default {WRITE_BEHIND >> 20}M; 0: every write goes through)")

    m.add_argument("--cache", metavar="DIR",
                   help="the local object cache of a cluster mount: copies of snapshot objects and of the "
                        "objects of VDIs this mount writes, read at local-disk speed (default: STORE/cache)")
    m.add_argument("--cache-size", type=size_arg, metavar="SIZE",
                   help="the most the cache holds (default: a tenth of its file system, leaving a fifth free; "
                        "0: no cache)")
    m.add_argument("--cache-ttl", type=float, default=TTL, metavar="SECONDS",
                   help=f"cached objects unused for this long are removed (default {TTL:g}, a week)")
    nbd = m.add_mutually_exclusive_group()
    nbd.add_argument("--nbd", metavar="PATH", default="",
                     help="serve the VDIs over NBD on this unix socket too, mode 0660 (export NAME, or "
                          "NAME@SNAP read-only; QEMU: nbd+unix:///NAME?socket=PATH; default: "
                          "STORE/nbd.sock)")
    nbd.add_argument("--no-nbd", dest="nbd", action="store_const", const=None, help="serve no NBD socket")
    m.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (per-VDI requests, bytes and "
                        "latency, leases, cache, pool space, peers' round trips; docs/operations.md)")
    m.add_argument("--nbd-group", metavar="GROUP",
                   help="the NBD socket's group, whose members may connect (e.g. the group QEMU runs as under "
                        "libvirt); default: the mount's own")

    u = sub.add_parser("umount", help="flush and unmount a vdifs mount",
                       description="Flush everything to the pool, unmount, and wait for the mount process to exit.")
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    u.add_argument("--timeout", type=float, default=UMOUNT_TIMEOUT, metavar="SECONDS",
                   help=f"how long to wait for the mount process to finish (default: {UMOUNT_TIMEOUT:g})")

    vdi.add_parser(sub, store_default)
    cache.add_parser(sub, store_default)
    status.add_parser(sub, store_default)
    cluster.add_parsers(sub)
    return p


# -- mount / umount ----------------------------------------------------------------


def cmd_mount(args: argparse.Namespace) -> int:
    """Mount in the foreground, or fork a mount process and return once it
    mounted (or say why it could not)."""
    store = os.path.abspath(args.store)
    mountpoint = os.path.abspath(args.mountpoint)
    check_mountpoint(mountpoint)
    if not os.path.exists("/dev/fuse"):
        raise CliError("/dev/fuse is missing: load the fuse kernel module (modprobe fuse)")
    cluster = cluster_addresses(args.cluster) if (args.cluster or os.environ.get("VDIFS_CLUSTER")) else None
    mount = Mount(mountpoint, store, allow_other=args.allow_other, cluster=cluster,
                  secret_file=args.secret_file, copies=args.copies, lease_term=args.lease_term,
                  io_wait=args.io_wait, write_behind=args.write_behind, encrypt=args.encrypt,
                  cache_dir=args.cache, cache_size=args.cache_size, cache_ttl=args.cache_ttl, nbd=args.nbd,
                  nbd_group=args.nbd_group, metrics=args.metrics)
    lock = lock_store(store)
    keep_freed_buffers()
    raise_open_files_limit()
    logfile = args.log_file or os.path.join(store, "mount.log")
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
        raise CliError(verdict or f"the mount process failed before mounting; see {logfile}")
    os.close(read_fd)
    os.setsid()
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


def process_alive(pid: int) -> bool:
    """True while pid runs; a zombie (exited, not yet reaped by its parent) is done."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def cmd_umount(args: argparse.Namespace) -> int:
    """Flush, unmount, and wait until the mount process is gone, so that a
    service manager stopping the mount knows the store is free."""
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
        if not process_alive(pid):
            return 0
        time.sleep(0.05)
    raise CliError(f"unmounted, but the mount process {pid} has not exited after {args.timeout:.0f} s")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"mount": cmd_mount, "umount": cmd_umount, "vdi": vdi.cmd_vdi, "cache": cache.cmd_cache,
                "status": status.cmd_status, "top": status.cmd_status,
                "peer": cluster.cmd_peer, "cluster": cluster.cmd_cluster}
    try:
        return handlers[args.command](args)
    except (CliError, VdifsError) as e:
        print(f"vdifs: {e}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:  # a start-up failure inside the process's nursery
        error = as_vdifs_error(group)
        if error is None:
            raise
        print(f"vdifs: {error}", file=sys.stderr)
        return 1
    except trio.TooSlowError:
        print("vdifs: the mount did not answer in time", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
