#!/usr/bin/env bash
# Measures the split threshold (`serve --split-bytes`): requests at or above it go to the
# crypto workers (split into parallel sector runs while workers are idle); smaller ones run
# inline on their connection. For each candidate threshold it runs fio (nbd engine) 1 MiB and
# 256 KiB sequential reads and writes at QD1 (latency-bound: splitting can help) and QD16
# (throughput-bound: hand-offs cost), over ROUNDS alternating rounds, and prints the medians of
# throughput and of GB per server CPU-second. Usage: scripts/split-sweep.sh [ROUNDS] [BIN]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROUNDS="${1:-3}"
BIN="${2:-$ROOT/target/release/nbdcrypt}"
[[ -x "$BIN" ]] || { echo "split-sweep.sh: build first: cargo build --release" >&2; exit 1; }
OUT="${NBDCRYPT_BENCH_OUT:-$ROOT/target/split-sweep}"
rm -rf "$OUT"; mkdir -p "$OUT"
WORK="$(mktemp -d /dev/shm/nbdcrypt-split.XXXXXX)"
PID=""
cleanup() { [[ -n "$PID" ]] && kill "$PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
"$BIN" keygen "$WORK/key" >/dev/null
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
URI="nbd://127.0.0.1:$PORT/b"
THRESHOLDS="64K 256K 1M 64M"
cpu() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$PID/stat"; }
for round in $(seq 1 "$ROUNDS"); do
    for t in $THRESHOLDS; do
        echo "==> round $round/$ROUNDS: --split-bytes $t" >&2
        rm -f "$WORK/vol"
        "$BIN" --log warn serve --listen "127.0.0.1:$PORT" --split-bytes "$t" \
            --export "name=b,file=$WORK/vol,key-file=$WORK/key,size=1G" >/dev/null 2>&1 &
        PID=$!
        for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.05; done
        fio --name=pre --ioengine=nbd "--uri=$URI" --rw=write --bs=1M --iodepth=16 --size=1G \
            --output-format=terse >/dev/null
        for bs in 1M 256K; do for qd in 1 16; do for rw in write read; do
            c0=$(cpu)
            fio --name=j --ioengine=nbd "--uri=$URI" --rw=$rw --bs=$bs --iodepth=$qd --size=1G \
                --time_based --runtime=2 --output-format=json --output="$OUT/r$round-$t-$bs-$qd-$rw.json" >/dev/null
            echo $(( $(cpu) - c0 )) >"$OUT/r$round-$t-$bs-$qd-$rw.cpu"
        done; done; done
        kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""
    done
done
python3 - "$OUT" "$(getconf CLK_TCK)" "$THRESHOLDS" <<'PY'
import json, os, statistics, sys
out, tck, ths = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
res = {}
for f in os.listdir(out):
    if not f.endswith(".json"): continue
    r, t, bs, qd, rw = f[:-5].split("-")
    t_ = open(os.path.join(out, f)).read(); j = json.loads(t_[t_.index("{"):])["jobs"][0]
    gbs = (j["read"]["bw_bytes"] + j["write"]["bw_bytes"]) / 1e9
    cpu = int(open(os.path.join(out, f[:-5] + ".cpu")).read()) / tck
    res.setdefault((t, bs, qd, rw), []).append((gbs, gbs / (cpu / 2.0) if cpu else 0))
print("| request | QD | op | " + " | ".join(f"split ≥ {t}: GB/s, GB/CPU-s" for t in ths) + " |")
print("|---|---|---|" + "---|" * len(ths))
for bs in ("1M", "256K"):
    for qd in ("1", "16"):
        for rw in ("write", "read"):
            cells = []
            for t in ths:
                xs = res.get((t, bs, qd, rw), [])
                if not xs: cells.append("–"); continue
                cells.append(f"{statistics.median(x[0] for x in xs):.2f}, {statistics.median(x[1] for x in xs):.2f}")
            print(f"| {bs} | {qd} | {rw} | " + " | ".join(cells) + " |")
PY
