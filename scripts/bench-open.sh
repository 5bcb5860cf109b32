#!/usr/bin/env bash
# The formats with two-level tables must open by reading the header and the L1 table only, with
# no scan of L2 tables or refcounts: time and peak memory of `imgfs info` against `qemu-img
# info` on a 1 TiB image with 64 MiB of data spread over it (64 L2 tables in use). Prints a
# markdown table. Called by bench.sh for qcow and qcow2.
#
#   scripts/bench-open.sh qcow2|qcow IMGFS_BINARY WORK_DIR
set -euo pipefail
format=${1:?format (qcow2 or qcow)}
imgfs=${2:?the imgfs binary}
work=${3:?a work directory}
case $format in
    qcow2 | qcow) ;;
    *) echo "bench-open.sh: only qcow2 and qcow" >&2; exit 2 ;;
esac
mib=$((1024 * 1024))
big=$work/big.$format
qemu-img create -q -f "$format" "$big" 1T
spread=()
for ((i = 0; i < 64; i++)); do spread+=(-c "write -q -P 0x5a $((i * 16 * 1024 * mib)) 1M"); done
qemu-io -f "$format" "${spread[@]}" "$big" >/dev/null

now_ns() { date +%s%N; }
median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
# open_cost TOOL... -> "median_ms max_rss_kib" over 5 runs
open_cost() {
    local times=() rss=0 t0 t1 kib rep
    for ((rep = 0; rep < 5; rep++)); do
        t0=$(now_ns)
        kib=$(/usr/bin/time -f %M "$@" 2>&1 >/dev/null | tail -n 1)
        t1=$(now_ns)
        times+=($(((t1 - t0) / 1000000)))
        ((kib > rss)) && rss=$kib
    done
    echo "$(printf '%s\n' "${times[@]}" | median) $rss"
}
read -r imgfs_ms imgfs_kib < <(open_cost "$imgfs" info "$big")
read -r qemu_ms qemu_kib < <(open_cost qemu-img info -U "$big")
rm -f "$big"
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
echo
echo "| open a 1 TiB $format image (info, median of 5) | imgfs | qemu-img | imgfs/qemu ratio |"
echo "| --- | ---: | ---: | ---: |"
echo "| time (ms) | $imgfs_ms | $qemu_ms | $(ratio "$imgfs_ms" "$qemu_ms") |"
echo "| peak memory (MiB) | $((imgfs_kib / 1024)) | $((qemu_kib / 1024)) | $(ratio "$imgfs_kib" "$qemu_kib") |"
