#!/usr/bin/env bash
# Whole-server benchmark: nbdcrypt against its peers, side by side, in one run.
#
# Servers (all on loopback, all data in tmpfs):
#   nbdcrypt        XTS-AES-256 volume, default workers (one per core)
#   nbdcrypt-wN     the same with --workers N, for the scaling sweep (N < cores, and 1)
#   nbdkit-memory   nbdkit's memory plugin: no encryption, the reference
#   nbdkit-file     nbdkit's file plugin over a tmpfs file: no encryption, same store as ours
#   nbdkit-luks     nbdkit's luks filter over a LUKS image made by qemu-img (aes-xts-plain64)
#   qemu-nbd-luks   qemu-nbd serving that LUKS image
#   nbdcrypt-metrics  nbdcrypt with --metrics-listen, scraped every second during its jobs
#                   (issue 15: per-request metrics must cost nothing visible)
# With --proxy (issue 14), the servers are proxies in front of one upstream, nbdkit memory on a
# Unix socket, started fresh for each server:
#   nbdcrypt-proxy       nbdcrypt serving a raw export whose file= is the upstream
#   nbdkit-proxy         nbdkit's nbd plugin: an unencrypted proxy, the ceiling (the reference)
#   nbdkit-luks-proxy    nbdkit --filter=luks nbd (the LUKS image copied into the upstream)
#   qemu-nbd-luks-proxy  qemu-nbd with a LUKS image whose file is the NBD upstream
# With --ceph: a single-node Ceph cluster (scripts/ceph-single-node.sh) and qemu-nbd exporting
# an RBD image; qemu-nbd-rbd is fio straight to it over its Unix socket (the reference),
# nbdcrypt-rbd nbdcrypt in front of it with fio over TCP, and nbdcrypt-rbd-unix the same with fio
# over a Unix socket, the reference's transport (like for like: on two shared vCPUs loopback
# TCP's extra cost is visible); nbdkit-proxy-rbd and nbdkit-proxy-rbd-unix are nbdkit's nbd
# plugin in front of the same export (TCP, Unix socket): an unencrypted proxy, the most any hop
# in front of the cluster can keep of fio straight to it on this machine. Volumes are 256 MiB
# there (the memstore OSD holds them in RAM).
# Jobs (fio, nbd engine): seq 1 MiB write/read at QD16, 4 KiB randread/randwrite at QD32, a 70/30
# 4 KiB mix at QD32, and 4 KiB randread at QD32 over 1, 2 and 4 connections (numjobs).
# Each round starts every server in turn (fresh, prefilled), runs every job against it, and
# stops it; rounds alternate so slow drifts of this shared machine hit every server alike.
# The server's CPU time per job comes from /proc/PID/stat (utime+stime); the whole machine's
# (every process: fio, the server, an upstream, a cluster) from /proc/stat, so the report can
# say whether a job was CPU-bound and what each server costs the machine per GB moved.
#
# Usage: scripts/bench.sh [--quick] [--proxy|--ceph] [--rounds N] [--runtime SECONDS] [--out DIR]
#                         [--bin PATH]
#                         [--base-bin PATH]   (another build, served as nbdcrypt-base, or
#                                              nbdcrypt-base-proxy / -rbd with --proxy / --ceph)
#                         [--servers "NAME ..."]   (a subset, e.g. "nbdcrypt nbdkit-memory")
#                         [--jobs "JOB ..."]   (only these jobs, e.g. "randread", for A/B runs)
#                         [--pin]   (with --ceph: the cluster and qemu-nbd on the last CPU, fio
#                                    and nbdcrypt on CPU 0, as if the cluster had machines of
#                                    its own; unpinned, nbdcrypt's CPU comes out of the OSD's)
#   --quick   one round, 1 s jobs, 64 MiB volumes, debug binary: a smoke run for CI.
# Output: a table on stdout, and in OUT (default target/bench, target/bench-proxy,
# target/bench-ceph): results.json, table.md,
# chart.png, and every fio JSON file.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

QUICK=0
ROUNDS=3
RUNTIME=4
OUT="$ROOT/target/bench"
BIN=""
# --base-bin: another nbdcrypt build (e.g. the previous commit) served as `nbdcrypt-base` in the
# same run, for before/after ratios.
BASE_BIN="${NBDCRYPT_BENCH_BASE_BIN:-}"
ONLY=""
JOBS_ONLY=""
MODE=local
PIN=0
while (($#)); do
    case "$1" in
        --quick) QUICK=1 ;;
        --proxy) MODE=proxy; OUT="$ROOT/target/bench-proxy" ;;
        --ceph) MODE=ceph; OUT="$ROOT/target/bench-ceph" ;;
        --rounds) ROUNDS="$2"; shift ;;
        --runtime) RUNTIME="$2"; shift ;;
        --out) OUT="$2"; shift ;;
        --bin) BIN="$2"; shift ;;
        --base-bin) BASE_BIN="$2"; shift ;;
        --servers) ONLY="$2"; shift ;;
        --jobs) JOBS_ONLY="$2"; shift ;;
        --pin) PIN=1 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
SIZE_MIB=1024
[[ "$MODE" == ceph ]] && SIZE_MIB=256
if ((QUICK)); then ROUNDS=1; RUNTIME=1; SIZE_MIB=64; fi

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'bench.sh: %s\n' "$*" >&2; exit 1; }

# --- peers -------------------------------------------------------------------------------
# fio (nbd engine), nbdkit (memory plugin, luks filter), qemu-utils (qemu-img, qemu-nbd),
# gnuplot (chart), python3 (aggregation; standard library only).
# shellcheck source=scripts/lib/deb.sh
. "$ROOT/scripts/lib/deb.sh"
# shellcheck source=scripts/lib/qemu.sh
. "$ROOT/scripts/lib/qemu.sh"
deb_install_missing fio nbdkit qemu-utils gnuplot-nox python3 openssl libnbd-bin curl
if [[ "$MODE" == ceph ]]; then
    deb_install_missing ceph-mon ceph-mgr ceph-osd ceph-common
    # qemu-nbd loads the rbd driver from qemu-block-extra, which must be of qemu-utils' build;
    # installing it plainly on a fresh machine (qemu-utils 10 from backports) made apt remove
    # qemu-utils, and with it qemu-nbd. One consistent qemu, as scripts/test.sh has it.
    qemu_consistent
fi
[[ -e /usr/lib/x86_64-linux-gnu/nbdkit/filters/nbdkit-luks-filter.so ]] ||
    nbdkit --dump-config >/dev/null || die "nbdkit is not usable"

if [[ -z "$BIN" ]]; then
    if ((QUICK)); then
        log "building nbdcrypt (debug)"
        cargo build --locked --quiet
        BIN="$ROOT/target/debug/nbdcrypt"
    else
        log "building nbdcrypt (release)"
        cargo build --locked --release --quiet
        BIN="$ROOT/target/release/nbdcrypt"
    fi
fi
[[ -x "$BIN" ]] || die "no nbdcrypt binary at $BIN"

# --- work area and cleanup ---------------------------------------------------------------
WORK="$(mktemp -d /dev/shm/nbdcrypt-bench.XXXXXX)"
SERVER_PID=""
UP_PID=""
cleanup() {
    local p
    for p in "$SERVER_PID" "$UP_PID" "${SCRAPER_PID:-}"; do
        if [[ -n "$p" ]] && kill -0 "$p" 2>/dev/null; then
            kill "$p" 2>/dev/null || true
            wait "$p" 2>/dev/null || true
        fi
    done
    [[ -e "$WORK/ceph/ceph.conf" ]] && "$ROOT/scripts/ceph-single-node.sh" stop "$WORK/ceph"
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
rm -rf "$OUT"
mkdir -p "$OUT"

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

CORES="$(nproc)"
PIN_CLUSTER=()
PIN_CLIENT=()
PASS=bench-passphrase
LUKS="$WORK/luks.img"
# The LUKS peers' image (the Ceph mode has no LUKS peer).
if [[ "$MODE" != ceph ]]; then
    log "making the LUKS image (qemu-img, aes-xts-plain64, ${SIZE_MIB} MiB)"
    # qemu-img calibrates the PBKDF on CPU time and, on a busy machine, can fail with "Unable to
    # get accurate CPU usage": try again with a longer calibration before giving up.
    made=0
    for iter_ms in 10 100 500; do
        if qemu-img create -q -f luks --object "secret,id=sec0,data=$PASS" \
            -o "key-secret=sec0,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,iter-time=$iter_ms" \
            "$LUKS" "${SIZE_MIB}M"; then
            made=1
            break
        fi
        rm -f "$LUKS"
    done
    ((made)) || die "qemu-img could not make the LUKS image"
fi
"$BIN" keygen "$WORK/volume.key" >/dev/null
# TLS: the same PKI for nbdcrypt and nbdkit (GnuTLS layout); no client certificates.
"$ROOT/scripts/tls-certs.sh" "$WORK/pki" >/dev/null

# Servers, and the jobs each runs. The sweep servers run the jobs that show scaling.
FULL="seqwrite seqread randread randwrite mix70 mc1 mc2 mc4"
SWEEP="seqwrite seqread randread mc4"
SERVERS=(nbdcrypt nbdkit-memory nbdkit-file nbdkit-luks qemu-nbd-luks nbdcrypt-tls nbdkit-memory-tls
    nbdcrypt-metrics)
declare -A JOBS=([nbdcrypt]="$FULL" [nbdkit-memory]="$FULL" [nbdkit-file]="$FULL"
    [nbdkit-luks]="$FULL" [qemu-nbd-luks]="$FULL" [nbdcrypt-tls]="$SWEEP"
    [nbdkit-memory-tls]="$SWEEP" [nbdcrypt-metrics]="$FULL")
w=1
while ((w < CORES)); do
    SERVERS+=("nbdcrypt-w$w")
    JOBS[nbdcrypt-w$w]="$SWEEP"
    w=$((w * 2))
done
((QUICK)) && SERVERS=(nbdcrypt nbdkit-memory nbdkit-file nbdkit-luks qemu-nbd-luks nbdcrypt-w1
    nbdcrypt-tls nbdkit-memory-tls nbdcrypt-metrics) &&
    JOBS[nbdcrypt-w1]="seqwrite randread" && JOBS[nbdcrypt-tls]="seqwrite randread" &&
    JOBS[nbdkit-memory-tls]="seqwrite randread" && JOBS[nbdcrypt-metrics]="randread"
if [[ -n "$BASE_BIN" ]]; then
    [[ -x "$BASE_BIN" ]] || die "no nbdcrypt binary at $BASE_BIN (--base-bin)"
    SERVERS+=(nbdcrypt-base)
    JOBS[nbdcrypt-base]="$FULL"
fi
if [[ "$MODE" == proxy ]]; then
    SERVERS=(nbdcrypt-proxy nbdkit-proxy nbdkit-luks-proxy qemu-nbd-luks-proxy)
    for s in "${SERVERS[@]}"; do JOBS[$s]="$FULL"; done
    [[ -n "$BASE_BIN" ]] && SERVERS+=(nbdcrypt-base-proxy) && JOBS[nbdcrypt-base-proxy]="$FULL"
    ((QUICK)) && for s in "${SERVERS[@]}"; do JOBS[$s]="seqwrite randread"; done
elif [[ "$MODE" == ceph ]]; then
    SERVERS=(nbdcrypt-rbd nbdcrypt-rbd-unix qemu-nbd-rbd nbdkit-proxy-rbd nbdkit-proxy-rbd-unix)
    [[ -n "$BASE_BIN" ]] && SERVERS+=(nbdcrypt-base-rbd)
    for s in "${SERVERS[@]}"; do JOBS[$s]="seqwrite seqread randread"; done
    log "starting a single-node Ceph cluster"
    "$ROOT/scripts/ceph-single-node.sh" start "$WORK/ceph" --osd-mib $((SIZE_MIB * 3 + 512)) >/dev/null
    if ((PIN)); then
        ((CORES >= 2)) || die "--pin needs two CPUs"
        PIN_CLUSTER=(taskset -c $((CORES - 1)))
        PIN_CLIENT=(taskset -c 0)
        for f in "$WORK/ceph/run/"*.pid; do
            taskset -a -p -c $((CORES - 1)) "$(cat "$f")" >/dev/null
        done
        log "pinned: Ceph daemons and qemu-nbd on CPU $((CORES - 1)), fio and nbdcrypt on CPU 0"
    fi
    rbd -c "$WORK/ceph/ceph.conf" create --size $((SIZE_MIB + 1)) rbd/bench
fi
if [[ -n "$ONLY" ]]; then
    read -ra SERVERS <<<"$ONLY"
    for s in "${SERVERS[@]}"; do [[ -n "${JOBS[$s]:-}" ]] || JOBS[$s]="$SWEEP"; done
fi
if [[ -n "$JOBS_ONLY" ]]; then
    for s in "${SERVERS[@]}"; do JOBS[$s]="$JOBS_ONLY"; done
fi

UP_SOCK="$WORK/upstream.sock"
UP_URI="nbd+unix:///?socket=$UP_SOCK"
start_upstream() { # KIND -> sets UP_PID; the upstream of the proxy and Ceph servers
    rm -f "$UP_SOCK"
    case "$1" in
        memory) nbdkit -f -U "$UP_SOCK" memory "$((SIZE_MIB + 64))M" >"$WORK/upstream.log" 2>&1 & ;;
        rbd) "${PIN_CLUSTER[@]}" qemu-nbd --persistent --shared=8 --cache=none --format=raw --socket="$UP_SOCK" \
            "rbd:rbd/bench:conf=$WORK/ceph/ceph.conf" >"$WORK/upstream.log" 2>&1 & ;;
    esac
    UP_PID=$!
    wait_for_socket "$UP_SOCK" "$UP_PID" "$WORK/upstream.log" "the $1 upstream"
}

wait_for_socket() { # SOCKET PID LOG WHAT: until SOCKET exists; dies if PID exits first
    local i
    for i in $(seq 1 300); do
        [[ -S "$1" ]] && return 0
        kill -0 "$2" 2>/dev/null || { cat "$3" >&2; die "$4 exited at start"; }
        sleep 0.05
    done
    die "$4 did not create $1"
}

start_server() { # NAME PORT -> sets SERVER_PID, URI
    local name="$1" port="$2"
    case "$name" in
        *-proxy) start_upstream memory ;;
        *-rbd | *-rbd-unix) start_upstream rbd ;;
    esac
    # The LUKS proxies read a LUKS image: copy it into the (empty) upstream first.
    [[ "$name" == *luks-proxy ]] && nbdcopy "$LUKS" "$UP_URI"
    case "$name" in
        nbdcrypt-proxy | nbdcrypt-rbd | nbdcrypt-base-proxy | nbdcrypt-base-rbd | nbdcrypt-rbd-unix)
            local bin="$BIN" listen=(--listen "127.0.0.1:$port")
            [[ "$name" == nbdcrypt-base-* ]] && bin="$BASE_BIN"
            if [[ "$name" == *-unix ]]; then
                rm -f "$WORK/front.sock"
                listen=(--unix "$WORK/front.sock")
            fi
            "${PIN_CLIENT[@]}" "$bin" --log warn serve "${listen[@]}" \
                --export "name=bench,file=$UP_URI,key-file=$WORK/volume.key,size=${SIZE_MIB}M" \
                >"$WORK/server.log" 2>&1 &
            ;;
        nbdkit-proxy | nbdkit-proxy-rbd)
            "${PIN_CLIENT[@]}" nbdkit -f -i 127.0.0.1 -p "$port" nbd socket="$UP_SOCK" \
                >"$WORK/server.log" 2>&1 &
            ;;
        nbdkit-proxy-rbd-unix)
            rm -f "$WORK/front.sock"
            "${PIN_CLIENT[@]}" nbdkit -f -U "$WORK/front.sock" nbd socket="$UP_SOCK" \
                >"$WORK/server.log" 2>&1 &
            ;;
        nbdkit-luks-proxy)
            nbdkit -f -i 127.0.0.1 -p "$port" --filter=luks nbd socket="$UP_SOCK" \
                "passphrase=$PASS" >"$WORK/server.log" 2>&1 &
            ;;
        qemu-nbd-luks-proxy)
            qemu-nbd -b 127.0.0.1 -p "$port" -x bench -t -e 8 --cache=writeback \
                --object "secret,id=sec0,data=$PASS" \
                --image-opts "driver=luks,key-secret=sec0,file.driver=nbd,file.server.type=unix,file.server.path=$UP_SOCK" \
                >"$WORK/server.log" 2>&1 &
            ;;
        qemu-nbd-rbd)
            # fio goes straight to the upstream: a forwarder would add a hop of its own.
            sleep infinity &
            ;;
        nbdcrypt*)
            local workers=() tls=() metrics=()
            [[ "$name" == nbdcrypt-w* ]] && workers=(--workers "${name#nbdcrypt-w}")
            if [[ "$name" == nbdcrypt-metrics ]]; then
                METRICS_PORT="$(free_port)"
                metrics=(--metrics-listen "127.0.0.1:$METRICS_PORT")
            fi
            [[ "$name" == *-tls ]] && tls=(--tls-cert "$WORK/pki/server-cert.pem"
                --tls-key "$WORK/pki/server-key.pem" --tls-required)
            rm -f "$WORK/volume.img"
            local bin="$BIN"
            [[ "$name" == nbdcrypt-base ]] && bin="$BASE_BIN"
            "$bin" --log warn serve --listen "127.0.0.1:$port" "${workers[@]}" "${tls[@]}" "${metrics[@]}" \
                --export "name=bench,file=$WORK/volume.img,key-file=$WORK/volume.key,size=${SIZE_MIB}M" \
                >"$WORK/server.log" 2>&1 &
            ;;
        nbdkit-memory)
            nbdkit -f -i 127.0.0.1 -p "$port" memory "${SIZE_MIB}M" >"$WORK/server.log" 2>&1 &
            ;;
        nbdkit-memory-tls)
            nbdkit -f -i 127.0.0.1 -p "$port" --tls=require --tls-certificates="$WORK/pki" \
                memory "${SIZE_MIB}M" >"$WORK/server.log" 2>&1 &
            ;;
        nbdkit-file)
            rm -f "$WORK/plain.img"
            truncate -s "${SIZE_MIB}M" "$WORK/plain.img"
            nbdkit -f -i 127.0.0.1 -p "$port" file "$WORK/plain.img" >"$WORK/server.log" 2>&1 &
            ;;
        nbdkit-luks)
            nbdkit -f -i 127.0.0.1 -p "$port" --filter=luks file "$LUKS" "passphrase=$PASS" \
                >"$WORK/server.log" 2>&1 &
            ;;
        qemu-nbd-luks)
            qemu-nbd -b 127.0.0.1 -p "$port" -x bench -t -e 8 --cache=writeback \
                --object "secret,id=sec0,data=$PASS" \
                --image-opts "driver=luks,key-secret=sec0,file.driver=file,file.filename=$LUKS" \
                >"$WORK/server.log" 2>&1 &
            ;;
        *) die "unknown server $name" ;;
    esac
    SERVER_PID=$!
    URI="nbd://127.0.0.1:$port/bench"
    if [[ "$name" == nbdcrypt-metrics ]]; then
        # A scraper as a fleet runs one (every second here; Prometheus' default is 15 s).
        (while kill -0 "$SERVER_PID" 2>/dev/null; do
            curl -s -o /dev/null "http://127.0.0.1:$METRICS_PORT/metrics" || true
            sleep 1
        done) &
        SCRAPER_PID=$!
    fi
    if [[ "$name" == qemu-nbd-rbd ]]; then
        # Its CPU column is then that of `sleep`: not comparable, and not used by a target.
        URI="$UP_URI"
        return 0
    fi
    # fio's libnbd refuses certificate files named in a URI (nbd_set_uri_allow_local_file), so
    # the benchmark client does not verify the server; the handshake and cipher work are the
    # same either way.
    [[ "$name" == *-tls ]] && URI="nbds://localhost:$port/bench?tls-verify-peer=false"
    local i
    if [[ "$name" == *-unix ]]; then
        URI="nbd+unix:///bench?socket=$WORK/front.sock"
        wait_for_socket "$WORK/front.sock" "$SERVER_PID" "$WORK/server.log" "$name"
        return 0
    fi
    for i in $(seq 1 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log" >&2; die "$name exited at start"; }
        sleep 0.05
    done
    die "$name did not start listening on port $port"
}

stop_server() {
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
    if [[ -n "${SCRAPER_PID:-}" ]]; then
        kill "$SCRAPER_PID" 2>/dev/null || true
        wait "$SCRAPER_PID" 2>/dev/null || true
        SCRAPER_PID=""
    fi
    if [[ -n "$UP_PID" ]]; then
        kill "$UP_PID" 2>/dev/null || true
        wait "$UP_PID" 2>/dev/null || true
        UP_PID=""
    fi
}

cpu_ticks() { # utime + stime of SERVER_PID (all threads), in clock ticks
    awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$SERVER_PID/stat"
}

machine_ticks() { # ticks of all CPUs since boot, and their number: "busy steal total cpus"
    # /proc/stat's first line: user nice system idle iowait irq softirq steal (guest is in user).
    # Busy is work done here; steal is time the hypervisor gave to other guests (not idle).
    awk '/^cpu / { t = $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9; b = $2 + $3 + $4 + $7 + $8; s = $9 }
         /^cpu[0-9]/ { n++ }
         END { print b, s, t, n }' /proc/stat
}

fio_job() { # JOB -> fio arguments
    local common=(--ioengine=nbd "--uri=$URI" --size="${SIZE_MIB}M" --time_based
        "--runtime=$RUNTIME" --ramp_time=0.5 --group_reporting --output-format=json)
    case "$1" in
        seqwrite) echo "${common[*]} --rw=write --bs=1M --iodepth=16" ;;
        seqread) echo "${common[*]} --rw=read --bs=1M --iodepth=16" ;;
        randread) echo "${common[*]} --rw=randread --bs=4k --iodepth=32" ;;
        randwrite) echo "${common[*]} --rw=randwrite --bs=4k --iodepth=32" ;;
        mix70) echo "${common[*]} --rw=randrw --rwmixread=70 --bs=4k --iodepth=32" ;;
        mc1 | mc2 | mc4) echo "${common[*]} --rw=randread --bs=4k --iodepth=32 --numjobs=${1#mc}" ;;
    esac
}

TICKS="$(getconf CLK_TCK)"
# fio runs RUNTIME seconds plus a 0.5 s ramp; anything far beyond that is a hang.
JOB_LIMIT="${NBDCRYPT_BENCH_JOB_LIMIT:-$(awk -v r="$RUNTIME" 'BEGIN { printf "%d", r + 60 }')}"
START=$(date +%s)
for round in $(seq 1 "$ROUNDS"); do
    # Alternate the order: odd rounds forward, even rounds backward.
    order=("${SERVERS[@]}")
    if ((round % 2 == 0)); then
        order=()
        for ((i = ${#SERVERS[@]} - 1; i >= 0; i--)); do order+=("${SERVERS[i]}"); done
    fi
    for name in "${order[@]}"; do
        log "round $round/$ROUNDS: $name"
        dir="$OUT/raw/round-$round/$name"
        mkdir -p "$dir"
        start_server "$name" "$(free_port)"
        # Prefill: every read job reads written (encrypted) data, not holes.
        "${PIN_CLIENT[@]}" fio --name=prefill --ioengine=nbd "--uri=$URI" --rw=write --bs=1M --iodepth=16 \
            --size="${SIZE_MIB}M" --output-format=terse >/dev/null
        for job in ${JOBS[$name]}; do
            before=$(cpu_ticks)
            read -r busy0 steal0 total0 _ < <(machine_ticks)
            # A per-job time limit: a job that hangs (a connection that never finishes closing)
            # becomes a failed cell in the table instead of losing the whole run.
            # shellcheck disable=SC2046
            if ! "${PIN_CLIENT[@]}" timeout -k 10 "$JOB_LIMIT" fio --name="$job" $(fio_job "$job") \
                --output="$dir/$job.json" >"$dir/$job.fio-out" 2>&1; then
                log "$name/$job failed or exceeded ${JOB_LIMIT}s; recorded as a failed cell"
                { echo "fio exit or timeout after ${JOB_LIMIT}s"; tail -5 "$dir/$job.fio-out"; } >"$dir/$job.failed"
                rm -f "$dir/$job.json"
            fi
            rm -f "$dir/$job.fio-out"
            after=$(cpu_ticks)
            read -r busy1 steal1 total1 cpus < <(machine_ticks)
            echo "$(((after - before)))" >"$dir/$job.cpu"
            echo "$((busy1 - busy0)) $((steal1 - steal0)) $((total1 - total0)) $cpus" >"$dir/$job.machine"
        done
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log" >&2; die "$name died"; }
        stop_server
    done
done
ELAPSED=$(($(date +%s) - START))

CPU_FLAGS="$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(aes|vaes|vpclmulqdq|avx2|avx512f|pclmulqdq)$' | sort | tr '\n' ' ')"
CPU_MODEL="$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
python3 "$ROOT/scripts/bench_report.py" "$OUT" \
    --ticks "$TICKS" --rounds "$ROUNDS" --cores "$CORES" --elapsed "$ELAPSED" \
    --cpu "$CPU_MODEL" --flags "$CPU_FLAGS" --size-mib "$SIZE_MIB" --runtime "$RUNTIME" \
    --nbdcrypt-version "$("$BIN" --version)" --quick "$QUICK" --mode "$MODE"
if command -v gnuplot >/dev/null; then
    gnuplot "$OUT/chart.gp"
    [[ -s "$OUT/chart.png" ]] || die "gnuplot drew no chart"
fi
log "done in ${ELAPSED}s; results in $OUT"
