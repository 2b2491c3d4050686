"""How long creating a VDI takes as the directory grows (issue 17):
bench/create_latency.py [--cluster] [--vdis N] [--every K] [--tree DIR]

Real processes: an embedded mount (or, with --cluster, three peers on
127.0.0.1 and a cluster mount, copies 3) of the tree DIR (default: this
one), then N VDIs (default 10,000) created one after another through the
mount as a user makes them (`open(O_CREAT)` of a new file, then close).
Every K creates (default 1,000) it prints the median and the 90th
percentile of the last 100 creates' latency, and at the end the ratio of
the last hundred's median to the first hundred's (issue 17's goal: within
2x). The mount and peers are stopped (by pid) and their folders removed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vdifs(tree: str, *args: str, **kw: object) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=tree)
    return subprocess.Popen([PY, "-m", "vdifs", *args], cwd=tree, env=env, **kw)  # type: ignore[call-overload]


def wait_for(what: str, check: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"create_latency: {what} did not happen within {seconds:.0f} s")
        time.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cluster", action="store_true", help="three peers and a cluster mount (default: embedded)")
    ap.add_argument("--vdis", type=int, default=10_000, help="VDIs to create (default 10000)")
    ap.add_argument("--every", type=int, default=1_000, help="report every this many creates (default 1000)")
    ap.add_argument("--tree", default=TOP, help="the source tree to run (default: this one)")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="vdifs-create-")
    procs: list[subprocess.Popen[bytes]] = []
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt)
    log = open(os.path.join(work, "log"), "wb")
    try:
        where: list[str] = []
        if args.cluster:
            addrs = [f"127.0.0.1:{free_port()}" for _ in range(3)]
            for i, a in enumerate(addrs):
                join = ["--join", addrs[0]] if i else []
                procs.append(vdifs(args.tree, "peer", "--store", os.path.join(work, f"p{i}"), "--listen", a,
                                   *join, "--log-level", "warning", stderr=log))
                time.sleep(0.5)
            secret = os.path.join(work, "secret")
            wait_for("cluster format", lambda: vdifs(args.tree, "cluster", "format", "--copies", "3", "--secret-file",
                                                     secret, addrs[0], stdout=subprocess.DEVNULL,
                                                     stderr=subprocess.DEVNULL).wait() == 0)
            where = ["--cluster", ",".join(addrs), "--secret-file", secret]
        procs.insert(0, vdifs(args.tree, "mount", mnt, "--store", os.path.join(work, "store"), "--foreground",
                              "--log-level", "warning", *where, stderr=log))
        wait_for("the mount", lambda: os.path.ismount(mnt))
        times: list[float] = []
        first = None
        print(f"# {'cluster' if args.cluster else 'embedded'} mount of {args.tree}: creates  median ms  p90 ms")
        for i in range(1, args.vdis + 1):
            t = time.perf_counter()
            os.close(os.open(os.path.join(mnt, f"vm-{i:05d}.img"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            times.append(time.perf_counter() - t)
            if i == 100:
                first = statistics.median(times[-100:])
            if i % args.every == 0 or i == args.vdis or i == 100:
                last = sorted(times[-100:])
                print(f"{i:8d} {1e3 * statistics.median(last):9.1f} {1e3 * last[int(len(last) * 0.9)]:7.1f}",
                      flush=True)
        if first:
            print(f"# last hundred / first hundred (medians): {statistics.median(times[-100:]) / first:.2f}x")
    finally:
        subprocess.run(["fusermount3", "-u", "-z", mnt], stderr=subprocess.DEVNULL)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        log.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
