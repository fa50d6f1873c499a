#!/usr/bin/env bash
# `volume reencrypt` against a plain copy: the rate of re-encrypting a volume in place, next to
# `dd` reading and writing the same backing file in place with the same block size (16 MiB, the
# re-key chunk; conv=notrunc,fdatasync), in one run. Re-keying must be bound by I/O, not by
# crypto (issue 15: >= 0.7x dd).
#
# The volume is preallocated (every sector holds ciphertext: no holes to skip). Rounds alternate
# dd and reencrypt on the same file, so drifts of this shared machine hit both; the ratio is
# the median of the per-round ratios.
#
# Usage: scripts/bench-reencrypt.sh [--quick] [--size MIB] [--rounds N] [--dir DIR] [--bin PATH]
#                                   [--out DIR]
#   --dir   where the backing file lives (default: a tmpfs directory in /dev/shm; name a disk
#           directory to measure a disk)
#   --quick one round on 64 MiB with the debug binary: a smoke run for CI.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
QUICK=0
SIZE_MIB=2048
ROUNDS=5
DIR=""
BIN=""
OUT="$ROOT/target/bench-reencrypt"
while (($#)); do
    case "$1" in
        --quick) QUICK=1 ;;
        --size) SIZE_MIB="$2"; shift ;;
        --rounds) ROUNDS="$2"; shift ;;
        --dir) DIR="$2"; shift ;;
        --bin) BIN="$2"; shift ;;
        --out) OUT="$2"; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "bench-reencrypt.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
if ((QUICK)); then SIZE_MIB=64; ROUNDS=1; fi
log() { printf '==> %s\n' "$*" >&2; }
if [[ -z "$BIN" ]]; then
    if ((QUICK)); then
        cargo build --quiet --locked && BIN="$ROOT/target/debug/nbdcrypt"
    else
        cargo build --quiet --locked --release && BIN="$ROOT/target/release/nbdcrypt"
    fi
fi
WORK="$(mktemp -d "${DIR:-/dev/shm}/nbdcrypt-bench-reencrypt.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM
export NBDCRYPT_STATE_DIR="$WORK/state"
BACKING="$WORK/v.img"
log "creating a ${SIZE_MIB} MiB preallocated volume in $WORK"
"$BIN" --log warn volume create v --size "${SIZE_MIB}M" --backing "$BACKING" --preallocate >/dev/null

now() { date +%s.%N; }
declare -a DD REENC RATIO
for ((r = 1; r <= ROUNDS; r++)); do
    t0="$(now)"
    dd if="$BACKING" of="$BACKING" bs=16M conv=notrunc,fdatasync status=none
    t1="$(now)"
    "$BIN" --log warn volume reencrypt v >/dev/null
    t2="$(now)"
    dd_rate="$(awk -v s="$SIZE_MIB" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", (s + 1) / (b - a) }')"
    re_rate="$(awk -v s="$SIZE_MIB" -v a="$t1" -v b="$t2" 'BEGIN { printf "%.1f", s / (b - a) }')"
    ratio="$(awk -v x="$re_rate" -v y="$dd_rate" 'BEGIN { printf "%.3f", x / y }')"
    DD+=("$dd_rate"); REENC+=("$re_rate"); RATIO+=("$ratio")
    log "round $r: dd ${dd_rate} MiB/s, reencrypt ${re_rate} MiB/s, ratio ${ratio}"
done
median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
mkdir -p "$OUT"
cat >"$OUT/results.json" <<JSON
{
  "size_mib": $SIZE_MIB,
  "rounds": $ROUNDS,
  "dir": "$(df --output=fstype "$WORK" | tail -1) ($(dirname "$WORK"))",
  "cpu": "$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')",
  "cores": $(nproc),
  "dd_mib_s": [$(IFS=,; echo "${DD[*]}")],
  "reencrypt_mib_s": [$(IFS=,; echo "${REENC[*]}")],
  "ratio": [$(IFS=,; echo "${RATIO[*]}")],
  "median_dd_mib_s": $(median "${DD[@]}"),
  "median_reencrypt_mib_s": $(median "${REENC[@]}"),
  "median_ratio": $(median "${RATIO[@]}"),
  "target": 0.7
}
JSON
printf 'reencrypt %s MiB/s, dd in place %s MiB/s (medians of %s rounds); ratio %s (target >= 0.7)\n' \
    "$(median "${REENC[@]}")" "$(median "${DD[@]}")" "$ROUNDS" "$(median "${RATIO[@]}")"
