#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests and the mount tests against qemu-img.
# Mount tests need root and /dev/fuse; with CI=true they never skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# --lib --tests: unit and mount tests; there are no doc tests to run.
cargo test --lib --tests 2>&1 | tee "$log"
# The integration tests once more with every mount over FUSE over io_uring (Linux 6.14+; as
# root, the fuse module's enable_uring is set for the pass and put back after). The transport
# test sets that parameter itself, so it runs in the first pass only.
uring=/sys/module/fuse/parameters/enable_uring
if [[ $(id -u) -eq 0 && -w $uring ]]; then
    before=$(cat "$uring")
    trap 'echo "$before" >"$uring"; rm -f "$log"' EXIT
    echo Y >"$uring"
    targets=()
    for t in tests/*.rs; do
        t=$(basename "$t" .rs)
        [[ $t == transport_mount ]] || targets+=(--test "$t")
    done
    IMGFS_TEST_TRANSPORT=uring cargo test "${targets[@]}" 2>&1 | tee -a "$log"
    echo "$before" >"$uring"
elif [[ ${CI:-} == true ]]; then
    echo "CI must run the mount tests over io_uring too: needs root and Linux 6.14+" >&2
    exit 1
fi
awk '/^test result:/ { p += $4; f += $6 } END { printf "imgfs: %d passed, %d failed\n", p, f }' "$log"
