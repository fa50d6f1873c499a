#!/bin/sh
# Inside the VM: growing a served volume with the kernel's nbd-client, as docs/operations.md
# tells it (server included, local KMS): ext4 on a 64 MiB volume, detach, `nbdcrypt volume
# resize` while the server runs, reattach (the new size), e2fsck -f + resize2fs, old files
# intact, a file larger than the old volume written, e2fsck -fn clean.
step() { echo "E2E-STEP $*"; }
fail() {
    echo "E2E-FAIL $*"
    [ -n "$SP" ] && kill "$SP" 2>/dev/null
    exit 1
}
export NBDCRYPT_STATE_DIR=/tmp/resize-state
step "resize: volume create grow 64M, serve, attach, mkfs.ext4, write"
nbdcrypt --log error volume create grow --size 64M >/dev/null || fail "volume create grow"
nbdcrypt serve --volume grow --listen 127.0.0.1:10899 --ready-file /tmp/grow.ready >/tmp/grow.log 2>&1 &
SP=$!
i=0
while [ ! -s /tmp/grow.ready ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
[ -s /tmp/grow.ready ] || { cat /tmp/grow.log; fail "the resize server did not start"; }
attach() {
    nbd-client 127.0.0.1 10899 /dev/nbd0 -N grow -b 4096 >/tmp/nbd.log 2>&1 ||
        { cat /tmp/nbd.log; fail "nbd-client attach grow"; }
}
attach
[ "$(blockdev --getsize64 /dev/nbd0)" = 67108864 ] || fail "grow is not 64 MiB"
mkfs.ext4 -q -F /dev/nbd0 >/dev/null 2>&1 || fail "mkfs.ext4 grow"
mount -t ext4 /dev/nbd0 /mnt || fail "mount grow"
dd if=/dev/urandom of=/mnt/old bs=1M count=20 2>/dev/null || fail "write old"
(cd /mnt && sha256sum old) >/tmp/grow.sums
umount /mnt || fail "umount grow"
nbd-client -d /dev/nbd0 >/dev/null 2>&1 || fail "detach grow"

step "resize: nbdcrypt volume resize grow --size 160M while served; reattach, resize2fs"
nbdcrypt --log error volume resize grow --size 160M || fail "volume resize"
sleep 1
attach
[ "$(blockdev --getsize64 /dev/nbd0)" = 167772160 ] || fail "reattached grow is $(blockdev --getsize64 /dev/nbd0) bytes, not 160 MiB"
e2fsck -fp /dev/nbd0 >/tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; fail "e2fsck -fp before resize2fs"; }
resize2fs /dev/nbd0 >/tmp/resize2fs.log 2>&1 || { cat /tmp/resize2fs.log; fail "resize2fs"; }
mount -t ext4 /dev/nbd0 /mnt || fail "mount grown"
(cd /mnt && sha256sum -c /tmp/grow.sums >/dev/null 2>&1) || fail "old file changed"
dd if=/dev/urandom of=/mnt/new bs=1M count=100 2>/dev/null || fail "100 MiB do not fit: the file system did not grow"
umount /mnt || fail "umount grown"
e2fsck -fn /dev/nbd0 >/tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; fail "e2fsck -fn after the growth"; }
nbd-client -d /dev/nbd0 >/dev/null 2>&1 || fail "detach grown"
kill "$SP"
wait "$SP" 2>/dev/null
step "ok resize"
