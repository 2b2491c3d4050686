"""`vdifs status` and `vdifs top`: a running mount's view, once or refreshed
like iostat."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from vdifs.cli.common import CliError, control_socket, table
from vdifs.cli.vdi import Control, add_where, show_json
from vdifs.model.sizes import format_size

KINDS = ("read", "write", "flush", "discard")


def add_parser(sub: argparse._SubParsersAction, store_default: str) -> None:  # type: ignore[type-arg]
    where = f"the one running vdifs mount; with none, the mount of the store {store_default}"
    s = sub.add_parser("status", help="a running mount's pool, map, VDIs, leases and I/O",
                       description="What a running mount sees: the pool's size and free space, the cluster "
                                   "map's epoch and peers, and every VDI used through it (its lease, "
                                   "open handles, write-behind window, requests in flight and its I/O). "
                                   "Once, with totals since the mount started; --watch refreshes it "
                                   "every --interval seconds with rates, like iostat.")
    add_where(s, None, where)
    s.add_argument("--json", action="store_true", help="machine-readable output (the totals)")
    s.add_argument("--watch", action="store_true", help="refresh with per-second rates until interrupted")
    s.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="for --watch (default 1)")
    t = sub.add_parser("top", help="per-VDI I/O rates of a running mount, refreshed (status --watch)",
                       description="`vdifs status --watch`: per-VDI requests, throughput and latency per "
                                   "second, refreshed every --interval seconds until interrupted.")
    add_where(t, None, where)
    t.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="refresh period (default 1)")


def summary(st: dict[str, Any]) -> str:
    """The lines above the table: where, what pool, which map."""
    where = f"cluster {st['cluster']}" if st.get("cluster") else f"embedded pool in {st['store']}"
    lines = [f"{st['mountpoint']}: {where}, pid {st['pid']}, vdifs {st['version']}"]
    pool = (f"pool: {format_size(st['total'])}, {format_size(st['free'])} free, {st['copies']} copies; "
            f"{st['vdis']} VDIs" + (f", {st['deleting']} being deleted" if st.get("deleting") else ""))
    lines.append(pool)
    if st.get("epoch") is not None:
        lines.append(f"map: epoch {st['epoch']}, {st['peers_up']}/{st['peers']} peers up")
    cache = st.get("cache")
    if cache:
        lines.append(f"cache: {format_size(cache['used'])} of {format_size(cache['size'])}, "
                     f"{cache['hits']} hits, {cache['misses']} misses")
    elif st.get("cluster"):  # by default it is off where the disk has less than a fifth free
        lines.append("cache: off (--cache-size 0, or less than a fifth of its disk free)")
    return "\n".join(lines)


def _lease(v: dict[str, Any]) -> str:
    return "-" if v["lease"] is None else ("held" if v["lease"] else "no")


def totals_rows(st: dict[str, Any]) -> list[list[str]]:
    rows = []
    for v in st["open"]:
        r, w = v["read"], v["write"]
        rows.append([v["name"], _lease(v), str(v["handles"]), str(v["in_flight"]), format_size(v["window"]),
                     str(r["count"]), format_size(r["bytes"]), _avg_ms(r), str(w["count"]), format_size(w["bytes"]),
                     _avg_ms(w), str(v["flush"]["count"]), _avg_ms(v["flush"])])
    return rows


TOTALS_HEADER = ["VDI", "LEASE", "OPEN", "IN-FLIGHT", "WINDOW", "READS", "READ", "R-AVG ms", "WRITES", "WRITTEN",
                 "W-AVG ms", "FLUSHES", "F-AVG ms"]


def _avg_ms(op: dict[str, Any], count: float | None = None, seconds: float | None = None) -> str:
    n = op["count"] if count is None else count
    s = op["seconds"] if seconds is None else seconds
    return f"{1e3 * s / n:.2f}" if n else "-"


def rate_rows(before: dict[str, Any], after: dict[str, Any], elapsed: float) -> list[list[str]]:
    """iostat's view of two samples: per second, and the mean wait of what completed between."""
    old = {v["vid"]: v for v in before["open"]}
    rows = []
    for v in after["open"]:
        p = old.get(v["vid"])
        d = {k: {f: v[k][f] - (p[k][f] if p else 0) for f in ("count", "bytes", "seconds")} for k in KINDS}
        rows.append([v["name"], _lease(v), str(v["in_flight"]),
                     f"{d['read']['count'] / elapsed:.0f}", f"{d['write']['count'] / elapsed:.0f}",
                     f"{d['read']['bytes'] / elapsed / 1e6:.1f}", f"{d['write']['bytes'] / elapsed / 1e6:.1f}",
                     _avg_ms(d["read"]), _avg_ms(d["write"]), f"{d['flush']['count'] / elapsed:.0f}",
                     _avg_ms(d["flush"]), format_size(v["window"])])
    return rows


RATE_HEADER = ["VDI", "LEASE", "IN-FLIGHT", "r/s", "w/s", "rMB/s", "wMB/s", "r_await ms", "w_await ms",
               "flush/s", "f_await ms", "WINDOW"]


def cmd_status(args: argparse.Namespace) -> int:
    call = Control(control_socket(args.mount, args.store))
    if args.command == "top" or args.watch:
        return watch(call, args.interval)
    st = call("status")
    if args.json:
        show_json(st)
        return 0
    print(summary(st))
    if st["open"]:
        print()
        print(table(totals_rows(st), TOTALS_HEADER))
    return 0


def watch(call: Control, interval: float) -> int:
    if interval <= 0:
        raise CliError("--interval must be a positive number of seconds")
    before, then = call("status"), time.monotonic()
    try:
        while True:
            time.sleep(interval)
            after, now = call("status"), time.monotonic()
            out = [summary(after), "", table(rate_rows(before, after, now - then), RATE_HEADER)]
            if sys.stdout.isatty():
                sys.stdout.write("\033[H\033[J")  # from the top of a cleared screen
            print("\n".join(out), flush=True)
            if not sys.stdout.isatty():
                print(flush=True)
            before, then = after, now
    except KeyboardInterrupt:
        return 0
