#!/usr/bin/env bash
# XTS engine benchmark: runs benches/xts.rs (criterion) ROUNDS times and prints the
# BENCHMARKING.md table: medians over rounds of criterion's per-round median, with min–max, and
# the ratios the targets are stated in, computed within each round (same machine state) and
# then taken as a median. Usage: scripts/bench-xts.sh [ROUNDS]   (default 3)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ROUNDS="${1:-3}"
OUT="${NBDCRYPT_BENCH_OUT:-$ROOT/target/bench-xts}"
rm -rf "$OUT"; mkdir -p "$OUT"

for r in $(seq 1 "$ROUNDS"); do
    echo "==> round $r/$ROUNDS" >&2
    rm -rf target/criterion/xts-*
    cargo bench --locked --bench xts -- --noplot >"$OUT/round-$r.log" 2>&1
    mkdir -p "$OUT/round-$r"
    cp -r target/criterion/xts-* "$OUT/round-$r/"
done

python3 - "$OUT" "$ROUNDS" <<'PY'
import json, os, statistics, sys, subprocess, datetime
out, rounds = sys.argv[1], int(sys.argv[2])

def load(r):
    res = {}
    base = os.path.join(out, f"round-{r}")
    for group in os.listdir(base):
        _, direction, sector = group.split("-")
        for impl in os.listdir(os.path.join(base, group)):
            d = os.path.join(base, group, impl)
            if impl == "report" or not os.path.isdir(d):
                continue
            for req in os.listdir(d):
                est = os.path.join(d, req, "new", "estimates.json")
                if not os.path.exists(est):
                    continue
                ns = json.load(open(est))["median"]["point_estimate"]
                res[(direction, int(sector), impl, int(req))] = int(req) / ns  # GB/s (1e9 B/s)
    return res

runs = [load(r) for r in range(1, rounds + 1)]
keys = sorted(set().union(*runs))

def stat(vals):
    return statistics.median(vals), min(vals), max(vals)

def fmt(v):
    m, lo, hi = v
    return f"{m:.2f} ({lo:.2f}–{hi:.2f})"

flags = ""
try:
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            have = set(line.split(":")[1].split())
            flags = " ".join(f for f in ["aes", "pclmulqdq", "avx2", "vaes", "vpclmulqdq", "avx512f", "avx512bw", "avx512_vbmi2"] if f in have)
            break
    model = next(l.split(":")[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
except Exception:
    model = "unknown"

print(f"Date: {datetime.date.today()}  \nCPU: {model}, flags: `{flags}`  \nRounds: {rounds}; cell = median GB/s over rounds (min–max)\n")
impls = ["vaes", "vaes256", "hw", "portable", "aws-lc-raw", "openssl", "xts-mode"]
for direction in ["encrypt", "decrypt"]:
    print(f"### {direction}, single thread, GB/s (10^9 B/s)\n")
    print("| sector | request | " + " | ".join(i for i in impls if any(k[0]==direction and k[2]==i for k in keys)) + " |")
    cols = [i for i in impls if any(k[0]==direction and k[2]==i for k in keys)]
    print("|---|---|" + "---|" * len(cols))
    for sector in [512, 4096]:
        for req in [4096, 65536, 1048576]:
            cells = []
            for i in cols:
                k = (direction, sector, i, req)
                vals = [r[k] for r in runs if k in r]
                cells.append(fmt(stat(vals)) if vals else "–")
            print(f"| {sector} | {req//1024} KiB | " + " | ".join(cells) + " |")
    print()

def ratio(num, den):
    vals = [r[num] / r[den] for r in runs if num in r and den in r]
    return stat(vals) if vals else None

print("### Targets (ratio = median over rounds of the per-round ratio; min–max)\n")
print("| target | case | ratio | holds |\n|---|---|---|---|")
rows = []
for req in [4096, 65536, 1048576]:
    rows.append(("hw ≥ 0.9 × AWS-LC raw, 4 KiB sectors", f"encrypt, {req//1024} KiB request", ratio(("encrypt", 4096, "hw", req), ("encrypt", 4096, "aws-lc-raw", req)), 0.9))
for b in ["vaes", "vaes256", "hw", "portable"]:
    for d in ["encrypt", "decrypt"]:
        for req in [65536, 1048576]:
            rows.append(("512 B sectors ≥ 0.8 × 4 KiB sectors", f"{b} {d}, {req//1024} KiB request", ratio((d, 512, b, req), (d, 4096, b, req)), 0.8))
for sector in [512, 4096]:
    for req in [4096, 65536, 1048576]:
        rows.append(("portable ≥ 0.7 × OpenSSL", f"encrypt, {sector} B sectors, {req//1024} KiB", ratio(("encrypt", sector, "portable", req), ("encrypt", sector, "openssl", req)), 0.7))
for sector in [512, 4096]:
    for req in [4096, 65536, 1048576]:
        for b in ["vaes", "vaes256"]:
            rows.append((f"(reference) {b} ÷ AWS-LC raw", f"encrypt, {sector} B sectors, {req//1024} KiB", ratio(("encrypt", sector, b, req), ("encrypt", sector, "aws-lc-raw", req)), None))
for sector in [512, 4096]:
    rows.append(("(reference) hw ÷ xts-mode", f"encrypt, {sector} B sectors, 1024 KiB", ratio(("encrypt", sector, "hw", 1048576), ("encrypt", sector, "xts-mode", 1048576)), None))
summary = []
for name, case, r, goal in rows:
    if r is None:
        continue
    holds = "" if goal is None else ("yes" if r[0] >= goal else "**no**")
    print(f"| {name} | {case} | {r[0]:.2f} ({r[1]:.2f}–{r[2]:.2f}) | {holds} |")
    summary.append({"target": name, "case": case, "ratio_median": r[0], "ratio_min": r[1], "ratio_max": r[2], "goal": goal})
json.dump({"rounds": rounds, "cpu": model, "flags": flags,
           "results": [{"direction": k[0], "sector": k[1], "impl": k[2], "request": k[3],
                        "gbps": [r[k] for r in runs if k in r]} for k in keys],
           "targets": summary}, open(os.path.join(out, "xts.json"), "w"), indent=1)
PY
