"""`vdifs cache`: what a cluster mount's local object cache holds and did."""

from __future__ import annotations

import argparse
from typing import Any

from vdifs.cli.common import CliError, control_socket, table
from vdifs.cli.vdi import Control, add_where, show_json
from vdifs.model.sizes import format_size


def add_parser(sub: argparse._SubParsersAction, store_default: str) -> None:  # type: ignore[type-arg]
    c = sub.add_parser("cache", help="show a cluster mount's local object cache",
                       description="Size, use, objects by state, hits, misses, fills, evictions and bytes "
                                   "saved of the local object cache of a running cluster mount.")
    add_where(c, None, f"the one running vdifs mount; with none, the mount of the store {store_default}")
    c.add_argument("--json", action="store_true", help="machine-readable output")


def rows(c: dict[str, Any]) -> list[list[str]]:
    objects = c["objects"]
    lookups = c["hits"] + c["misses"]
    ratio = f" ({100 * c['hits'] / lookups:.0f}% of reads of cacheable objects)" if lookups else ""
    return [
        ["directory", c["root"]],
        ["size", format_size(c["size"])],
        ["used", f"{format_size(c['used'])} ({100 * c['used'] / c['size']:.0f}%)" if c["size"] else "0"],
        ["reserved by fills", format_size(c["reserved"])],
        ["objects", f"{objects['ready']} ready, {objects['filling']} filling, {objects['evicting']} evicting"],
        ["hits", f"{c['hits']}{ratio}"],
        ["misses", str(c["misses"])],
        ["fills", f"{c['fills']} ({c['fill_refusals']} refused for room)"],
        ["evictions", f"{c['evictions']} ({c['expirations']} after {c['ttl']:g} s unused)"],
        ["dropped as out of date or damaged", str(c["drops"])],
        ["read from the cache", format_size(c["bytes_saved"])],
    ]


def cmd_cache(args: argparse.Namespace) -> int:
    status = Control(control_socket(args.mount, args.store))("status")
    c = status.get("cache")
    if args.json:
        show_json(c)
        return 0
    if c is None:
        raise CliError(f"the mount at {status['mountpoint']} has no cache "
                       f"({'--cache-size 0, or no room on its disk' if status.get('cluster') else 'embedded pools are local'})")
    print(table(rows(c), ["FIELD", "VALUE"]))
    return 0
