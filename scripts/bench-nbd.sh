#!/usr/bin/env bash
# Benchmark imgfs's NBD export against qemu-nbd and nbdkit, side by side, on the same kind of
# image, and print a markdown table. Run through `scripts/bench.sh --nbd [options]`.
#
#   scripts/bench.sh --nbd [--format vdi|qcow2|qcow|vhdx|vmdk] [--size 1G] [--quick]
#
# Each server serves its own copy of the image on a loopback TCP port:
#   - imgfs nbd (page cache; up to 16 worker threads per connection, small requests served on
#     the connection's own thread);
#   - qemu-nbd -f FORMAT --cache=writeback --aio=io_uring (aio=threads where io_uring fails),
#     --shared=16;
#   - nbdkit's file plugin on a raw copy of the image: the ceiling for a server with no format
#     to decode;
#   - for qcow2, also nbdkit's qcow2dec filter on a copy of the image (read rows only: the filter
#     is read-only). It arrived in nbdkit 1.36 and Debian 12 ships 1.32: point NBDKIT at a newer
#     nbdkit (an installed binary or the ./nbdkit wrapper of a build tree) to get this column;
#     without the filter it is left out.
# What is measured (page cache dropped before each run):
#   - sequential read: nbdcopy EXPORT null:, with 1 and with 4 connections (MB/s);
#   - sequential write: nbdcopy --flush SOURCE EXPORT from a raw file of non-zero data in the
#     page cache, 1 and 4 connections (MB/s). nbdcopy uses one connection when a server does
#     not advertise multi-conn (qemu-nbd on a writable export);
#   - random 4k read and write: fio's nbd engine, iodepth 8 per connection, 1 and 4 connections
#     (numjobs), time based (IOPS).
# Every row is the median of 3 runs (1 with --quick), the servers taking turns.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd -P)

die() {
    echo "bench.sh --nbd: $*" >&2
    exit 1
}
warn() { echo "bench.sh --nbd: $*" >&2; }
log() { echo "==> $*" >&2; }

FORMAT=vdi
SIZE=
QUICK=0
while (($#)); do
    case $1 in
        --format) FORMAT=${2:?--format needs a value}; shift 2 ;;
        --format=*) FORMAT=${1#*=}; shift ;;
        --size) SIZE=${2:?--size needs a value}; shift 2 ;;
        --size=*) SIZE=${1#*=}; shift ;;
        --quick) QUICK=1; shift ;;
        -h | --help) sed -n '2,25p' "$0"; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done
if ((QUICK)); then
    SIZE=${SIZE:-256M}
    RUNTIME=3
else
    SIZE=${SIZE:-1G}
    RUNTIME=10
fi
REPS=3
((QUICK)) && REPS=1

case $FORMAT in
    vdi) CREATE_OPTS=(-f vdi -o static=off); EXT=vdi ;;
    qcow2) CREATE_OPTS=(-f qcow2); EXT=qcow2 ;;
    qcow) CREATE_OPTS=(-f qcow); EXT=qcow ;;
    vhdx) CREATE_OPTS=(-f vhdx -o subformat=dynamic); EXT=vhdx ;;
    vmdk) CREATE_OPTS=(-f vmdk -o subformat=monolithicSparse); EXT=vmdk ;;
    *) die "unknown format '$FORMAT' (known: vdi qcow2 qcow vhdx vmdk)" ;;
esac
SIZE_BYTES=$(numfmt --from=iec "${SIZE%iB}" 2>/dev/null) || die "cannot parse --size '$SIZE'"
MIB=$((1024 * 1024))
((SIZE_BYTES >= 16 * MIB && SIZE_BYTES % MIB == 0)) || die "--size must be a whole number of MiB, at least 16M"
((EUID == 0)) || die "must run as root (it drops the page cache)"

missing=()
command -v fio >/dev/null || missing+=(fio)
command -v jq >/dev/null || missing+=(jq)
command -v nbdcopy >/dev/null || missing+=(libnbd-bin)
NBDKIT=${NBDKIT:-nbdkit}
[[ $NBDKIT == nbdkit ]] && { command -v nbdkit >/dev/null || missing+=(nbdkit); }
command -v qemu-nbd >/dev/null || missing+=(qemu-utils)
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio has no nbd engine"

log "building imgfs (cargo build --release)"
(cd "$REPO_DIR" && cargo build --release --quiet) || die "cargo build --release failed"
TARGET_DIR=$(cd "$REPO_DIR" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
IMGFS=$TARGET_DIR/release/imgfs

WORK=$(mktemp -d "${TMPDIR:-/tmp}/imgfs-bench-nbd.XXXXXX")
PIDS=()
cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    done
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A free loopback port, chosen by the kernel.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

log "creating a $SIZE $FORMAT image and filling it with data"
mkdir -p "$WORK/imgfs" "$WORK/qemu" "$WORK/nbdkit"
IMAGE=$WORK/imgfs/bench.$EXT
qemu-img create -q "${CREATE_OPTS[@]}" "$IMAGE" "$SIZE_BYTES"
fill=()
for ((off = 0; off < SIZE_BYTES; off += 256 * MIB)); do
    len=$((SIZE_BYTES - off < 256 * MIB ? SIZE_BYTES - off : 256 * MIB))
    fill+=(-c "write -q -P 0x5a $off $len")
done
qemu-io -f "$FORMAT" "${fill[@]}" "$IMAGE" >/dev/null
cp "$IMAGE" "$WORK/qemu/"
qemu-img convert -f "$FORMAT" -O raw "$IMAGE" "$WORK/nbdkit/bench.raw"
# The source of the write rows: non-zero data, so nbdcopy sends real writes.
SOURCE=$WORK/source.raw
head -c "$SIZE_BYTES" /dev/urandom >"$SOURCE"

P_IMGFS=$(free_port)
log "starting imgfs nbd on port $P_IMGFS"
"$IMGFS" nbd --log-file "$WORK/imgfs.log" --listen "127.0.0.1:$P_IMGFS" "$WORK/imgfs" ||
    die "imgfs nbd did not start: $(tail -n 5 "$WORK/imgfs.log")"
PIDS+=("$(pgrep -n -f -- "--listen 127.0.0.1:$P_IMGFS")")

P_QEMU=$(free_port)
log "starting qemu-nbd on port $P_QEMU"
QEMU_AIO=io_uring
start_qemu() {
    qemu-nbd --fork --persistent --shared=16 --cache=writeback --aio="$1" --discard=unmap \
        -f "$FORMAT" --bind 127.0.0.1 --port "$P_QEMU" --export-name bench \
        --pid-file "$WORK/qemu.pid" "$WORK/qemu/bench.$EXT"
}
if ! start_qemu io_uring 2>"$WORK/qemu.err"; then
    warn "qemu-nbd with aio=io_uring failed ($(tr '\n' ' ' <"$WORK/qemu.err")); using aio=threads"
    QEMU_AIO=threads
    start_qemu threads || die "qemu-nbd did not start"
fi
PIDS+=("$(cat "$WORK/qemu.pid")")

P_KIT=$(free_port)
log "starting nbdkit on port $P_KIT"
# start_nbdkit PORT PIDFILE NBDKIT-ARGS...: nbdkit forks; its pid file appears once it listens.
start_nbdkit() {
    local port=$1 pidfile=$2 i
    shift 2
    "$NBDKIT" --port "$port" -i 127.0.0.1 -P "$pidfile" -e bench "$@" || return 1
    for ((i = 0; i < 100; i++)); do [[ -s $pidfile ]] && break; sleep 0.1; done
    [[ -s $pidfile ]] || return 1
    PIDS+=("$(cat "$pidfile")")
}
start_nbdkit "$P_KIT" "$WORK/nbdkit.pid" file "$WORK/nbdkit/bench.raw" || die "nbdkit did not start"

SIDES=(imgfs qemu nbdkit)
if [[ $FORMAT == qcow2 ]]; then
    if "$NBDKIT" null --filter=qcow2dec --dump-plugin >/dev/null 2>&1; then
        P_DEC=$(free_port)
        log "starting nbdkit --filter=qcow2dec on port $P_DEC"
        cp "$IMAGE" "$WORK/nbdkit/bench.qcow2"
        start_nbdkit "$P_DEC" "$WORK/qcow2dec.pid" -r --filter=qcow2dec file "$WORK/nbdkit/bench.qcow2" ||
            die "nbdkit --filter=qcow2dec did not start"
        SIDES+=(qcow2dec)
    else
        warn "$NBDKIT has no qcow2dec filter (nbdkit 1.36 or later): that column is left out"
    fi
fi

uri() {
    case $1 in
        imgfs) echo "nbd://127.0.0.1:$P_IMGFS/bench.$EXT" ;;
        qemu) echo "nbd://127.0.0.1:$P_QEMU/bench" ;;
        nbdkit) echo "nbd://127.0.0.1:$P_KIT/bench" ;;
        qcow2dec) echo "nbd://127.0.0.1:$P_DEC/bench" ;;
    esac
}

drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
}

now_ns() { date +%s%N; }
rate() { awk -v b="$SIZE_BYTES" -v t0="$1" -v t1="$2" 'BEGIN { printf "%.1f", b / ((t1 - t0) / 1e9) / 1e6 }'; }

# fio_iops RW CONNECTIONS URI -> IOPS
fio_iops() {
    local json=$WORK/fio.json
    timeout -k 5 $((RUNTIME + 120)) fio --name=bench --ioengine=nbd --uri="$3" --rw="$1" \
        --bs=4k --iodepth=8 --numjobs="$2" --group_reporting --time_based \
        --runtime="$RUNTIME" --ramp_time=1 --size="$SIZE_BYTES" --norandommap --randrepeat=0 \
        --output-format=json --output="$json" >/dev/null || return 1
    jq -e '.jobs[0].error == 0' "$json" >/dev/null || return 1
    jq -r '.jobs[0].read.iops + .jobs[0].write.iops | floor' "$json"
}

measure() {
    local t0 t1
    case $1 in
        seqread1 | seqread4)
            t0=$(now_ns)
            nbdcopy --connections="${1#seqread}" "$2" null: || return 1
            t1=$(now_ns)
            rate "$t0" "$t1"
            ;;
        seqwrite1 | seqwrite4)
            cat "$SOURCE" >/dev/null
            t0=$(now_ns)
            nbdcopy --connections="${1#seqwrite}" --flush "$SOURCE" "$2" || return 1
            t1=$(now_ns)
            rate "$t0" "$t1"
            ;;
        randread1 | randread4) fio_iops randread "${1#randread}" "$2" ;;
        randwrite1 | randwrite4) fio_iops randwrite "${1#randwrite}" "$2" ;;
    esac
}

label() {
    case $1 in
        seqread1) echo "sequential read, nbdcopy, 1 connection (MB/s)" ;;
        seqread4) echo "sequential read, nbdcopy, 4 connections (MB/s)" ;;
        seqwrite1) echo "sequential write, nbdcopy --flush, 1 connection (MB/s)" ;;
        seqwrite4) echo "sequential write, nbdcopy --flush, 4 connections (MB/s)" ;;
        randread1) echo "random read 4k, fio nbd iodepth=8, 1 connection (IOPS)" ;;
        randread4) echo "random read 4k, fio nbd iodepth=8, 4 connections (IOPS)" ;;
        randwrite1) echo "random write 4k, fio nbd iodepth=8, 1 connection (IOPS)" ;;
        randwrite4) echo "random write 4k, fio nbd iodepth=8, 4 connections (IOPS)" ;;
    esac
}

median() {
    tr ' ' '\n' | grep . | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.1f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

TESTS=(seqread1 seqread4 randread1 randread4 seqwrite1 seqwrite4 randwrite1 randwrite4)
declare -A RESULT VALUES
for test in "${TESTS[@]}"; do
    reps=$REPS
    for side in "${SIDES[@]}"; do VALUES[$side]=; done
    for ((rep = 1; rep <= reps; rep++)); do
        for side in "${SIDES[@]}"; do
            if [[ $side == qcow2dec && $test == *write* ]]; then
                RESULT[$test.$side]=read-only
                continue
            fi
            log "$(label "$test"): $side ($rep/$reps)"
            drop_caches
            if value=$(measure "$test" "$(uri "$side")" 2>"$WORK/err") && [[ -n $value ]]; then
                VALUES[$side]+="$value "
                RESULT[$test.$side]=$(median <<<"${VALUES[$side]}")
            else
                RESULT[$test.$side]=error
                warn "$side, $(label "$test"): $(head -c 300 "$WORK/err" | tr '\n' ' ')"
            fi
        done
    done
done

# Everything imgfs wrote must be a sound image after it writes back.
log "stopping imgfs and checking its image"
kill -TERM "${PIDS[0]}"
while kill -0 "${PIDS[0]}" 2>/dev/null; do sleep 0.1; done
if [[ $FORMAT != qcow ]]; then
    qemu-img check -q "$IMAGE" || warn "qemu-img check of imgfs's image failed"
fi

echo
echo "machine: nproc $(nproc), $(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo), kernel $(uname -r), $(qemu-nbd --version | head -n 1), nbdkit $("$NBDKIT" --version | awk '{ print $2 }'), $(fio --version)"
echo "run: $FORMAT $SIZE image, median of $REPS runs per row, fio ${RUNTIME}s, qemu-nbd aio=$QEMU_AIO, imgfs $(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null)"
echo
ratio() {
    if [[ $1 =~ ^[0-9.]+$ && $2 =~ ^[0-9.]+$ ]]; then
        awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'
    else
        echo -
    fi
}
if [[ " ${SIDES[*]} " == *" qcow2dec "* ]]; then
    echo "| test | imgfs | qemu-nbd | nbdkit qcow2dec | nbdkit (raw file) | imgfs/qemu-nbd | imgfs/qcow2dec |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
else
    echo "| test | imgfs | qemu-nbd | nbdkit (raw file) | imgfs/qemu-nbd |"
    echo "| --- | ---: | ---: | ---: | ---: |"
fi
for test in "${TESTS[@]}"; do
    a=${RESULT[$test.imgfs]}
    b=${RESULT[$test.qemu]}
    c=${RESULT[$test.nbdkit]}
    if [[ " ${SIDES[*]} " == *" qcow2dec "* ]]; then
        d=${RESULT[$test.qcow2dec]}
        echo "| $(label "$test") | $a | $b | $d | $c | $(ratio "$a" "$b") | $(ratio "$a" "$d") |"
    else
        echo "| $(label "$test") | $a | $b | $c | $(ratio "$a" "$b") |"
    fi
done
