#!/usr/bin/env bash
# bench/quick.sh [TREE[::MOUNT-OPTIONS]...]: a quick A/B of the embedded pool
# (or, with CLUSTER=1, of three peers on 127.0.0.1 and a cluster mount,
# copies 3) between source trees (default: this one), or one tree with
# different mount options ("$PWD::--write-behind 0"). For each in turn: mount a
# fresh pool with that tree's code, fill a 1 GiB VDI sequentially (1 MiB, qd 8;
# the file pre-sized first, so every object is created and nothing grows it),
# then 4 KiB random writes and reads at qd 16, a 64 KiB 70/30 mix at qd 8, 4 KiB
# random writes with an fsync every 32 at qd 16 and at qd 1 (flush32,
# flush32q1: as a guest flushes) and a sequential read, RUNTIME seconds each (default 10), O_DIRECT, libaio.
# The read jobs are 100%-read mixes, so fio opens the file read-write as a
# hypervisor opens a VM's disk (the lease, and so the mount's cache, apply).
# Trees alternate ROUNDS times (default 2) so drift of this shared machine
# hits both; compare medians. JOBS="seqwrite seqread" runs only those jobs, in
# that order; SIZE (default 1G) sizes the VDI. Every job starts after a `sync`,
# as in bench/fio-jobs.sh, so none pays for an earlier one's writeback.
# "TREE::@nbd" runs that entry's jobs through the mount's NBD export (fio's
# nbd engine) instead of the file; "TREE::peer:OPTION" gives the peers that
# option (CLUSTER=1), e.g. "$PWD::peer:--cached-replica-writes". PROFILE=JOB records the mount
# with py-spy during that job (collapsed stacks, next to WORK: $WORK.profile.*);
# CPU=1 adds each job's CPU time per I/O: the machine's, the mount's, the peers', fio's;
# STATUS=1 keeps the mount's `vdifs status --json` after each job ($WORK.JOB.status.ENTRY.json). Not the issue's benchmark (bench/run.sh and
# bench/cluster.sh are): a tool for deciding whether a change pays.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(dirname "$HERE")
PY=${PY:-$TOP/.venv/bin/python}
RT=${RUNTIME:-10}
ROUNDS=${ROUNDS:-2}
WORK=${WORK:-/tmp/vdifs-quick}
trees=("$@"); [[ ${#trees[@]} -gt 0 ]] || trees=("$TOP")
for t in "${trees[@]}"; do  # a worktree has no compiled module yet: build it in place, as pip -e does
    t=${t%%::*}
    [[ -f $t/setup.py ]] && (cd "$t" && "$PY" setup.py -q build_ext --inplace >/dev/null 2>&1 || echo "quick.sh: $t: native module not built" >&2)
done
mpid=
ppids=()
cleanup() {
    fusermount3 -u "$WORK/mnt" 2>/dev/null || true
    for p in $mpid "${ppids[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
SIZE=${SIZE:-1G}
COMMON=(--randseed=20261121 --randrepeat=1 --group_reporting --output-format=json --size="$SIZE")
cpu_ticks() {  # CPU ticks so far: the machine's busy ones, the mount's, the peers' (threads included)
    local m=0 peers=0 p
    [[ -n $mpid ]] && m=$(awk '{print $14+$15}' "/proc/$mpid/stat" 2>/dev/null || echo 0)
    for p in "${ppids[@]}"; do peers=$((peers + $(awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done
    echo "$(awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat) $m $peers"
}
one() {  # one TREE[::OPTS] ROUND
    local opts=() engine=(--ioengine=libaio --direct=1 --fallocate=none)
    if [[ $1 == *::* ]]; then read -r -a opts <<< "${1#*::}"; set -- "${1%%::*}" "$2" "${1#*::}"; fi
    if [[ " ${opts[*]:-} " == *" @nbd "* ]]; then  # the jobs through the mount's NBD export instead of the file
        local kept=(); for o in "${opts[@]}"; do [[ $o == @nbd ]] || kept+=("$o"); done; opts=("${kept[@]}")
        engine=(--ioengine=nbd "--uri=nbd+unix:///q.img?socket=$WORK/store/nbd.sock")
    fi
    local popts=() kept=()  # "peer:OPTION": an option of the peers, not of the mount
    for o in "${opts[@]}"; do if [[ $o == peer:* ]]; then popts+=("${o#peer:}"); else kept+=("$o"); fi; done
    opts=("${kept[@]}")
    rm -rf "$WORK"; mkdir -p "$WORK/mnt"
    local where=()
    if [[ ${CLUSTER:-0} == 1 ]]; then
        local addrs=() a join
        for i in 1 2 3; do
            a="127.0.0.1:$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
            addrs+=("$a"); join=(); [[ $i -gt 1 ]] && join=(--join "${addrs[0]}")
            env -C "$1" PYTHONPATH="$1" "$PY" -m vdifs peer --store "$WORK/p$i" --listen "$a" "${join[@]}" "${popts[@]}" --log-level warning \
                2>"$WORK.peer$i.log" & ppids+=($!)
            sleep 0.5
        done
        for _ in $(seq 60); do
            env -C "$1" PYTHONPATH="$1" "$PY" -m vdifs cluster format --copies 3 --secret-file "$WORK/secret" "${addrs[0]}" \
                >/dev/null 2>&1 && break
            sleep 0.5
        done
        where=(--cluster "$(IFS=,; echo "${addrs[*]}")" --secret-file "$WORK/secret")
    fi
    env -C "$1" PYTHONPATH="$1" "$PY" -m vdifs mount "$WORK/mnt" --store "$WORK/store" --foreground --log-level warning \
        "${where[@]}" "${opts[@]}" 2>"$WORK.mount.log" & mpid=$!
    echo "$mpid ${ppids[*]}" > "$WORK.pids"
    for _ in $(seq 100); do mountpoint -q "$WORK/mnt" && break; sleep 0.1; done
    mountpoint -q "$WORK/mnt" || { echo "quick.sh: the mount did not come up (see $WORK.mount.log)" >&2; exit 1; }
    local tree=$1 f=$WORK/mnt/q.img line="$(basename "$1")${3:+ [$3]} r$2"
    truncate -s "$SIZE" "$f"
    local -A spec=([seqwrite]="--rw=write --bs=1M --iodepth=8" [randwrite]="--rw=randwrite --bs=4k --iodepth=16"
        [randread]="--rw=randrw --rwmixread=100 --bs=4k --iodepth=16" [randrw70]="--rw=randrw --rwmixread=70 --bs=64k --iodepth=8"
        [flush32]="--rw=randwrite --bs=4k --iodepth=16 --fsync=32" [flush32q1]="--rw=randwrite --bs=4k --iodepth=1 --fsync=32"
        [seqread]="--rw=rw --rwmixread=100 --bs=1M --iodepth=8")
    for name in ${JOBS:-seqwrite randwrite randread randrw70 flush32 flush32q1 seqread}; do
        [[ -n ${spec[$name]:-} ]] || { echo "quick.sh: no job $name" >&2; exit 2; }
        set -- ${spec[$name]}
        sync
        timed=(); [[ $name == seq* ]] || timed=(--runtime="$RT" --time_based)
        target=(--filename="$f"); [[ ${engine[0]} == --ioengine=nbd ]] && target=()
        local spy=
        if [[ ${PROFILE:-} == "$name" ]]; then  # the mount's profile of this job, raw (collapsed stacks)
            [[ -x $(dirname "$PY")/py-spy ]] || { echo "quick.sh: PROFILE needs py-spy in $(dirname "$PY") (pip install py-spy)" >&2; exit 2; }
            "$(dirname "$PY")/py-spy" record --nonblocking -r 250 -f raw -d "$RT" -p "$mpid" \
                -o "$WORK.profile.$name.$(echo "$line" | cut -d' ' -f1-4 | tr -c 'A-Za-z0-9._-' _).txt" >/dev/null 2>&1 & spy=$!
        fi
        local before; before=$(cpu_ticks)
        fio --name="$name" "${target[@]}" "${engine[@]}" "${COMMON[@]}" "${timed[@]}" "$@" > "$WORK.$name.json"
        [[ -z $spy ]] || wait "$spy" || true
        [[ ${CPU:-0} == 1 ]] && echo "$before $(cpu_ticks)" > "$WORK.$name.cpu"
        [[ ${STATUS:-0} == 1 ]] && env -C "$tree" PYTHONPATH="$tree" "$PY" -m vdifs status --store "$WORK/store" --json \
            > "$WORK.$name.status.$(echo "$line" | cut -d' ' -f1-3 | tr -c 'A-Za-z0-9._-' _).json"
        line+=$(python3 - "$WORK.$name.json" "$name" <<'PY'
import json, os, sys
raw = open(sys.argv[1]).read()
j = json.loads(raw[raw.index("{"):])["jobs"][0]  # fio's nbd engine says hello first
r, w = j["read"], j["write"]
if sys.argv[2].startswith("seq"):
    print(f"  {sys.argv[2]} {(r['bw_bytes'] + w['bw_bytes']) / 1e6:7.0f} MB/s", end="")
else:
    print(f"  {sys.argv[2]} {r['iops'] + w['iops']:7.0f} IOPS", end="")
ios = r["total_ios"] + w["total_ios"]
try:  # CPU=1: CPU time per I/O (us): the machine's, the mount's, the peers', fio's
    t0, m0, p0, t1, m1, p1 = map(int, open(sys.argv[1][:-len(".json")] + ".cpu").read().split())
    hz, rt = os.sysconf("SC_CLK_TCK"), j["job_runtime"] / 1e3
    fio_cpu = (j["usr_cpu"] + j["sys_cpu"]) / 100 * rt
    print(f" [us/io: all {(t1 - t0) / hz / ios * 1e6:.0f} mount {(m1 - m0) / hz / ios * 1e6:.0f} "
          f"peers {(p1 - p0) / hz / ios * 1e6:.0f} fio {fio_cpu / ios * 1e6:.0f}]", end="")
except (OSError, ValueError):
    pass
PY
)
    done
    echo "$line"
    fusermount3 -u "$WORK/mnt"; wait "$mpid" || true; mpid=
    for p in "${ppids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; ppids=()
}
for r in $(seq "$ROUNDS"); do for t in "${trees[@]}"; do one "$t" "$r"; done; done
