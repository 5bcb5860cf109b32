#!/usr/bin/env bash
# How much of a sequential copy into a fresh image is still waiting for the disk when the copy
# ends: 1 MiB writes over the whole raw file of an empty image through an imgfs mount, then
# the dirty and under-write-back page cache (/proc/meminfo) at that moment, then the time the
# fsync takes, on the same descriptor (imgfs makes a close durable, so a `dd` without fsync
# would still wait for the disk in its close). Beside it the same on a plain sparse raw file.
# Prints a markdown table of medians.
#
#   scripts/bench-writeback.sh [--format vdi|qcow2|vhdx|vhd|vmdk] [--size 1G] [--runs 3] [--other IMGFS]
#
# --other adds a column for a second imgfs binary (a build before a change, say). The sides
# take turns, each run starting with the next one. Needs root (it mounts and drops the page
# cache); builds imgfs in release mode; works in a fresh mktemp directory and removes it again.
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
FORMAT=vdi
SIZE=1G
RUNS=3
OTHER=
while (($#)); do
    case $1 in
        --format) FORMAT=${2:?}; shift 2 ;;
        --size) SIZE=${2:?}; shift 2 ;;
        --runs) RUNS=${2:?}; shift 2 ;;
        --other) OTHER=${2:?}; shift 2 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench-writeback.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
case $FORMAT in
    vdi) CREATE=(-f vdi -o static=off); EXT=vdi ;;
    qcow2) CREATE=(-f qcow2); EXT=qcow2 ;;
    vhdx) CREATE=(-f vhdx -o subformat=dynamic); EXT=vhdx ;;
    vhd) CREATE=(-f vpc -o subformat=dynamic,force_size=on); EXT=vhd ;;
    vmdk) CREATE=(-f vmdk -o subformat=monolithicSparse); EXT=vmdk ;;
    *) echo "bench-writeback.sh: unknown format $FORMAT" >&2; exit 2 ;;
esac
[ "$(id -u)" -eq 0 ] || { echo "bench-writeback.sh: run as root" >&2; exit 1; }
SIZE_BYTES=$(numfmt --from=iec "$SIZE")
cargo build --release --quiet --manifest-path "$REPO_DIR/Cargo.toml"
declare -A BIN=([imgfs]="$REPO_DIR/target/release/imgfs")
SIDES=(imgfs)
if [[ -n $OTHER ]]; then
    BIN[other]=$OTHER
    SIDES+=(other)
fi
SIDES+=(file)
WORK=$(mktemp -d)
cleanup() {
    for side in "${SIDES[@]}"; do
        [[ $side == file ]] && continue
        mountpoint -q "$WORK/$side/mnt" 2>/dev/null && "${BIN[$side]}" umount "$WORK/$side/mnt" >/dev/null 2>&1
    done
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

for side in "${SIDES[@]}"; do
    mkdir -p "$WORK/$side/src" "$WORK/$side/mnt"
    for ((run = 1; run <= RUNS; run++)); do
        if [[ $side == file ]]; then
            truncate -s "$SIZE_BYTES" "$WORK/file/src/fresh$run.raw"
        else
            qemu-img create -q "${CREATE[@]}" "$WORK/$side/src/fresh$run.$EXT" "$SIZE_BYTES"
        fi
    done
    [[ $side == file ]] || "${BIN[$side]}" mount "$WORK/$side/src" "$WORK/$side/mnt"
done

# copy_then_fsync FILE -> "COPY_SECONDS PENDING_MIB FSYNC_SECONDS"
copy_then_fsync() {
    python3 - "$1" "$SIZE_BYTES" <<'PY'
import os, sys, time
path, size = sys.argv[1], int(sys.argv[2])
def pending_mib():
    kib = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith(("Dirty:", "Writeback:")):
                kib += int(line.split()[1])
    return kib // 1024
chunk = b"\0" * (1 << 20)
fd = os.open(path, os.O_WRONLY)
t0 = time.monotonic()
for offset in range(0, size, len(chunk)):
    os.pwrite(fd, chunk[: size - offset], offset)
t1 = time.monotonic()
pending = pending_mib()
os.fsync(fd)
t2 = time.monotonic()
os.close(fd)
print(f"{t1 - t0:.2f} {pending} {t2 - t1:.2f}")
PY
}
declare -A COPY DIRTY SYNC RATE TOTAL
for ((run = 1; run <= RUNS; run++)); do
    first=$(((run - 1) % ${#SIDES[@]}))
    for side in "${SIDES[@]:first}" "${SIDES[@]:0:first}"; do
        target=$WORK/$side/mnt/fresh$run.$EXT.raw
        [[ $side == file ]] && target=$WORK/file/src/fresh$run.raw
        sync
        echo 3 >/proc/sys/vm/drop_caches
        read -r copy pending fsync < <(copy_then_fsync "$target")
        echo "run $run, $side: copy $copy s, $pending MiB pending, fsync $fsync s" >&2
        COPY[$side]+="$copy "
        DIRTY[$side]+="$pending "
        SYNC[$side]+="$fsync "
        RATE[$side]+="$(awk -v a="$copy" -v b="$fsync" -v s="$SIZE_BYTES" 'BEGIN { printf "%.0f", s / (a + b) / 1e6 }') "
        TOTAL[$run.$side]=$(awk -v a="$copy" -v b="$fsync" 'BEGIN { print a + b }')
    done
done
for side in "${SIDES[@]}"; do
    [[ $side == file ]] || "${BIN[$side]}" umount "$WORK/$side/mnt"
done

median() { tr ' ' '\n' | grep . | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
echo "$FORMAT, $SIZE written in 1 MiB writes into a fresh image, then fsync; median of $RUNS runs"
echo
echo "| side | copy (s) | MiB dirty or under write-back when the copy ends | fsync (s) | MB/s, copy and fsync |"
echo "| --- | ---: | ---: | ---: | ---: |"
for side in "${SIDES[@]}"; do
    name=$side
    [[ $side == other ]] && name="imgfs (--other)"
    echo "| $name | $(median <<<"${COPY[$side]}") | $(median <<<"${DIRTY[$side]}") | $(median <<<"${SYNC[$side]}") | $(median <<<"${RATE[$side]}") |"
done
# The copy's own speed swings from run to run (the host page cache and the disk), so the
# comparison that holds is per run: the sides' times within one run, then their median.
echo
for side in "${SIDES[@]}"; do
    [[ $side == imgfs ]] && continue
    ratios=
    for ((run = 1; run <= RUNS; run++)); do
        ratios+="$(awk -v a="${TOTAL[$run.$side]}" -v b="${TOTAL[$run.imgfs]}" 'BEGIN { printf "%.2f", a / b }') "
    done
    echo "- $side's time / imgfs's time, copy and fsync, run by run: $ratios(median $(median <<<"$ratios"))"
done
