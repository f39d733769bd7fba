#!/usr/bin/env bash
# Run fuzz targets: `fuzz/run.sh [SECONDS] [TARGET...]` runs each TARGET (default:
# every target) for SECONDS (default 30), or for FUZZ_RUNS executions if that is
# set (e.g. FUZZ_RUNS=10000000). Installs cargo-fuzz if missing. Works on stable
# Rust through RUSTC_BOOTSTRAP=1 (cargo fuzz passes nightly-only -Z flags). The
# fuzzed code is safe Rust, so AddressSanitizer is off by default (3-4x more
# executions); KSM_FUZZ_SANITIZER=address turns it back on.
#
# Each target starts from the committed corpus (fuzz/corpus/<target>, read only)
# and the inputs earlier runs found (fuzz/target/corpus/<target>, where new ones
# go); fuzz/cmin.sh folds the latter into the committed corpus, minimized.
# Exits non-zero if any target found a failure; the input that failed is in
# fuzz/artifacts/<target>/ and the full log in fuzz/target/logs/<target>.log.
set -euo pipefail

secs="${1:-30}"
shift || true
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/.."                      # cargo fuzz looks for ./fuzz

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1
san=(--sanitizer "${KSM_FUZZ_SANITIZER:-none}")
cargo fuzz build "${san[@]}"
mkdir -p fuzz/target/logs

if [[ -n "${FUZZ_RUNS:-}" ]]; then
    limit=(-runs="$FUZZ_RUNS")
else
    limit=(-max_total_time="$secs")
fi

targets=("$@")
if ((${#targets[@]} == 0)); then
    mapfile -t targets < <(cargo fuzz list)
fi

failed=()
for t in "${targets[@]}"; do
    log="fuzz/target/logs/$t.log"
    mkdir -p "fuzz/target/corpus/$t"
    if cargo fuzz run "${san[@]}" "$t" "fuzz/target/corpus/$t" "fuzz/corpus/$t" -- "${limit[@]}" >"$log" 2>&1; then
        echo "$t: $(grep -E '^Done [0-9]+ runs' "$log" | tail -1)"
    else
        echo "$t: FAILED (log: $log)"
        tail -n 40 "$log"
        failed+=("$t")
    fi
done

if ((${#failed[@]})); then
    echo "failing targets: ${failed[*]}" >&2
    exit 1
fi
