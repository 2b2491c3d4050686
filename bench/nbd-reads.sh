#!/usr/bin/env bash
# bench/nbd-reads.sh [TREE...]: what a 4 KiB read costs the embedded mount
# through its NBD export and through the file, the transport against the
# transport. For each round (ROUNDS, default 3), for each source tree (default:
# this one), mount a fresh embedded pool running that tree's code, make a 256
# MiB hole VDI (the volume answers zeros at once: transport only) and a 256 MiB
# VDI of written data (page-cached: the transport plus a verified read), then
# 4 KiB random reads at qd 16 for RUNTIME seconds (default 6) of each, through
# fio's nbd engine and through the file (libaio, O_DIRECT). Prints IOPS and the
# mount's CPU time per request (/proc/PID/stat, threads included). Trees
# alternate within a round, so this shared machine's drift hits both; compare
# medians. Needs root and fio.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(dirname "$HERE")
PY=${PY:-$TOP/.venv/bin/python}
RT=${RUNTIME:-6}
ROUNDS=${ROUNDS:-3}
WORK=${WORK:-/tmp/vdifs-nbd-reads}
trees=("$@"); [[ ${#trees[@]} -gt 0 ]] || trees=("$TOP")
mpid=
cleanup() {
    fusermount3 -u "$WORK/mnt" 2>/dev/null || true
    [[ -z $mpid ]] || kill "$mpid" 2>/dev/null || true
}
trap cleanup EXIT
ticks() { awk '{print $14+$15}' "/proc/$mpid/stat"; }
one() {  # TREE ROUND
    rm -rf "$WORK"; mkdir -p "$WORK/mnt"
    env -C "$1" PYTHONPATH="$1" "$PY" -m vdifs mount "$WORK/mnt" --store "$WORK/store" --foreground \
        --log-level warning > "$WORK.mount.log" 2>&1 & mpid=$!
    for _ in $(seq 100); do mountpoint -q "$WORK/mnt" && break; sleep 0.2; done
    mountpoint -q "$WORK/mnt" || { echo "nbd-reads.sh: the mount did not come up (see $WORK.mount.log)" >&2; exit 1; }
    truncate -s 256M "$WORK/mnt/hole.img"
    dd if=/dev/urandom of="$WORK/mnt/data.img" bs=1M count=256 oflag=direct status=none
    local line name how engine t0 out
    line="$(basename "$1") r$2"
    for name in hole data; do
        for how in nbd file; do
            if [[ $how == nbd ]]; then engine=(--ioengine=nbd "--uri=nbd+unix:///$name.img?socket=$WORK/store/nbd.sock")
            else engine=(--ioengine=libaio --direct=1 "--filename=$WORK/mnt/$name.img"); fi
            t0=$(ticks)
            out=$(fio --name=r "${engine[@]}" --rw=randread --bs=4k --iodepth=16 --size=256M --runtime="$RT" \
                --time_based --output-format=json 2>/dev/null)
            line+=$(python3 - "$out" "$t0" "$(ticks)" "$name $how" <<'PY'
import json, os, sys
raw, t0, t1, what = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
r = json.loads(raw[raw.index("{"):])["jobs"][0]["read"]  # fio's nbd engine says hello first
print(f"  {what} {r['iops']:6.0f} IOPS {(t1 - t0) / os.sysconf('SC_CLK_TCK') / r['total_ios'] * 1e6:5.1f} us", end="")
PY
)
        done
    done
    echo "$line"
    fusermount3 -u "$WORK/mnt"; wait "$mpid" || true; mpid=
}
for r in $(seq "$ROUNDS"); do for t in "${trees[@]}"; do one "$t" "$r"; done; done
