"""The daemon's side of guest networking: every group's backend, the firewall, and cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

from slicer.net.addressing import Addressing
from slicer.net.backends import BridgeNetwork, GroupNetwork, IsolatedNetwork, PasstNetwork
from slicer.net.firewall import ruleset
from slicer.net.system import NetworkError, has_net_admin, host_networks, netns_names, nft, run, sysctl
from slicer.net.tap import delete_tap, tap_names
from slicer.vmm.jail import helper_uid

if TYPE_CHECKING:
    from slicer.core.config import HostGroup

log = logging.getLogger(__name__)
BACKENDS: dict[str, type[GroupNetwork]] = {"bridge": BridgeNetwork, "isolated": IsolatedNetwork,
                                           "passt": PasstNetwork}

__all__ = ["HostNetwork", "NetworkError"]


class HostNetwork:
    """Owns every name it makes: bridges, namespaces and nftables tables carry a tag derived
    from the data directory, so two daemons on one host never touch each other's."""

    def __init__(self, groups: list[HostGroup], data_dir: Path) -> None:
        self.tag = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:4]
        self.table = f"slicer_{self.tag}"
        self.veth_prefix = f"s{self.tag}-"  # the host's end of every isolated VM's veth pair
        self.template_tap_prefix = f"x{self.tag}"  # template VMs' TAPs, connected to nothing
        self.staging_tap_prefix = f"t{self.tag}-"  # an isolated VM's TAP before it is in its namespace
        self._record = data_dir / "run" / "network.json"
        self._procs: set[asyncio.subprocess.Process] = set()
        admin = has_net_admin()
        # passt runs as a uid of its own when the daemon can filter that uid's connections
        passt = any((g.network.mode or ("bridge" if admin else "passt")) == "passt" for g in groups)
        self.helper_uid = helper_uid(self.tag) if passt and admin and os.geteuid() == 0 and shutil.which("nft") \
            else None
        if passt and self.helper_uid is None:
            log.warning("passt groups: without root and nftables, their guests can reach this host's addresses "
                        "and link-local ones (cloud metadata) through passt")
        self.groups: dict[str, GroupNetwork] = {}
        for g in groups:
            mode = g.network.mode or ("bridge" if admin else "passt")
            if mode != "passt" and not admin:
                raise NetworkError(f"host group {g.name}: network mode {mode} needs CAP_NET_ADMIN (run the "
                                   "daemon as root), or set network.mode: passt")
            tool = "passt" if mode == "passt" else "nft"
            if shutil.which(tool) is None:
                raise NetworkError(f"host group {g.name}: network mode {mode} needs `{tool}`: install Debian's "
                                   f"{'passt' if mode == 'passt' else 'nftables'} package")
            self.groups[g.name] = BACKENDS[mode](g, self)

    def group(self, name: str) -> GroupNetwork:
        return self.groups[name]

    @property
    def _kernel_groups(self) -> list[GroupNetwork]:
        return [g for g in self.groups.values() if g.mode != "passt"]

    @property
    def _filtered(self) -> bool:
        """Whether the daemon has rules to load: kernel groups, or passt groups run as root."""
        return bool(self._kernel_groups) or self.helper_uid is not None

    # -- what this daemon made (kept across a crash) ------------------------------------------------
    def _bridges_made(self) -> list[str]:
        try:
            return list(json.loads(self._record.read_text()).get("bridges", []))
        except (OSError, ValueError):
            return []

    def _save(self, bridges: list[str]) -> None:
        self._record.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._record.with_suffix(".tmp")
        tmp.write_text(json.dumps({"bridges": sorted(set(bridges))}))
        tmp.replace(self._record)

    def created_bridge(self, name: str) -> None:
        self._save([*self._bridges_made(), name])

    def owns_bridge(self, name: str) -> bool:
        return name in self._bridges_made()

    def forget_bridge(self, name: str) -> None:
        self._save([b for b in self._bridges_made() if b != name])

    def track(self, proc: asyncio.subprocess.Process) -> None:
        """Keep a helper process (passt) referenced until it ends."""
        self._procs.add(proc)
        asyncio.get_running_loop().create_task(proc.wait()).add_done_callback(lambda _: self._procs.discard(proc))

    # -- daemon lifecycle ---------------------------------------------------------------------------
    async def start(self, keep: Collection[str] = ()) -> None:
        """Remove what an earlier daemon of this data dir left (but the namespaces of the VMs
        named in ``keep``, which are adopted), pick the groups' addresses, make the bridges and
        load the firewall. Errors name the group and the key to change."""
        await self._remove_namespaces(keep)
        bridges = {g.bridge for g in self.groups.values() if isinstance(g, BridgeNetwork)}
        for stale in set(self._bridges_made()) - bridges:
            await run("ip", "link", "del", stale, check=False)
            self.forget_bridge(stale)
        host = [(i, ipaddress.IPv4Network(c, strict=False)) for i, c in await host_networks() if i not in bridges]
        taken = [n for _, n in host]
        for g in self.groups.values():  # explicit subnets first: defaults must avoid them
            net = g.group.network
            explicit = net.gateway or (net.mode == "isolated" and net.range)
            if explicit:
                g.addressing = Addressing(g.group, self.tag + g.group.name, taken)
                clash = next(((i, n) for i, n in host if n.overlaps(g.addressing.network)), None)
                if clash and g.mode != "passt":
                    raise NetworkError(f"host group {g.group.name}: network {g.addressing.network} overlaps "
                                       f"{clash[1]} on host interface {clash[0]}; choose another network.gateway "
                                       "or network.range")
                taken.append(g.addressing.network)
        for g in self.groups.values():
            if not g.planned:
                try:
                    g.addressing = Addressing(g.group, self.tag + g.group.name, taken)
                except ValueError as e:
                    raise NetworkError(f"host group {g.group.name}: {e}; set network.gateway or range") from e
                taken.append(g.addressing.network)
            log.info("host group %s: network %s", g.group.name, g.describe())
        if not self._filtered:
            return
        if self._kernel_groups:
            sysctl("net.ipv4.ip_forward", "1")
        for g in self._kernel_groups:
            await g.setup()
        iso = [g.firewall for g in self.groups.values() if isinstance(g, IsolatedNetwork)]
        br = [g for g in self.groups.values() if isinstance(g, BridgeNetwork)]
        gateways = [(g.bridge, str(g.addressing.gateway.ip)) for g in br if g.addressing.gateway is not None]
        await nft(ruleset(self.table, [g.bridge for g in br], [str(g.addressing.network) for g in br], iso,
                          self.veth_prefix if iso else "", gateways, self.helper_uid))

    async def stop(self) -> None:
        """Remove everything :meth:`start` and the VMs' attaches made; idempotent."""
        await self._remove_namespaces()
        if self._filtered or self._bridges_made():
            t = self.table
            await nft(f"add table bridge {t}\ndelete table bridge {t}\nadd table inet {t}\ndelete table inet {t}\n",
                      check=False)
        for g in self._kernel_groups:
            with contextlib.suppress(NetworkError):
                await g.teardown()
        for proc in list(self._procs):
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()

    async def remove_stale_taps(self) -> list[str]:
        """Delete the TAPs of this data directory that no VM of ours holds (after adoption): a
        VMM may have made its TAP persistent before it ended while no daemon ran."""
        held = {tap for g in self.groups.values() if isinstance(g, BridgeNetwork) for tap in g.taps.values()}
        prefixes = (self.template_tap_prefix, self.staging_tap_prefix,
                    *(g.tap_prefix for g in self.groups.values() if isinstance(g, BridgeNetwork)
                      and g.tap_prefix.startswith(f"st{self.tag}")))  # never another program's (a custom prefix)
        stale = [t for t in await tap_names() if t.startswith(prefixes) and t not in held]
        for tap in stale:
            log.warning("removing TAP %s: left behind by a VM that ended while no daemon ran", tap)
            await delete_tap(tap)
        return stale

    async def _remove_namespaces(self, keep: Collection[str] = ()) -> None:
        prefix = f"slicer-{self.tag}-"
        for ns in netns_names():
            if ns.startswith(prefix) and ns[len(prefix):] not in keep:
                await run("ip", "netns", "del", ns, check=False)

    def describe(self) -> dict:
        return {name: g.describe() for name, g in self.groups.items() if g.planned}
