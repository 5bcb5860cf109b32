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
awk '/^test result:/ { p += $4; f += $6 } END { printf "imgfs: %d passed, %d failed\n", p, f }' "$log"
