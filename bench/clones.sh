#!/usr/bin/env bash
# bench/clones.sh [OUTDIR]: issue 15's boot storm, one run, loopback only.
# Twenty VMs cloned from one template boot on one host: each reads its
# disk's first SIZE (default 256M) at once (dd, 1 MiB, O_DIRECT, 20 in
# parallel). Measured: wall time of the whole storm and the bytes that
# crossed loopback meanwhile (/proc/net/dev, lo), with the page cache
# dropped first so every server reads its disk as after a reboot.
#   gluster        : ../shared/bench/gluster/setup.sh (replica 3), 20 copies of the image file
#   vdifs          : 3 peers, copies 3, a template VDI, a snapshot, 20 clones; local cache on
#   vdifs-nocache  : the same with --cache-size 0
# Needs root.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(dirname "$HERE")
SHARED=${SHARED:-$TOP/../shared}
V=${V:-$TOP/.venv/bin/vdifs}
SIZE=${SIZE:-256M}
N=${N:-20}
OUT=${1:-$HERE/results/clones-$(date -u +%Y%m%dT%H%M%SZ)}
WORK=${WORK:-/tmp/vdifs-bench-clones}
mkdir -p "$OUT"
pids=()
cleanup() {
    fusermount3 -u "$WORK/mnt" 2>/dev/null || true
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
mib=$(( $(numfmt --from=iec "$SIZE") >> 20 ))
lo_bytes() { awk '/^ *lo:/{print $2}' /proc/net/dev; }

storm() {  # storm LABEL DIR: N parallel reads of DIR/c0..c(N-1); one line of results
    local label=$1 dir=$2
    sync; echo 3 > /proc/sys/vm/drop_caches
    local b0 t0 t1 b1
    b0=$(lo_bytes); t0=$(date +%s.%N)
    local readers=()
    for i in $(seq 0 $((N - 1))); do
        dd if="$dir/c$i" of=/dev/null bs=1M count="$mib" iflag=direct status=none & readers+=($!)
    done
    wait "${readers[@]}"
    t1=$(date +%s.%N); b1=$(lo_bytes)
    python3 - "$label" "$t0" "$t1" "$b0" "$b1" "$N" "$mib" <<'EOF' | tee -a "$OUT/summary.txt"
import sys
label, t0, t1, b0, b1, n, mib = sys.argv[1:]
secs = float(t1) - float(t0)
moved = (int(b1) - int(b0)) / 2**20
total = int(n) * int(mib)
print(f"{label:14s} {secs:7.2f} s  {total / secs:7.0f} MiB/s read by the VMs  {moved:8.0f} MiB over loopback")
EOF
}

echo "# clone boot storm $(date -u +%FT%TZ) kernel=$(uname -r) nproc=$(nproc) N=$N SIZE=$SIZE" | tee "$OUT/README"
: > "$OUT/summary.txt"
head -c "$SIZE" /dev/urandom > "$OUT/template.img.tmp"

bash "$SHARED/bench/gluster/setup.sh" > "$OUT/gluster-setup.log" 2>&1
rm -rf /mnt/gluster/clones; mkdir -p /mnt/gluster/clones
for i in $(seq 0 $((N - 1))); do
    dd if="$OUT/template.img.tmp" of="/mnt/gluster/clones/c$i" bs=1M oflag=direct status=none
done
storm gluster /mnt/gluster/clones
rm -rf /mnt/gluster/clones

vdifs_storm() {  # vdifs_storm LABEL MOUNT-OPTIONS...
    local label=$1; shift
    rm -rf "$WORK"; mkdir -p "$WORK"
    port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
    local addrs=() a i
    for i in 1 2 3; do
        a="127.0.0.1:$(port)"; addrs+=("$a")
        local join=(); [[ $i -gt 1 ]] && join=(--join "${addrs[0]}")
        "$V" peer --store "$WORK/p$i" --listen "$a" "${join[@]}" --log-level warning 2>"$OUT/$label-peer$i.log" &
        pids+=($!)
        sleep 0.5
    done
    for _ in $(seq 60); do
        "$V" cluster format --copies 3 --secret-file "$WORK/secret" "${addrs[0]}" 2>/dev/null && break
        sleep 0.5
    done
    "$V" mount "$WORK/mnt" --store "$WORK/ms" --cluster "$(IFS=,; echo "${addrs[*]}")" \
        --secret-file "$WORK/secret" --log-level warning "$@"
    truncate -s "$SIZE" "$WORK/mnt/tmpl"
    dd if="$OUT/template.img.tmp" of="$WORK/mnt/tmpl" bs=1M oflag=direct conv=notrunc status=none
    "$V" vdi -m "$WORK/mnt" snapshot tmpl base >/dev/null
    for i in $(seq 0 $((N - 1))); do "$V" vdi -m "$WORK/mnt" clone tmpl@base "c$i" >/dev/null; done
    storm "$label" "$WORK/mnt"
    "$V" cache -m "$WORK/mnt" --json > "$OUT/$label-cache.json" 2>/dev/null || true
    "$V" umount "$WORK/mnt"
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    pids=()
}
vdifs_storm vdifs --cache-size 2G
vdifs_storm vdifs-nocache --cache-size 0
rm -f "$OUT/template.img.tmp"
cat "$OUT/summary.txt"
