#!/usr/bin/env bash
# bench/run.sh [OUTDIR]: one run, three targets, the same fio jobs (bench/fio-jobs.sh):
#   tmpfs     a file on a tmpfs (the kernel without FUSE)
#   memfs     ../shared/bench/pyfuse3-memfs.py, the fastest a pyfuse3 file system can be
#   vdifs     a VDI on the embedded pool (store on the local disk)
# and the peak RSS of the vdifs mount process during its jobs. Needs root.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(dirname "$HERE")
SHARED=${SHARED:-$TOP/../shared}
PY=${PY:-$TOP/.venv/bin/python}
OUT=${1:-$HERE/results/$(date -u +%Y%m%dT%H%M%SZ)}
WORK=${WORK:-/tmp/vdifs-bench}
mkdir -p "$OUT" "$WORK"/{tmpfs,memfs,vdifs}
pids=()
cleanup() {
    fusermount3 -u "$WORK/memfs" 2>/dev/null || true
    fusermount3 -u "$WORK/vdifs" 2>/dev/null || true
    umount "$WORK/tmpfs" 2>/dev/null || true
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$WORK/store"
}
trap cleanup EXIT
echo "# bench $(date -u +%FT%TZ) kernel=$(uname -r) $(fio --version) nproc=$(nproc) loadavg=$(cut -d' ' -f1-3 /proc/loadavg)" | tee "$OUT/README"

echo "== tmpfs"
mount -t tmpfs -o size=3G tmpfs "$WORK/tmpfs"
"$HERE/fio-jobs.sh" "$WORK/tmpfs/fio.img" "$OUT/tmpfs"
umount "$WORK/tmpfs"

echo "== memfs (pyfuse3 ceiling)"
"$PY" "$SHARED/bench/pyfuse3-memfs.py" "$WORK/memfs" 2048 & pids+=($!)
for _ in $(seq 100); do mountpoint -q "$WORK/memfs" && break; sleep 0.1; done
"$HERE/fio-jobs.sh" "$WORK/memfs/disk" "$OUT/memfs"
fusermount3 -u "$WORK/memfs"

echo "== vdifs (embedded pool)"
rm -rf "$WORK/store"
"$PY" -m vdifs mount "$WORK/vdifs" --store "$WORK/store" --foreground --log-level warning \
    2>"$OUT/vdifs-mount.log" & vpid=$!; pids+=($vpid)
for _ in $(seq 100); do mountpoint -q "$WORK/vdifs" && break; sleep 0.1; done
( peak=0; while kill -0 $vpid 2>/dev/null; do
      rss=$(awk '/VmRSS/{print $2}' /proc/$vpid/status 2>/dev/null || echo 0)
      (( rss > peak )) && peak=$rss && echo "$peak" > "$OUT/vdifs-peak-rss-kib"
      sleep 0.5; done ) & pids+=($!)
"$HERE/fio-jobs.sh" "$WORK/vdifs/fio.img" "$OUT/vdifs"
echo "peak RSS of the vdifs mount: $(( $(cat "$OUT/vdifs-peak-rss-kib") / 1024 )) MiB" | tee -a "$OUT/README"
fusermount3 -u "$WORK/vdifs"

"$PY" "$HERE/compare.py" "$OUT" | tee "$OUT/table.md"
