#!/usr/bin/env bash
# Runs the cargo-fuzz targets under fuzz/ one after the other, SECONDS each (default 60), under
# `nice -n 19`, and prints per target: runs, execs/s, coverage, corpus, peak RSS and crashes.
#
#   bash scripts/fuzz.sh [SECONDS] [TARGET...]       # every target when none is named
#
# Limits (environment): IMGFS_FUZZ_RSS_MB (default 512) is libFuzzer's -rss_limit_mb and
# -malloc_limit_mb, so one allocation or the whole process above it is a crash;
# IMGFS_FUZZ_TIMEOUT (default 25) seconds per input is a hang, and inputs slower than 10 s
# are reported as slow (instrumented code runs 10-20 times slower than a release build:
# images whose tables approach the memory budget take seconds). The live corpora grow in
# fuzz/corpus/<target> (not in git); crashes, hangs, OOMs, leaks and slow inputs land in
# fuzz/artifacts/<target>/ next to the log.
# Needs cargo-fuzz (installed here if missing) and a nightly toolchain, or the stable one
# with RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(vdi qcow qcow2 vhdx vhd vmdk luks status nbd)
rss_mb=${IMGFS_FUZZ_RSS_MB:-512}
timeout=${IMGFS_FUZZ_TIMEOUT:-25}

if ! cargo fuzz --version >/dev/null 2>&1; then
    nice -n 19 cargo install --locked cargo-fuzz
fi
toolchain=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    toolchain=(+nightly)
else
    export RUSTC_BOOTSTRAP=1
fi
(cd fuzz && nice -n 19 cargo "${toolchain[@]}" fuzz build)
triple=$(rustc -vV | sed -n 's/^host: //p')
bin_dir=$root/fuzz/target/$triple/release

# Image files live on tmpfs while fuzzing; removed on exit whatever happens.
scratch=$(mktemp -d "${IMGFS_FUZZ_SCRATCH:-/dev/shm}/imgfs-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
export IMGFS_FUZZ_DIR=$scratch
# A small quarantine keeps AddressSanitizer's own memory from counting against the limit.
export ASAN_OPTIONS=${ASAN_OPTIONS:-quarantine_size_mb=16}
# The host write-back thread lives as long as the process (fuzz/lsan.supp says why).
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$root/fuzz/lsan.supp}

printf '%-7s %10s %8s %7s %7s %12s %8s %8s %5s\n' target runs exec/s cov ft corpus rss_mb crashes slow
failed=0
for t in "${targets[@]}"; do
    corpus=fuzz/corpus/$t
    artifacts=fuzz/artifacts/$t
    mkdir -p "$corpus" "$artifacts"
    log=$artifacts/fuzz.log
    count() { find "$artifacts" -type f -name "$1" | wc -l; }
    before=$(($(count 'crash-*') + $(count 'oom-*') + $(count 'timeout-*') + $(count 'leak-*')))
    slow_before=$(count 'slow-unit-*')
    set +e
    nice -n 19 "$bin_dir/$t" \
        -rss_limit_mb="$rss_mb" -malloc_limit_mb="$rss_mb" -timeout="$timeout" \
        -report_slow_units=10 -max_len=65536 -max_total_time="$seconds" -dict=fuzz/imgfs.dict \
        -print_final_stats=1 -artifact_prefix="$artifacts/" \
        "$corpus" "fuzz/seeds/$t" >"$log" 2>&1
    status=$?
    set -e
    crashes=$(($(count 'crash-*') + $(count 'oom-*') + $(count 'timeout-*') + $(count 'leak-*') - before))
    slow=$(($(count 'slow-unit-*') - slow_before))
    stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -1; }
    last=$(grep -E '^#[0-9]+[[:space:]]+(DONE|pulse|NEW|REDUCE)' "$log" | tail -1 || true)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    corp=$(sed -n 's/.* corp: \([0-9]*\/[0-9]*[a-zA-Z]*\).*/\1/p' <<<"$last")
    printf '%-7s %10s %8s %7s %7s %12s %8s %8s %5s\n' "$t" "$(stat number_of_executed_units)" \
        "$(stat average_exec_per_sec)" "${cov:-?}" "${ft:-?}" "${corp:-?}" \
        "$(stat peak_rss_mb)" "$crashes" "$slow"
    if [ "$status" -ne 0 ] || [ "$crashes" -ne 0 ]; then
        failed=1
        echo "  $t: exit $status; see $log and $artifacts/" >&2
    fi
done
exit "$failed"
