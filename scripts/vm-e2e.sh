#!/usr/bin/env bash
# The real kernel path: the Linux NBD driver (`nbd-client`) inside a qemu VM, against nbdcrypt
# serving on the host's loopback.
#
# The VM runs Debian's kernel (it ships nbd.ko) under TCG with a small initramfs: busybox,
# nbd-client, e2fsprogs, fio and cryptsetup with their libraries. Inside it (scripts/vm/
# guest-test.sh): attach with 4096- and 512-byte blocks and with 2 connections, mkfs.ext4,
# mount, write, unmount, detach, reattach, e2fsck -fn, verify checksums; a fio verify job on
# /dev/nbd0; the recovery path: a persistent volume's backing file, attached as a second
# disk, opened with `cryptsetup open --type plain --cipher aes-xts-plain64 --key-size 512` and
# the key from `nbdcrypt volume export-key`, shows the same files; and the scratch lifecycle,
# `scripts/scratch-volume.sh up` / `down` with the server inside the guest, after which the
# volume and its key are gone; growing a served volume (`volume resize`, reattach, resize2fs;
# scripts/vm/resize-guest.sh); and a re-keyed volume (`volume reencrypt` on the host) opened
# by dm-crypt with the new exported key, not the old one (scripts/vm/rekeyed-guest.sh). TLS: a
# second server with --tls-required and --tls-client-ca; the guest's nbd-client is refused
# without a certificate, with another CA's and in plaintext, and with
# -certfile/-keyfile/-cacertfile it runs the mkfs/fsck/verify cycle over TLS.
#
# Kernel, modules and the initramfs base are cached in $NBDCRYPT_VM_CACHE (default
# ~/.cache/nbdcrypt/vm), so reruns skip the downloads and the build.
#
# Usage: scripts/vm-e2e.sh [--bin PATH]   (default: target/debug/nbdcrypt, built if missing)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN=""
while (($#)); do
    case "$1" in
        --bin) BIN="$2"; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "vm-e2e.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
CACHE="${NBDCRYPT_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nbdcrypt/vm}"
TIMEOUT="${NBDCRYPT_VM_TIMEOUT:-900}"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'vm-e2e.sh: %s\n' "$*" >&2; exit 1; }

# --- host packages -----------------------------------------------------------------------
# qemu-system-x86 (the VM), cpio (the initramfs), and the tools copied into the guest with
# their libraries: e2fsprogs, fio, cryptsetup-bin, bash. kmod provides depmod, binutils strip.
# shellcheck source=scripts/lib/deb.sh
. "$ROOT/scripts/lib/deb.sh"
# shellcheck source=scripts/lib/qemu.sh
. "$ROOT/scripts/lib/qemu.sh"
qemu_consistent
# qemu-utils again: installing qemu-system-x86 can remove a newer one; keep the peers whole.
deb_install_missing cpio e2fsprogs fio cryptsetup-bin kmod xxd binutils openssl libnbd-bin

if [[ -z "$BIN" ]]; then
    cargo build --locked --quiet
    BIN="$ROOT/target/debug/nbdcrypt"
fi
[[ -x "$BIN" ]] || die "no nbdcrypt binary at $BIN"

# --- kernel and guest packages (cached) ----------------------------------------------------
kernel_package() { apt-cache depends linux-image-amd64 2>/dev/null | grep -o 'linux-image-6[^ ]*' | head -1; }
KPKG="$(kernel_package)"
if [[ -z "$KPKG" ]]; then
    # No package lists yet (a fresh machine where nothing else needed installing).
    if [[ $(id -u) -eq 0 ]]; then apt-get update -qq; else sudo apt-get update -qq; fi
    KPKG="$(kernel_package)"
fi
[[ -n "$KPKG" ]] || die "cannot resolve Debian's linux-image-amd64 package (apt sources?)"
KVER="${KPKG#linux-image-}"
GUEST_DEBS=("$KPKG" busybox-static nbd-client libnl-3-200 libnl-genl-3-200)
EXTRACT="$CACHE/extract-$KVER"
if [[ ! -f "$EXTRACT/.done" ]]; then
    log "downloading ${GUEST_DEBS[*]}"
    rm -rf "$EXTRACT" "$CACHE/debs"
    mkdir -p "$EXTRACT" "$CACHE/debs"
    (cd "$CACHE/debs" && apt-get download "${GUEST_DEBS[@]}" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
    for d in "$CACHE"/debs/*.deb; do dpkg -x "$d" "$EXTRACT"; done
    [[ -f "$EXTRACT/boot/vmlinuz-$KVER" ]] || die "the kernel package did not unpack"
    # The package leaves modules.dep to its postinst: make it here.
    depmod -b "$EXTRACT" "$KVER"
    touch "$EXTRACT/.done"
fi
KERNEL="$EXTRACT/boot/vmlinuz-$KVER"

# --- initramfs base (cached; rebuilt when this script or the tool versions change) ---------
GUEST_TOOLS=("$EXTRACT/sbin/nbd-client" /usr/sbin/mke2fs /usr/sbin/e2fsck /usr/sbin/resize2fs /usr/bin/fio /usr/sbin/cryptsetup /bin/bash)
MODULES=(virtio_pci virtio_net virtio_blk nbd crc32c_generic ext4 dm_crypt ecb xts aesni_intel)
stamp="$( (sha256sum "$0" "${GUEST_TOOLS[@]}"; echo "$KVER ${MODULES[*]}") | sha256sum | cut -c1-16)"
BASE="$CACHE/base-$stamp.cpio"
if [[ ! -f "$BASE" ]]; then
    log "building the initramfs base ($KVER)"
    R="$(mktemp -d)"
    mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,lib,lib64,proc,sys,dev,tmp,run,mnt,e2e}
    cp "$EXTRACT/bin/busybox" "$R/bin/busybox"
    ln -s busybox "$R/bin/sh"
    # The kernel loads crypto modules on demand through /sbin/modprobe.
    ln -s ../bin/busybox "$R/sbin/modprobe"
    libpath="$EXTRACT/lib/x86_64-linux-gnu:$EXTRACT/usr/lib/x86_64-linux-gnu"
    for tool in "${GUEST_TOOLS[@]}"; do
        cp "$tool" "$R/bin/$(basename "$tool")"
        LD_LIBRARY_PATH="$libpath" ldd "$tool" | awk '/=> \// { print $3 } /^\t\/lib64/ { print $1 }' |
            while read -r lib; do
                dest="$R/lib/x86_64-linux-gnu/$(basename "$lib")"
                [[ "$lib" == /lib64/* ]] && dest="$R$lib"
                mkdir -p "$(dirname "$dest")"
                [[ -e "$dest" ]] || cp -L "$lib" "$dest"
            done
    done
    ln -sf mke2fs "$R/bin/mkfs.ext4"
    # Kernel modules and everything they depend on, from modules.dep.
    MD="$EXTRACT/lib/modules/$KVER"
    want=()
    for m in "${MODULES[@]}"; do
        path="$(grep -E "(^|/)${m//_/[-_]}\.ko:" "$MD/modules.dep" | head -1 | cut -d: -f1)"
        [[ -n "$path" ]] || die "module $m not in $KVER"
        want+=("$path")
        deps="$(grep -E "^$path:" "$MD/modules.dep" | cut -d: -f2)"
        for d in $deps; do want+=("$d"); done
    done
    for path in "${want[@]}"; do
        mkdir -p "$R/lib/modules/$KVER/$(dirname "$path")"
        cp "$MD/$path" "$R/lib/modules/$KVER/$path"
    done
    cp "$MD"/modules.{order,builtin,builtin.modinfo} "$R/lib/modules/$KVER/" 2>/dev/null || true
    depmod -b "$R" "$KVER"
    (cd "$R" && find . | cpio -o -H newc --quiet) >"$BASE.tmp"
    mv "$BASE.tmp" "$BASE"
    rm -rf "$R"
fi

# --- the host side: volumes and the server ------------------------------------------------
RUN="$(mktemp -d "$ROOT/target/vm-e2e.XXXXXX")"
SERVER_PID=""
TLS_PID=""
cleanup() {
    for pid in "$SERVER_PID" "$TLS_PID"; do
        if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
            kill "$pid"; wait "$pid" 2>/dev/null || true
        fi
    done
    # Keep the last run's console and server logs for diagnosis.
    cp "$RUN/console.log" "$ROOT/target/vm-e2e-console.log" 2>/dev/null || true
    cp "$RUN/server.log" "$ROOT/target/vm-e2e-server.log" 2>/dev/null || true
    cp "$RUN/tls-server.log" "$ROOT/target/vm-e2e-tls-server.log" 2>/dev/null || true
    # For scripts/secrets-audit.py (scripts/test.sh): the logs, the raw keys, the KMS store.
    if [[ -n "${NBDCRYPT_TEST_ARTIFACTS:-}" ]]; then
        local a="$NBDCRYPT_TEST_ARTIFACTS/vm-e2e-$$"
        mkdir -p "$a/logs" "$a/keys" "$a/kms"
        cp "$RUN"/*.log "$RUN/console.log" "$a/logs/" 2>/dev/null || true
        cp "$RUN"/k4k "$RUN"/k512 "$RUN"/ktls "$RUN/recovery.key" "$RUN"/rekeyed-*.key "$a/keys/" 2>/dev/null || true
        cp "${STATE:-/nonexistent}/kms/keys.json" "$a/kms/" 2>/dev/null || true
    fi
    rm -rf "$RUN"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
STATE="$RUN/state"
export NBDCRYPT_STATE_DIR="$STATE"
"$BIN" keygen "$RUN/k4k" >/dev/null
"$BIN" keygen "$RUN/k512" >/dev/null
"$BIN" --log warn volume create persist --type persistent --size 128M >/dev/null
"$BIN" --log warn volume export-key persist --confirm | tr -d '\n' | xxd -r -p >"$RUN/recovery.key"
[[ "$(stat -c %s "$RUN/recovery.key")" == 64 ]] || die "export-key did not give 64 bytes"
BACKING="$STATE/volumes/persist.img"
[[ -f "$BACKING" ]] || die "no backing file at $BACKING"

# A re-keyed persistent volume: ext4 with a few files written through a server, then
# `volume reencrypt`; the guest opens its backing with dm-crypt and the new key.
"$BIN" --log warn volume create rekeyed --type persistent --size 64M >/dev/null
mkdir -p "$RUN/seed"
for i in 1 2 3; do head -c $((i * 300001)) /dev/urandom >"$RUN/seed/f$i"; done
(cd "$RUN/seed" && find . -type f | sort | xargs sha256sum) >"$RUN/rekeyed.sums"
mkfs.ext4 -q -F -b 4096 -d "$RUN/seed" "$RUN/rekeyed.ext4" 64M >/dev/null 2>&1 ||
    die "mkfs.ext4 -d for the re-keyed volume"
"$BIN" serve --listen 127.0.0.1:0 --ready-file "$RUN/rk-ready" --volume rekeyed >"$RUN/rk-server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 300); do [[ -s "$RUN/rk-ready" ]] && break; sleep 0.1; done
[[ -s "$RUN/rk-ready" ]] || { cat "$RUN/rk-server.log" >&2; die "the seeding server did not start"; }
nbdcopy "$RUN/rekeyed.ext4" "$(cat "$RUN/rk-ready")/rekeyed" || die "nbdcopy into rekeyed"
kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
SERVER_PID=""
"$BIN" --log warn volume export-key rekeyed --confirm | tr -d '\n' | xxd -r -p >"$RUN/rekeyed-old.key"
"$BIN" --log warn volume reencrypt rekeyed >/dev/null || die "volume reencrypt rekeyed"
"$BIN" --log warn volume export-key rekeyed --confirm | tr -d '\n' | xxd -r -p >"$RUN/rekeyed-new.key"
cmp -s "$RUN/rekeyed-old.key" "$RUN/rekeyed-new.key" && die "reencrypt did not change the data key"
REKEYED="$STATE/volumes/rekeyed.img"

"$BIN" serve --listen 127.0.0.1:0 --ready-file "$RUN/ready" --volume persist \
    --export "name=s4k,file=$RUN/s4k.img,key-file=$RUN/k4k,size=64M" \
    --export "name=s512,file=$RUN/s512.img,key-file=$RUN/k512,size=64M,sector-size=512" \
    >"$RUN/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 300); do [[ -s "$RUN/ready" ]] && break; sleep 0.1; done
[[ -s "$RUN/ready" ]] || { cat "$RUN/server.log" >&2; die "the server did not start"; }
PORT="$(sed -E 's/.*:([0-9]+)$/\1/' "$RUN/ready")"

# A second server for the TLS part: TLS required, clients need a certificate from the test CA.
"$ROOT/scripts/tls-certs.sh" "$RUN/pki" >/dev/null
"$BIN" keygen "$RUN/ktls" >/dev/null
"$BIN" serve --listen 127.0.0.1:0 --ready-file "$RUN/tls-ready" \
    --tls-cert "$RUN/pki/server-cert.pem" --tls-key "$RUN/pki/server-key.pem" \
    --tls-client-ca "$RUN/pki/ca-cert.pem" \
    --export "name=tls,file=$RUN/tls.img,key-file=$RUN/ktls,size=64M" \
    >"$RUN/tls-server.log" 2>&1 &
TLS_PID=$!
for _ in $(seq 300); do [[ -s "$RUN/tls-ready" ]] && break; sleep 0.1; done
[[ -s "$RUN/tls-ready" ]] || { cat "$RUN/tls-server.log" >&2; die "the TLS server did not start"; }
TLS_PORT="$(sed -E 's/.*:([0-9]+)$/\1/' "$RUN/tls-ready")"

# --- the per-run part of the initramfs: the test, its settings and the recovery key --------
G="$RUN/guest"
mkdir -p "$G/e2e"
cp "$ROOT/scripts/vm/init.sh" "$G/init"
cp "$ROOT/scripts/vm/guest-test.sh" "$G/e2e/guest-test.sh"
chmod +x "$G/init"
cp "$RUN/recovery.key" "$G/e2e/recovery.key"
mkdir -p "$G/e2e/tls"
cp "$RUN/pki/ca-cert.pem" "$RUN/pki/client-cert.pem" "$RUN/pki/client-key.pem" "$G/e2e/tls/"
cp "$RUN/pki/other/client-cert.pem" "$G/e2e/tls/other-cert.pem"
cp "$RUN/pki/other/client-key.pem" "$G/e2e/tls/other-key.pem"
# The scratch lifecycle runs entirely in the guest (server included): scripts/scratch-volume.sh
# with the kernel nbd-client. The binary is stripped to keep the initramfs small; it needs only
# libc, libm and libgcc_s, which the base already has for the other tools.
mkdir -p "$G/bin"
strip -o "$G/bin/nbdcrypt" "$BIN"
cp "$ROOT/scripts/scratch-volume.sh" "$G/e2e/scratch-volume.sh"
cp "$ROOT/scripts/vm/scratch-guest.sh" "$G/e2e/scratch-guest.sh"
chmod +x "$G/e2e/scratch-guest.sh"
cp "$ROOT/scripts/vm/resize-guest.sh" "$ROOT/scripts/vm/rekeyed-guest.sh" "$G/e2e/"
chmod +x "$G/e2e/resize-guest.sh" "$G/e2e/rekeyed-guest.sh"
cp "$RUN/rekeyed-old.key" "$RUN/rekeyed-new.key" "$RUN/rekeyed.sums" "$G/e2e/"
cat >"$G/e2e/env" <<EOF
NBD_HOST=10.0.2.2
NBD_PORT=$PORT
EXPORT_4K=s4k
EXPORT_512=s512
PERSISTENT=persist
PERSISTENT_SECTOR=4096
TLS_PORT=$TLS_PORT
TLS_EXPORT=tls
EOF
(cd "$G" && find . | cpio -o -H newc --quiet) >"$RUN/run.cpio"
# Uncompressed cpio archives concatenate: the kernel unpacks both.
cat "$BASE" "$RUN/run.cpio" >"$RUN/initrd"

log "booting the VM (TCG; kernel $KVER); server on 127.0.0.1:$PORT"
set +e
timeout "$TIMEOUT" qemu-system-x86_64 -accel tcg -cpu max -m 2048 -smp 2 \
    -nographic -no-reboot -kernel "$KERNEL" -initrd "$RUN/initrd" \
    -append "console=ttyS0 panic=-1 loglevel=3" \
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0 \
    -drive "file=$BACKING,format=raw,if=virtio,readonly=on" \
    -drive "file=$REKEYED,format=raw,if=virtio,readonly=on" \
    </dev/null >"$RUN/console.log" 2>&1
rc=$?
set -e
grep -E '^E2E-' "$RUN/console.log" | tr -d '\r' >&2 || true
if ! grep -q '^E2E-RESULT PASS' <(tr -d '\r' <"$RUN/console.log"); then
    echo "---- console ----" >&2
    tail -60 "$RUN/console.log" >&2
    echo "---- server ----" >&2
    tail -30 "$RUN/server.log" >&2
    ((rc == 124)) && die "the VM timed out after ${TIMEOUT}s"
    die "the kernel-path test failed"
fi
kill -0 "$SERVER_PID" 2>/dev/null || die "the server died"
kill -0 "$TLS_PID" 2>/dev/null || die "the TLS server died"
# The refusals reached the server and were logged with their reason; the good client got in.
for want in "peer sent no certificates" "TLS is required" "TLS established"; do
    grep -q "$want" "$RUN/tls-server.log" || { tail -30 "$RUN/tls-server.log" >&2; die "the TLS server log lacks: $want"; }
done
log "kernel nbd-client path: PASS"
