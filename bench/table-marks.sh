#!/usr/bin/env bash
# bench/table-marks.sh [TREE...]: what keeping checksum tables durable costs a
# VM that writes all over its disk. Per tree (default: this one), in turn: an
# embedded mount running that tree's code, a SIZE file (default 4G, so 1,024
# objects) pre-sized and filled with 1 MiB writes, then 4 KiB random writes at
# RATE per second (default 2000, qd 16, O_DIRECT) for DURATION seconds (default 100:
# three periodic passes of `keep_checksums_durable`). Prints the mount's
# fsync, fdatasync and fsetxattr calls during the random writes (perf stat of
# tracepoints), and fio's 99.9th percentile write latency. Needs root, fio, perf.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(dirname "$HERE")
PY=${PY:-$TOP/.venv/bin/python}
SIZE=${SIZE:-4G}
RATE=${RATE:-2000}
DURATION=${DURATION:-100}
WORK=${WORK:-/tmp/vdifs-table-marks}
mpid=
cleanup() {
    fusermount3 -u "$WORK/mnt" 2>/dev/null || true
    [[ -n $mpid ]] && kill "$mpid" 2>/dev/null || true
}
trap cleanup EXIT
one() {
    rm -rf "$WORK"; mkdir -p "$WORK/mnt"
    env -C "$1" PYTHONPATH="$1" "$PY" -m vdifs mount "$WORK/mnt" --store "$WORK/store" --foreground \
        --log-level warning 2>"$WORK.mount.log" & mpid=$!
    for _ in $(seq 100); do mountpoint -q "$WORK/mnt" && break; sleep 0.1; done
    local f=$WORK/mnt/t.img
    truncate -s "$SIZE" "$f"
    fio --name=fill --filename="$f" --rw=write --bs=1M --iodepth=8 --ioengine=libaio --direct=1 --size="$SIZE" \
        --output-format=terse >/dev/null
    sync
    perf stat -x, -e syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync,syscalls:sys_enter_fsetxattr \
        -p "$mpid" -o "$WORK.perf" -- sleep "$DURATION" & local perf_pid=$!
    fio --name=w --filename="$f" --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio --direct=1 --size="$SIZE" \
        --runtime="$DURATION" --time_based --rate_iops="$RATE" --randseed=20261202 --output-format=json > "$WORK.fio.json"
    wait "$perf_pid" || true
    python3 - "$1" "$WORK" <<'PY'
import json, os, sys
tree, work = sys.argv[1:3]
w = json.load(open(work + ".fio.json"))["jobs"][0]["write"]
calls = {l.split(",")[2].split(":")[1]: l.split(",")[0] for l in open(work + ".perf") if "sys_enter" in l}
p999 = w["clat_ns"]["percentile"]["99.900000"] / 1e6
print(f"{os.path.basename(tree)}: {w['total_ios']} writes; fsync {calls['sys_enter_fsync']}, "
      f"fdatasync {calls['sys_enter_fdatasync']}, fsetxattr {calls['sys_enter_fsetxattr']}; "
      f"p99.9 latency {p999:.1f} ms")
PY
    fusermount3 -u "$WORK/mnt"; wait "$mpid" || true; mpid=
}
trees=("$@"); [[ ${#trees[@]} -gt 0 ]] || trees=("$TOP")
for t in "${trees[@]}"; do one "$t"; done
