"""Choosing every group's addresses at daemon start, given the networks the host already has."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Sequence
from typing import Protocol

from slicer.net.addressing import Addressing, HasNetwork
from slicer.net.system import NetworkError

log = logging.getLogger(__name__)
HostNets = Sequence[tuple[str, ipaddress.IPv4Network]]  # (interface, network) of the host's addresses


class Plannable(Protocol):
    """A group's network as the planner sees it (real backends and the dry run alike)."""

    mode: str
    addressing: Addressing

    @property
    def group(self) -> HasNetwork: ...

    @property
    def name(self) -> str: ...

    @property
    def planned(self) -> bool: ...

    def describe(self) -> dict: ...


def plan_addresses(groups: Iterable[Plannable], tag: str, host: HostNets) -> None:
    """Give each group its :class:`Addressing`: groups with an explicit subnet first (defaults
    must avoid them), then the others in free space. A kernel group (not passt) whose explicit
    subnet overlaps a host network is refused, naming the group and the keys to change."""
    groups = list(groups)
    taken = [n for _, n in host]
    for g in groups:
        net = g.group.network
        if net.gateway or (net.mode == "isolated" and net.range):
            g.addressing = Addressing(g.group, tag + g.name, taken)
            clash = next(((i, n) for i, n in host if n.overlaps(g.addressing.network)), None)
            if clash and g.mode != "passt":
                raise NetworkError(f"host group {g.name}: network {g.addressing.network} overlaps {clash[1]} on "
                                   f"host interface {clash[0]}; choose another network.gateway or network.range")
            taken.append(g.addressing.network)
    for g in groups:
        if not g.planned:
            try:
                g.addressing = Addressing(g.group, tag + g.name, taken)
            except ValueError as e:
                raise NetworkError(f"host group {g.name}: {e}; set network.gateway or range") from e
            taken.append(g.addressing.network)
        log.info("host group %s: network %s", g.name, g.describe())
