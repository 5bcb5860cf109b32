#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests and the mount tests against qemu-img.
# Mount tests need root and /dev/fuse; with CI=true they never skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --quiet 2>&1
