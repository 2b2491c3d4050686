"""What the command modules share: errors, argument types, tables, the
progress line, logging, and finding the mount to talk to.

It imports none of the other command modules, so any of them can use it.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable
from typing import IO, Any, TypeVar

import trio

from vdifs.control import caller
from vdifs.control.mounts import MOUNTS_FILE, read_mounts, vdifs_mounts
from vdifs.errors import VdifsError
from vdifs.fuse.mount import default_store
from vdifs.model.sizes import format_size, parse_size
from vdifs.wire.rpc import ClientKey, RemoteError, RpcPool

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = ["debug", "info", "warning", "error"]


# How long to wait for a mount's answer (seconds), by the work a request does
# (a quick one waits caller.DEFAULT_TIMEOUT).
MAP_TIMEOUT = 300.0  # walks or copies a VDI's object map: snapshot, clone, rollback, diff, du
RESIZE_TIMEOUT = 3600.0  # shrinking frees every object past the new end


class CliError(Exception):
    """An expected failure: printed as one line, exit status 1."""


# -- arguments --------------------------------------------------------------------------

#: `-5G` is a (bad) size, not an option: let it reach size_arg, which says why.
NEGATIVE_SIZE = re.compile(r"^-\d+(\.\d+)?[KMGTPkmgtp]?(i?B)?$")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that hands `-5G` to the argument, not the option
    matcher; its subparsers are Parsers too (argparse makes them of the
    parent's class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_SIZE  # argparse's hook for what looks like a negative number


def size_arg(text: str) -> int:
    """argparse type of a size with an optional K/M/G/T/P suffix."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# -- output -----------------------------------------------------------------------------


def table(rows: list[list[str]], header: list[str]) -> str:
    """Left-aligned columns two spaces apart, the header first."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def format_time(t: float) -> str:
    """A wall-clock time in local time, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


BAR_WIDTH = 24


def bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """`[######..................]  25%`: done of total (an empty total is done)."""
    frac = 1.0 if total <= 0 else min(1.0, max(0.0, done / total))
    fill = int(frac * width)
    return "[" + "#" * fill + "." * (width - fill) + f"] {frac:4.0%}"


def count_of(done: int, total: int) -> str:
    """`25/100`, the amount shown after a bar of items."""
    return f"{done}/{total}"


def progress_text(done: int, total: int, amount: Callable[[int, int], str] = count_of) -> str:
    """A bar and the amount it stands for: `[######..................]  25% 25/100`."""
    return f"{bar(done, total)} {amount(done, total)}"


class Progress:
    """One progress line on stderr, redrawn in place while a long command
    runs. Drawn only on a terminal (a pipe or log gets nothing), and at most
    every `interval` seconds so a fast loop does not spend its time printing.
    With no total (None) it shows the amount without a bar."""

    def __init__(self, label: str, total: int | None = 0, *, amount: Callable[[int, int], str] = count_of,
                 stream: IO[str] | None = None, interval: float = 0.2,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.total, self.done = label, total, 0
        self.amount = amount
        self.stream = stream if stream is not None else sys.stderr
        self.show = self.stream.isatty()
        self.interval, self.clock = interval, clock
        self.drawn = False
        self.last = -interval

    def update(self, done: int, total: int | None = None) -> None:
        """Progress is now `done` (of `total`, when it changed)."""
        self.done = done
        if total is not None:
            self.total = total
        now = self.clock()
        finished = self.total is not None and self.done >= self.total
        if self.show and (now - self.last >= self.interval or finished):
            self.last = now
            self.drawn = True
            if self.total is None:
                text = f"{self.label} {self.amount(self.done, 0)}"
            else:
                text = f"{self.label}: {progress_text(self.done, self.total, self.amount)}"
            print("\r" + text, end="", file=self.stream, flush=True)

    def add(self, n: int) -> None:
        self.update(self.done + n)

    def close(self) -> None:
        """End the line, so what is printed next starts on its own."""
        if self.drawn:
            print(file=self.stream)
            self.drawn = False


def setup_logging(level: str, stream: Any = None, filename: str | None = None) -> None:
    """Send every log record to `filename` or `stream`, at `level`."""
    handler: logging.Handler = logging.FileHandler(filename) if filename else logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("pyfuse3").setLevel(max(logging.INFO, root.level))


# -- finding the mount ------------------------------------------------------------------


def running_mounts(path: str = MOUNTS_FILE) -> list[str]:
    """Mount points of the vdifs mounts of this machine (none when
    /proc/mounts cannot be read)."""
    return [e.mountpoint for e in vdifs_mounts(read_mounts(path))]


def control_socket(mount: str | None, store: str | None, mounts_file: str = MOUNTS_FILE) -> str:
    """The control socket to talk to: the mount named by -m, the store named
    by --store, else the one running vdifs mount, else (none running) the
    default store's, as before mounts were looked for."""
    if mount and store:
        raise CliError("give either -m/--mount or --store, not both")
    if mount:
        return caller.socket_for_mount(os.path.abspath(mount), mounts_file)
    if store:
        return caller.socket_for_store(os.path.abspath(store))
    mounts = running_mounts(mounts_file)
    if len(mounts) == 1:
        return caller.socket_for_mount(mounts[0], mounts_file)
    if mounts:
        raise CliError(f"{len(mounts)} vdifs mounts are running ({', '.join(mounts)}): "
                       "pick one with -m MOUNTPOINT")
    return caller.socket_for_store(default_store())


def format_bytes(done: int, total: int) -> str:
    """`1.0 MiB of 4.0 MiB`, the amount shown after a bar of bytes."""
    return f"{format_size(done)} of {format_size(total)}"


# -- talking to a cluster's peers -------------------------------------------------------

T = TypeVar("T")
PEER_TIMEOUT = 30.0  # seconds to wait for a peer's answer to an admin request


def run_with_pool(fn: Callable[[RpcPool], Awaitable[T]], secret: bytes | ClientKey | None,
                  cluster_id: str | None = None) -> T:
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


async def first_answer(pool: RpcPool, addresses: list[str], op: str, args: dict[str, Any] | None = None,
                       timeout: float = PEER_TIMEOUT) -> Any:
    """The answer of the first of `addresses` that answers `op`."""
    errors = []
    for a in addresses:
        try:
            return await pool.call(a, op, args, timeout=timeout)
        except RemoteError as e:
            if e.errno == errno.EACCES:  # refused to our credential: the others would refuse it too
                raise
            errors.append(f"{a}: {e}")
        except VdifsError as e:
            errors.append(f"{a}: {e}")
    raise VdifsError("no peer answered: " + "; ".join(errors), code=errno.EHOSTUNREACH)
