"""Table of one cluster bench run: vdifs (3 peers, copies=3) against GlusterFS
replica 3 and against the bound of its architecture (bench/netfs_ceiling.py)."""

import json
import os
import sys

out = sys.argv[1]
JOBS = ["seqwrite", "seqread", "randwrite", "randread", "randrw70", "flush32"]


def result(target, job):
    try:
        raw = open(os.path.join(out, target, f"{job}.json")).read()
        return json.loads(raw[raw.index("{"):])["jobs"][0]  # fio's nbd engine says hello first
    except Exception:
        return None


def metric(target, job):
    j = result(target, job)
    if j is None:
        return None
    if job == "randrw70":
        return j["read"]["iops"] + j["write"]["iops"], "IOPS"
    side = "read" if job in ("seqread", "randread") else "write"
    if job.startswith("rand") or job == "flush32":
        return j[side]["iops"], "IOPS"
    return j[side]["bw_bytes"] / 1e6, "MB/s"


nbd = os.path.isdir(os.path.join(out, "vdifs-nbd"))
print("| job | unit | GlusterFS replica 3 | netfs ceiling | vdifs copies=3 | vdifs / GlusterFS | ceiling / GlusterFS |"
      + (" vdifs NBD | NBD / GlusterFS | NBD / vdifs file |" if nbd else ""))
print("|---|---|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if nbd else ""))
for job in JOBS:
    g, n, v = metric("gluster", job), metric("netfs", job), metric("vdifs", job)
    unit = (g or v or n or (0, ""))[1]
    cell = lambda m: f"{m[0]:.0f}" if m else "failed"
    ratio = lambda a, b: f"{a[0] / b[0]:.2f}x" if a and b and b[0] else "-"
    row = f"| {job} | {unit} | {cell(g)} | {cell(n)} | {cell(v)} | {ratio(v, g)} | {ratio(n, g)} |"
    if nbd:
        b = metric("vdifs-nbd", job)
        row += f" {cell(b)} | {ratio(b, g)} | {ratio(b, v)} |"
    print(row)
targets = ("gluster", "netfs", "vdifs") + (("vdifs-nbd",) if nbd else ())
# fio runs an fsync through libaio at once, with the job's writes still in
# flight, and through its nbd engine as one more request in the queue: there
# every slot freed before the first flush's reply becomes another flush, so
# the "same" job flushes more often. Say how often, so the row is read right.
every = []
for target in targets:
    j = result(target, "flush32")
    if j and j.get("sync", {}).get("total_ios"):
        every.append(f"{target} {j['write']['total_ios'] / j['sync']['total_ios']:.1f}")
if every:
    print("\nflush32, writes per flush: " + ", ".join(every))
for target in targets:
    try:
        verdict = [line for line in open(os.path.join(out, target, "summary.txt")) if line.startswith("verify")][0]
        print(f"\n{target} {verdict.strip()}")
    except (OSError, IndexError):
        print(f"\n{target} verify: no result")
