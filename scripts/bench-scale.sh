#!/usr/bin/env bash
# The scale figures: one directory of many images served by one mount. For each count N, N
# qcow2 images of 1 MiB (4 KiB of data each) are made; then it times the mount (its start-up
# scan), the first and a second `ls`, `ls -l`, and reading the first 4 KiB of every raw file
# one after the other, and reports read failures, the daemon's peak memory once everything
# is listed and once everything is read (every image then open), and how many descriptors it
# holds at the end (images closed a few seconds after their last use). Prints a markdown
# table (seconds, MiB).
#
#   scripts/bench-scale.sh [--user USER] [--nofile LIMIT] [N ...]     (default N: 10000)
#
#   --user USER      run the daemon and every command on the mount as USER (a user without
#                    root mounts through fusermount3; /dev/fuse is made 0666 for the run, as
#                    distributions set it, and restored after)
#   --nofile LIMIT   the descriptor limit (ulimit -n) of the daemon and the commands
#
# Needs root (it creates the user's tree and may change /dev/fuse); builds imgfs in release
# mode; works in a fresh mktemp directory and removes it again, even on error or ctrl-c.
#
# The single-quoted scripts below are run by another shell, which expands them.
# shellcheck disable=SC2016
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
RUN_AS=
NOFILE=
COUNTS=()
while (($#)); do
    case $1 in
        --user) RUN_AS=${2:?--user needs a name}; shift 2 ;;
        --nofile) NOFILE=${2:?--nofile needs a number}; shift 2 ;;
        -h | --help) sed -n '2,17p' "$0"; exit 0 ;;
        *) COUNTS+=("$1"); shift ;;
    esac
done
((${#COUNTS[@]})) || COUNTS=(10000)
[ "$(id -u)" -eq 0 ] || { echo "bench-scale.sh: run as root" >&2; exit 1; }
for tool in qemu-img qemu-io setpriv; do
    command -v "$tool" >/dev/null || { echo "bench-scale.sh: $tool is missing" >&2; exit 1; }
done
cargo build --release --quiet --manifest-path "$REPO_DIR/Cargo.toml"
TARGET_DIR=$(cd "$REPO_DIR" && cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')

WORK=$(mktemp -d)
chmod 755 "$WORK"
# The user may not reach the build directory: the binary is copied beside the tree.
IMGFS=$WORK/imgfs
cp "$TARGET_DIR/release/imgfs" "$IMGFS"
DEV_FUSE_MODE=
cleanup() {
    if mountpoint -q "$WORK/mnt" 2>/dev/null; then
        as_user "$IMGFS" umount "$WORK/mnt" >/dev/null 2>&1 || umount -l "$WORK/mnt" || true
    fi
    [[ -z $DEV_FUSE_MODE ]] || chmod "$DEV_FUSE_MODE" /dev/fuse
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
if [[ -n $RUN_AS ]]; then
    mode=$(stat -c %a /dev/fuse)
    if [[ $mode != 666 ]]; then
        DEV_FUSE_MODE=$mode
        chmod 666 /dev/fuse
    fi
fi

# Runs a command as the chosen user (or root) under the chosen descriptor limit.
as_user() {
    local limit=${NOFILE:-$(ulimit -n)}
    if [[ -n $RUN_AS ]]; then
        setpriv --reuid="$(id -u "$RUN_AS")" --regid="$(id -g "$RUN_AS")" --clear-groups \
            bash -c 'ulimit -n "$0" && exec "$@"' "$limit" "$@"
    else
        bash -c 'ulimit -n "$0" && exec "$@"' "$limit" "$@"
    fi
}

seconds() {
    local start end
    start=$(date +%s.%N)
    "$@" >/dev/null
    end=$(date +%s.%N)
    awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }'
}

daemon_pid() {
    pgrep -n -f -- "$IMGFS mount --log-file $WORK/out/log"
}

# qcow2 with 4 KiB clusters keeps each image at 24 KiB: 100,000 of them take 2.4 GB.
qemu-img create -q -f qcow2 -o cluster_size=4k "$WORK/one.qcow2" 1M
qemu-io -f qcow2 -c 'write -q -P 0x5a 0 4k' "$WORK/one.qcow2" >/dev/null
user=${RUN_AS:-root}
echo "machine: nproc $(nproc), kernel $(uname -r), imgfs $(git -C "$REPO_DIR" rev-parse --short HEAD)"
echo
echo "| images | user, descriptor limit | mount (scan) | first ls | second ls | ls -l | peak RSS listed (MiB) | read 4 KiB of each | failed reads | peak RSS read (MiB) | descriptors held after |"
echo "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
for n in "${COUNTS[@]}"; do
    rm -rf "$WORK/src" "$WORK/out" && mkdir -p "$WORK/src" "$WORK/mnt" "$WORK/out"
    # tee writes up to 256 copies at once: a process per copy would take minutes.
    seq -f "$WORK/src/disk%06g.qcow2" 1 "$n" |
        xargs -n 256 sh -c 'tee "$@" <"$0" >/dev/null' "$WORK/one.qcow2"
    [[ -z $RUN_AS ]] || chown -R "$RUN_AS": "$WORK/src" "$WORK/mnt" "$WORK/out"
    sync
    mount_s=$(seconds as_user "$IMGFS" mount --log-file "$WORK/out/log" "$WORK/src" "$WORK/mnt")
    pid=$(daemon_pid)
    first=$(seconds as_user ls "$WORK/mnt")
    second=$(seconds as_user ls "$WORK/mnt")
    long=$(seconds as_user ls -l "$WORK/mnt")
    listed=$(as_user ls "$WORK/mnt" | grep -c '\.raw$' || true)
    listed_peak=$(awk '/^VmHWM:/ { printf "%.0f", $2 / 1024 }' "/proc/$pid/status")
    ((listed == n)) || echo "bench-scale.sh: the mount lists $listed raw files, not $n" >&2
    # Every raw file opened, read and closed in turn; what comes back must be n times the
    # 4 KiB written (compared by checksum), and head must not have failed on any.
    failed=0
    reads=$(seconds as_user bash -c 'set -o pipefail; cd "$0" && ls | grep "\.raw$" |
        xargs -n 512 head -q -c 4096 | cksum >"$1"' "$WORK/mnt" "$WORK/out/got") || failed=1
    expected=$(head -c $((n * 4096)) /dev/zero | tr '\0' Z | cksum)
    [[ $failed == 0 && $(<"$WORK/out/got") == "$expected" ]] || failed=1
    peak=$(awk '/^VmHWM:/ { printf "%.0f", $2 / 1024 }' "/proc/$pid/status")
    fds=$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 | wc -l)
    as_user "$IMGFS" umount "$WORK/mnt"
    result=$([[ $failed == 0 ]] && echo 0 || echo "some")
    echo "| $n | $user, ${NOFILE:-$(ulimit -n)} | $mount_s | $first | $second | $long | $listed_peak | $reads | $result | $peak | $fds |"
done
