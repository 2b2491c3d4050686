#!/usr/bin/env bash
# bench/cluster.sh [OUTDIR]: issue 3's comparison, one run, loopback only.
#   gluster : ../shared/bench/gluster/setup.sh (replica 3, 4 MB shards) at /mnt/gluster
#   netfs   : ../shared/bench/lean-netfs.py (or NETFS=bench/netfs_ceiling.py), the fastest a pyfuse3 file system whose
#             data lives in three other Python processes (loopback TCP,
#             reads from one, writes to all three) can be: the bound for
#             this architecture on this machine
#   vdifs   : three `vdifs peer` processes on 127.0.0.1 and one mount, copies=3
#             (MOUNT_OPTS: more `vdifs mount` options, e.g. "--cache-size 0";
#             PEER_OPTS: more `vdifs peer` options, e.g. "--cached-replica-writes"), then
#             the same jobs over the mount's NBD export with fio's nbd engine (NBD=0: not)
# All through bench/fio-jobs.sh: the jobs of ../shared/bench/fio-suite.sh (O_DIRECT,
# same options and seed) on one pre-sized file per target, plus flush32.
# Guest RAM is touched once first: on this VM the first write into a page of
# RAM is ~7x slower than later ones, which otherwise favours whoever runs last.
# Records the peak RSS of each vdifs process. Needs root.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(dirname "$HERE")
SHARED=${SHARED:-$TOP/../shared}
V=${V:-$TOP/.venv/bin/vdifs}
OUT=${1:-$HERE/results/cluster-$(date -u +%Y%m%dT%H%M%SZ)}
WORK=${WORK:-/tmp/vdifs-bench-cluster}
mkdir -p "$OUT"
pids=()
cleanup() {
    fusermount3 -u "$WORK/mnt" 2>/dev/null || true
    fusermount3 -u "$WORK/netfs" 2>/dev/null || true
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
peak_rss() {  # peak_rss PID FILE: sample VmRSS every 0.5 s while PID lives
    ( peak=0; while kill -0 "$1" 2>/dev/null; do
          rss=$(awk '/VmRSS/{print $2}' /proc/"$1"/status 2>/dev/null || echo 0)
          (( rss > peak )) && peak=$rss && echo "$peak" > "$2"
          sleep 0.5; done ) & pids+=($!)
}

echo "# cluster bench $(date -u +%FT%TZ) kernel=$(uname -r) nproc=$(nproc)" | tee "$OUT/README"
echo "vdifs $(git -C "$TOP" rev-parse --short HEAD 2>/dev/null || echo ?); mount options: ${MOUNT_OPTS:-none}; peer options: ${PEER_OPTS:-none}" | tee -a "$OUT/README"
avail=$(awk '/MemAvailable/{print int($2/1024*0.7)}' /proc/meminfo)
echo "warming ${avail} MiB of guest RAM"
dd if=/dev/zero of=/dev/shm/vdifs-warm bs=1M count="$avail" status=none; rm -f /dev/shm/vdifs-warm

bash "$SHARED/bench/gluster/setup.sh" > "$OUT/gluster-setup.log" 2>&1
echo "== GlusterFS replica 3 (effective settings in gluster-settings.txt)"
gluster --mode=script volume info vdis > "$OUT/gluster-settings.txt" 2>&1 || true
gluster --mode=script volume get vdis all 2>/dev/null \
    | grep -E 'strict-o-direct|shard|eager-lock|remote-dio|quorum|io-thread|client-io-threads|write-behind|read-ahead|io-cache|quick-read|open-behind|stat-prefetch|event-threads' \
    >> "$OUT/gluster-settings.txt" || true
cat "$OUT/gluster-settings.txt"
rm -f /mnt/gluster/fio.img
"$HERE/fio-jobs.sh" /mnt/gluster/fio.img "$OUT/gluster"
rm -f /mnt/gluster/fio.img
# Its daemons (glusterd, three bricks, the client) leave before the other
# targets run, so none of them shares the machine with an idle volume
# (KEEP_GLUSTER=1 keeps it up).
[[ ${KEEP_GLUSTER:-0} == 1 ]] || bash "$SHARED/bench/gluster/teardown.sh" > "$OUT/gluster-teardown.log" 2>&1 \
    || echo "GlusterFS teardown failed (see $OUT/gluster-teardown.log); going on"

PY=${PY:-$TOP/.venv/bin/python}
# The lean probe of ../shared/bench/lean-netfs.py (fixed binary frames, no lock,
# scope or task per request: the techniques vdifs now uses on its data path);
# NETFS=bench/netfs_ceiling.py measures the older, plainer probe instead.
NETFS=${NETFS:-$SHARED/bench/lean-netfs.py}
echo "== netfs ceiling ($(basename "$NETFS"): pyfuse3 + 3 data processes over loopback)"
mkdir -p "$WORK/netfs"
nports=()
for i in 1 2 3; do
    p=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    nports+=("$p"); "$PY" "$NETFS" serve "$p" 2048 & pids+=($!)
done
for p in "${nports[@]}"; do  # until every server listens
    for _ in $(seq 100); do python3 -c "import socket; socket.create_connection(('127.0.0.1', $p))" 2>/dev/null && break; sleep 0.1; done
done
"$PY" "$NETFS" mount "$WORK/netfs" 2048 "$(IFS=,; echo "${nports[*]}")" & pids+=($!)
for _ in $(seq 100); do mountpoint -q "$WORK/netfs" && break; sleep 0.1; done
mountpoint -q "$WORK/netfs" || { echo "netfs ceiling did not mount" >&2; exit 1; }
"$HERE/fio-jobs.sh" "$WORK/netfs/disk" "$OUT/netfs"
fusermount3 -u "$WORK/netfs"

echo "== vdifs, 3 peers, copies=3"
rm -rf "$WORK"; mkdir -p "$WORK"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
addrs=()
for i in 1 2 3; do
    a="127.0.0.1:$(port)"; addrs+=("$a")
    join=(); [[ $i -gt 1 ]] && join=(--join "${addrs[0]}")
    "$V" peer --store "$WORK/p$i" --listen "$a" "${join[@]}" ${PEER_OPTS:-} --log-level warning 2>"$OUT/peer$i.log" &
    pids+=($!); peak_rss $! "$OUT/peer$i-peak-rss-kib"
    sleep 0.5
done
for _ in $(seq 60); do  # until the other two have registered at the first
    "$V" cluster format --copies 3 --secret-file "$WORK/secret" "${addrs[0]}" 2>/dev/null && break
    sleep 0.5
done
[[ -f $WORK/secret ]] || { echo "cluster format never succeeded" >&2; exit 1; }
"$V" mount "$WORK/mnt" --store "$WORK/ms" --cluster "$(IFS=,; echo "${addrs[*]}")" \
    --secret-file "$WORK/secret" --foreground --log-level warning ${MOUNT_OPTS:-} 2>"$OUT/mount.log" &
mpid=$!; pids+=($mpid); peak_rss $mpid "$OUT/mount-peak-rss-kib"
for _ in $(seq 100); do mountpoint -q "$WORK/mnt" && break; sleep 0.1; done
cache_state() {  # cache_state LABEL: what the mount's cache held and served so far, into the README
    if "$V" cache -m "$WORK/mnt" --json > "$OUT/$1-cache.json" 2>/dev/null; then
        python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); G=1<<30
print("%s: cache %.1f GiB, %.1f used, hits %d, misses %d, fills %d, evictions %d" % (sys.argv[2],
      c["size"] / G, c["used"] / G, c["hits"], c["misses"], c["fills"], c["evictions"]))' \
            "$OUT/$1-cache.json" "$1"
    else
        echo "$1: no cache"
    fi | tee -a "$OUT/README"
}
"$HERE/fio-jobs.sh" "$WORK/mnt/fio.img" "$OUT/vdifs"
cache_state vdifs
if [[ ${NBD:-1} == 1 ]]; then  # the same jobs on a second VDI, through the mount's NBD export
    truncate -s "${FIO_SIZE:-2G}" "$WORK/mnt/nbd.img"
    "$HERE/fio-jobs.sh" "nbd+unix:///nbd.img?socket=$WORK/ms/nbd.sock" "$OUT/vdifs-nbd"
    cache_state vdifs-nbd
fi
for f in "$OUT"/*-peak-rss-kib; do echo "$(basename "$f" -peak-rss-kib): peak RSS $(( $(cat "$f") / 1024 )) MiB"; done | tee -a "$OUT/README"
python3 "$HERE/compare_cluster.py" "$OUT" | tee "$OUT/table.md"
