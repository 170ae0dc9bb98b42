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
if [ ! -b /dev/vda ]; then
    echo "slicer-initramfs: no /dev/vda: this kernel lacks virtio_mmio/virtio_blk (built in, or modules matching it)"
    sleep 2; poweroff -f
fi
if ! mount -t ext4 -o rw /dev/vda /newroot; then
    echo "slicer-initramfs: cannot mount /dev/vda"; sleep 2; poweroff -f
fi
if grep -q 'slicer.runtime' /proc/cmdline; then
    # A user's image: our runtime (Python, aiohttp, the agent) on the second disk, mounted
    # read-only under /run; the image's root stays untouched but for the mount points.
    i=0
    while [ ! -b /dev/vdb ] && [ $i -lt 500 ]; do usleep 10000; i=$((i + 1)); done
    mkdir -p /newroot/run /newroot/dev /newroot/proc /newroot/sys /newroot/tmp /newroot/etc
    mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /newroot/run
    mkdir -p /newroot/run/slicer/rt
    if ! mount -t ext4 -o ro /dev/vdb /newroot/run/slicer/rt; then
        echo "slicer-initramfs: cannot mount the runtime disk /dev/vdb"; sleep 2; poweroff -f
    fi
    own_init=$(grep -c 'slicer.init=image' /proc/cmdline)
    mount --move /dev /newroot/dev
    umount /proc /sys
    if [ "$own_init" = 1 ]; then
        # The image's own init (systemd) as PID 1; our init runs beside it as a service that
        # starts early (sets the guest up, runs the agent), declared in /run like any runtime unit.
        units=/newroot/run/systemd/system
        mkdir -p $units/sysinit.target.wants
        cat > $units/slicer-agent.service <<'UNIT'
[Unit]
Description=Slicer guest agent
DefaultDependencies=no
Before=sysinit.target shutdown.target
Conflicts=shutdown.target

[Service]
ExecStart=/run/slicer/rt/opt/slicer/init --agent
Restart=always
RestartSec=1
UNIT
        ln -s ../slicer-agent.service $units/sysinit.target.wants/slicer-agent.service
        echo "slicer-initramfs: starting the image's /sbin/init"
        exec switch_root /newroot /sbin/init
    fi
    exec switch_root /newroot /run/slicer/rt/opt/slicer/init
fi
# The agent and init come with the initramfs, so every boot (persistent disks included) runs
# the agent of the image the host booted it with: guest and host never drift.
rm -rf /newroot/opt/slicer
mkdir -p /newroot/opt /newroot/sbin
cp -a /slicer/opt/slicer /newroot/opt/slicer
cp -a /slicer/slicer-init /newroot/sbin/slicer-init
mkdir -p /newroot/usr/local/bin
cp -a /slicer/slicer-agent /newroot/usr/local/bin/slicer-agent
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /sbin/slicer-init
