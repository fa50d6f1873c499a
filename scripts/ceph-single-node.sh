#!/usr/bin/env bash
# A throw-away single-node Ceph cluster for tests and benchmarks, from Debian's packages.
#
#   scripts/ceph-single-node.sh start DIR [--osd-mib N]   start it; prints "conf=DIR/ceph.conf"
#   scripts/ceph-single-node.sh stop DIR                  stop every daemon it started
#   scripts/ceph-single-node.sh status DIR                `ceph -s`
#
# One monitor, one manager and one OSD on the memstore object store (data in RAM, at most
# --osd-mib MiB, default 2048), all on 127.0.0.1 (msgr2 only, on a free port), no
# authentication, pool `rbd` of size 1. Everything lives under DIR: ceph.conf, the daemons'
# data, run/ (pid files, admin sockets) and log/. Nothing starts by itself and nothing outside
# DIR is written, so several clusters can run at once in different directories. `start` returns
# once the cluster is HEALTH_OK with every placement group active+clean (8–10 s here), or fails
# after 90 s and stops what it started. `stop` stops the OSD first, then the manager and the
# monitor (SIGTERM, then SIGKILL after 20 s); it is safe to run twice or on a half-started DIR.
#
# An RBD image is then one command away, e.g.
#   rbd -c DIR/ceph.conf create --size 1024 rbd/img
#   qemu-nbd --persistent --shared=8 --cache=none --format=raw --socket=DIR/img.sock \
#            'rbd:rbd/img:conf=DIR/ceph.conf'
# Facts and pitfalls behind the configuration: ../shared/guide/FACTS.md (Ceph) and
# docs/scale-out.md.
set -euo pipefail

PROG="ceph-single-node.sh"
say() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
usage() { sed -n '2,6p' "$0" >&2; exit 2; }

need() {
    local c
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 ||
            die "$c is not installed (Debian: apt-get install --no-install-recommends ceph-mon ceph-mgr ceph-osd ceph-common)"
    done
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

new_uuid() {
    python3 -c 'import uuid; print(uuid.uuid4())'
}

# The pid files of the daemons in stop order.
PIDFILES=(run/osd.0.pid run/mgr.x.pid run/mon.a.pid)

stop_cluster() {
    local dir="$1" f pid i
    for f in "${PIDFILES[@]}"; do
        [[ -s "$dir/$f" ]] || continue
        pid="$(cat "$dir/$f")"
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            for ((i = 0; i < 200; i++)); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            if kill -0 "$pid" 2>/dev/null; then
                say "$f ($pid) did not stop in 20 s; killing it"
                kill -KILL "$pid" 2>/dev/null || true
                sleep 0.2
            fi
        fi
        rm -f "$dir/$f"
    done
}

write_conf() {
    local dir="$1" fsid="$2" port="$3" osd_mib="$4"
    cat >"$dir/ceph.conf" <<EOF
[global]
fsid = $fsid
mon_initial_members = a
mon_host = v2:127.0.0.1:$port
public_network = 127.0.0.1/32
ms_bind_msgr1 = false
ms_bind_msgr2 = true
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
mon_data_avail_warn = 1
mon_data_avail_crit = 0
mon_warn_on_insecure_global_id_reclaim = false
mon_warn_on_insecure_global_id_reclaim_allowed = false
mgr_initial_modules = iostat
mgr_stats_period = 1
mon_mgr_digest_period = 1
mgr_tick_period = 1
osd_objectstore = memstore
memstore_device_bytes = $((osd_mib * 1024 * 1024))
run_dir = $dir/run
pid_file = $dir/run/\$name.pid
log_file = $dir/log/\$name.log
mon_cluster_log_file = $dir/log/cluster.log
mon_data = $dir/mon/\$name
mgr_data = $dir/mgr/\$name
osd_data = $dir/osd/\$name
keyring = /dev/null
crash_dir = $dir/crash
[mon]
admin_socket = $dir/run/\$name.asok
[mgr]
admin_socket = $dir/run/\$name.asok
[osd]
admin_socket = $dir/run/\$name.asok
EOF
}

start_cluster() {
    local dir="$1" osd_mib="$2"
    need ceph ceph-mon ceph-mgr ceph-osd monmaptool rbd python3
    [[ -e "$dir/ceph.conf" ]] && die "$dir already holds a cluster (ceph.conf exists); stop it and use an empty directory"
    mkdir -p "$dir"/{run,log,mon,mgr,osd,crash}
    dir="$(cd "$dir" && pwd)"
    local fsid port conf
    fsid="$(new_uuid)"
    port="$(free_port)"
    conf="$dir/ceph.conf"
    write_conf "$dir" "$fsid" "$port" "$osd_mib"
    # A failure from here on stops whatever was started.
    trap 'say "start failed; stopping what was started (logs in $dir/log)"; stop_cluster "$dir"' ERR
    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port]" "$dir/monmap" >/dev/null
    ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" >"$dir/log/mkfs-mon.out" 2>&1
    ceph-mon -c "$conf" -i a 2>>"$dir/log/daemons.err"
    ceph-mgr -c "$conf" -i x 2>>"$dir/log/daemons.err"
    local uuid id
    uuid="$(new_uuid)"
    id="$(timeout 60 ceph -c "$conf" --connect-timeout 30 osd new "$uuid")"
    [[ "$id" == 0 ]] || die "the new OSD got id $id, expected 0"
    mkdir -p "$dir/osd/osd.0"
    ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$uuid" >"$dir/log/mkfs-osd.out" 2>&1
    ceph-osd -c "$conf" -i 0 2>>"$dir/log/daemons.err"
    timeout 60 ceph -c "$conf" osd pool create rbd 8 8 >/dev/null 2>&1
    timeout 60 ceph -c "$conf" osd pool set rbd size 1 --yes-i-really-mean-it >/dev/null 2>&1
    timeout 60 rbd -c "$conf" pool init rbd
    local health="" pgs="" deadline=$((SECONDS + 90))
    while ((SECONDS < deadline)); do
        health="$(timeout 10 ceph -c "$conf" health 2>/dev/null || true)"
        pgs="$(timeout 10 ceph -c "$conf" pg stat 2>/dev/null || true)"
        if [[ "$health" == HEALTH_OK* && "$pgs" =~ ^([0-9]+)\ pgs:\ ([0-9]+)\ active\+clean ]] &&
            [[ "${BASH_REMATCH[1]}" == "${BASH_REMATCH[2]}" && "${BASH_REMATCH[1]}" -gt 0 ]]; then
            trap - ERR
            echo "conf=$conf"
            return 0
        fi
        sleep 0.2
    done
    say "not healthy after 90 s: ${health:-no answer}; ${pgs:-no pg stat}"
    false
}

[[ $# -ge 2 ]] || usage
cmd="$1"
dir="$2"
shift 2
case "$cmd" in
start)
    osd_mib=2048
    while [[ $# -gt 0 ]]; do
        case "$1" in
        --osd-mib) osd_mib="${2:?--osd-mib needs a number}"; shift 2 ;;
        *) usage ;;
        esac
    done
    [[ "$osd_mib" =~ ^[0-9]+$ ]] || die "--osd-mib: not a number: $osd_mib"
    start_cluster "$dir" "$osd_mib"
    ;;
stop)
    [[ -d "$dir" ]] || exit 0
    stop_cluster "$(cd "$dir" && pwd)"
    ;;
status)
    need ceph
    ceph -c "$dir/ceph.conf" -s
    ;;
*) usage ;;
esac
