#!/usr/bin/env python3
"""Aggregates scripts/bench.sh's raw fio results into a table, a JSON file and a gnuplot chart.

Ratios are computed within each round (the same machine state for every server of that round)
and their median over rounds is reported, with the medians and min-max of the absolute figures.
Standard library only.
"""
import argparse
import datetime
import json
import os
import statistics
import sys

# The reference of each mode of scripts/bench.sh: every ratio in the table and chart is to it.
REFERENCES = {
    "local": "nbdkit-memory",
    "proxy": "nbdkit-proxy",
    "ceph": "qemu-nbd-rbd",
}
REFERENCE = REFERENCES["local"]
STORES = {
    "local": "in tmpfs",
    "proxy": "in an nbdkit memory upstream on a Unix socket",
    "ceph": "on an RBD image (single-node memstore Ceph cluster, qemu-nbd on a Unix socket)",
}
DESCRIPTIONS = {
    "local": "nbdkit memory (unencrypted)",
    "proxy": "the nbdkit nbd plugin proxying the same upstream (unencrypted)",
    "ceph": "fio straight to qemu-nbd over RBD (unencrypted)",
}
# metric key -> (job, label, unit, extractor name)
METRICS = [
    ("seqwrite", "seqwrite", "seq 1 MiB write QD16", "GB/s"),
    ("seqread", "seqread", "seq 1 MiB read QD16", "GB/s"),
    ("seqwrite_gb_per_cpu_s", "seqwrite", "1 MiB write: GB per server CPU-s", "GB/CPU-s"),
    ("seqread_gb_per_cpu_s", "seqread", "1 MiB read: GB per server CPU-s", "GB/CPU-s"),
    ("seqwrite_gb_per_machine_cpu_s", "seqwrite", "1 MiB write: GB per machine CPU-s", "GB/CPU-s"),
    ("seqread_gb_per_machine_cpu_s", "seqread", "1 MiB read: GB per machine CPU-s", "GB/CPU-s"),
    ("randread", "randread", "4 KiB randread QD32", "kIOPS"),
    ("randwrite", "randwrite", "4 KiB randwrite QD32", "kIOPS"),
    ("mix70", "mix70", "4 KiB 70/30 randrw QD32", "kIOPS"),
    ("mc1", "mc1", "4 KiB randread, 1 conn", "kIOPS"),
    ("mc2", "mc2", "4 KiB randread, 2 conns", "kIOPS"),
    ("mc4", "mc4", "4 KiB randread, 4 conns", "kIOPS"),
]
SERVER_ORDER = [
    "nbdcrypt",
    "nbdkit-memory",
    "nbdkit-file",
    "nbdkit-luks",
    "qemu-nbd-luks",
    "nbdcrypt-tls",
    "nbdkit-memory-tls",
    "nbdcrypt-metrics",
    "nbdcrypt-proxy",
    "nbdkit-proxy",
    "nbdkit-luks-proxy",
    "qemu-nbd-luks-proxy",
    "nbdcrypt-rbd",
    "nbdcrypt-rbd-unix",
    "qemu-nbd-rbd",
    "nbdkit-proxy-rbd",
    "nbdkit-proxy-rbd-unix",
]


def load_fio(path):
    with open(path) as f:
        text = f.read()
    # fio may print notes before the JSON document.
    return json.loads(text[text.index("{"):])


def machine(job_dir, job):
    """The whole machine during a job: (busy fraction incl. steal, busy CPU-s per wall second),
    from bench.sh's /proc/stat deltas; None for runs made before it recorded them."""
    path = os.path.join(job_dir, f"{job}.machine")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        busy, steal, total, cpus = (int(x) for x in f.read().split())
    if total <= 0 or busy <= 0:
        return None
    return (busy + steal) / total, busy / total * cpus


def figure(metric, job_dir, job, ticks, wall_s):
    fio = load_fio(os.path.join(job_dir, f"{job}.json"))
    j = fio["jobs"][0]
    rd, wr = j["read"], j["write"]
    if metric in ("seqwrite", "seqread"):
        side = wr if metric == "seqwrite" else rd
        return side["bw_bytes"] / 1e9
    if metric.endswith("_gb_per_machine_cpu_s"):
        side = wr if metric.startswith("seqwrite") else rd
        m = machine(job_dir, job)
        # bandwidth / (the machine's busy CPU-seconds per wall second): fio, the server and
        # whatever it stands on (an upstream, a cluster) together
        return None if m is None else side["bw_bytes"] / 1e9 / m[1]
    if metric.endswith("_gb_per_cpu_s"):
        side = wr if metric.startswith("seqwrite") else rd
        with open(os.path.join(job_dir, f"{job}.cpu")) as f:
            cpu_s = int(f.read().strip()) / ticks
        if cpu_s <= 0:
            return None
        # bandwidth / (server CPU-seconds per wall second)
        return side["bw_bytes"] / 1e9 / (cpu_s / wall_s)
    return (rd["iops"] + wr["iops"]) / 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--ticks", type=int, required=True)
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--cores", type=int, required=True)
    ap.add_argument("--elapsed", type=int, required=True)
    ap.add_argument("--cpu", default="")
    ap.add_argument("--flags", default="")
    ap.add_argument("--size-mib", type=int, required=True)
    ap.add_argument("--runtime", type=float, required=True)
    ap.add_argument("--nbdcrypt-version", default="")
    ap.add_argument("--quick", type=int, default=0)
    ap.add_argument("--mode", choices=sorted(REFERENCES), default="local")
    a = ap.parse_args()
    global REFERENCE
    REFERENCE = REFERENCES[a.mode]
    wall_s = a.runtime + 0.5  # fio --ramp_time=0.5 runs before the measured window

    raw = os.path.join(a.out, "raw")
    rounds = sorted(os.listdir(raw))
    servers = set()
    values = {}  # (server, metric) -> [per round]
    by_round = {}  # (server, metric) -> {round: value}
    ratios = {}  # (server, metric) -> [per round ratio to REFERENCE]
    failed = {}  # (server, metric) -> [rounds whose job failed or timed out]
    busy = {}  # (server, job) -> {round: the machine's busy fraction during that job}
    for r in rounds:
        per_round = {}
        for server in os.listdir(os.path.join(raw, r)):
            servers.add(server)
            d = os.path.join(raw, r, server)
            for metric, job, _, _ in METRICS:
                if os.path.exists(os.path.join(d, f"{job}.failed")):
                    failed.setdefault((server, metric), []).append(r)
                    continue
                if not os.path.exists(os.path.join(d, f"{job}.json")):
                    continue
                v = figure(metric, d, job, a.ticks, wall_s)
                if v is not None:
                    per_round[(server, metric)] = v
                    values.setdefault((server, metric), []).append(v)
                    by_round.setdefault((server, metric), {})[r] = v
                m = machine(d, job)
                if m is not None:
                    busy.setdefault((server, job), {})[r] = m[0]
        for (server, metric), v in per_round.items():
            ref = per_round.get((REFERENCE, metric))
            if ref:
                ratios.setdefault((server, metric), []).append(v / ref)
    order = [s for s in SERVER_ORDER if s in servers] + sorted(
        s for s in servers if s not in SERVER_ORDER
    )

    def med(xs):
        return statistics.median(xs) if xs else None

    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": a.cpu,
        "cpu_flags": a.flags.split(),
        "cores": a.cores,
        "rounds": a.rounds,
        "runtime_s": a.runtime,
        "volume_mib": a.size_mib,
        "elapsed_s": a.elapsed,
        "nbdcrypt": a.nbdcrypt_version,
        "quick": bool(a.quick),
        "reference": REFERENCE,
        "servers": {},
        "failed": [
            {"server": srv, "metric": m, "rounds": rs} for (srv, m), rs in sorted(failed.items())
        ],
    }
    for s in order:
        results["servers"][s] = {}
        for metric, _, label, unit in METRICS:
            xs = values.get((s, metric))
            if not xs:
                continue
            results["servers"][s][metric] = {
                "label": label,
                "unit": unit,
                "median": med(xs),
                "min": min(xs),
                "max": max(xs),
                "rounds": xs,
                "ratio_to_reference": med(ratios.get((s, metric), [])),
            }

    # Targets of issue 5, as ratios measured in the same run.
    def ratio(server, metric, peer):
        # Per-round ratio, then the median over rounds.
        v, p = by_round.get((server, metric), {}), by_round.get((peer, metric), {})
        rs = [v[r] / p[r] for r in v if r in p and p[r]]
        return med(rs) if rs else None

    targets = []
    if a.mode == "local":
        # Issue 5.
        for metric, need in [
            ("seqwrite", 0.9),
            ("seqread", 0.9),
            ("randread", 1.0),
            ("randwrite", 1.0),
            ("seqwrite_gb_per_cpu_s", 0.8),
        ]:
            targets.append(("nbdcrypt", metric, REFERENCE, need, ratio("nbdcrypt", metric, REFERENCE)))
        for peer in ("nbdkit-luks", "qemu-nbd-luks"):
            for metric in ("seqwrite", "seqread"):
                targets.append(("nbdcrypt", metric, peer, 5.0, ratio("nbdcrypt", metric, peer)))
        # Issue 15: metrics on (scraped every second) against metrics off.
        targets.append(("nbdcrypt-metrics", "randread", "nbdcrypt", 0.97,
                        ratio("nbdcrypt-metrics", "randread", "nbdcrypt")))
    elif a.mode == "proxy":
        # Issue 14: against the unencrypted proxy, and the encrypting proxies.
        for metric, need in [("seqwrite", 0.9), ("seqread", 0.9), ("randread", 1.0)]:
            targets.append(
                ("nbdcrypt-proxy", metric, REFERENCE, need, ratio("nbdcrypt-proxy", metric, REFERENCE))
            )
        for peer in ("nbdkit-luks-proxy", "qemu-nbd-luks-proxy"):
            for metric in ("seqwrite", "seqread"):
                targets.append(
                    ("nbdcrypt-proxy", metric, peer, 4.0, ratio("nbdcrypt-proxy", metric, peer))
                )
    else:
        # Issue 14 over Ceph: we must not become the bottleneck.
        # Both client transports: TCP, and a Unix socket as the reference has.
        for server in ("nbdcrypt-rbd", "nbdcrypt-rbd-unix"):
            for metric in ("seqwrite", "seqread", "randread"):
                targets.append((server, metric, REFERENCE, 0.9, ratio(server, metric, REFERENCE)))
    # Over Ceph (no target of its own: measured): what an unencrypted proxy keeps of fio straight
    # to the cluster, and nbdcrypt against it on the same transport; together they split a
    # shortfall into the cost of any hop on this machine and the cost of encrypting.
    hop_pairs = (
        ("nbdkit-proxy-rbd", REFERENCE),
        ("nbdkit-proxy-rbd-unix", REFERENCE),
        ("nbdcrypt-rbd", "nbdkit-proxy-rbd"),
        ("nbdcrypt-rbd-unix", "nbdkit-proxy-rbd-unix"),
    )
    results["hop"] = [
        {"metric": m, "server": s, "peer": p, "ratio": r}
        for m in ("seqwrite", "seqread", "randread")
        for s, p in hop_pairs
        for r in [ratio(s, m, p)]
        if r is not None
    ]
    # The machine during the sequential jobs (no target: measured): how busy it was, and what
    # each server's whole path (fio, server, upstream or cluster) cost it per GB. Where the
    # reference's job kept the machine busy, throughput is CPU-bound, and a server that adds `a`
    # CPU-s per GB to the reference's `x` keeps x / (x + a) of it: 0.9x allows a = x / 9.
    results["machine"] = []
    for job in ("seqwrite", "seqread"):
        metric = f"{job}_gb_per_machine_cpu_s"
        ref = by_round.get((REFERENCE, metric), {})
        for s in order:
            v = by_round.get((s, metric), {})
            if not v:
                continue
            added = [1 / v[r] - 1 / ref[r] for r in v if r in ref]
            results["machine"].append({
                "job": job,
                "server": s,
                "busy": med(list(busy.get((s, job), {}).values())),
                "cpu_s_per_gb": med([1 / x for x in v.values()]),
                "added_cpu_s_per_gb": med(added) if added and s != REFERENCE else None,
                "allowed_for_0_9": med([1 / x for x in ref.values()]) / 9 if ref else None,
            })
    # TLS in transit (issue 7 sets no figure): the cost of TLS to nbdcrypt, and nbdcrypt over
    # TLS against an unencrypted-at-rest server over TLS (nbdkit memory with GnuTLS).
    tls_pairs = (("nbdcrypt-tls", "nbdcrypt"), ("nbdcrypt-tls", "nbdkit-memory-tls"))
    tls_ratios = [
        (m, s, p, ratio(s, m, p))
        for m in ("seqwrite", "seqread", "randread", "mc4")
        for s, p in tls_pairs
    ]
    results["tls"] = [
        {"metric": m, "server": s, "peer": p, "ratio": r} for m, s, p, r in tls_ratios if r is not None
    ]
    results["targets"] = [
        {
            "server": s,
            "metric": m,
            "peer": p,
            "need": n,
            "ratio": r,
            "holds": None if r is None else r >= n,
        }
        for s, m, p, n, r in targets
    ]
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)

    # Markdown table: one row per metric; each cell median (min–max) and ratio to reference.
    lines = []
    if a.quick:
        lines.append(
            "**Quick smoke run** (`--quick`: debug build, 1 s jobs, one round): checks that "
            "every server and job runs; its figures are not measurements."
        )
        lines.append("")
    lines.append(
        f"Run {results['date']} on {a.cpu} ({a.cores} cores; flags: {a.flags.strip()}), "
        f"{a.rounds} round(s) of {a.runtime:g} s jobs, {a.size_mib} MiB volumes "
        f"{STORES[a.mode]}, "
        f"{a.elapsed} s in all. Cells: median (min–max) and ×ratio to {REFERENCE} "
        f"(per-round ratio, median)."
    )
    lines.append("")
    lines.append("| metric | " + " | ".join(order) + " |")
    lines.append("|---|" + "---|" * len(order))
    for metric, _, label, unit in METRICS:
        cells = []
        for s in order:
            e = results["servers"][s].get(metric)
            lost = failed.get((s, metric), [])
            if not e:
                cells.append(f"FAILED ({len(lost)}/{a.rounds} rounds)" if lost else "–")
                continue
            fmt = "{:.2f}" if unit != "kIOPS" else "{:.1f}"
            cell = f"{fmt.format(e['median'])} ({fmt.format(e['min'])}–{fmt.format(e['max'])})"
            if e["ratio_to_reference"] is not None and s != REFERENCE:
                cell += f" ×{e['ratio_to_reference']:.2f}"
            if lost:
                cell += f" FAILED in {len(lost)}/{a.rounds} rounds"
            cells.append(cell)
        lines.append(f"| {label} ({unit}) | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| target | need | measured | |")
    lines.append("|---|---|---|---|")
    for t in results["targets"]:
        label = dict((m, l) for m, _, l, _ in METRICS)[t["metric"]]
        r = "n/a" if t["ratio"] is None else f"{t['ratio']:.2f}×"
        verdict = "n/a" if t["holds"] is None else ("holds" if t["holds"] else "MISSED")
        if a.quick:
            verdict = "not judged (--quick)"
        lines.append(f"| {t['server']} / {t['peer']}: {label} | ≥ {t['need']:g}× | {r} | {verdict} |")
    # Ratios without a target, one table each.
    for key, title in (("hop", "a hop in front of the cluster"), ("tls", "TLS")):
        if not results.get(key):
            continue
        lines.append("")
        lines.append(f"| {title} (no target: measured) | ratio |")
        lines.append("|---|---|")
        for t in results[key]:
            label = dict((m, l) for m, _, l, _ in METRICS)[t["metric"]]
            lines.append(f"| {t['server']} / {t['peer']}: {label} | {t['ratio']:.2f}× |")
    if results["machine"]:
        lines.append("")
        lines.append(
            "| the machine during the job (no target: measured) | busy | CPU-s per GB "
            f"| added to {REFERENCE}'s | 0.9× of it allows |"
        )
        lines.append("|---|---|---|---|---|")
        for e in results["machine"]:
            label = "1 MiB write" if e["job"] == "seqwrite" else "1 MiB read"
            busy_cell = "–" if e["busy"] is None else f"{100 * e['busy']:.0f} %"
            added = "–" if e["added_cpu_s_per_gb"] is None else f"{e['added_cpu_s_per_gb']:+.2f}"
            allowed = "–" if e["allowed_for_0_9"] is None else f"{e['allowed_for_0_9']:.2f}"
            lines.append(
                f"| {e['server']}: {label} | {busy_cell} | {e['cpu_s_per_gb']:.2f} "
                f"| {added} | {allowed} |"
            )
    table = "\n".join(lines) + "\n"
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(table)
    sys.stdout.write(table)

    # gnuplot: clustered bars of the ratio to the reference, one cluster per metric.
    short = {
        "seqwrite": "seq write 1M",
        "seqread": "seq read 1M",
        "seqwrite_gb_per_cpu_s": "write GB/CPU-s",
        "seqread_gb_per_cpu_s": "read GB/CPU-s",
        "seqwrite_gb_per_machine_cpu_s": "write GB/machine CPU-s",
        "seqread_gb_per_machine_cpu_s": "read GB/machine CPU-s",
        "randread": "randread 4K",
        "randwrite": "randwrite 4K",
        "mix70": "70/30 4K",
        "mc1": "1 conn 4K",
        "mc2": "2 conns 4K",
        "mc4": "4 conns 4K",
    }
    shown = [s for s in order if s != REFERENCE]
    with open(os.path.join(a.out, "chart.dat"), "w") as f:
        f.write("metric " + " ".join(shown) + "\n")
        for metric, _, _, _ in METRICS:
            row = []
            for s in shown:
                e = results["servers"][s].get(metric)
                r = e["ratio_to_reference"] if e else None
                row.append("NaN" if r is None else f"{r:.4f}")
            f.write(f'"{short[metric]}" ' + " ".join(row) + "\n")
    with open(os.path.join(a.out, "chart.gp"), "w") as f:
        f.write(
            f"""set terminal pngcairo size 1400,620 font ',11'
set output '{os.path.join(a.out, 'chart.png')}'
cd '{a.out}'
set title "{'QUICK SMOKE RUN (debug build), not a measurement. ' if a.quick else ''}Each server relative to {DESCRIPTIONS[a.mode]} (= 1.0; dashed line). fio nbd engine, loopback.\\n{results['date'][:10]}, {a.cpu}, {a.cores} cores, median of {a.rounds} round(s)"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set yrange [0:*]
set grid ytics
set key outside right top autotitle columnhead
set ylabel 'ratio to {REFERENCE} (higher is better)'
set xtics rotate by -20
set arrow from graph 0, first 1 to graph 1, first 1 nohead dt 2 lw 1.5
plot for [i=2:{len(shown) + 1}] 'chart.dat' using i:xtic(1)
"""
        )


if __name__ == "__main__":
    main()
