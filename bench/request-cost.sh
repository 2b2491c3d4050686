#!/usr/bin/env bash
# bench/request-cost.sh TREE[::MOUNT-OPTIONS]...: what one request costs a
# cluster mount and its peers. Per tree, ROUNDS times (default 2), alternating:
# three peers on 127.0.0.1 and a mount (copies 3) running that tree's code
# (with MOUNT-OPTIONS, e.g. "/work/main::--cache-size 0"), a SIZE file (default
# 256M) filled with 1 MiB writes and synced, then 4 KiB random reads and writes
# at a fixed RATE (default 3000 IOPS, qd 16, O_DIRECT) for 12 s each, and, with
# SEQREAD=1, one 1 MiB qd 8 sequential read of the whole file. Prints the
# mount's user and system CPU time per request, the three peers' CPU time
# together per request (per MiB for the sequential read; all from
# /proc/PID/stat) and the mount's system calls per request (perf stat -e
# raw_syscalls:sys_enter). A fixed rate makes trees comparable by cost, not by
# throughput, on a noisy machine. Needs root, fio and perf.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(dirname "$HERE")
PY=${PY:-$TOP/.venv/bin/python}
ROUNDS=${ROUNDS:-2}
RATE=${RATE:-3000}
WORK=${WORK:-/tmp/vdifs-request-cost}
pids=()
cleanup() {
    fusermount3 -u "$WORK/mnt" 2>/dev/null || true
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SIZE=${SIZE:-256M}
ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' /proc/"$p"/stat))); done; echo "$t"; }
one() {  # one TREE[::OPTS] ROUND
    local opts=()
    if [[ $1 == *::* ]]; then read -r -a opts <<< "${1#*::}"; set -- "${1%%::*}" "$2"; fi
    rm -rf "$WORK"; mkdir -p "$WORK/mnt"
    local addrs=() a join mpid ppids=()
    for i in 1 2 3; do
        a="127.0.0.1:$(port)"; addrs+=("$a"); join=(); [[ $i -gt 1 ]] && join=(--join "${addrs[0]}")
        env -C "$1" PYTHONPATH="$1" "$PY" -m vdifs peer --store "$WORK/p$i" --listen "$a" "${join[@]}" \
            --log-level warning 2>"$WORK.peer$i.log" & pids+=($!); ppids+=($!)
        sleep 0.5
    done
    for _ in $(seq 60); do
        env -C "$1" PYTHONPATH="$1" "$PY" -m vdifs cluster format --copies 3 --secret-file "$WORK/secret" \
            "${addrs[0]}" >/dev/null 2>&1 && break
        sleep 0.5
    done
    env -C "$1" PYTHONPATH="$1" "$PY" -m vdifs mount "$WORK/mnt" --store "$WORK/store" --foreground \
        --log-level warning --cluster "$(IFS=,; echo "${addrs[*]}")" --secret-file "$WORK/secret" \
        "${opts[@]}" 2>"$WORK.mount.log" & mpid=$!; pids+=($mpid)
    for _ in $(seq 100); do mountpoint -q "$WORK/mnt" && break; sleep 0.1; done
    local f=$WORK/mnt/c.img
    truncate -s "$SIZE" "$f"
    fio --name=fill --filename="$f" --rw=write --bs=1M --iodepth=8 --ioengine=libaio --direct=1 --size="$SIZE" \
        --output-format=terse >/dev/null
    sync
    local jobs=(randread randwrite); [[ ${SEQREAD:-0} == 1 ]] && jobs+=(seqread)
    for job in "${jobs[@]}"; do
        local t0 t1 p0 p1 perf_pid shape
        case $job in
            seqread) shape=(--rw=read --bs=1M --iodepth=8) ;;
            *) shape=(--rw=$job --bs=4k --iodepth=16 --runtime=12 --time_based --rate_iops="$RATE") ;;
        esac
        t0=$(awk '{print $14, $15}' /proc/$mpid/stat); p0=$(ticks "${ppids[@]}")
        perf stat -x, -e raw_syscalls:sys_enter -p "$mpid" -o "$WORK.syscalls" -- sleep 12 & perf_pid=$!
        fio --name=c --filename="$f" "${shape[@]}" --ioengine=libaio --direct=1 --size="$SIZE" \
            --output-format=json > "$WORK.fio.json"
        t1=$(awk '{print $14, $15}' /proc/$mpid/stat); p1=$(ticks "${ppids[@]}")
        wait "$perf_pid" || true
        python3 - "$1" "$2" "$job" "$t0" "$t1" "$p0" "$p1" "$WORK" <<'PY'
import json, os, sys
tree, rnd, job, t0, t1, p0, p1, work = sys.argv[1:9]
j = json.load(open(work + ".fio.json"))["jobs"][0]
n = j["read"]["total_ios"] + j["write"]["total_ios"]
(u0, s0), (u1, s1) = map(int, t0.split()), map(int, t1.split())
hz = os.sysconf("SC_CLK_TCK")
peers = 1e6 * (int(p1) - int(p0)) / hz / n
if job == "seqread":  # 1 MiB requests: CPU per MiB (the system calls counted over 12 s are not per request here)
    print(f"{os.path.basename(tree)} r{rnd} {job}: {n} MiB; mount {1e6 * (u1 - u0 + s1 - s0) / hz / n:.0f} us, "
          f"peers {peers:.0f} us per MiB")
    sys.exit()
calls = next(int(l.split(",")[0]) for l in open(work + ".syscalls") if "sys_enter" in l)
print(f"{os.path.basename(tree)} r{rnd} {job}: {n} requests; mount user {1e6 * (u1 - u0) / hz / n:.0f} us, "
      f"system {1e6 * (s1 - s0) / hz / n:.0f} us, {calls / n:.1f} system calls per request; "
      f"peers {peers:.0f} us per request")
PY
    done
    fusermount3 -u "$WORK/mnt"; wait "$mpid" || true
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; pids=()
}
trees=("$@"); [[ ${#trees[@]} -gt 0 ]] || trees=("$TOP")
for r in $(seq "$ROUNDS"); do for t in "${trees[@]}"; do one "$t" "$r"; done; done
