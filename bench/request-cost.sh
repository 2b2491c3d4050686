#!/usr/bin/env bash
# bench/request-cost.sh TREE...: what one 4 KiB request costs a cluster mount.
# Per tree, ROUNDS times (default 2), alternating: three peers on 127.0.0.1 and
# a mount (copies 3) running that tree's code, a 256 MiB file filled, then 4
# KiB random reads and writes at a fixed RATE (default 3000 IOPS, qd 16,
# O_DIRECT) for 12 s each. Prints the mount's user and system CPU time per
# request (from /proc/PID/stat) and its system calls per request (perf stat
# -e raw_syscalls:sys_enter). A fixed rate makes trees comparable by cost,
# not by throughput, on a noisy machine. Needs root, fio and perf.
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
one() {  # one TREE ROUND
    rm -rf "$WORK"; mkdir -p "$WORK/mnt"
    local addrs=() a join mpid
    for i in 1 2 3; do
        a="127.0.0.1:$(port)"; addrs+=("$a"); join=(); [[ $i -gt 1 ]] && join=(--join "${addrs[0]}")
        env -C "$1" PYTHONPATH="$1" "$PY" -m vdifs peer --store "$WORK/p$i" --listen "$a" "${join[@]}" \
            --log-level warning 2>"$WORK.peer$i.log" & pids+=($!)
        sleep 0.5
    done
    for _ in $(seq 60); do
        env -C "$1" PYTHONPATH="$1" "$PY" -m vdifs cluster format --copies 3 --secret-file "$WORK/secret" \
            "${addrs[0]}" >/dev/null 2>&1 && break
        sleep 0.5
    done
    env -C "$1" PYTHONPATH="$1" "$PY" -m vdifs mount "$WORK/mnt" --store "$WORK/store" --foreground \
        --log-level warning --cluster "$(IFS=,; echo "${addrs[*]}")" --secret-file "$WORK/secret" \
        2>"$WORK.mount.log" & mpid=$!; pids+=($mpid)
    for _ in $(seq 100); do mountpoint -q "$WORK/mnt" && break; sleep 0.1; done
    local f=$WORK/mnt/c.img
    truncate -s 256M "$f"
    fio --name=fill --filename="$f" --rw=write --bs=1M --iodepth=8 --ioengine=libaio --direct=1 --size=256M \
        --output-format=terse >/dev/null
    for job in randread randwrite; do
        local t0 t1 perf_pid
        t0=$(awk '{print $14, $15}' /proc/$mpid/stat)
        perf stat -x, -e raw_syscalls:sys_enter -p "$mpid" -o "$WORK.syscalls" -- sleep 12 & perf_pid=$!
        fio --name=c --filename="$f" --rw=$job --bs=4k --iodepth=16 --ioengine=libaio --direct=1 --size=256M \
            --runtime=12 --time_based --rate_iops="$RATE" --output-format=json > "$WORK.fio.json"
        wait "$perf_pid" || true
        t1=$(awk '{print $14, $15}' /proc/$mpid/stat)
        python3 - "$1" "$2" "$job" "$t0" "$t1" "$WORK" <<'PY'
import json, os, sys
tree, rnd, job, t0, t1, work = sys.argv[1:7]
j = json.load(open(work + ".fio.json"))["jobs"][0]
n = j["read"]["total_ios"] + j["write"]["total_ios"]
(u0, s0), (u1, s1) = map(int, t0.split()), map(int, t1.split())
hz = os.sysconf("SC_CLK_TCK")
calls = next(int(l.split(",")[0]) for l in open(work + ".syscalls") if "sys_enter" in l)
print(f"{os.path.basename(tree)} r{rnd} {job}: {n} requests; mount user {1e6 * (u1 - u0) / hz / n:.0f} us, "
      f"system {1e6 * (s1 - s0) / hz / n:.0f} us, {calls / n:.1f} system calls per request")
PY
    done
    fusermount3 -u "$WORK/mnt"; wait "$mpid" || true
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; pids=()
}
trees=("$@"); [[ ${#trees[@]} -gt 0 ]] || trees=("$TOP")
for r in $(seq "$ROUNDS"); do for t in "${trees[@]}"; do one "$t" "$r"; done; done
