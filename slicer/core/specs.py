"""From a host group and a node's values to the driver's :class:`VMSpec`."""

from __future__ import annotations

from pathlib import Path

from slicer.core.config import HostGroup
from slicer.core.records import NodeKind
from slicer.core.state import NodeRecord
from slicer.image.build import GuestImage
from slicer.net.surface import GroupNet
from slicer.vmm.base import VMSpec


def vm_spec(image: GuestImage, group: HostGroup, net: GroupNet, *, name: str, cpus: int, ram_bytes: int,
            ip: str, disk: Path, run_dir: Path) -> VMSpec:
    """The VM's spec with a placeholder NIC of the group's kind (``spec.net``); the caller
    attaches the real one right before starting it."""
    guest = net.addressing.guest(ip)
    return VMSpec(
        name=name, cpus=cpus, ram_bytes=ram_bytes,
        kernel=image.kernel, initrd=image.initrd, base_disk=image.rootfs, runtime_disk=image.runtime,
        disk=disk, disk_size=group.disk_size, run_dir=run_dir,
        ip_cidr=guest.ip_cidr, gateway=guest.gateway, mac=guest.mac,
        dns=group.dns_servers, net=net.placeholder(),
        # the image's own init (systemd), our agent beside it: only with a user's image
        kernel_args=["slicer.init=image"] if group.init == "image" and image.runtime is not None else [],
    )


def as_recorded(spec: VMSpec, rec: NodeRecord) -> VMSpec:
    """What of the machine the node's record decides: its layout (the one its saved state fits),
    and what a guest reset does. As in Slicer (Firecracker has no reboot), a reboot ends a
    sandbox or persistent VM; a service, which the config says should run, boots again in place."""
    spec.layout = rec.spec.layout or 0
    spec.reboot = rec.kind == NodeKind.SERVICE
    return spec
