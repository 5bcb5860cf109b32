#!/usr/bin/env bash
# Times what the catalog does for a large source tree: the mount's start-up scan, the first
# and a second `ls` of one directory of many files, and `ls -l` (a lookup and getattr per
# entry), through an imgfs mount. Prints a markdown table of seconds.
#
#   scripts/bench-tree.sh [FILES ...]      (default: 10000 20000)
#
# Each directory holds FILES small files that are not images plus 20 small VDI images. Needs
# root (it mounts); builds imgfs in release mode; works in a fresh mktemp directory and removes
# it again, even on error or ctrl-c.
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
[ "$(id -u)" -eq 0 ] || { echo "bench-tree.sh: run as root" >&2; exit 1; }
cargo build --release --quiet --manifest-path "$REPO_DIR/Cargo.toml"
IMGFS="$REPO_DIR/target/release/imgfs"
WORK=$(mktemp -d)
cleanup() {
    mountpoint -q "$WORK/mnt" 2>/dev/null && "$IMGFS" umount "$WORK/mnt" >/dev/null 2>&1
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

seconds() {
    local start end
    start=$(date +%s.%N)
    "$@" >/dev/null
    end=$(date +%s.%N)
    awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", b - a }'
}

echo "| files | images | mount (scan) | first ls | second ls | ls -l |"
echo "| ---: | ---: | ---: | ---: | ---: | ---: |"
for files in "${@:-10000 20000}"; do
    for n in $files; do
        rm -rf "$WORK/src" && mkdir -p "$WORK/src/big" "$WORK/mnt"
        qemu-img create -q -f vdi "$WORK/one.vdi" 1M
        for i in $(seq 1 20); do cp "$WORK/one.vdi" "$WORK/src/big/disk$i.vdi"; done
        (cd "$WORK/src/big" && seq -f 'note%06g.txt' 1 "$n" | xargs touch)
        sync
        mount_s=$(seconds "$IMGFS" mount --log-file "$WORK/log" "$WORK/src" "$WORK/mnt")
        "$IMGFS" umount "$WORK/mnt"
        # A fresh mount whose first listing sees every file anew (the scan is skipped by
        # adding the files after it).
        rm -rf "$WORK/src/big" && mkdir -p "$WORK/src/big"
        "$IMGFS" mount --log-file "$WORK/log" "$WORK/src" "$WORK/mnt"
        for i in $(seq 1 20); do cp "$WORK/one.vdi" "$WORK/src/big/disk$i.vdi"; done
        (cd "$WORK/src/big" && seq -f 'note%06g.txt' 1 "$n" | xargs touch)
        first=$(seconds ls "$WORK/mnt/big")
        second=$(seconds ls "$WORK/mnt/big")
        long=$(seconds ls -l "$WORK/mnt/big")
        "$IMGFS" umount "$WORK/mnt"
        echo "| $n | 20 | $mount_s | $first | $second | $long |"
    done
done
