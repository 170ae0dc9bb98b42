"""What the network layer reads of a host group: Slicer's ``network:`` block (validated here, as
the YAML schema of ``slicer.core.config`` embeds it) and the group's name and DNS servers."""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from slicer.net.system import IFNAMSIZ

MAX_POOL = 4096  # addresses considered per group


def cidr(value: str, what: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{what}: {value!r} is not an IPv4 address or CIDR") from None
    if net.version != 4:
        raise ValueError(f"{what}: {value!r} is not IPv4 (IPv6 is not supported yet)")
    return net


def rule_entry(value: str, what: str) -> str:
    """An ``allow``/``drop`` entry normalised: a CIDR (or address), optionally with ``:PORT``
    (Slicer's proxy lock-down names ``IP:3128``); nft takes prefix lengths, not netmasks."""
    if not isinstance(value, str):
        raise ValueError(f"{what}: {value!r} is not an IPv4 address or CIDR")
    address, sep, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    if not sep:
        return str(cidr(value, what))
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what}: {value!r}: the port must be a number from 1 to 65535")
    return f"{cidr(address, what)}:{int(port)}"


class NetworkConfig(BaseModel):
    """Slicer's ``network:`` block. ``mode`` unset: bridge when the daemon has CAP_NET_ADMIN
    (root), passt otherwise."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["bridge", "isolated", "passt"] | None = None
    # bridge: the group's subnet and the host's address on it; unset: a free /24 in
    # 192.168.128.0/17 picked at start (see slicer.net.addressing)
    gateway: str | None = None
    addresses: list[str] = []  # bridge: static pool, VM n gets entry n
    range: str | None = None  # bridge: "A-B" inside the gateway's subnet; isolated: a CIDR of /30s
    bridge: str | None = Field(default=None, max_length=IFNAMSIZ, pattern=r"^[A-Za-z0-9_.-]+$")
    tap_prefix: str | None = Field(default=None, max_length=IFNAMSIZ - 4, pattern=r"^[A-Za-z0-9_.-]+$")
    allow: list[str] = []  # isolated: only these CIDRs or CIDR:PORTs (besides DNS)
    drop: list[str] = []  # isolated: everything but these (the most specific entry wins)

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, v: object) -> object:
        if v == "user":
            raise ValueError("mode user (QEMU's slirp) lets guests reach the host's loopback services; "
                             "use bridge, isolated or passt")
        if v == "macvtap":
            raise ValueError("mode macvtap is not supported yet; use bridge (VMs on a bridge of the host, "
                             "NAT out) or isolated")
        return v

    @field_validator("gateway")
    @classmethod
    def _gateway(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            iface = ipaddress.ip_interface(v)
        except ValueError:
            raise ValueError(f"gateway {v!r} is not an address in CIDR form (e.g. 192.168.137.1/24)") from None
        if iface.version != 4 or iface.network.prefixlen > 29 or "/" not in v:
            raise ValueError("gateway must be an IPv4 CIDR of a /29 or larger network, e.g. 192.168.137.1/24")
        if iface.ip in (iface.network.network_address, iface.network.broadcast_address):
            raise ValueError(f"gateway {v} is its subnet's network or broadcast address")
        return v

    @model_validator(mode="after")
    def _check(self) -> NetworkConfig:
        for what in ("allow", "drop"):
            setattr(self, what, [rule_entry(c, what) for c in getattr(self, what)])
        if self.mode == "isolated":
            if self.gateway or self.addresses or self.bridge or self.tap_prefix:
                raise ValueError("isolated mode takes range, allow and drop; gateway, addresses, bridge and "
                                 "tap_prefix are for bridge mode")
            if self.range is not None:
                net = cidr(self.range, "range")
                if "/" not in self.range or net.prefixlen > 30:
                    raise ValueError(f"range {self.range!r}: isolated mode needs a CIDR of /30 blocks, e.g. "
                                     "169.254.100.0/22")
            return self
        if self.allow or self.drop:
            raise ValueError("allow and drop apply to mode: isolated (bridge VMs share their subnet)")
        if self.addresses and self.range:
            raise ValueError("give either addresses or range, not both")
        if (self.addresses or self.range) and self.gateway is None:
            raise ValueError("addresses and range need a gateway (the subnet they are in)")
        if self.gateway is None:
            return self
        net = self.interface.network
        usable = [a for a in self.pool() if a in net and a not in (net.network_address, net.broadcast_address,
                                                                    self.interface.ip)]
        if len(usable) != len(self.pool()):
            bad = next(a for a in self.pool() if a not in usable)
            raise ValueError(f"address {bad} is not a usable VM address of {net} (gateway {self.interface.ip})")
        return self

    @property
    def interface(self) -> ipaddress.IPv4Interface:
        assert self.gateway is not None
        return ipaddress.IPv4Interface(self.gateway)

    def pool(self) -> list[ipaddress.IPv4Address]:
        """Bridge mode: the addresses VMs take, in order (explicit ``addresses``/``range``, or
        every host address of the subnet from .2)."""
        if self.addresses:
            out = []
            for a in self.addresses:
                try:
                    out.append(ipaddress.IPv4Interface(a).ip)
                except ValueError:
                    raise ValueError(f"addresses: {a!r} is not an IPv4 address") from None
            if len(set(out)) != len(out):
                raise ValueError("addresses: an address is listed twice")
            return out
        if self.range:
            try:
                first, last = (ipaddress.IPv4Address(p.strip()) for p in self.range.split("-"))
            except ValueError:
                raise ValueError(f"range {self.range!r} must be A-B, e.g. 192.168.137.20-192.168.137.80") from None
            if last < first:
                raise ValueError(f"range {self.range!r}: the last address comes before the first")
            return [first + i for i in range(min(int(last) - int(first) + 1, MAX_POOL))]
        net = self.interface.network
        return list(itertools.islice((a for a in net.hosts() if a != self.interface.ip), MAX_POOL))


class GroupLike(Protocol):
    """Any host group (the core's config model included) the network layer can be built from."""

    @property
    def name(self) -> str: ...

    @property
    def network(self) -> NetworkConfig: ...

    @property
    def dns_servers(self) -> Sequence[str]: ...


@dataclass(frozen=True)
class NetGroup:
    """One host group as the network layer sees it: all a backend reads of the config."""

    name: str
    network: NetworkConfig
    dns_servers: tuple[str, ...] = ()

    @classmethod
    def of(cls, group: GroupLike) -> NetGroup:
        return cls(group.name, group.network, tuple(group.dns_servers))
