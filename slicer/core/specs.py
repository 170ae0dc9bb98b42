"""From a host group and a node's values to the driver's :class:`VMSpec`."""

from __future__ import annotations

from pathlib import Path

from slicer.core.config import HostGroup
from slicer.image.build import GuestImage
from slicer.vmm.base import VMSpec


def vm_spec(image: GuestImage, group: HostGroup, *, name: str, cpus: int, ram_bytes: int, ip: str,
            disk: Path, run_dir: Path) -> VMSpec:
    net = group.network.interface
    return VMSpec(
        name=name, cpus=cpus, ram_bytes=ram_bytes,
        kernel=image.kernel, initrd=image.initrd, base_disk=image.rootfs,
        disk=disk, disk_size=group.disk_size, run_dir=run_dir,
        ip_cidr=f"{ip}/{net.network.prefixlen}", gateway=str(net.ip),
        dns=group.dns_servers, isolated=group.network.mode == "isolated",
    )
