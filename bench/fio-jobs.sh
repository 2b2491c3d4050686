#!/usr/bin/env bash
# fio-jobs.sh FILE|NBD-URI OUTDIR
#
# The jobs of ../shared/bench/fio-suite.sh (same options, same seed, O_DIRECT
# with libaio), run against one existing or new FILE instead of a directory,
# so that the pyfuse3 ceiling probe (which serves exactly one file) can be
# measured with the same jobs as everything else. verify uses the first
# 256 MiB of FILE. FILE is pre-sized (truncated to FIO_SIZE, sparse) before the
# first job, so no job grows it: the kernel serialises O_DIRECT writes that
# extend a file, which skewed seqwrite between targets. One job more than the
# shared suite: flush32, 4 KiB random writes with an fsync after every 32, as
# a guest that flushes its disk cache does. The read jobs are written as
# mixes of 100% reads so that fio opens the file read-write, as a hypervisor
# opens a VM's disk (a vdifs mount caches a VDI it holds the lease of, and a
# read-only open takes no lease); the I/O is the same for every target.
# With an NBD URI (nbd+unix:///NAME?socket=PATH) the same jobs go through
# fio's nbd engine to an export of that size instead.
# Writes OUTDIR/<job>.json and
# OUTDIR/summary.txt.
set -euo pipefail
FILE=${1:?usage: fio-jobs.sh FILE OUTDIR}
OUT=${2:?usage: fio-jobs.sh FILE OUTDIR}
SEED=${FIO_SEED:-20261121}
SIZE=${FIO_SIZE:-2G}
RT=${FIO_RUNTIME:-20}
SEQCAP=${FIO_SEQ_CAP:-60}
mkdir -p "$OUT"
COMMON=(--randseed="$SEED" --randrepeat=1 --group_reporting --lat_percentiles=1 --output-format=json)
if [[ $FILE == nbd* ]]; then  # an NBD URI: fio's nbd engine (libnbd), the export already sized
    COMMON+=(--ioengine=nbd --uri="$FILE")
else
    COMMON+=(--ioengine=libaio --direct=1 --fallocate=none --filename="$FILE")
    [[ -e $FILE ]] || truncate -s "$SIZE" "$FILE"
fi
: > "$OUT/summary.txt"
job() {  # job NAME fio-args...
    local name=$1; shift
    sync  # no job pays for the writeback of an earlier job's or target's dirty pages
    timeout 300 fio --name="$name" "${COMMON[@]}" --output="$OUT/$name.json" "$@" >"$OUT/$name.log" 2>&1 || true
    python3 "$(dirname "$0")/summarize.py" "$name" "$OUT/$name.json" | tee -a "$OUT/summary.txt"
}
job seqwrite  --size="$SIZE" --rw=write --bs=1M --iodepth=8 --runtime="$SEQCAP"
job seqread   --size="$SIZE" --rw=rw --rwmixread=100 --bs=1M --iodepth=8 --runtime="$SEQCAP"
job randwrite --size="$SIZE" --rw=randwrite --bs=4k --iodepth=16 --runtime="$RT" --time_based
job randread  --size="$SIZE" --rw=randrw --rwmixread=100 --bs=4k --iodepth=16 --runtime="$RT" --time_based
job randrw70  --size="$SIZE" --rw=randrw --rwmixread=70 --bs=64k --iodepth=8 --runtime="$RT" --time_based
job flush32   --size="$SIZE" --rw=randwrite --bs=4k --iodepth=16 --fsync=32 --runtime="$RT" --time_based
job verify    --size=256M --rw=randwrite --bs=64k --iodepth=8 --verify=crc32c --do_verify=1 \
              --verify_fatal=1 --verify_state_save=0
