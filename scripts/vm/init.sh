#!/bin/sh
# /init of the nbdcrypt end-to-end test VM (busybox sh). Sets up the guest, then runs
# /e2e/guest-test.sh and powers off. Everything it prints goes to the serial console, where
# scripts/vm-e2e.sh reads the `E2E-…` lines.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /tmp /run /mnt /run/cryptsetup
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
mkdir -p /run/cryptsetup
echo 1 > /proc/sys/kernel/printk 2>/dev/null

for m in virtio_pci virtio_net virtio_blk nbd crc32c_generic ext4 dm_crypt xts; do
    modprobe "$m" 2>/dev/null || echo "E2E-NOTE modprobe $m failed"
done
# Slirp (-netdev user): the guest is 10.0.2.15, the host's loopback is 10.0.2.2.
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2

if sh /e2e/guest-test.sh; then
    echo "E2E-RESULT PASS"
else
    echo "E2E-RESULT FAIL"
fi
sync
poweroff -f
