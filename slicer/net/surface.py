"""What the lifecycle layer may use of a network: :class:`slicer.net.host.HostNetwork` (the host's)
and :class:`slicer.net.dryrun.DryRunNetwork` (nothing on the host) both are one. Annotate with
these to take either."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Protocol

from slicer.net.addressing import Addressing
from slicer.vmm.base import NetDevice

Policy = dict[str, list[str]]


class GroupNet(Protocol):
    """One host group's network."""

    mode: str
    device_kind: str

    @property
    def addressing(self) -> Addressing: ...

    @property
    def planned(self) -> bool: ...

    def placeholder(self) -> NetDevice: ...

    async def attach(self, name: str, ip: str, run_dir: Path, policy: Policy | None = None) -> NetDevice: ...

    async def detach(self, name: str, ip: str, run_dir: Path) -> None: ...

    async def adopt(self, name: str, ip: str, vmm_pid: int, policy: Policy | None = None) -> None: ...

    async def template_device(self, name: str, run_dir: Path) -> NetDevice: ...

    async def release(self, dev: NetDevice) -> None: ...

    def describe(self) -> dict: ...


class Network(Protocol):
    """Every group's network, started and stopped with the daemon."""

    @property
    def groups(self) -> Mapping[str, GroupNet]: ...

    def group(self, name: str) -> GroupNet: ...

    async def start(self, keep: Collection[str] = ()) -> None: ...

    async def stop(self) -> None: ...

    async def remove_stale_taps(self) -> list[str]: ...

    def describe(self) -> dict: ...
