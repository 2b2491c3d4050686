#!/usr/bin/env bash
# bench/reads-ab.sh [TREE...]: an A/B of the embedded mount's reads against the
# pyfuse3 memfs probe. For each round (ROUNDS, default 2), for each source tree
# (default: this one; each tree's own code, its native module built in place),
# mount a fresh embedded pool, fill a 1 GiB VDI (1 MiB writes, qd 8), sync, then
# run 4 KiB random reads at qd 16 and 1 MiB sequential reads at qd 8, RUNTIME
# seconds each (default 6), O_DIRECT, libaio; then the same on the memfs probe,
# so every round carries its own ceiling. Prints one line per tree and round;
# compare medians. Needs root.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(dirname "$HERE")
SHARED=${SHARED:-$TOP/../shared}
PY=${PY:-$TOP/.venv/bin/python}
RT=${RUNTIME:-6}
ROUNDS=${ROUNDS:-2}
WORK=${WORK:-/tmp/vdifs-reads-ab}
trees=("$@"); [[ ${#trees[@]} -gt 0 ]] || trees=("$TOP")
pids=()
cleanup() {
    fusermount3 -u "$WORK/mnt" 2>/dev/null || true
    fusermount3 -u "$WORK/mem" 2>/dev/null || true
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
for t in "${trees[@]}"; do
    [[ -f $t/setup.py ]] && (cd "$t" && "$PY" setup.py -q build_ext --inplace >/dev/null 2>&1 || echo "reads-ab.sh: $t: native module not built" >&2)
done
job() {  # job FILE -> "randread IOPS seqread MB/s"
    local r s
    r=$(fio --name=rr --filename="$1" --ioengine=libaio --direct=1 --size=1G --randseed=1 --runtime="$RT" --time_based \
            --bs=4k --iodepth=16 --rw=randread --output-format=json | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["read"]["iops"]))')
    s=$(fio --name=sr --filename="$1" --ioengine=libaio --direct=1 --size=1G --runtime="$RT" --time_based \
            --bs=1M --iodepth=8 --rw=read --output-format=json | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["read"]["bw_bytes"] / 1e6))')
    echo "randread $r IOPS  seqread $s MB/s"
}
fill() { fio --name=fill --filename="$1" --ioengine=libaio --direct=1 --size=1G --rw=write --bs=1M --iodepth=8 \
             --fallocate=none --output-format=terse >/dev/null; sync; }
wait_mounted() { for _ in $(seq 100); do mountpoint -q "$1" && return; sleep 0.1; done; echo "no mount at $1" >&2; exit 1; }
for r in $(seq "$ROUNDS"); do
    for t in "${trees[@]}"; do
        rm -rf "$WORK"; mkdir -p "$WORK/mnt" "$WORK/mem"
        env -C "$t" PYTHONPATH="$t" "$PY" -m vdifs mount "$WORK/mnt" --store "$WORK/store" --foreground \
            --log-level warning 2>"$WORK.log" & pid=$!; pids+=($pid)
        wait_mounted "$WORK/mnt"
        truncate -s 1G "$WORK/mnt/q.img"; fill "$WORK/mnt/q.img"
        echo "round $r  $t  $(job "$WORK/mnt/q.img")"
        fusermount3 -u "$WORK/mnt"; wait "$pid" || true
    done
    "$PY" "$SHARED/bench/pyfuse3-memfs.py" "$WORK/mem" 1100 & pid=$!; pids+=($pid)
    wait_mounted "$WORK/mem"
    fill "$WORK/mem/disk"
    echo "round $r  memfs  $(job "$WORK/mem/disk")"
    fusermount3 -u "$WORK/mem"; wait "$pid" || true
done
