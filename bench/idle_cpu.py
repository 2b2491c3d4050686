"""Idle CPU of peers against the cluster's size: bench/idle_cpu.py [N ...]

For each N (default 3 and 24): starts N peers on 127.0.0.1, formats the
cluster (copies 3), waits until every peer is up in the map, lets it settle,
then measures each peer's CPU (user + system, from /proc) over a window
with no client at all. Prints, per N, the mean, median and maximum share of
a core per peer, and the same for the meta peers alone (they also answer
every other peer's map polls). Run from the repository with the venv's
python; uses a temporary directory and kills what it started.

Options (environment): SETTLE seconds before measuring (default 10),
WINDOW seconds measured (default 30), MOUNTS cluster mounts to start once
the cluster is up (default 0), each writing 1 MiB to a VDI of its own and
then left at rest (SETTLE past 30 s: a mount pings the peers it used in the
last 30 s); their CPU and system calls are reported too.
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
MOUNTS = int(os.environ.get("MOUNTS", "0"))


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


def syscalls_per_second(pids: list[int]) -> subprocess.Popen:
    """perf counting the processes' system calls over WINDOW (read with `rate`)."""
    return subprocess.Popen(["perf", "stat", "-x,", "-e", "raw_syscalls:sys_enter", "-p",
                             ",".join(str(p) for p in pids), "--", "sleep", str(WINDOW)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def rate(perf: subprocess.Popen, processes: int) -> float:
    counted = [line.split(",")[0] for line in perf.communicate()[1].splitlines() if "sys_enter" in line]
    return int(counted[0]) / WINDOW / processes if counted and counted[0].isdigit() else float("nan")


def start_mounts(work: str, addrs: list[str], secret: str) -> list[tuple[subprocess.Popen, str]]:
    mounts = []
    for j in range(MOUNTS):
        mp = f"{work}/mnt{j}"
        os.makedirs(mp)
        with open(f"{work}/mount{j}.log", "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "vdifs", "mount", mp, "--store", f"{work}/ms{j}",
                                     "--foreground", "--cluster", ",".join(addrs[:3]), "--secret-file", secret,
                                     "--log-level", "warning", "--no-nbd"], stdout=log, stderr=subprocess.STDOUT)
        mounts.append((proc, mp))
        deadline = time.monotonic() + 60
        while not os.path.ismount(mp):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"mount {j} did not come up: see {work}/mount{j}.log")
            time.sleep(0.1)
        with open(f"{mp}/vm{j}", "wb") as f:
            f.write(os.urandom(1 << 20))
    return mounts


def measure(n: int) -> dict:
    work = tempfile.mkdtemp(prefix=f"vdifs-idle{n}-")
    addrs = [f"127.0.0.1:{port()}" for _ in range(n)]
    procs: list[subprocess.Popen] = []
    mounts: list[tuple[subprocess.Popen, str]] = []
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
        mounts = start_mounts(work, addrs, secret)
        time.sleep(SETTLE)
        before = [cpu_seconds(p.pid) for p in procs]
        mounts_before = [cpu_seconds(m.pid) for m, _ in mounts]
        # system calls as well as time: on a shared machine the time a piece of
        # work takes varies with the neighbours, its system calls do not (and
        # this VM has no instruction counters)
        peers_perf = syscalls_per_second([p.pid for p in procs])
        mounts_perf = syscalls_per_second([m.pid for m, _ in mounts]) if mounts else None
        syscalls = rate(peers_perf, n)
        mount_syscalls = rate(mounts_perf, len(mounts)) if mounts_perf is not None else float("nan")
        shares = [(cpu_seconds(p.pid) - b) / WINDOW for p, b in zip(procs, before)]
        mount_shares = [(cpu_seconds(m.pid) - b) / WINDOW for (m, _), b in zip(mounts, mounts_before)]
        metas = [s for s, a in zip(shares, addrs) if a in meta]
        others = [s for s, a in zip(shares, addrs) if a not in meta]
        return {"peers": n, "mean": statistics.mean(shares), "median": statistics.median(shares),
                "max": max(shares), "syscalls": syscalls, "mount_syscalls": mount_syscalls,
                "mount_mean": statistics.mean(mount_shares) if mount_shares else float("nan"),
                "meta_mean": statistics.mean(metas) if metas else 0.0,
                "other_mean": statistics.mean(others) if others else 0.0}
    finally:
        for m, mp in mounts:
            subprocess.run(["fusermount3", "-u", mp], capture_output=True)
            try:
                m.wait(30)
            except subprocess.TimeoutExpired:
                m.kill()
                m.wait()
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
    print(f"| peers | CPU per peer: mean | median | max | meta peers | the others | system calls per peer "
          f"| {MOUNTS} mounts at rest: CPU each | system calls each |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        r = measure(n)
        print(f"| {n} | {100 * r['mean']:.2f}% | {100 * r['median']:.2f}% | {100 * r['max']:.2f}% "
              f"| {100 * r['meta_mean']:.2f}% | {100 * r['other_mean']:.2f}% "
              f"| {r['syscalls']:.0f}/s | {100 * r['mount_mean']:.2f}% | {r['mount_syscalls']:.0f}/s |", flush=True)


if __name__ == "__main__":
    main()
