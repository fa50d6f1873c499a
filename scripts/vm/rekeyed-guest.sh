#!/bin/sh
# Inside the VM: the recovery path of a re-keyed volume. The host wrote an ext4 file system
# into the persistent volume `rekeyed`, ran `nbdcrypt volume reencrypt`, and exported the old
# and the new key; its backing file is the third disk (/dev/vdb). dm-crypt opens it with the
# new key and shows the files; with the old key there is no file system.
step() { echo "E2E-STEP $*"; }
fail() {
    echo "E2E-FAIL $*"
    exit 1
}
open() { # KEYFILE
    DM_DISABLE_UDEV=1 cryptsetup open --type plain --cipher aes-xts-plain64 --key-size 512 \
        --key-file "$1" --offset 2048 --sector-size 4096 \
        --readonly --disable-locks /dev/vdb rekeyed >/tmp/cs.log 2>&1 ||
        { cat /tmp/cs.log; fail "cryptsetup open rekeyed"; }
}
close() {
    DM_DISABLE_UDEV=1 cryptsetup close rekeyed --disable-locks 2>/dev/null
}
step "re-keyed volume: cryptsetup open --type plain with the new exported key"
blockdev --flushbufs /dev/vdb
open /e2e/rekeyed-new.key
mount -t ext4 -o ro,noload /dev/mapper/rekeyed /mnt || fail "mount the re-keyed volume with the new key"
(cd /mnt && sha256sum -c /e2e/rekeyed.sums >/tmp/rk.log 2>&1) || { cat /tmp/rk.log; fail "re-keyed files differ"; }
umount /mnt
close
step "re-keyed volume: the old key shows no file system"
open /e2e/rekeyed-old.key
if mount -t ext4 -o ro,noload /dev/mapper/rekeyed /mnt 2>/dev/null; then
    umount /mnt
    close
    fail "the old key still opens the re-keyed volume"
fi
close
step "ok re-keyed"
