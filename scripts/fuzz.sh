#!/usr/bin/env bash
# Runs the fuzz targets in fuzz/ (cargo fuzz, libFuzzer, AddressSanitizer) and prints how many
# executions each had. The toolchain is stable, so RUSTC_BOOTSTRAP=1 lets cargo fuzz pass its
# -Z sanitizer flags. Crashes land in fuzz/artifacts/TARGET/ and fail the run.
#
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   (default: 60 s, every target)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECONDS_PER="${1:-60}"
shift || true
TARGETS=("$@")
((${#TARGETS[@]})) || TARGETS=(handshake request header policy)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cd "$ROOT/fuzz"
total=0
for t in "${TARGETS[@]}"; do
    mkdir -p "corpus/$t"
    log="$(mktemp)"
    if ! RUSTC_BOOTSTRAP=1 cargo fuzz run -O "$t" -- -max_total_time="$SECONDS_PER" \
        -print_final_stats=1 -rss_limit_mb=4096 >"$log" 2>&1; then
        tail -40 "$log" >&2
        echo "fuzz.sh: $t found a crash (see fuzz/artifacts/$t/)" >&2
        exit 1
    fi
    n="$(awk '/stat::number_of_executed_units/ { print $2 }' "$log")"
    rate="$(awk '/stat::average_exec_per_sec/ { print $2 }' "$log")"
    printf '%-10s %12s executions  %8s/s  no crash\n' "$t" "$n" "$rate"
    total=$((total + n))
    rm -f "$log"
done
printf '%-10s %12s executions\n' total "$total"
