"""Print one summary line for a fio JSON result: name, MB/s, IOPS, p99 ms per direction."""

import json
import sys

name, path = sys.argv[1], sys.argv[2]
try:
    raw = open(path).read()
    job = json.loads(raw[raw.index("{"):])["jobs"][0]  # fio's nbd engine says hello first
except Exception as e:  # a failed job leaves no or broken JSON
    print(f"{name:<10} FAILED ({e})")
    raise SystemExit(0)
parts = []
for side in ("read", "write"):
    d = job[side]
    if d["io_bytes"]:
        pct = (d.get("lat_ns") or d.get("clat_ns") or {}).get("percentile", {})
        parts.append(f"{side[0].upper()} {d['bw_bytes'] / 1e6:9.1f} MB/s {d['iops']:9.0f} IOPS "
                     f"p99 {pct.get('99.000000', 0) / 1e6:8.2f} ms")
status = f"  ERROR {job['error']}" if job.get("error") else ""
print(f"{name:<10} {' | '.join(parts)}{status}")
