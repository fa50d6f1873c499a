#!/usr/bin/env bash
# Runs the fio job files in benches/fio/ against one target and prints a summary.
#
#   scripts/fio-bench.sh nbd://127.0.0.1:10809/scratch   # fio's nbd engine (libnbd), no kernel
#   scripts/fio-bench.sh /dev/nbd0                        # the kernel NBD device (libaio, direct)
#
# Options: --runtime SECONDS (default 10), --size SIZE (default: the whole target, at most 4G),
# --jobs "seq-write seq-read rand-4k mixed-70-30 latency-qd1" (default: all), --json FILE.
# The write jobs overwrite the target: a mounted device is refused.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUNTIME=10
SIZE=""
JOBS="seq-write seq-read rand-4k mixed-70-30 latency-qd1"
JSON=""
TARGET=""
while (($#)); do
    case "$1" in
        --runtime) RUNTIME="$2"; shift ;;
        --size) SIZE="$2"; shift ;;
        --jobs) JOBS="$2"; shift ;;
        --json) JSON="$2"; shift ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        -*) echo "fio-bench.sh: unknown option $1" >&2; exit 2 ;;
        *) TARGET="$1" ;;
    esac
    shift
done
[[ -n "$TARGET" ]] || { sed -n '2,10p' "$0" >&2; exit 2; }
command -v fio >/dev/null || { echo "fio-bench.sh: fio is not installed (apt-get install fio)" >&2; exit 1; }

case "$TARGET" in
    nbd://* | nbds://* | nbd+unix://*)
        ENGINE=(--ioengine=nbd "--uri=$TARGET")
        if [[ -z "$SIZE" ]]; then
            command -v nbdinfo >/dev/null || { echo "fio-bench.sh: give --size (or install libnbd-bin for nbdinfo)" >&2; exit 1; }
            bytes="$(nbdinfo --size "$TARGET")"
            SIZE=$((bytes < 4 << 30 ? bytes : 4 << 30))
        fi
        ;;
    /dev/*)
        [[ -b "$TARGET" ]] || { echo "fio-bench.sh: $TARGET is not a block device" >&2; exit 1; }
        if grep -q "^$(readlink -f "$TARGET") " /proc/mounts; then
            echo "fio-bench.sh: $TARGET is mounted; the write jobs would destroy it" >&2
            exit 1
        fi
        ENGINE=(--ioengine=libaio --direct=1 "--filename=$TARGET")
        if [[ -z "$SIZE" ]]; then
            bytes="$(blockdev --getsize64 "$TARGET")"
            SIZE=$((bytes < 4 << 30 ? bytes : 4 << 30))
        fi
        ;;
    *) echo "fio-bench.sh: the target is an nbd:// URI or a /dev/ block device" >&2; exit 2 ;;
esac

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
for job in $JOBS; do
    file="$ROOT/benches/fio/$job.fio"
    [[ -f "$file" ]] || { echo "fio-bench.sh: no job file $file" >&2; exit 2; }
    echo "==> $job ($RUNTIME s per job)" >&2
    FIO_RUNTIME="$RUNTIME" FIO_SIZE="$SIZE" fio "${ENGINE[@]}" --output-format=json \
        --output="$OUT/$job.json" "$file" >/dev/null
done

python3 - "$OUT" "$JSON" $JOBS <<'PY'
import json, os, sys
out, json_path, jobs = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = []
for job in jobs:
    text = open(os.path.join(out, f"{job}.json")).read()
    for j in json.loads(text[text.index("{"):])["jobs"]:
        for side in ("read", "write"):
            s = j[side]
            if s["io_bytes"] == 0:
                continue
            pct = s.get("clat_ns", {}).get("percentile", {})
            rows.append({
                "job": j["jobname"], "op": side,
                "MB_per_s": s["bw_bytes"] / 1e6, "IOPS": s["iops"],
                "clat_p50_us": pct.get("50.000000", 0) / 1e3,
                "clat_p99_us": pct.get("99.000000", 0) / 1e3,
            })
print(f"{'job':28} {'op':5} {'MB/s':>9} {'IOPS':>9} {'p50 µs':>9} {'p99 µs':>9}")
for r in rows:
    print(f"{r['job']:28} {r['op']:5} {r['MB_per_s']:9.1f} {r['IOPS']:9.0f} "
          f"{r['clat_p50_us']:9.1f} {r['clat_p99_us']:9.1f}")
if json_path:
    json.dump(rows, open(json_path, "w"), indent=2)
PY
