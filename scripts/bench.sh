#!/usr/bin/env bash
# Benchmark imgfs against the FUSE servers users would pick instead, side by side in one run, on
# the same kind of image, and print a markdown table:
#   - qemu-storage-daemon's FUSE export (every format, every row);
#   - the libyal mounter for the format: qcowmount (qcow, qcow2), vhdimount (dynamic VHD),
#     vmdkmount (VMDK), from Debian's libqcow-utils, libvhdi-utils, libvmdk-utils. They are
#     read-only, so they take part in the read rows only; vdi and vhdx have none;
#   - "file": the same operation on a plain raw file with no FUSE in between, the limit.
#
#   scripts/bench.sh [--format vdi|qcow2|qcow|vhdx|vhd|vmdk|vmdk-flat] [--size 1G] [--quick] [--imgfs-threads N] [--transport auto|uring|dev] [--imgfs-args ARGS] [--rows LIST]
#   scripts/bench.sh --nbd [--format F] [--size S] [--quick]   (NBD: imgfs, qemu-nbd, nbdkit;
#                                                                 see scripts/bench-nbd.sh)
#
# Needs root (it drops the page cache and mounts FUSE file systems). Installs fio, fuse3, jq,
# attr, qemu-utils and the libyal tools with apt-get when they are missing, builds imgfs in
# release mode, works in a fresh mktemp directory (under $TMPDIR, default /tmp) and removes it
# again, even on error or ctrl-c.
#
# What is measured (each row on imgfs, qemu-storage-daemon, the libyal mounter and the file,
# taking turns within each repetition, each repetition starting one side later: a host disk
# that is faster after a pause favours no side; page cache dropped before every run):
#   - sequential read: dd if=RAW of=/dev/null bs=1M, buffered and with iflag=direct; and
#     buffered again after an untimed pass, so the image is in the host page cache and the
#     row measures each server's own path, not the disk
#   - sequential write: dd if=/dev/zero of=RAW bs=1M conv=notrunc,fsync (the way users write
#     a raw disk), into blocks that are already allocated (overwrite); the same with
#     oflag=direct (one synchronous 1 MiB request at a time: pure per-request latency); and a
#     row into a fresh, empty image (every block gets allocated on the way).
#     MB/s = 10^6 bytes/s over the whole dd run, fsync included; median of 3 runs.
#   - sequential first write with fio: rw=write bs=1M end_fsync=1 ioengine=psync, one job, the
#     whole image, into a fresh, empty image each run (MB/s from fio's write bw_bytes, which
#     includes the final fsync); median of 3 runs.
#   - random 4k read/write: fio, ioengine=psync (so iodepth 1 per job), direct=1, numjobs 1
#     and 4, time_based, group_reporting, JSON output parsed with jq; plus 4 jobs reading the
#     unallocated blocks of an empty image (no host I/O: the FUSE round trip alone)
#   - next to each row, imgfs's ratio to every other column, and the CPU time (user+system, all
#     threads, from /proc/PID/stat) of the imgfs daemon, qemu-storage-daemon and the libyal
#     mounter per GiB moved (dd: the image size; fio: its read+write io_bytes, counted after
#     the ramp); median over the repetitions like the values.
# Every server serves its own copy of the image (the images are locked QEMU-style, so one file
# must never be served by both at once); all of them read and write their image through the
# host page cache. imgfs opens the raw file with direct I/O (FOPEN_DIRECT_IO, 1 MiB requests),
# so the FUSE side has no page cache of its own.
# The file column reads a raw copy of the image (qemu-img convert -O raw), overwrites it, writes
# the first-write rows into a fresh sparse file (truncate) each run and reads a sparse file for
# the unallocated row. Its O_DIRECT and direct=1 rows go to the host disk, where the servers read
# their image file through the host page cache: on those rows the file can be the slower side.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd -P)

# --nbd: the NBD export against qemu-nbd and nbdkit, a benchmark of its own.
for arg in "$@"; do
    if [[ $arg == --nbd ]]; then
        args=()
        for a in "$@"; do [[ $a == --nbd ]] || args+=("$a"); done
        exec bash "$SCRIPT_DIR/bench-nbd.sh" "${args[@]}"
    fi
done

usage() {
    cat <<'EOF'
Usage: scripts/bench.sh [--format vdi|qcow2|qcow|vhdx|vhd|vmdk|vmdk-flat] [--size 1G] [--quick] [--imgfs-threads N] [--transport auto|uring|dev] [--imgfs-args ARGS] [--rows LIST]

Compares imgfs with qemu-storage-daemon's FUSE export, the libyal mounter for the format
(qcowmount, vhdimount, vmdkmount; read rows only) and the plain raw file without FUSE, on a
freshly made image, and prints a markdown table: MB/s for sequential rows, IOPS for random
rows, imgfs's ratio to each other column, and the servers' CPU seconds per GiB moved. Must run
as root.

  --format F         image format (default vdi; vhd is dynamic, vmdk monolithicSparse,
                     vmdk-flat monolithicFlat)
  --size S           virtual disk size, e.g. 256M, 1G (default 1G; 256M with --quick)
  --quick            smaller image and 3 s fio runs instead of 10 s
  --imgfs-threads N  pass --threads N to imgfs mount (default: imgfs's own default)
  --transport T      pass --transport T to imgfs mount; with uring the fuse module's
                     enable_uring is set to Y for the run and put back after (default:
                     imgfs's own, auto: io_uring only where enable_uring is already Y)
  --imgfs-args ARGS  more arguments for imgfs mount, split at spaces (e.g. "--read-only
                     --no-passthrough" with read rows only)
  --rows LIST        only these rows, comma-separated, in the table's order: seqread,
                     seqreaddirect, seqreadwarm, randread1, randread4, seqwrite, seqwritedirect,
                     randwrite1, randwrite4, holeread4, allocwrite, allocfio (default: all)
EOF
}

die() {
    echo "bench.sh: $*" >&2
    exit 1
}
warn() { echo "bench.sh: $*" >&2; }
log() { echo "==> $*" >&2; }

# ---------------------------------------------------------------- arguments
FORMAT=vdi
SIZE=
QUICK=0
IMGFS_THREADS=
IMGFS_ARGS=
TRANSPORT=
ROWS=
while (($#)); do
    case $1 in
        --format) FORMAT=${2:?--format needs a value}; shift 2 ;;
        --format=*) FORMAT=${1#*=}; shift ;;
        --size) SIZE=${2:?--size needs a value}; shift 2 ;;
        --size=*) SIZE=${1#*=}; shift ;;
        --quick) QUICK=1; shift ;;
        --imgfs-threads) IMGFS_THREADS=${2:?--imgfs-threads needs a value}; shift 2 ;;
        --imgfs-threads=*) IMGFS_THREADS=${1#*=}; shift ;;
        --imgfs-args) IMGFS_ARGS=${2:?--imgfs-args needs a value}; shift 2 ;;
        --imgfs-args=*) IMGFS_ARGS=${1#*=}; shift ;;
        --transport) TRANSPORT=${2:?--transport needs a value}; shift 2 ;;
        --transport=*) TRANSPORT=${1#*=}; shift ;;
        --rows) ROWS=${2:?--rows needs a value}; shift 2 ;;
        --rows=*) ROWS=${1#*=}; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

for row in ${ROWS//,/ }; do
    case $row in
        seqread | seqreaddirect | seqreadwarm | randread1 | randread4 | seqwrite | seqwritedirect | randwrite1 | randwrite4 | holeread4 | allocwrite | allocfio) ;;
        *) usage >&2; die "unknown row '$row'" ;;
    esac
done

if ((QUICK)); then
    SIZE=${SIZE:-256M}
    RUNTIME=3
else
    SIZE=${SIZE:-1G}
    RUNTIME=10
fi
RAMP=1
SEQ_REPS=3 # runs of each sequential row; the table shows the median

# Format -> how qemu-img creates it, the qemu block driver that opens it (qsd, qemu-io) and the
# file name extension imgfs recognises. Add new formats here. (The commas in -o are qemu-img's
# option list, not array separators.)
# shellcheck disable=SC2054
case $FORMAT in
    vdi) CREATE_OPTS=(-f vdi -o static=off); QEMU_DRIVER=vdi; EXT=vdi ;;
    qcow2) CREATE_OPTS=(-f qcow2); QEMU_DRIVER=qcow2; EXT=qcow2 ;;
    qcow) CREATE_OPTS=(-f qcow); QEMU_DRIVER=qcow; EXT=qcow ;;
    vhdx) CREATE_OPTS=(-f vhdx -o subformat=dynamic); QEMU_DRIVER=vhdx; EXT=vhdx ;;
    # force_size keeps the disk at --size; without it qemu-img rounds it up to a CHS geometry.
    vhd) CREATE_OPTS=(-f vpc -o subformat=dynamic,force_size=on); QEMU_DRIVER=vpc; EXT=vhd ;;
    vmdk) CREATE_OPTS=(-f vmdk -o subformat=monolithicSparse); QEMU_DRIVER=vmdk; EXT=vmdk ;;
    vmdk-flat) CREATE_OPTS=(-f vmdk -o subformat=monolithicFlat); QEMU_DRIVER=vmdk; EXT=vmdk ;;
    *) die "unknown format '$FORMAT' (known: vdi qcow2 qcow vhdx vhd vmdk vmdk-flat)" ;;
esac
# The libyal mounter users would pick instead (libfuse 2, read-only, one image per mount point,
# served as MOUNTPOINT/<name>1); vdi and vhdx have none.
case $FORMAT in
    qcow | qcow2) LIBYAL=qcowmount; LIBYAL_FILE=qcow1 ;;
    vhd) LIBYAL=vhdimount; LIBYAL_FILE=vhdi1 ;;
    vmdk | vmdk-flat) LIBYAL=vmdkmount; LIBYAL_FILE=vmdk1 ;;
    *) LIBYAL=; LIBYAL_FILE= ;;
esac

SIZE_BYTES=$(numfmt --from=iec "${SIZE%iB}" 2>/dev/null) || die "cannot parse --size '$SIZE' (use e.g. 256M or 1G)"
MIB=$((1024 * 1024))
((SIZE_BYTES >= 16 * MIB && SIZE_BYTES % MIB == 0)) || die "--size must be a whole number of MiB, at least 16M"
SIZE_MB=$((SIZE_BYTES / MIB))

if [[ -n $IMGFS_THREADS && ! $IMGFS_THREADS =~ ^[0-9]+$ ]]; then
    die "--imgfs-threads needs a number"
fi

if ((EUID != 0)); then
    die "must run as root: it drops the page cache (/proc/sys/vm/drop_caches) and mounts FUSE file systems. Try: sudo $0"
fi

# ---------------------------------------------------------------- tools
missing=()
command -v fio >/dev/null 2>&1 || missing+=(fio)
command -v fusermount3 >/dev/null 2>&1 || missing+=(fuse3)
command -v jq >/dev/null 2>&1 || missing+=(jq)
command -v getfattr >/dev/null 2>&1 || missing+=(attr)
[[ -x /usr/bin/time ]] || missing+=(time)
for tool in qemu-img qemu-io qemu-storage-daemon; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        missing+=(qemu-utils)
        break
    fi
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The libyal mounters (Debian's libqcow-utils, libvhdi-utils, libvmdk-utils). Not fatal: without
# them the libyal column says "not served".
ly_missing=()
command -v qcowmount >/dev/null 2>&1 || ly_missing+=(libqcow-utils)
command -v vhdimount >/dev/null 2>&1 || ly_missing+=(libvhdi-utils)
command -v vmdkmount >/dev/null 2>&1 || ly_missing+=(libvmdk-utils)
if ((${#ly_missing[@]})); then
    log "installing ${ly_missing[*]}"
    if ! { ((${#missing[@]})) || apt-get update -qq; } ||
        ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${ly_missing[@]}" >/dev/null; then
        warn "could not install ${ly_missing[*]}; the libyal column stays empty"
    fi
fi
if [[ ! -e /dev/fuse ]]; then
    modprobe fuse 2>/dev/null || true
    [[ -e /dev/fuse ]] || die "/dev/fuse is missing (modprobe fuse failed)"
fi
command -v cargo >/dev/null 2>&1 || die "cargo is needed to build imgfs"

log "building imgfs (cargo build --release)"
(cd "$REPO_DIR" && cargo build --release --quiet) || die "cargo build --release failed"
TARGET_DIR=$(cd "$REPO_DIR" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
IMGFS=$TARGET_DIR/release/imgfs
[[ -x $IMGFS ]] || die "no imgfs binary at $IMGFS after the build"

# ---------------------------------------------------------------- work dir and cleanup
WORK=$(mktemp -d "${TMPDIR:-/tmp}/imgfs-bench.XXXXXX")
WORK=$(cd "$WORK" && pwd -P)
case $WORK in
    *,* | *' '*) rmdir "$WORK"; die "the temp dir path ($WORK) must not contain commas or spaces (qsd options)" ;;
esac
SRC=$WORK/imgfs-src      # images imgfs serves
MNT=$WORK/imgfs-mnt      # imgfs mount point
QSD=$WORK/qsd            # images qsd serves, and its export files
QSD_PID_FILE=$QSD/qsd.pid
FILES=$WORK/file         # the plain raw files of the "file" column
LY=$WORK/libyal          # images the libyal mounter serves, NAME.EXT on mount point NAME.mnt
LIBYAL_IMAGES=(bench alloc1)
declare -A LIBYAL_PIDS   # NAME -> pid of the mounter process serving it
IMGFS_LOG=$WORK/imgfs.log
mkdir -p "$SRC" "$MNT" "$QSD" "$FILES" "$LY"

# Is PATH a mount point? Reads mountinfo, so it also sees a dead FUSE mount ("Transport endpoint
# is not connected") that stat-based checks choke on.
is_mounted() {
    awk -v p="$1" '$5 == p { found = 1 } END { exit !found }' /proc/self/mountinfo
}

anything_mounted_below() {
    awk -v p="$1/" 'index($5, p) == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo
}

qsd_pid() {
    local pid
    [[ -s $QSD_PID_FILE ]] || return 1
    pid=$(<"$QSD_PID_FILE")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    # Only ever signal the qemu-storage-daemon this script started (comm is cut to 15 chars).
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == qemu-storage-d* ]] || return 1
    echo "$pid"
}

stop_qsd() {
    local pid i f
    if pid=$(qsd_pid); then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            warn "qemu-storage-daemon ($pid) ignored SIGTERM for 10 s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
            while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
        fi
    fi
    rm -f "$QSD_PID_FILE"
    # A start that hung never wrote its pid file: its processes name our work directory.
    pkill -KILL -f "qemu-storage-daemon .*$QSD/" 2>/dev/null || true
    # QEMU 10.0 leaves its FUSE mounts behind when it exits on SIGTERM.
    for f in "$QSD"/*.raw; do
        if is_mounted "$f"; then
            fusermount3 -u "$f" 2>/dev/null || fusermount3 -u -z "$f" 2>/dev/null || umount -l "$f" 2>/dev/null || true
        fi
    done
}

# libyal_pid_of IMAGE MOUNTPOINT -> pid of the libyal mounter this script started on them (after
# mounting it forks, and the child serves: find it by its exact command line).
libyal_pid_of() {
    local dir cmd
    for dir in /proc/[0-9]*; do
        [[ $(cat "$dir/comm" 2>/dev/null) == "$LIBYAL" ]] || continue
        cmd=$(tr '\0' ' ' 2>/dev/null <"$dir/cmdline") || continue
        if [[ $cmd == "$LIBYAL $1 $2 " ]]; then
            echo "${dir#/proc/}"
            return 0
        fi
    done
    return 1
}

stop_libyal() {
    local name mnt pid i
    [[ -n $LIBYAL ]] || return 0
    for name in "${LIBYAL_IMAGES[@]}"; do
        mnt=$LY/$name.mnt
        pid=${LIBYAL_PIDS[$name]:-}
        [[ -n $pid ]] || pid=$(libyal_pid_of "$LY/$name.$EXT" "$mnt") || pid=
        if is_mounted "$mnt"; then
            fusermount3 -u "$mnt" 2>/dev/null || umount "$mnt" 2>/dev/null ||
                fusermount3 -u -z "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
        fi
        unset "LIBYAL_PIDS[$name]"
        [[ -n $pid ]] || continue
        # Unmounted, it leaves its FUSE loop and exits.
        for ((i = 0; i < 100; i++)); do
            [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$LIBYAL" ]] || continue 2
            sleep 0.1
        done
        warn "$LIBYAL ($pid) did not exit within 10 s of its unmount; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    done
}

stop_imgfs() {
    if is_mounted "$MNT"; then
        if ! timeout 120 "$IMGFS" umount "$MNT"; then
            warn "imgfs umount failed; detaching $MNT lazily"
            fusermount3 -u -z "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true
        fi
    fi
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    set +e
    stop_imgfs
    stop_qsd
    stop_libyal
    if [[ -n ${URING_BEFORE:-} ]]; then
        echo "$URING_BEFORE" >"$URING_PARAM"
    fi
    if ((rc != 0)) && [[ -s $IMGFS_LOG ]]; then
        warn "last lines of the imgfs log:"
        tail -n 20 "$IMGFS_LOG" >&2
    fi
    if anything_mounted_below "$WORK"; then
        warn "something below $WORK is still mounted; leaving it in place"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
# set -e ends the run without a word; say where.
trap 'warn "failed (status $?) at line $LINENO: $BASH_COMMAND"' ERR
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

avail_kb=$(df -Pk "$WORK" | awk 'NR == 2 { print $4 }')
# Both daemons' bench and filled alloc images, the libyal copy, the raw copy and the fresh raw file.
need_kb=$(((2 * (1 + 2 * SEQ_REPS) + 3) * SIZE_BYTES / 1024 + 256 * 1024))
((avail_kb >= need_kb)) || die "need $((need_kb / 1024)) MiB free below ${TMPDIR:-/tmp}, have $((avail_kb / 1024)) MiB (set TMPDIR elsewhere)"

# ---------------------------------------------------------------- images
# bench.EXT: fully written (every block allocated), for the read and overwrite rows.
# allocN.EXT: empty, one for each run of the dd "first write (allocation)" row;
# fioallocN.EXT: the same for the fio first write row.
# Each daemon gets its own copies.
ALLOC_IMAGES=()
for ((i = 1; i <= SEQ_REPS; i++)); do ALLOC_IMAGES+=("alloc$i" "fioalloc$i"); done
IMAGES=(bench "${ALLOC_IMAGES[@]}")
log "creating a $SIZE $FORMAT image and filling it with data"
qemu-img create -q "${CREATE_OPTS[@]}" "$SRC/bench.$EXT" "$SIZE_BYTES"
fill_cmds=()
chunk=$((256 * MIB))
for ((off = 0; off < SIZE_BYTES; off += chunk)); do
    len=$((SIZE_BYTES - off < chunk ? SIZE_BYTES - off : chunk))
    fill_cmds+=(-c "write -q -P 0x5a $off $len")
done
qemu-io -f "$QEMU_DRIVER" "${fill_cmds[@]}" "$SRC/bench.$EXT" >/dev/null
# With its extent files (a monolithicFlat VMDK is bench.vmdk plus bench-flat.vmdk).
cp "$SRC"/bench[.-]* "$QSD/"
for name in "${ALLOC_IMAGES[@]}"; do
    qemu-img create -q "${CREATE_OPTS[@]}" "$SRC/$name.$EXT" "$SIZE_BYTES"
    qemu-img create -q "${CREATE_OPTS[@]}" "$QSD/$name.$EXT" "$SIZE_BYTES"
done
for name in "${IMAGES[@]}"; do touch "$QSD/$name.raw"; done
# The libyal mounter's own copies: the data for the read rows, an empty image for holeread4.
if [[ -n $LIBYAL ]]; then
    cp "$SRC"/bench[.-]* "$LY/"
    qemu-img create -q "${CREATE_OPTS[@]}" "$LY/alloc1.$EXT" "$SIZE_BYTES"
fi
# The file column: the image's data as a raw file, and a sparse file for the unallocated row.
qemu-img convert -f "$QEMU_DRIVER" -O raw "$SRC/bench.$EXT" "$FILES/bench.raw"
(($(stat -c %s "$FILES/bench.raw") == SIZE_BYTES)) || die "qemu-img convert made a raw file of the wrong size"
truncate -s "$SIZE_BYTES" "$FILES/hole.raw"

# ---------------------------------------------------------------- start both daemons
IMGFS_STATUS=ok
imgfs_args=(mount --log-file "$IMGFS_LOG")
[[ -n $IMGFS_THREADS ]] && imgfs_args+=(--threads "$IMGFS_THREADS")
URING_PARAM=/sys/module/fuse/parameters/enable_uring
if [[ -n $TRANSPORT ]]; then
    imgfs_args+=(--transport "$TRANSPORT")
    if [[ $TRANSPORT == uring ]]; then
        [[ -w $URING_PARAM ]] || die "--transport uring: $URING_PARAM missing (Linux 6.14+)"
        URING_BEFORE=$(cat "$URING_PARAM")
        echo Y >"$URING_PARAM"
    fi
fi
read -r -a extra_args <<<"$IMGFS_ARGS"
imgfs_args+=("${extra_args[@]}")
log "mounting imgfs"
if ! imgfs_err=$("$IMGFS" "${imgfs_args[@]}" "$SRC" "$MNT" 2>&1); then
    IMGFS_STATUS="imgfs mount failed: $imgfs_err"
else
    for f in "${IMAGES[@]}"; do
        raw=$MNT/$f.$EXT.raw
        if [[ ! -f $raw ]]; then
            IMGFS_STATUS="imgfs does not serve $f.$EXT (mount shows: $(find "$MNT" -mindepth 1 -maxdepth 1 -printf '%f ' 2>&1))"
            break
        fi
        got=$(stat -c %s "$raw")
        if ((got != SIZE_BYTES)); then
            IMGFS_STATUS="imgfs serves $f.$EXT.raw with size $got, expected $SIZE_BYTES"
            break
        fi
    done
fi
[[ $IMGFS_STATUS == ok ]] || warn "$IMGFS_STATUS"
# The daemon's pid, for its CPU time: the mount root answers it as an extended attribute.
IMGFS_PID=
if [[ $IMGFS_STATUS == ok ]]; then
    IMGFS_PID=$(getfattr -n user.imgfs.pid --only-values "$MNT" 2>/dev/null) || IMGFS_PID=
    if [[ ! $IMGFS_PID =~ ^[0-9]+$ || ! -r /proc/$IMGFS_PID/stat ]]; then
        warn "cannot read the imgfs daemon's pid (user.imgfs.pid on $MNT); no CPU figures for imgfs"
        IMGFS_PID=
    fi
fi

# qemu-storage-daemon (QEMU 10.0 has no multi-threaded or io_uring FUSE export yet; its FUSE
# options are only mountpoint, writable, growable and allow-other). Best of what was tried on a
# 2-core VM: the file node reads and writes through the host page cache like imgfs
# (cache.direct=off, the default) with aio=io_uring (random reads about 2x faster than the
# default aio=threads at numjobs=4), and the exports run in their own iothread instead of the
# main loop (reads 10-60% faster, writes within noise). aio=threads is the fallback when
# io_uring is unavailable. allow-other=off like imgfs; writethrough and cache.no-flush stay off,
# so fsync reaches the disk on both sides.
qsd_start() {
    local aio=$1 args=(--object "iothread,id=iothread0") name
    for name in "${IMAGES[@]}"; do
        args+=(--blockdev "driver=file,node-name=$name-file,filename=$QSD/$name.$EXT,aio=$aio"
            --blockdev "driver=$QEMU_DRIVER,node-name=$name-fmt,file=$name-file"
            --export "type=fuse,id=$name,node-name=$name-fmt,mountpoint=$QSD/$name.raw,writable=on,allow-other=off,iothread=iothread0")
    done
    QSD_OPTS="--object iothread,id=iothread0 --blockdev driver=file,filename=IMG,aio=$aio --blockdev driver=$QEMU_DRIVER,file=... --export type=fuse,writable=on,allow-other=off,iothread=iothread0 --daemonize"
    # QEMU 10.0 with aio=io_uring never finishes starting on a monolithicFlat VMDK: give up
    # after a minute (and fall back to aio=threads below).
    timeout -k 5 60 qemu-storage-daemon "${args[@]}" --daemonize --pidfile "$QSD_PID_FILE"
}
log "starting qemu-storage-daemon"
if ! qsd_start io_uring 2>"$WORK/qsd.err"; then
    warn "qemu-storage-daemon with aio=io_uring failed ($(tr '\n' ' ' <"$WORK/qsd.err")); retrying with aio=threads"
    stop_qsd
    qsd_start threads || die "qemu-storage-daemon did not start"
fi
QSD_PID=$(qsd_pid) || die "qemu-storage-daemon did not leave a pid file"

# libyal_start NAME: mount $LY/NAME.EXT on $LY/NAME.mnt the way its manual says (`TOOL IMAGE
# MOUNTPOINT`: it mounts, then daemonizes). On failure LIBYAL_ERR says why.
libyal_start() {
    local name=$1 img=$LY/$1.$EXT mnt=$LY/$1.mnt out=$WORK/libyal-$1.out pid got
    mkdir -p "$mnt"
    if ! timeout -k 5 60 "$LIBYAL" "$img" "$mnt" >"$out" 2>&1; then
        # Drop its version banner, keep the error.
        LIBYAL_ERR="$LIBYAL $name.$EXT failed: $(grep -v -e "^$LIBYAL [0-9]*\$" -e '^$' "$out" | head -c 300 | tr '\n' ' ')"
        return 1
    fi
    if ! is_mounted "$mnt" || [[ ! -f $mnt/$LIBYAL_FILE ]]; then
        LIBYAL_ERR="$LIBYAL $name.$EXT: no $LIBYAL_FILE on its mount point (it shows: $(find "$mnt" -mindepth 1 -maxdepth 1 -printf '%f ' 2>&1))"
        return 1
    fi
    got=$(stat -c %s "$mnt/$LIBYAL_FILE")
    if ((got != SIZE_BYTES)); then
        LIBYAL_ERR="$LIBYAL serves $name.$EXT with size $got, expected $SIZE_BYTES"
        return 1
    fi
    if ! pid=$(libyal_pid_of "$img" "$mnt"); then
        LIBYAL_ERR="$LIBYAL $name.$EXT: mounted, but no $LIBYAL process serves it"
        return 1
    fi
    LIBYAL_PIDS[$name]=$pid
}
LIBYAL_STATUS=ok
LIBYAL_VERSION=
if [[ -z $LIBYAL ]]; then
    LIBYAL_STATUS="none"
elif ! command -v "$LIBYAL" >/dev/null 2>&1; then
    LIBYAL_STATUS="$LIBYAL is not installed"
else
    # awk reads all of it: with head, the tool could die of SIGPIPE and pipefail end the run.
    LIBYAL_VERSION=$("$LIBYAL" -V 2>/dev/null | awk 'NR == 1') || LIBYAL_VERSION=
    log "starting $LIBYAL"
    for name in "${LIBYAL_IMAGES[@]}"; do
        if ! libyal_start "$name"; then
            warn "$LIBYAL_ERR"
            if [[ $LIBYAL_STATUS == ok ]]; then LIBYAL_STATUS=$LIBYAL_ERR; fi
        fi
    done
fi

# ---------------------------------------------------------------- measurements
DROP_CACHES=ok
drop_caches() {
    sync
    if ! echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; then
        [[ $DROP_CACHES == ok ]] && warn "cannot write /proc/sys/vm/drop_caches; results include cached data"
        DROP_CACHES=failed
    fi
}

now_ns() { date +%s%N; }

# Daemon CPU time per GiB moved. measure() gets the serving process's pid (empty for the file
# column), reads its CPU time before and after the operation into $WORK/cpu0, and leaves the
# seconds per GiB (2^30 bytes) in $WORK/cpu.
CLK_TCK=$(getconf CLK_TCK)
# cpu_ticks PID -> utime + stime of the process, all its threads, in clock ticks (fields 14 and
# 15 of /proc/PID/stat, counted here after the ")" that closes the command name)
cpu_ticks() {
    local stat fields
    stat=$(<"/proc/$1/stat") || return 1
    read -r -a fields <<<"${stat##*) }"
    echo $((fields[11] + fields[12]))
}
cpu_mark() {
    [[ -z $1 ]] || cpu_ticks "$1" >"$WORK/cpu0"
}
# cpu_done PID BYTES
cpu_done() {
    local t0 t1
    [[ -n $1 && -s $WORK/cpu0 ]] || return 0
    t0=$(<"$WORK/cpu0")
    t1=$(cpu_ticks "$1") || return 0
    awk -v t="$((t1 - t0))" -v hz="$CLK_TCK" -v b="$2" 'BEGIN { if (b > 0) printf "%.3f", t / hz / (b / 1073741824) }' >"$WORK/cpu"
}
# cpu_mark_after_ramp TIMEOUT_PID DAEMON_PID: fio's ramp time moves data that its report leaves
# out, so the CPU count starts when the ramp ends: RAMP seconds after fio (the child of timeout)
# has forked its job processes, which takes it a few hundred ms from its start.
cpu_mark_after_ramp() {
    local i fio
    for ((i = 0; i < 3000; i++)); do
        kill -0 "$1" 2>/dev/null || return 0
        fio=$(pgrep -o -P "$1")
        if [[ -n $fio ]] && pgrep -P "$fio" >/dev/null; then break; fi
        sleep 0.01
    done
    sleep "$RAMP"
    cpu_mark "$2"
}

# The last dd must have moved the whole image (its stats line starts with the byte count).
dd_check_bytes() {
    local bytes
    bytes=$(awk '/bytes/ && /copied/ { b = $1 } END { print b + 0 }' "$WORK/dd.err")
    if ((bytes != SIZE_BYTES)); then
        echo "dd moved $bytes bytes, expected $SIZE_BYTES: $(tr '\n' ' ' <"$WORK/dd.err")" >&2
        return 1
    fi
}

# dd_rate START_NS END_NS -> MB/s (10^6 bytes) for the whole image
dd_rate() {
    awk -v b="$SIZE_BYTES" -v t0="$1" -v t1="$2" 'BEGIN { printf "%.1f", b / ((t1 - t0) / 1e9) / 1e6 }'
}

# fio_iops RW NUMJOBS FILE PID -> IOPS
fio_iops() {
    local json=$WORK/fio.json fio_pid sampler='' rc=0
    rm -f "$json"
    timeout -k 5 $((RUNTIME + RAMP + 120)) fio --name=bench --filename="$3" --rw="$1" --bs=4k \
        --direct=1 --ioengine=psync --iodepth=1 --numjobs="$2" --group_reporting \
        --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" --size="$SIZE_BYTES" \
        --norandommap --randrepeat=0 --invalidate=0 --fallocate=none \
        --output-format=json --output="$json" >/dev/null &
    fio_pid=$!
    if [[ -n $4 ]]; then
        cpu_mark_after_ramp "$fio_pid" "$4" &
        sampler=$!
    fi
    wait "$fio_pid" || rc=$?
    if [[ -n $sampler ]]; then wait "$sampler" || true; fi
    ((rc == 0)) || return 1
    jq -e '.jobs[0].error == 0' "$json" >/dev/null || return 1
    cpu_done "$4" "$(jq -r '.jobs[0].read.io_bytes + .jobs[0].write.io_bytes' "$json")"
    jq -r '.jobs[0].read.iops + .jobs[0].write.iops | floor' "$json"
}

# fio_write_mbs FILE PID -> MB/s (10^6 bytes) of one sequential pass of 1 MiB writes over the
# whole file, final fsync included (fio counts the end_fsync in the job's runtime).
fio_write_mbs() {
    local json=$WORK/fio.json
    rm -f "$json"
    cpu_mark "$2"
    timeout -k 5 600 fio --name=bench --filename="$1" --rw=write --bs=1M --ioengine=psync \
        --iodepth=1 --numjobs=1 --size="$SIZE_BYTES" --end_fsync=1 --invalidate=0 --fallocate=none \
        --output-format=json --output="$json" >/dev/null || return 1
    jq -e --argjson size "$SIZE_BYTES" '.jobs[0].error == 0 and .jobs[0].write.io_bytes == $size' "$json" >/dev/null || {
        echo "fio wrote $(jq -r '.jobs[0].write.io_bytes' "$json") bytes, expected $SIZE_BYTES" >&2
        return 1
    }
    cpu_done "$2" "$(jq -r '.jobs[0].read.io_bytes + .jobs[0].write.io_bytes' "$json")"
    jq -r '.jobs[0].write.bw_bytes' "$json" | awk '{ printf "%.1f", $1 / 1e6 }'
}

# measure TEST FILE PID -> the number for the table (and the daemon PID's CPU s/GiB in
# $WORK/cpu; no PID, no CPU figure). The caller drops the page cache first (here
# it would run in a subshell). Not run under set -e (it is called from an if), so every step
# checks its own status.
measure() {
    local t0 t1
    case $1 in
        seqread | seqreaddirect | seqreadwarm)
            local iflags=fullblock
            [[ $1 == seqreaddirect ]] && iflags=fullblock,direct
            if [[ $1 == seqreadwarm ]]; then
                # An untimed pass first, so the timed one finds everything in the host page
                # cache: what is left is each server's own path.
                timeout -k 5 600 dd if="$2" of=/dev/null bs=1M count="$SIZE_MB" 2>"$WORK/dd.err" || { cat "$WORK/dd.err" >&2; return 1; }
            fi
            cpu_mark "$3"
            t0=$(now_ns)
            timeout -k 5 600 dd if="$2" of=/dev/null bs=1M count="$SIZE_MB" iflag="$iflags" 2>"$WORK/dd.err" || { cat "$WORK/dd.err" >&2; return 1; }
            t1=$(now_ns)
            cpu_done "$3" "$SIZE_BYTES"
            dd_check_bytes || return 1
            dd_rate "$t0" "$t1"
            ;;
        seqwrite | allocwrite | seqwritedirect)
            local flags=()
            [[ $1 == seqwritedirect ]] && flags=(oflag=direct)
            cpu_mark "$3"
            t0=$(now_ns)
            timeout -k 5 600 dd if=/dev/zero of="$2" bs=1M count="$SIZE_MB" conv=notrunc,fsync "${flags[@]}" 2>"$WORK/dd.err" || { cat "$WORK/dd.err" >&2; return 1; }
            t1=$(now_ns)
            cpu_done "$3" "$SIZE_BYTES"
            dd_check_bytes || return 1
            dd_rate "$t0" "$t1"
            ;;
        randread1) fio_iops randread 1 "$2" "$3" ;;
        randread4 | holeread4) fio_iops randread 4 "$2" "$3" ;;
        randwrite1) fio_iops randwrite 1 "$2" "$3" ;;
        randwrite4) fio_iops randwrite 4 "$2" "$3" ;;
        allocfio) fio_write_mbs "$2" "$3" ;;
        *) return 1 ;;
    esac
}

is_read_test() {
    case $1 in
        seqread | seqreaddirect | seqreadwarm | randread1 | randread4 | holeread4) return 0 ;;
        *) return 1 ;;
    esac
}

# Reads first, while the image still holds the 0x5a pattern; then overwrites; the last three
# rows use the separate empty images. holeread4 reads unallocated blocks, so neither daemon touches
# the host file: it measures what the FUSE round trip itself costs, the ceiling for randread4.
TESTS=(seqread seqreaddirect seqreadwarm randread1 randread4 seqwrite seqwritedirect randwrite1 randwrite4 holeread4 allocwrite allocfio)
if [[ -n $ROWS ]]; then
    chosen=()
    for test in "${TESTS[@]}"; do
        [[ ",$ROWS," == *",$test,"* ]] && chosen+=("$test")
    done
    TESTS=("${chosen[@]}")
fi
label() {
    case $1 in
        seqread) echo "sequential read, buffered, dd bs=1M (MB/s)" ;;
        seqreaddirect) echo "sequential read, O_DIRECT, dd bs=1M iflag=direct (MB/s)" ;;
        seqreadwarm) echo "sequential read, image in the host page cache (no disk), dd bs=1M (MB/s)" ;;
        randread1) echo "random read 4k, fio numjobs=1 (IOPS)" ;;
        randread4) echo "random read 4k, fio numjobs=4 (IOPS)" ;;
        seqwrite) echo "sequential overwrite, dd bs=1M conv=fsync (MB/s)" ;;
        seqwritedirect) echo "sequential overwrite, dd bs=1M oflag=direct (MB/s)" ;;
        randwrite1) echo "random overwrite 4k, fio numjobs=1 (IOPS)" ;;
        randwrite4) echo "random overwrite 4k, fio numjobs=4 (IOPS)" ;;
        holeread4) echo "random read 4k of unallocated blocks (no host I/O), fio numjobs=4 (IOPS)" ;;
        allocwrite) echo "sequential first write into empty image, dd bs=1M conv=fsync (MB/s)" ;;
        allocfio) echo "sequential first write into empty image, fio bs=1M end_fsync=1 (MB/s)" ;;
    esac
}

# The sequential rows are short and noisy, so they run SEQ_REPS times, the sides taking turns
# (imgfs, qsd, libyal, file), and the table shows the median (the allocation rows write into a fresh empty image
# each time). The random fio rows run once, for RUNTIME seconds.
reps_of() {
    case $1 in
        seqread | seqreaddirect | seqreadwarm | seqwrite | seqwritedirect | allocwrite | allocfio) echo "$SEQ_REPS" ;;
        *) echo 1 ;;
    esac
}

# median [FORMAT] < "v1 v2 ..." (FORMAT for the mean of the middle two; default %.1f)
median() {
    tr ' ' '\n' | grep . | sort -g | awk -v fmt="${1:-%.1f}" '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf fmt, (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

SIDES=(imgfs qsd libyal file)
declare -A RESULT VALUES CPU CPUS
ERRORS=()
for test in "${TESTS[@]}"; do
    reps=$(reps_of "$test")
    for side in "${SIDES[@]}"; do
        VALUES[$side]=
        CPUS[$side]=
    done
    for ((rep = 1; rep <= reps; rep++)); do
        first=$(((rep - 1) % ${#SIDES[@]}))
        for side in "${SIDES[@]:first}" "${SIDES[@]:0:first}"; do
            image=bench
            [[ $test == allocwrite ]] && image=alloc$rep
            [[ $test == allocfio ]] && image=fioalloc$rep
            [[ $test == holeread4 ]] && image=alloc1
            [[ ${RESULT[$test.$side]:-} == error ]] && continue
            pid=
            case $side in
                imgfs)
                    if [[ $IMGFS_STATUS != ok ]]; then
                        RESULT[$test.$side]="not served"
                        continue
                    fi
                    target=$MNT/$image.$EXT.raw
                    pid=$IMGFS_PID
                    ;;
                qsd)
                    target=$QSD/$image.raw
                    pid=$QSD_PID
                    ;;
                libyal)
                    # Read-only: it takes part in the read rows only.
                    if [[ -z $LIBYAL ]] || ! is_read_test "$test"; then
                        RESULT[$test.$side]="–"
                        continue
                    fi
                    if [[ -z ${LIBYAL_PIDS[$image]:-} ]]; then
                        RESULT[$test.$side]="not served"
                        continue
                    fi
                    target=$LY/$image.mnt/$LIBYAL_FILE
                    pid=${LIBYAL_PIDS[$image]}
                    ;;
                file)
                    case $test in
                        holeread4) target=$FILES/hole.raw ;;
                        allocwrite | allocfio)
                            target=$FILES/fresh.raw
                            rm -f "$target"
                            truncate -s "$SIZE_BYTES" "$target"
                            ;;
                        *) target=$FILES/bench.raw ;;
                    esac
                    ;;
            esac
            suffix=
            ((reps > 1)) && suffix=" ($rep/$reps)"
            log "$(label "$test"): $side$suffix"
            err=$WORK/err
            drop_caches
            rm -f "$WORK/cpu" "$WORK/cpu0"
            if value=$(measure "$test" "$target" "$pid" 2>"$err") && [[ -n $value ]]; then
                VALUES[$side]+="$value "
                RESULT[$test.$side]=$(median <<<"${VALUES[$side]}")
                if [[ -s $WORK/cpu ]]; then
                    CPUS[$side]+="$(<"$WORK/cpu") "
                    CPU[$test.$side]=$(median %.3f <<<"${CPUS[$side]}")
                fi
            else
                RESULT[$test.$side]=error
                ERRORS+=("$side, $(label "$test"): $(head -c 400 "$err" | tr '\n' ' ')")
                warn "${ERRORS[-1]}"
            fi
        done
    done
done

# ---------------------------------------------------------------- report
qemu_version=$(qemu-storage-daemon --version | awk 'NR == 1 { print $3 }')
fs_type=$(df -PT "$WORK" | awk 'NR == 2 { print $2 }')
mem_gib=$(awk '/^MemTotal:/ { printf "%.0f", $2 / 1048576 }' /proc/meminfo)
cpu=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
imgfs_rev=$(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo "no commit")
if [[ -n $(git -C "$REPO_DIR" status --porcelain 2>/dev/null | head -n 1) ]]; then
    imgfs_rev="$imgfs_rev+dirty"
fi

echo
echo "machine: nproc $(nproc), ${cpu:-unknown CPU}, ${mem_gib} GiB RAM, kernel $(uname -r), QEMU $qemu_version, $(fio --version), images on $fs_type"
imgfs_transport="/dev/fuse"
grep -q "FUSE over io_uring: " "$IMGFS_LOG" 2>/dev/null && imgfs_transport="io_uring ($(grep -o "[0-9]* queue(s) of [0-9]* entries on [0-9]* threads" "$IMGFS_LOG" | head -1))"
echo "run: $FORMAT $SIZE image ($SIZE_BYTES bytes), sequential rows: median of $SEQ_REPS, fio ${RUNTIME}s (+${RAMP}s ramp) psync direct=1 bs=4k, page cache drop: $DROP_CACHES, imgfs $imgfs_rev threads=${IMGFS_THREADS:-default} transport: $imgfs_transport${IMGFS_ARGS:+ args: $IMGFS_ARGS}, rows: ${ROWS:-all}"
echo "qsd: $QSD_OPTS"
if [[ -n $LIBYAL ]]; then
    echo "libyal: ${LIBYAL_VERSION:-$LIBYAL}, \`$LIBYAL IMAGE MOUNTPOINT\` (libfuse 2, daemonizes, one thread), read rows only"
fi
echo "file: the same operations on a plain raw file on the host file system, no FUSE in between"
echo "CPU s/GiB: the serving process's user+system CPU time (all threads) per GiB moved, median like the values; fio rows count after the ramp"
echo
# ratio A B -> A/B with two decimals, or an en dash when either is not a number
ratio() {
    if [[ $1 =~ ^[0-9.]+$ && $2 =~ ^[0-9.]+$ ]]; then
        awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "–" }'
    else
        echo "–"
    fi
}
echo "| test | imgfs | qemu-storage-daemon | ${LIBYAL:-libyal (none for $FORMAT)} | file | imgfs/qsd | imgfs/${LIBYAL:-libyal} | imgfs/file | CPU s/GiB imgfs | CPU s/GiB qsd | CPU s/GiB ${LIBYAL:-libyal} |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
for test in "${TESTS[@]}"; do
    a=${RESULT[$test.imgfs]:-–}
    b=${RESULT[$test.qsd]:-–}
    l=${RESULT[$test.libyal]:-–}
    f=${RESULT[$test.file]:-–}
    echo "| $(label "$test") | $a | $b | $l | $f | $(ratio "$a" "$b") | $(ratio "$a" "$l") | $(ratio "$a" "$f") | ${CPU[$test.imgfs]:-–} | ${CPU[$test.qsd]:-–} | ${CPU[$test.libyal]:-–} |"
done
if [[ $IMGFS_STATUS != ok ]]; then
    echo
    echo "imgfs: $IMGFS_STATUS"
fi
if [[ -n $LIBYAL && $LIBYAL_STATUS != ok ]]; then
    echo
    echo "$LIBYAL_STATUS"
fi

# ---------------------------------------------------------------- opening a 1 TiB image
if [[ $FORMAT == qcow2 || $FORMAT == qcow ]]; then
    log "opening a 1 TiB $FORMAT image"
    bash "$SCRIPT_DIR/bench-open.sh" "$FORMAT" "$IMGFS" "$WORK"
fi

if ((${#ERRORS[@]})); then
    echo
    echo "errors:"
    printf -- '- %s\n' "${ERRORS[@]}"
fi
