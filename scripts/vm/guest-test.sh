#!/bin/sh
# The kernel-path test, run inside the VM by /init against the host's nbdcrypt server.
# /e2e/env gives NBD_HOST, NBD_PORT and the export names. Prints `E2E-STEP …` as it goes and
# `E2E-FAIL …` (exit 1) on the first failure.
. /e2e/env

step() { echo "E2E-STEP $*"; }
fail() {
    echo "E2E-FAIL $*"
    exit 1
}

# PORT and TLS_OPTS switch attach to the TLS server (see the TLS section below).
PORT="$NBD_PORT"
TLS_OPTS=""
attach() { # EXPORT BLOCKSIZE CONNECTIONS
    # shellcheck disable=SC2086 # TLS_OPTS is a list of options
    nbd-client "$NBD_HOST" "$PORT" /dev/nbd0 -N "$1" -b "$2" -C "$3" $TLS_OPTS >/tmp/nbd.log 2>&1 ||
        { cat /tmp/nbd.log; fail "nbd-client attach $1 -b $2 -C $3 $TLS_OPTS"; }
}

detach() {
    nbd-client -d /dev/nbd0 >/dev/null 2>&1 || fail "nbd-client -d"
}

write_files() { # DIR TAG
    i=0
    while [ $i -lt 6 ]; do
        dd if=/dev/urandom of="$1/f$i" bs=4096 count=$((i * 37 + 1)) 2>/dev/null || fail "write f$i"
        i=$((i + 1))
    done
    mkdir -p "$1/tree"
    cp -a /e2e "$1/tree/" || fail "copy tree"
    (cd "$1" && find . -type f | sort | xargs sha256sum) >"/tmp/sums-$2" || fail "checksums"
}

verify_files() { # DIR TAG
    (cd "$1" && sha256sum -c "/tmp/sums-$2" >/tmp/verify.log 2>&1) ||
        { cat /tmp/verify.log; fail "checksums differ ($2)"; }
}

# attach, mkfs, mount, write; unmount, detach, reattach, fsck, verify.
cycle() { # EXPORT BLOCKSIZE CONNECTIONS
    step "attach $1 (-b $2 -C $3), mkfs.ext4, mount, write"
    attach "$1" "$2" "$3"
    [ "$(blockdev --getss /dev/nbd0)" = "$2" ] || fail "logical block size is not $2"
    mkfs.ext4 -q -F /dev/nbd0 >/dev/null 2>&1 || fail "mkfs.ext4 on $1"
    mount -t ext4 /dev/nbd0 /mnt || fail "mount $1"
    write_files /mnt "$1"
    umount /mnt || fail "umount $1"
    detach
    step "reattach $1, e2fsck -fn, verify"
    attach "$1" "$2" "$3"
    e2fsck -fn /dev/nbd0 >/tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; fail "e2fsck $1"; }
    mount -t ext4 -o ro /dev/nbd0 /mnt || fail "remount $1"
    verify_files /mnt "$1"
    umount /mnt
    detach
    step "ok $1"
}

cycle "$EXPORT_4K" 4096 2
cycle "$EXPORT_512" 512 1

step "fio verify on /dev/nbd0 ($EXPORT_4K, 2 connections)"
attach "$EXPORT_4K" 4096 2
fio --name=verify --filename=/dev/nbd0 --ioengine=psync --direct=1 --rw=randwrite \
    --bsrange=4k-256k --blockalign=4k --size=24M --verify=crc32c --do_verify=1 \
    --verify_fatal=1 --numjobs=1 --output=/tmp/fio.log >/dev/null 2>&1 ||
    { cat /tmp/fio.log; fail "fio verify"; }
grep -q "err= 0" /tmp/fio.log || { cat /tmp/fio.log; fail "fio reported errors"; }
detach
step "ok fio"

if [ -n "$PERSISTENT" ]; then
    step "persistent volume $PERSISTENT: write through nbd"
    cycle "$PERSISTENT" 4096 1
    step "recovery: cryptsetup open --type plain over the backing file (second disk)"
    sync
    echo 3 >/proc/sys/vm/drop_caches
    blockdev --flushbufs /dev/vda
    DM_DISABLE_UDEV=1 cryptsetup open --type plain --cipher aes-xts-plain64 --key-size 512 \
        --key-file /e2e/recovery.key --offset 2048 --sector-size "$PERSISTENT_SECTOR" \
        --readonly --disable-locks /dev/vda recovered >/tmp/cs.log 2>&1 ||
        { cat /tmp/cs.log; fail "cryptsetup open"; }
    mount -t ext4 -o ro,noload /dev/mapper/recovered /mnt || fail "mount the dm-crypt device"
    verify_files /mnt "$PERSISTENT"
    umount /mnt
    DM_DISABLE_UDEV=1 cryptsetup close recovered --disable-locks 2>/dev/null
    step "ok recovery"
fi

if [ -n "$TLS_PORT" ]; then
    # The host runs a second server with --tls-cert/--tls-key/--tls-client-ca: only a client
    # with a certificate from that CA attaches, and everything else is refused.
    T=/e2e/tls
    refused() { # WHAT OPTIONS...
        what="$1"
        shift
        if nbd-client "$NBD_HOST" "$TLS_PORT" /dev/nbd1 -N "$TLS_EXPORT" -b 4096 "$@" \
            >/tmp/nbd-refused.log 2>&1; then
            nbd-client -d /dev/nbd1 >/dev/null 2>&1
            fail "TLS: $what was attached"
        fi
    }
    step "TLS: refused without a client certificate, with another CA's, and in plaintext"
    refused "a client without a certificate" -cacertfile "$T/ca-cert.pem"
    refused "another CA's certificate" -cacertfile "$T/ca-cert.pem" \
        -certfile "$T/other-cert.pem" -keyfile "$T/other-key.pem"
    refused "a plaintext client"
    step "ok TLS refusals"
    PORT="$TLS_PORT"
    TLS_OPTS="-cacertfile $T/ca-cert.pem -certfile $T/client-cert.pem -keyfile $T/client-key.pem"
    cycle "$TLS_EXPORT" 4096 2
    PORT="$NBD_PORT"
    TLS_OPTS=""
    step "ok TLS (kernel nbd-client, -certfile/-keyfile/-cacertfile)"
fi

if [ -x /e2e/rekeyed-guest.sh ]; then
    sh /e2e/rekeyed-guest.sh || fail "re-keyed volume"
fi

if [ -x /e2e/scratch-guest.sh ]; then
    sh /e2e/scratch-guest.sh || fail "scratch-volume lifecycle"
fi

if [ -x /e2e/resize-guest.sh ]; then
    sh /e2e/resize-guest.sh || fail "volume resize"
fi
exit 0
