#!/usr/bin/env bash
# Run every fuzz target for SECONDS each (default 30): `fuzz/run.sh [SECONDS]`.
# Installs cargo-fuzz if missing. Works on stable Rust through RUSTC_BOOTSTRAP=1
# (cargo fuzz passes nightly-only -Z flags). The fuzzed code is safe Rust, so
# AddressSanitizer is off by default (3-4x more executions);
# KSM_FUZZ_SANITIZER=address turns it back on.
# Exits non-zero if any target found a failure; the input that failed is in
# fuzz/artifacts/<target>/ and the full log in fuzz/target/logs/<target>.log.
set -euo pipefail

secs="${1:-30}"
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

failed=()
for t in $(cargo fuzz list); do
    log="fuzz/target/logs/$t.log"
    if cargo fuzz run "${san[@]}" "$t" -- -max_total_time="$secs" >"$log" 2>&1; then
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
