"""A network that touches nothing on the host, for running the lifecycle in-process (a fake driver,
unit tests): the same surface as :class:`slicer.net.host.HostNetwork` as the core uses it, the same
address planning and bookkeeping, and errors where a caller misuses it, but no ``ip``, ``nft``,
TAP, namespace or passt. Its devices are of kind ``none``: no descriptor, nothing behind them.

Strict by default: attaching a VM that is attached, detaching one that is not, or an address
another VM holds raise :class:`NetworkError`, so a test sees the lifecycle's mistakes. The real
backends are forgiving there (an attach replaces an earlier one, a detach is idempotent);
``strict=False`` behaves like them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from slicer.net.addressing import Addressing
from slicer.net.config import GroupLike, NetGroup
from slicer.net.names import Names
from slicer.net.planning import HostNets, plan_addresses
from slicer.net.system import NetworkError, ifname
from slicer.vmm.base import NetDevice

NO_DEVICE = "none"  # the NetDevice kind of this network: no fd, no process
Policy = dict[str, list[str]]


@dataclass
class Link:
    """What the host would hold for one VM."""

    name: str
    ip: str
    run_dir: Path | None
    policy: Policy | None = None
    vmm_pid: int | None = None  # set when adopted from an earlier daemon


class DryRunGroupNetwork:
    """One host group's network in a dry run: addresses, links, templates' devices."""

    device_kind = NO_DEVICE

    def __init__(self, group: NetGroup, mode: str, host: DryRunNetwork) -> None:
        self.group = group
        self.mode = mode
        self.host = host
        self.links: dict[str, Link] = {}  # VM name → its link
        self.template_devices: set[str] = set()  # names of devices handed out and not released
        self._addressing: Addressing | None = None

    @property
    def name(self) -> str:
        return self.group.name

    @property
    def addressing(self) -> Addressing:
        if self._addressing is None:
            raise NetworkError(f"host group {self.name}: network not set up yet")
        return self._addressing

    @addressing.setter
    def addressing(self, value: Addressing) -> None:
        self._addressing = value

    @property
    def planned(self) -> bool:
        return self._addressing is not None

    def placeholder(self) -> NetDevice:
        return NetDevice(NO_DEVICE)

    def check_policy(self, policy: Policy | None) -> None:
        """The real backends' refusal: a VM's own allow/drop only where it can be applied."""
        if policy and self.mode != "isolated":
            raise NetworkError(f"host group {self.name} ({self.mode}): a VM's own allow/drop apply to "
                               "isolated host groups only")

    def _check_link(self, name: str, ip: str) -> None:
        if not self.host.started:
            raise NetworkError(f"host group {self.name}: the network is not started")
        if ip not in self.addressing:
            raise NetworkError(f"{name}: {ip} is not an address of host group {self.name}'s network "
                               f"{self.addressing.network}")
        if not self.host.strict:
            return
        if name in self.links:
            raise NetworkError(f"{name}: already attached to host group {self.name}")
        holder = next((link.name for link in self.links.values() if link.ip == ip), None)
        if holder is not None:
            raise NetworkError(f"{name}: address {ip} is attached to {holder}")

    async def attach(self, name: str, ip: str, run_dir: Path, policy: Policy | None = None) -> NetDevice:
        self.check_policy(policy)
        self._check_link(name, ip)
        self.links[name] = Link(name, ip, run_dir, policy)
        return NetDevice(NO_DEVICE)

    async def adopt(self, name: str, ip: str, vmm_pid: int, policy: Policy | None = None) -> None:
        self.check_policy(policy)
        if self.mode == "isolated" and name not in self.host.kept:
            raise NetworkError(f"{name}: its network namespace is gone")  # start(keep=...) did not keep it
        self._check_link(name, ip)
        self.links[name] = Link(name, ip, None, policy, vmm_pid)

    async def detach(self, name: str, ip: str, run_dir: Path) -> None:
        link = self.links.get(name)
        if self.host.strict:
            if link is None:
                raise NetworkError(f"{name}: not attached to host group {self.name}")
            if link.ip != ip:
                raise NetworkError(f"{name}: attached with {link.ip}, detached with {ip}")
        self.links.pop(name, None)

    async def template_device(self, name: str, run_dir: Path) -> NetDevice:
        device = ifname(self.host.names.template_tap_prefix, name)
        if self.host.strict and device in self.template_devices:
            raise NetworkError(f"{name}: its template device {device} is in use")
        self.template_devices.add(device)
        return NetDevice(NO_DEVICE, name=device)

    async def release(self, dev: NetDevice) -> None:
        dev.close()
        if dev.name is not None:
            self.template_devices.discard(dev.name)

    def describe(self) -> dict:
        out = {"mode": self.mode, **self.addressing.describe()}
        if self.mode == "bridge":
            net = self.group.network
            out |= {"bridge": net.bridge or self.host.names.bridge(self.name),
                    "tap_prefix": net.tap_prefix or self.host.names.default_tap_prefix}
        return out


class DryRunNetwork:
    """Built like ``HostNetwork(config.host_groups, data_dir)``. ``default_mode``: a group's mode
    when its config names none (the real one picks by privilege); ``host_networks``: the host's
    networks to plan around (none by default: nothing is read from the host)."""

    def __init__(self, groups: Iterable[GroupLike], data_dir: Path, *, default_mode: str = "bridge",
                 host_networks: HostNets = (), strict: bool = True) -> None:
        self.names = Names.for_data_dir(data_dir)
        self.strict = strict
        self.helper_uid: int | None = None
        self.host_networks = list(host_networks)
        self.started = False
        self.kept: frozenset[str] = frozenset()
        self.groups: dict[str, DryRunGroupNetwork] = {}
        for g in map(NetGroup.of, groups):
            self.groups[g.name] = DryRunGroupNetwork(g, g.network.mode or default_mode, self)

    @property
    def tag(self) -> str:
        return self.names.tag

    @property
    def table(self) -> str:
        return self.names.table

    def group(self, name: str) -> DryRunGroupNetwork:
        return self.groups[name]

    async def start(self, keep: Collection[str] = ()) -> None:
        """Plan the groups' addresses; ``keep``: the VMs whose links survived (adopted next)."""
        self.kept = frozenset(keep)
        plan_addresses(self.groups.values(), self.tag, self.host_networks)
        self.started = True

    async def stop(self) -> None:
        """Everything goes, as the real stop removes it from the host; idempotent."""
        self.started = False
        for g in self.groups.values():
            g.links.clear()
            g.template_devices.clear()

    async def remove_stale_taps(self) -> list[str]:
        return []  # no TAP was ever made

    def attached(self) -> dict[str, str]:
        """VM name → its address, over all groups: what a test asserts against."""
        return {link.name: link.ip for g in self.groups.values() for link in g.links.values()}

    def describe(self) -> dict:
        return {name: g.describe() for name, g in self.groups.items() if g.planned}
