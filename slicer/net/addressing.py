"""Which addresses a host group's VMs take, and what each guest is told (address, gateway, MAC).

Bridge and passt groups have one subnet: the gateway's (``network.gateway``; unset, a free /24
in 192.168.128.0/17 picked from a digest of the group and the data directory). Isolated groups
have one /30 per VM (network, gateway, VM, broadcast) from ``network.range`` (unset, a free /22
in 169.254.0.0/16, picked the same way, as Slicer does).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from slicer.net.config import NetworkConfig

IPv4 = ipaddress.IPv4Address
BRIDGE_SPACE = ipaddress.IPv4Network("192.168.128.0/17")
ISOLATED_SPACE = ipaddress.IPv4Network("169.254.0.0/16")
CLOUD_METADATA = ipaddress.IPv4Address("169.254.169.254")


def mac_for(ip: str) -> str:
    """A locally administered MAC made of the VM's IPv4 address: unique wherever the IP is."""
    return "02:5c:" + ":".join(f"{b:02x}" for b in IPv4(ip).packed)


class HasNetwork(Protocol):
    """A host group (the core's config, or :class:`slicer.net.config.NetGroup`): only its
    ``network`` block is read."""

    @property
    def network(self) -> NetworkConfig: ...


@dataclass(frozen=True)
class GuestAddress:
    ip_cidr: str
    gateway: str
    mac: str


def _pick(space: ipaddress.IPv4Network, prefix: int, seed: str,
          taken: Iterable[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """A block of ``space`` chosen by ``seed`` that overlaps nothing ``taken``: the same one every
    time while the host's addresses stay the same, a different one for another group or data dir."""
    blocks = list(space.subnets(new_prefix=prefix))
    start = int(hashlib.sha256(seed.encode()).hexdigest(), 16) % len(blocks)
    taken = list(taken)
    for i in range(len(blocks)):
        block = blocks[(start + i) % len(blocks)]
        if CLOUD_METADATA not in block and not any(block.overlaps(t) for t in taken):
            return block
    raise ValueError(f"no free /{prefix} left in {space}")


class Addressing:
    def __init__(self, group: HasNetwork, seed: str, taken: list[ipaddress.IPv4Network]) -> None:
        net = group.network
        self.isolated = net.mode == "isolated"
        if self.isolated:
            self.range = (ipaddress.IPv4Network(net.range, strict=False) if net.range
                          else _pick(ISOLATED_SPACE, 22, seed, taken))
            self.network = self.range
            self.pool = [b.network_address + 2 for b in self.range.subnets(new_prefix=30)]
            self.gateway = None
        else:
            if net.gateway:
                self.gateway = ipaddress.IPv4Interface(net.gateway)
            else:
                block = _pick(BRIDGE_SPACE, 24, seed, taken)
                self.gateway = ipaddress.IPv4Interface(f"{block.network_address + 1}/24")
                net = net.model_copy(update={"gateway": str(self.gateway)})
            self.network = self.gateway.network
            self.pool = net.pool()

    def __contains__(self, ip: str) -> bool:
        return IPv4(ip) in self.pool

    def service_address(self, index: int) -> str | None:
        """The address of service ``<group>-<index>`` (services take the pool in order)."""
        return str(self.pool[index - 1]) if 0 < index <= len(self.pool) else None

    def free(self, used: set[str]) -> str | None:
        return next((str(a) for a in self.pool if str(a) not in used), None)

    def guest(self, ip: str) -> GuestAddress:
        addr = IPv4(ip)
        if self.isolated:
            return GuestAddress(f"{addr}/30", str(addr - 1), mac_for(ip))
        assert self.gateway is not None
        return GuestAddress(f"{addr}/{self.network.prefixlen}", str(self.gateway.ip), mac_for(ip))

    def describe(self) -> dict:
        if self.isolated:
            return {"range": str(self.range), "per_vm": "/30"}
        assert self.gateway is not None
        return {"gateway": str(self.gateway), "first": str(self.pool[0]), "last": str(self.pool[-1])}
