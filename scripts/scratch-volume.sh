#!/usr/bin/env bash
# Scratch volumes for jobs: create, serve, attach, format and mount in one step; unmount,
# detach, stop and crypto-shred in another.
#
#   scripts/scratch-volume.sh up NAME SIZE MOUNTPOINT [--fs ext4|xfs] [--connections N]
#                                                    [--via kernel|nbdfuse]
#   scripts/scratch-volume.sh down NAME
#   scripts/scratch-volume.sh status NAME
#
# `up` creates the scratch volume NAME (service-managed key) unless it exists, starts
# `nbdcrypt serve` for it (a transient systemd unit where systemd runs, else a detached process
# with a pidfile and a log), attaches it with the kernel's nbd-client on a free /dev/nbdN
# (-b 4096, -C N), or, where no nbd kernel module exists, with nbdfuse + a loop device, makes a
# filesystem if the device has none, and mounts it. Every step checks whether it is already
# done, so `up` can be run again after an interruption; `down` undoes whatever exists, in
# reverse order, then deletes the volume (its key is destroyed) and checks that it is gone.
#
# Environment: NBDCRYPT (the binary; default: nbdcrypt on PATH, else target/{release,debug}),
# NBDCRYPT_STATE_DIR (volumes and keys), NBDCRYPT_SCRATCH_RUN (per-volume runtime state;
# default /run/nbdcrypt-scratch, or $XDG_RUNTIME_DIR/nbdcrypt-scratch when not root).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROG="scratch-volume.sh"

say() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
usage() { sed -n '2,20p' "$0" >&2; exit 2; }

find_nbdcrypt() {
    if [[ -n "${NBDCRYPT:-}" ]]; then echo "$NBDCRYPT"; return; fi
    if command -v nbdcrypt >/dev/null; then command -v nbdcrypt; return; fi
    for b in "$ROOT/target/release/nbdcrypt" "$ROOT/target/debug/nbdcrypt"; do
        [[ -x "$b" ]] && { echo "$b"; return; }
    done
    die "nbdcrypt not found: put it on PATH, set NBDCRYPT, or run cargo build --release"
}

if [[ $(id -u) -eq 0 ]]; then
    RUN_BASE="${NBDCRYPT_SCRATCH_RUN:-/run/nbdcrypt-scratch}"
else
    RUN_BASE="${NBDCRYPT_SCRATCH_RUN:-${XDG_RUNTIME_DIR:-/tmp}/nbdcrypt-scratch}"
fi

# Per-volume runtime state: one small file per fact, so an interrupted `up` leaves exactly
# what `down` needs to undo.
state_get() { [[ -f "$RUN/$1" ]] && cat "$RUN/$1" || true; }
state_set() { printf '%s\n' "$2" >"$RUN/$1"; }

nbd_module_available() {
    [[ -e /sys/module/nbd ]] || [[ -b /dev/nbd0 ]] || modprobe nbd 2>/dev/null
}

free_nbd_device() {
    local dev
    for dev in /sys/block/nbd*; do
        [[ -e "$dev" ]] || continue
        # size 0 and no pid: nobody attached.
        if [[ "$(cat "$dev/size")" == 0 ]] && [[ ! -e "$dev/pid" ]]; then
            echo "/dev/$(basename "$dev")"
            return 0
        fi
    done
    return 1
}

has_filesystem() { # DEV
    if command -v blkid >/dev/null; then
        blkid -p "$1" >/dev/null 2>&1
    else
        # ext2/3/4 superblock magic 0xEF53 at byte 1080, XFS "XFSB" at byte 0.
        local ext xfs
        ext="$(dd if="$1" bs=1 skip=1080 count=2 2>/dev/null | od -An -tx1 | tr -d ' \n')"
        xfs="$(dd if="$1" bs=4 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')"
        [[ "$ext" == "53ef" || "$xfs" == "58465342" ]]
    fi
}

is_mounted() { # MOUNTPOINT
    local mp
    mp="$(readlink -f "$1" 2>/dev/null || echo "$1")"
    awk -v m="$mp" '$2 == m { found = 1 } END { exit !found }' /proc/mounts
}

pid_alive() { [[ -n "$1" ]] && kill -0 "$1" 2>/dev/null; }

start_server() {
    local port pid unit
    port="$(state_get port)"
    pid="$(state_get pid)"
    unit="$(state_get unit)"
    if [[ -n "$port" ]] && { pid_alive "$pid" || { [[ -n "$unit" ]] && systemctl is-active -q "$unit"; }; }; then
        say "server: already running (127.0.0.1:$port)"
        return
    fi
    rm -f "$RUN/ready"
    local args=(serve --listen 127.0.0.1:0 --volume "$NAME" --ready-file "$RUN/ready")
    if [[ -d /run/systemd/system ]] && command -v systemd-run >/dev/null; then
        unit="nbdcrypt-scratch-$NAME"
        systemd-run --quiet --collect --unit "$unit" -p KillSignal=SIGTERM \
            -p LimitMEMLOCK=64M -p LimitCORE=0 \
            --setenv=NBDCRYPT_STATE_DIR="$STATE_DIR" "$BIN" "${args[@]}" ||
            die "server: systemd-run failed (journalctl -u $unit)"
        state_set unit "$unit"
        say "server: started as transient unit $unit"
    else
        setsid "$BIN" "${args[@]}" >>"$RUN/server.log" 2>&1 </dev/null &
        state_set pid "$!"
        say "server: started (pid $!, log $RUN/server.log)"
    fi
    local i
    for i in $(seq 1 300); do
        [[ -s "$RUN/ready" ]] && break
        if [[ -n "$(state_get pid)" ]] && ! pid_alive "$(state_get pid)"; then
            tail -5 "$RUN/server.log" >&2
            die "server: exited at start (log above)"
        fi
        sleep 0.1
    done
    [[ -s "$RUN/ready" ]] || die "server: did not become ready in 30 s (log: $RUN/server.log)"
    port="$(sed -E 's/.*:([0-9]+)$/\1/' "$RUN/ready")"
    state_set port "$port"
}

attach() {
    local port dev via conns
    port="$(state_get port)"
    dev="$(state_get device)"
    via="$(state_get via)"
    conns="$CONNECTIONS"
    if [[ -n "$dev" ]] && [[ -b "$dev" ]]; then
        if [[ "$via" == kernel ]] && [[ "$(cat "/sys/block/$(basename "$dev")/size" 2>/dev/null)" != 0 ]]; then
            say "attach: already attached ($dev)"
            return
        fi
        if [[ "$via" == nbdfuse ]] && losetup "$dev" >/dev/null 2>&1; then
            say "attach: already attached ($dev)"
            return
        fi
    fi
    if [[ -z "$VIA" ]]; then
        if nbd_module_available; then VIA=kernel; else
            say "attach: this machine has no nbd kernel module (/dev/nbd* absent, modprobe nbd failed);"
            say "attach: using nbdfuse + a loop device instead"
            VIA=nbdfuse
        fi
    fi
    state_set via "$VIA"
    if [[ "$VIA" == kernel ]]; then
        command -v nbd-client >/dev/null || die "attach: nbd-client is not installed (apt-get install nbd-client)"
        dev="$(free_nbd_device)" || die "attach: no free /dev/nbdN (modprobe nbd nbds_max=…)"
        nbd-client 127.0.0.1 "$port" "$dev" -N "$NAME" -b 4096 -C "$conns" >"$RUN/nbd-client.log" 2>&1 ||
            { cat "$RUN/nbd-client.log" >&2; die "attach: nbd-client $dev failed"; }
        state_set device "$dev"
        say "attach: $dev (kernel nbd-client, -b 4096, $conns connection(s))"
    else
        command -v nbdfuse >/dev/null || die "attach: nbdfuse is not installed (apt-get install libnbd-bin fuse3)"
        local fuse="$RUN/fuse"
        mkdir -p "$fuse"
        if [[ ! -e "$fuse/disk" ]]; then
            setsid nbdfuse "$fuse/disk" "nbd://127.0.0.1:$port/$NAME" >>"$RUN/nbdfuse.log" 2>&1 </dev/null &
            state_set fusepid "$!"
            local i
            for i in $(seq 1 100); do [[ -e "$fuse/disk" ]] && break; sleep 0.1; done
            [[ -e "$fuse/disk" ]] || { cat "$RUN/nbdfuse.log" >&2; die "attach: nbdfuse did not come up"; }
        fi
        dev="$(losetup -j "$fuse/disk" -O NAME -n 2>/dev/null | head -1)"
        if [[ -z "$dev" ]]; then
            dev="$(losetup -f --show -b 4096 "$fuse/disk")" || die "attach: losetup failed"
        fi
        state_set device "$dev"
        say "attach: $dev (nbdfuse + loop device, 4096-byte blocks)"
    fi
}

make_fs() {
    local dev
    dev="$(state_get device)"
    if has_filesystem "$dev"; then
        say "mkfs: $dev already has a filesystem"
        return
    fi
    case "$FS" in
        ext4) mkfs.ext4 -q -F "$dev" || die "mkfs: mkfs.ext4 $dev failed" ;;
        xfs) command -v mkfs.xfs >/dev/null || die "mkfs: mkfs.xfs is not installed (apt-get install xfsprogs)"
             mkfs.xfs -q -f "$dev" || die "mkfs: mkfs.xfs $dev failed" ;;
        *) die "mkfs: unknown filesystem $FS (ext4 or xfs)" ;;
    esac
    say "mkfs: $FS on $dev"
}

mount_fs() {
    local dev
    dev="$(state_get device)"
    if is_mounted "$MOUNTPOINT"; then
        say "mount: $MOUNTPOINT is already mounted"
        return
    fi
    mkdir -p "$MOUNTPOINT"
    mount "$dev" "$MOUNTPOINT" || die "mount: mount $dev $MOUNTPOINT failed"
    say "mount: $dev on $MOUNTPOINT"
}

cmd_up() {
    [[ $# -ge 3 ]] || usage
    NAME="$1" SIZE="$2" MOUNTPOINT="$3"
    shift 3
    FS=ext4 CONNECTIONS=1 VIA=""
    while (($#)); do
        case "$1" in
            --fs) FS="$2"; shift ;;
            --connections) CONNECTIONS="$2"; shift ;;
            --via) VIA="$2"; shift ;;
            *) usage ;;
        esac
        shift
    done
    [[ $(id -u) -eq 0 ]] || die "up needs root (attach, mkfs and mount)"
    RUN="$RUN_BASE/$NAME"
    mkdir -p "$RUN"
    chmod 0700 "$RUN"
    mkdir -p "$MOUNTPOINT"
    MOUNTPOINT="$(cd "$MOUNTPOINT" && pwd -P)"
    state_set mountpoint "$MOUNTPOINT"
    state_set state_dir "$STATE_DIR"
    # Captured first: `| grep -q` would close the pipe early, and with pipefail the writer's
    # EPIPE would read as "no such volume".
    local desc
    desc="$("$BIN" --log error volume describe "$NAME" --json 2>/dev/null || true)"
    if grep -q '"state": "available"' <<<"$desc"; then
        say "volume: $NAME exists"
    elif grep -q '"state": "incomplete"' <<<"$desc"; then
        "$BIN" --log error volume create "$NAME" --resume >/dev/null ||
            die "volume: cannot finish the interrupted creation of $NAME"
        say "volume: finished the interrupted creation of $NAME"
    else
        "$BIN" --log error volume create "$NAME" --size "$SIZE" >/dev/null ||
            die "volume: cannot create $NAME"
        say "volume: created scratch volume $NAME ($SIZE)"
    fi
    start_server
    attach
    make_fs
    mount_fs
    say "up: $NAME is mounted on $MOUNTPOINT"
}

cmd_down() {
    [[ $# -eq 1 ]] || usage
    NAME="$1"
    RUN="$RUN_BASE/$NAME"
    local failed=0
    if [[ -d "$RUN" ]]; then
        local mp dev via pid unit fusepid
        mp="$(state_get mountpoint)"; dev="$(state_get device)"; via="$(state_get via)"
        pid="$(state_get pid)"; unit="$(state_get unit)"; fusepid="$(state_get fusepid)"
        [[ -n "$(state_get state_dir)" ]] && STATE_DIR="$(state_get state_dir)" && export NBDCRYPT_STATE_DIR="$STATE_DIR"
        if [[ -n "$mp" ]] && is_mounted "$mp"; then
            umount "$mp" && say "unmount: $mp" || { say "unmount: $mp is busy (fuser -vm $mp)"; failed=1; }
        fi
        if ((failed == 0)) && [[ "$via" == kernel ]] && [[ -n "$dev" ]]; then
            nbd-client -d "$dev" >/dev/null 2>&1 && say "detach: $dev" || say "detach: $dev was not attached"
        fi
        if ((failed == 0)) && [[ -d "$RUN/fuse" ]]; then
            # Whatever an interrupted `up` got to: loop devices over the FUSE file, the FUSE
            # mount, the nbdfuse process.
            local loop
            for loop in $(losetup -j "$RUN/fuse/disk" -O NAME -n 2>/dev/null) $dev; do
                if losetup "$loop" >/dev/null 2>&1; then losetup -d "$loop" && say "detach: $loop"; fi
                # A device still open elsewhere (udev probing it) detaches on its last close:
                # wait for that, or the FUSE file below stays busy.
                local i
                for i in $(seq 1 100); do losetup "$loop" >/dev/null 2>&1 || break; sleep 0.1; done
            done
            if is_mounted "$RUN/fuse"; then
                fusermount3 -u "$RUN/fuse" 2>/dev/null || umount -l "$RUN/fuse" 2>/dev/null || true
            fi
            pid_alive "$fusepid" && kill "$fusepid" 2>/dev/null
            pkill -f "nbdfuse $RUN/fuse/disk" 2>/dev/null || true
        fi
        if ((failed == 0)); then
            if [[ -n "$unit" ]] && systemctl is-active -q "$unit" 2>/dev/null; then
                systemctl stop "$unit" && say "server: stopped unit $unit"
            fi
            if pid_alive "$pid"; then
                kill -TERM "$pid"
                local i
                for i in $(seq 1 100); do pid_alive "$pid" || break; sleep 0.1; done
                pid_alive "$pid" && { say "server: pid $pid did not stop"; failed=1; } || say "server: stopped (pid $pid)"
            fi
        fi
    fi
    ((failed == 0)) || die "down: stopped before deleting $NAME (see above); run down again"
    local desc
    desc="$("$BIN" --log error volume describe "$NAME" --json 2>/dev/null || true)"
    if grep -qE '"state": "(available|incomplete|damaged|unreadable)"' <<<"$desc"; then
        "$BIN" --log error volume delete "$NAME" >/dev/null || die "volume: delete $NAME failed"
        say "volume: $NAME deleted"
    elif [[ -n "$desc" ]]; then
        say "volume: $NAME was already deleted"
    else
        say "volume: $NAME does not exist"
    fi
    # The check: the volume is deleted (its header copies no longer hold a wrapped key and its
    # backing file is gone), and serving it is refused.
    desc="$("$BIN" --log error volume describe "$NAME" --json 2>/dev/null || true)"
    if [[ -n "$desc" ]] && ! grep -q '"state": "deleted"' <<<"$desc"; then
        die "check: $NAME is not deleted"
    fi
    local backing
    backing="$(sed -nE 's/.*"backing": "([^"]*)".*/\1/p' <<<"$desc")"
    if [[ -n "$backing" ]] && [[ -e "$backing" ]]; then die "check: $backing still exists"; fi
    local rc=0 why
    why="$(timeout 20 "$BIN" --log error serve --listen 127.0.0.1:0 --volume "$NAME" 2>&1 >/dev/null </dev/null)" || rc=$?
    if ((rc == 0 || rc == 124)); then die "check: $NAME can still be served"; fi
    grep -qiE "deleted|no volume named|not found" <<<"$why" || die "check: serve refused $NAME for another reason: $why"
    say "check: $NAME is gone and its key destroyed"
    rm -rf "$RUN"
}

cmd_status() {
    [[ $# -eq 1 ]] || usage
    RUN="$RUN_BASE/$1"
    [[ -d "$RUN" ]] || { echo "$1: not up"; return; }
    local f
    for f in via device mountpoint port pid unit; do
        if [[ -f "$RUN/$f" ]]; then printf '%-10s %s\n' "$f" "$(cat "$RUN/$f")"; fi
    done
    local pid
    pid="$(cat "$RUN/pid" 2>/dev/null || true)"
    if [[ -n "$pid" ]] && pid_alive "$pid"; then
        echo "server     running"
    elif [[ ! -f "$RUN/unit" ]]; then
        echo "server     not running"
    fi
    return 0
}

BIN="$(find_nbdcrypt)"
# The same default as nbdcrypt's, spelled out: a systemd unit has no $HOME to derive it from.
STATE_DIR="${NBDCRYPT_STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/nbdcrypt}"
export NBDCRYPT_STATE_DIR="$STATE_DIR"
[[ $# -ge 1 ]] || usage
sub="$1"; shift
case "$sub" in
    up) cmd_up "$@" ;;
    down) cmd_down "$@" ;;
    status) cmd_status "$@" ;;
    *) usage ;;
esac
