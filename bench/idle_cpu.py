"""Idle CPU of peers against the cluster's size: bench/idle_cpu.py [N ...]

For each N (default 3 and 24): starts N peers on 127.0.0.1, formats the
cluster (copies 3), waits until every peer is up in the map, lets it settle,
then measures each peer's CPU (user + system, from /proc) over a window
with no client at all. Prints, per N, the mean, median and maximum share of
a core per peer, and the same for the meta peers alone (they also answer
every other peer's map polls). Run from the repository with the venv's
python; uses a temporary directory and kills what it started.

Options (environment): SETTLE seconds before measuring (default 10),
WINDOW seconds measured (default 30).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

SETTLE = float(os.environ.get("SETTLE", "10"))
WINDOW = float(os.environ.get("WINDOW", "30"))


def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vdifs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vdifs", *args], capture_output=True, text=True, timeout=120)


def measure(n: int) -> dict:
    work = tempfile.mkdtemp(prefix=f"vdifs-idle{n}-")
    addrs = [f"127.0.0.1:{port()}" for _ in range(n)]
    procs: list[subprocess.Popen] = []
    try:
        for i, a in enumerate(addrs):
            join = ["--join", addrs[0]] if i else []
            with open(f"{work}/peer{i}.log", "w") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", "vdifs", "peer", "--store", f"{work}/p{i}",
                                               "--listen", a, *join, "--log-level", "warning"],
                                              stdout=log, stderr=subprocess.STDOUT))
        secret = f"{work}/secret"
        time.sleep(2 + 0.2 * n)  # the joins reach the first peer before it formats
        deadline = time.monotonic() + 300
        while True:
            r = vdifs("cluster", "format", "--copies", "3", "--secret-file", secret, addrs[0])
            if r.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"the cluster did not format: {r.stderr.strip()}")
            time.sleep(1)
        while True:
            r = vdifs("cluster", "info", "--json", "--cluster", addrs[0], "--secret-file", secret)
            if r.returncode == 0:
                info = json.loads(r.stdout)
                up = [p for p in info["peers"] if p["state"] == "up"]
                if len(up) == n:
                    break
            if time.monotonic() > deadline:
                states = [p["state"] for p in info["peers"]] if r.returncode == 0 else r.stderr.strip()
                raise SystemExit(f"not all {n} peers came up: {states}")
            time.sleep(1)
        meta = {p["address"] for p in info["peers"] if p.get("meta")}
        time.sleep(SETTLE)
        before = [cpu_seconds(p.pid) for p in procs]
        # system calls as well as time: on a shared machine the time a piece of
        # work takes varies with the neighbours, its system calls do not (and
        # this VM has no instruction counters)
        perf = subprocess.run(["perf", "stat", "-x,", "-e", "raw_syscalls:sys_enter",
                               "-p", ",".join(str(p.pid) for p in procs), "--", "sleep", str(WINDOW)], capture_output=True, text=True)
        shares = [(cpu_seconds(p.pid) - b) / WINDOW for p, b in zip(procs, before)]
        counted = [line.split(",")[0] for line in perf.stderr.splitlines() if "sys_enter" in line]
        syscalls = int(counted[0]) / WINDOW / n if counted and counted[0].isdigit() else float("nan")
        metas = [s for s, a in zip(shares, addrs) if a in meta]
        others = [s for s, a in zip(shares, addrs) if a not in meta]
        return {"peers": n, "mean": statistics.mean(shares), "median": statistics.median(shares),
                "max": max(shares), "syscalls": syscalls,
                "meta_mean": statistics.mean(metas) if metas else 0.0,
                "other_mean": statistics.mean(others) if others else 0.0}
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [3, 24]
    print("| peers | CPU per peer: mean | median | max | meta peers | the others | system calls per peer |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        r = measure(n)
        print(f"| {n} | {100 * r['mean']:.2f}% | {100 * r['median']:.2f}% | {100 * r['max']:.2f}% "
              f"| {100 * r['meta_mean']:.2f}% | {100 * r['other_mean']:.2f}% "
              f"| {r['syscalls']:.0f}/s |", flush=True)


if __name__ == "__main__":
    main()
