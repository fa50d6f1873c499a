#!/bin/sh
# Inside the VM: the scratch-volume lifecycle with the kernel's nbd-client, server included.
echo "E2E-STEP scratch-volume.sh up jobvm 96M /scratch --connections 2"
export NBDCRYPT=/bin/nbdcrypt NBDCRYPT_STATE_DIR=/tmp/nbdcrypt-state NBDCRYPT_SCRATCH_RUN=/run/scratch
bash /e2e/scratch-volume.sh up jobvm 96M /scratch --connections 2 || { echo "E2E-FAIL scratch up"; exit 1; }
grep -q " /scratch ext4 " /proc/mounts || { echo "E2E-FAIL /scratch is not an ext4 mount"; exit 1; }
grep -q "^/dev/nbd" /proc/mounts || { echo "E2E-FAIL /scratch is not on /dev/nbdN"; exit 1; }
dd if=/dev/urandom of=/scratch/data bs=64k count=32 2>/dev/null || { echo "E2E-FAIL write"; exit 1; }
sync
echo "E2E-STEP scratch-volume.sh up again (idempotent)"
bash /e2e/scratch-volume.sh up jobvm 96M /scratch --connections 2 || { echo "E2E-FAIL scratch up (again)"; exit 1; }
echo "E2E-STEP scratch-volume.sh down jobvm"
bash /e2e/scratch-volume.sh down jobvm || { echo "E2E-FAIL scratch down"; exit 1; }
grep -q " /scratch " /proc/mounts && { echo "E2E-FAIL /scratch still mounted"; exit 1; }
[ "$(cat /sys/block/nbd0/size)" = 0 ] || { echo "E2E-FAIL nbd0 still attached"; exit 1; }
[ -e "$NBDCRYPT_STATE_DIR/volumes/jobvm.img" ] && { echo "E2E-FAIL backing file left"; exit 1; }
nbdcrypt --log error volume describe jobvm --json | grep -q '"state": "deleted"' ||
    { echo "E2E-FAIL jobvm not deleted"; exit 1; }
pidof nbdcrypt >/dev/null && { echo "E2E-FAIL a server is still running"; exit 1; }
echo "E2E-STEP ok scratch"
