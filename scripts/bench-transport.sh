#!/usr/bin/env bash
# Measure the two FUSE transports side by side (issue 16): the prototype in
# examples/fuse_transport serves one all-zero file once over /dev/fuse read/write and once over
# FUSE-over-io_uring, the same handler behind both, and this script reads it with dd and fio,
# the two transports taking turns, and prints a markdown table of medians.
#
#   scripts/bench-transport.sh [--quick] [--size 1G] [--runtime 10] [--reps 3]
#                              [--threads 4] [--depth 8] [--no-pin] [--defer-taskrun]
#                              [--shared-rings N]
#
# --threads: request threads of the /dev/fuse side (imgfs's default is 4); --depth: ring
# entries per CPU queue of the io_uring side; --no-pin: leave the io_uring queue threads
# unpinned (by default each runs on its queue's CPU, as in libfuse); --defer-taskrun: set the
# rings up with IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN; --shared-rings N: N
# unpinned rings (threads) that each hold entries of every queue, instead of one pinned ring
# per queue. --quick: 256 MiB file, 3 s fio runs.
#
#   scripts/bench-transport.sh --imgfs FORMAT [--quick] [--size 1G] [--reps 3] [--threads 4]
#
# --imgfs FORMAT: the same rows on imgfs itself instead of the prototype, `imgfs mount
# --transport dev` against `--transport uring`, each serving its own copy of an image of
# FORMAT (qcow2, vdi, vhdx, vpc, vmdk, qcow) filled with data by qemu-io. The copies stay in
# the host page cache (read once before the first row), so the rows compare the two paths
# through FUSE and imgfs, not the disk.
#
# Needs root (mount(2) and /sys/module/fuse/parameters/enable_uring, which it sets to Y for the
# run and restores afterwards, even on error or ctrl-c) and a kernel with FUSE over io_uring
# (6.14+). Installs fio, jq and bc with apt-get when missing. Rows:
#   - sequential read, dd bs=1M iflag=direct: 1 MiB O_DIRECT requests, one at a time
#   - sequential read, dd bs=1M buffered: page-cache readahead (the file is opened without
#     FOPEN_KEEP_CACHE, so each open starts cold); 128 KiB requests, background (async) reads
#   - random read 4k, fio psync direct=1 iodepth=1, numjobs 1 and 4, time_based
#   - with --imgfs, sequential overwrite: dd bs=1M conv=notrunc,fsync over the whole image
# Each row reports the median of --reps runs per transport, the ratio io_uring / dev, and the
# daemon's CPU time per GiB read: the on-CPU time of all its threads (first field of
# /proc/PID/task/*/schedstat, in ns; /proc/PID/stat's utime + stime say the same in 10 ms
# ticks, too coarse for a 0.2 s dd).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd -P)

SIZE=1G
RUNTIME=10
REPS=3
THREADS=4
DEPTH=8
URING_ARGS=()
IMGFS_FORMAT=
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick) SIZE=256M RUNTIME=3; shift ;;
        --size) SIZE=$2; shift 2 ;;
        --runtime) RUNTIME=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --depth) DEPTH=$2; shift 2 ;;
        --no-pin|--defer-taskrun) URING_ARGS+=("$1"); shift ;;
        --shared-rings) URING_ARGS+=("$1" "$2"); shift 2 ;;
        --imgfs) IMGFS_FORMAT=$2; shift 2 ;;
        -h|--help) sed -n '2,37p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

if [[ $(id -u) -ne 0 ]]; then
    echo "bench-transport.sh needs root (mount(2), enable_uring)" >&2
    exit 1
fi
PARAM=/sys/module/fuse/parameters/enable_uring
if [[ ! -e $PARAM ]]; then
    modprobe fuse 2>/dev/null || true
fi
if [[ ! -e $PARAM ]]; then
    echo "$PARAM missing: this kernel ($(uname -r)) has no FUSE over io_uring" >&2
    exit 1
fi
for tool in fio jq bc; do
    command -v "$tool" >/dev/null || apt-get install -y "$tool" >/dev/null
done

TARGET_DIR=${CARGO_TARGET_DIR:-$REPO_DIR/target}
if [[ -n $IMGFS_FORMAT ]]; then
    (cd "$REPO_DIR" && nice cargo build --release --quiet --bin imgfs)
    IMGFS=$TARGET_DIR/release/imgfs
else
    (cd "$REPO_DIR" && nice cargo build --release --quiet --example fuse_transport)
    BIN=$TARGET_DIR/release/examples/fuse_transport
fi

PREV=$(cat "$PARAM")
WORK=$(mktemp -d)
declare -A PID=()
declare -A FILE=()
cleanup() {
    for t in "${!PID[@]}"; do
        if [[ -n $IMGFS_FORMAT ]]; then
            # Returns once the daemon has written back and exited.
            "$IMGFS" umount "$WORK/$t" 2>/dev/null || umount -l "$WORK/$t" 2>/dev/null || true
            continue
        fi
        umount "$WORK/$t" 2>/dev/null || umount -l "$WORK/$t" 2>/dev/null || true
        kill "${PID[$t]}" 2>/dev/null || true
        wait "${PID[$t]}" 2>/dev/null || true
    done
    echo "$PREV" >"$PARAM"
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
echo Y >"$PARAM"

# imgfs, transport $1, serving its own copy of the image; FILE[$1] is its raw file.
start_imgfs() {
    local t=$1 ext=$IMGFS_FORMAT
    [[ $ext == vpc ]] && ext=vhd
    mkdir -p "$WORK/$t" "$WORK/$t-src"
    if [[ ! -f $WORK/image ]]; then
        qemu-img create -q -f "$IMGFS_FORMAT" "$WORK/image" "$SIZE"
        qemu-io -f "$IMGFS_FORMAT" -c "write -P 0x5a 0 $SIZE" "$WORK/image" >/dev/null
    fi
    cp "$WORK/image" "$WORK/$t-src/disk.$ext"
    "$IMGFS" mount --transport "$t" --threads "$THREADS" --log-file "$WORK/$t.log" \
        --pid-file "$WORK/$t.pid" "$WORK/$t-src" "$WORK/$t"
    PID[$t]=$(cat "$WORK/$t.pid")
    FILE[$t]=$WORK/$t/disk.$ext.raw
    cat "${FILE[$t]}" >/dev/null
}

start() {
    local t=$1
    if [[ -n $IMGFS_FORMAT ]]; then
        start_imgfs "$t"
        return 0
    fi
    FILE[$t]=$WORK/$t/zero
    mkdir -p "$WORK/$t"
    "$BIN" --transport "$t" --size "$SIZE" --threads "$THREADS" --depth "$DEPTH" "${URING_ARGS[@]}" "$WORK/$t" \
        2>"$WORK/$t.log" &
    PID[$t]=$!
    for _ in $(seq 100); do
        # Up once the file is there and the daemon has said which transport is live.
        if [[ -f $WORK/$t/zero ]] && grep -q '^transport' "$WORK/$t.log"; then
            return 0
        fi
        if ! kill -0 "${PID[$t]}" 2>/dev/null; then
            break
        fi
        sleep 0.1
    done
    echo "the $t daemon did not come up:" >&2
    cat "$WORK/$t.log" >&2
    exit 1
}
start dev
start uring
if ! grep -q "registered\|FUSE over io_uring: " "$WORK/uring.log"; then
    echo "io_uring registration failed; the daemon said:" >&2
    cat "$WORK/uring.log" >&2
    exit 1
fi
BYTES=$(stat -c %s "${FILE[dev]}")

# On-CPU nanoseconds of all threads of process $1.
cpu_ns() { cat /proc/"$1"/task/*/schedstat | awk '{s += $1} END {printf "%.0f\n", s}'; }

# measure TRANSPORT TEST -> "value cpu_seconds_per_GiB"
measure() {
    local t=$1 test=$2 file=${FILE[$1]} value bytes t0 t1 c0 c1 json
    c0=$(cpu_ns "${PID[$t]}")
    case $test in
        seq-direct|seq-buffered)
            local flag=()
            [[ $test == seq-direct ]] && flag=(iflag=direct)
            t0=$(date +%s.%N)
            dd if="$file" of=/dev/null bs=1M "${flag[@]}" status=none
            t1=$(date +%s.%N)
            value=$(echo "$BYTES / 1000000 / ($t1 - $t0)" | bc -l)
            bytes=$BYTES
            ;;
        seq-write)
            # Overwrites the allocated image (imgfs only): 1 MiB writes, fsync included.
            t0=$(date +%s.%N)
            dd if=/dev/zero of="$file" bs=1M count=$((BYTES >> 20)) conv=notrunc,fsync status=none
            t1=$(date +%s.%N)
            value=$(echo "$BYTES / 1000000 / ($t1 - $t0)" | bc -l)
            bytes=$BYTES
            ;;
        rand1|rand4)
            json=$(fio --name=r --filename="$file" --rw=randread --bs=4k --ioengine=psync \
                --numjobs="${test#rand}" --iodepth=1 --direct=1 --time_based \
                --runtime="$RUNTIME" --group_reporting --output-format=json)
            value=$(jq '.jobs[0].read.iops' <<<"$json")
            bytes=$(jq '.jobs[0].read.io_bytes' <<<"$json")
            ;;
    esac
    c1=$(cpu_ns "${PID[$t]}")
    echo "$value $(echo "($c1 - $c0) / 1000000000 / ($bytes / 1073741824)" | bc -l)"
}

median() { sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
declare -A VAL=() CPU=()
TESTS=(seq-direct seq-buffered rand1 rand4)
[[ -n $IMGFS_FORMAT ]] && TESTS+=(seq-write)
for test in "${TESTS[@]}"; do
    for rep in $(seq "$REPS"); do
        order=(dev uring)
        ((rep % 2 == 0)) && order=(uring dev)
        for t in "${order[@]}"; do
            read -r v c < <(measure "$t" "$test")
            VAL[$test.$t]+="$v "
            CPU[$test.$t]+="$c "
            printf '%s %s run %d: %.0f, daemon CPU %.3f s/GiB\n' "$test" "$t" "$rep" "$v" "$c" >&2
        done
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

label() {
    case $1 in
        seq-direct) echo "sequential read, dd bs=1M iflag=direct (MB/s)" ;;
        seq-buffered) echo "sequential read, dd bs=1M buffered (MB/s)" ;;
        rand1) echo "random read 4k, fio numjobs=1 (IOPS)" ;;
        rand4) echo "random read 4k, fio numjobs=4 (IOPS)" ;;
        seq-write) echo "sequential overwrite, dd bs=1M conv=notrunc,fsync (MB/s)" ;;
    esac
}
col() { tr ' ' '\n' <<<"${1% }" | median; }

echo
if [[ -n $IMGFS_FORMAT ]]; then
    served="imgfs $(git -C "$REPO_DIR" rev-parse --short HEAD) on a $IMGFS_FORMAT image of $SIZE in the host page cache"
    queues=$(grep -o '[0-9]* queue(s) of [0-9]* entries on [0-9]* threads' "$WORK/uring.log")
else
    served="the prototype's all-zero file of $SIZE"
    queues=$(grep -o '[0-9]* queue(s) x [0-9]* entries' "$WORK/uring.log")
fi
echo "nproc $(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r), $(fio --version); $served, medians of $REPS, fio ${RUNTIME} s; dev: $THREADS threads; uring: $queues${URING_ARGS[*]:+ ${URING_ARGS[*]}}; load average before $LOAD_BEFORE, after $LOAD_AFTER"
echo
echo "| test | /dev/fuse | io_uring | io_uring / dev | daemon CPU s/GiB, dev | daemon CPU s/GiB, io_uring |"
echo "| --- | ---: | ---: | ---: | ---: | ---: |"
for test in "${TESTS[@]}"; do
    d=$(col "${VAL[$test.dev]}")
    u=$(col "${VAL[$test.uring]}")
    cd_=$(col "${CPU[$test.dev]}")
    cu=$(col "${CPU[$test.uring]}")
    printf '| %s | %.0f | %.0f | %.2f | %.2f | %.2f |\n' "$(label "$test")" "$d" "$u" \
        "$(echo "$u / $d" | bc -l)" "$cd_" "$cu"
done
