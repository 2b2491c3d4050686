"""Side-by-side table of one bench run: vdifs against tmpfs and the pyfuse3 ceiling."""

import json
import os
import sys

out = sys.argv[1]
JOBS = ["seqwrite", "seqread", "randwrite", "randread", "randrw70", "flush32", "verify"]
TARGETS = ["tmpfs", "memfs", "vdifs"]


def metric(target, job):
    try:
        j = json.load(open(os.path.join(out, target, f"{job}.json")))["jobs"][0]
    except Exception:
        return None
    if j.get("error"):
        return None
    side = "read" if job in ("seqread", "randread") else "write"
    if job == "randrw70":
        return (j["read"]["iops"] + j["write"]["iops"], "IOPS")
    if job.startswith("rand") or job == "flush32":
        return (j[side]["iops"], "IOPS")
    return (j[side]["bw_bytes"] / 1e6, "MB/s")


print("| job | unit | tmpfs | pyfuse3 memfs (ceiling) | vdifs | vdifs / ceiling |")
print("|---|---|---:|---:|---:|---:|")
for job in JOBS:
    vals = [metric(t, job) for t in TARGETS]
    unit = next((v[1] for v in vals if v), "")
    cells = [f"{v[0]:.0f}" if v else "failed" for v in vals]
    ratio = f"{vals[2][0] / vals[1][0]:.0%}" if vals[1] and vals[2] else "-"
    print(f"| {job} | {unit} | {' | '.join(cells)} | {ratio} |")
