#!/usr/bin/env bash
# The crash harness: kills the imgfs daemon with SIGKILL at random moments while threads write
# and fsync, for every writable format and variant, and checks every image with qemu-img and a
# fresh mount (tests/crash/). Prints a table of rounds, failures and leaked clusters.
#
#   scripts/crash.sh [--rounds N] [--format F] [--seed S]
#
#   --rounds N   rounds per variant (default 10; CI runs 1)
#   --format F   only the variants whose name contains F (vdi, qcow2, qcow2-lazy, vhdx, vmdk, ...)
#   --seed S     replay a run (the seed is printed at the start)
#
# Needs root and /dev/fuse (it mounts). A failed round's files are kept under
# $TMPDIR/imgfs-crash-failures/.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=10
format=
seed=
while (($#)); do
    case $1 in
        --rounds) rounds=${2:?--rounds needs a value}; shift 2 ;;
        --format) format=${2:?--format needs a value}; shift 2 ;;
        --seed) seed=${2:?--seed needs a value}; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "crash.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
bash scripts/setup.sh
export IMGFS_CRASH_ROUNDS=$rounds IMGFS_CRASH_VARIANT=$format
[ -n "$seed" ] && export IMGFS_CRASH_SEED=$seed
exec cargo test --release --quiet --test crash a_daemon_killed -- --nocapture
