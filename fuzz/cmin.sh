#!/usr/bin/env bash
# Fold the inputs fuzz runs found (fuzz/target/corpus/<target>) into the committed
# corpus (fuzz/corpus/<target>) and minimize it with `cargo fuzz cmin`:
# `fuzz/cmin.sh [TARGET...]` (default: every target). `make test` replays every
# committed input. The corpus keeps a smallest set of inputs that covers every
# code edge the inputs reach (`-use_counters=0 -set_cover_merge=1`: hit counts
# would keep thousands of inputs per target); KSM_CMIN_ARGS replaces those flags.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/.."
export RUSTC_BOOTSTRAP=1
san=(--sanitizer "${KSM_FUZZ_SANITIZER:-none}")
targets=("$@")
if ((${#targets[@]} == 0)); then
    mapfile -t targets < <(cargo fuzz list)
fi
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    if [[ -d "fuzz/target/corpus/$t" ]]; then
        cp -n "fuzz/target/corpus/$t"/* "fuzz/corpus/$t"/ 2>/dev/null || true
    fi
    # shellcheck disable=SC2086
    cargo fuzz cmin "${san[@]}" "$t" "fuzz/corpus/$t" -- ${KSM_CMIN_ARGS:--use_counters=0 -set_cover_merge=1} \
        >"fuzz/target/cmin-$t.log" 2>&1
    echo "$t: $(find "fuzz/corpus/$t" -type f | wc -l) inputs, $(cat "fuzz/corpus/$t"/* | wc -c) bytes"
done
