#!/bin/sh
# Slicer initramfs: load the virtio modules the cloud kernel ships as modules, then hand over
# to the real root. Kept to busybox so it starts in milliseconds even under TCG.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order); do
    insmod "/lib/modules/$m" 2>/dev/null
done
if grep -q 'slicer.probe' /proc/cmdline; then
    echo "SLICER-PROBE-OK"
    poweroff -f
fi
i=0
while [ ! -b /dev/vda ] && [ $i -lt 500 ]; do usleep 10000; i=$((i + 1)); done
mkdir -p /newroot
if ! mount -t ext4 -o rw /dev/vda /newroot; then
    echo "slicer-initramfs: cannot mount /dev/vda"; sleep 2; poweroff -f
fi
# The agent and init come with the initramfs, so every boot (persistent disks included) runs
# the agent of the image the host booted it with: guest and host never drift.
rm -rf /newroot/opt/slicer
mkdir -p /newroot/opt /newroot/sbin
cp -a /slicer/opt/slicer /newroot/opt/slicer
cp -a /slicer/slicer-init /newroot/sbin/slicer-init
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /sbin/slicer-init
