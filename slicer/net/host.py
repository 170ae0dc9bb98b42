"""The daemon's side of guest networking: every group's backend, the firewall, and cleanup."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import shutil
from collections.abc import Collection, Iterable
from pathlib import Path

from slicer.net.backends import BridgeNetwork, GroupNetwork, IsolatedNetwork, PasstNetwork
from slicer.net.config import GroupLike, NetGroup
from slicer.net.context import NetContext
from slicer.net.firewall import ruleset
from slicer.net.ledger import BridgeLedger
from slicer.net.names import Names
from slicer.net.planning import plan_addresses
from slicer.net.system import NetworkError, has_net_admin, host_networks, netns_names, nft, run, sysctl
from slicer.net.tap import delete_tap, tap_names
from slicer.vmm.jail import helper_uid

log = logging.getLogger(__name__)
BACKENDS: dict[str, type[GroupNetwork]] = {"bridge": BridgeNetwork, "isolated": IsolatedNetwork,
                                           "passt": PasstNetwork}

__all__ = ["HostNetwork", "NetworkError"]


class HostNetwork:
    """Owns every name it makes: bridges, namespaces and nftables tables carry a tag derived
    from the data directory, so two daemons on one host never touch each other's.

    ``groups``: the config's host groups (``config.host_groups``), or any objects with a
    ``name``, a ``network`` block and ``dns_servers`` (:class:`slicer.net.config.NetGroup`)."""

    def __init__(self, groups: Iterable[GroupLike], data_dir: Path) -> None:
        groups = [NetGroup.of(g) for g in groups]
        names = Names.for_data_dir(data_dir)
        admin = has_net_admin()
        modes = {g.name: g.network.mode or ("bridge" if admin else "passt") for g in groups}
        # passt runs as a uid of its own when the daemon can filter that uid's connections
        passt = "passt" in modes.values()
        uid = helper_uid(names.tag) if passt and admin and os.geteuid() == 0 and shutil.which("nft") else None
        if passt and uid is None:
            log.warning("passt groups: without root and nftables, their guests can reach this host's addresses "
                        "and link-local ones (cloud metadata) through passt")
        self.context = NetContext(names, BridgeLedger.for_data_dir(data_dir), uid)
        self.groups: dict[str, GroupNetwork] = {}
        for g in groups:
            mode = modes[g.name]
            if mode != "passt" and not admin:
                raise NetworkError(f"host group {g.name}: network mode {mode} needs CAP_NET_ADMIN (run the "
                                   "daemon as root), or set network.mode: passt")
            tool = "passt" if mode == "passt" else "nft"
            if shutil.which(tool) is None:
                raise NetworkError(f"host group {g.name}: network mode {mode} needs `{tool}`: install Debian's "
                                   f"{'passt' if mode == 'passt' else 'nftables'} package")
            self.groups[g.name] = BACKENDS[mode](g, self.context)

    @property
    def names(self) -> Names:
        return self.context.names

    @property
    def tag(self) -> str:
        return self.names.tag

    @property
    def table(self) -> str:
        return self.names.table

    @property
    def veth_prefix(self) -> str:
        return self.names.veth_prefix

    @property
    def template_tap_prefix(self) -> str:
        return self.names.template_tap_prefix

    @property
    def staging_tap_prefix(self) -> str:
        return self.names.staging_tap_prefix

    @property
    def helper_uid(self) -> int | None:
        return self.context.helper_uid

    def group(self, name: str) -> GroupNetwork:
        return self.groups[name]

    @property
    def _kernel_groups(self) -> list[GroupNetwork]:
        return [g for g in self.groups.values() if g.mode != "passt"]

    @property
    def _filtered(self) -> bool:
        """Whether the daemon has rules to load: kernel groups, or passt groups run as root."""
        return bool(self._kernel_groups) or self.helper_uid is not None

    # -- daemon lifecycle ---------------------------------------------------------------------------
    async def start(self, keep: Collection[str] = ()) -> None:
        """Remove what an earlier daemon of this data dir left (but the namespaces of the VMs
        named in ``keep``, which are adopted), pick the groups' addresses, make the bridges and
        load the firewall. Errors name the group and the key to change."""
        await self._remove_namespaces(keep)
        bridges = {g.bridge for g in self.groups.values() if isinstance(g, BridgeNetwork)}
        ledger = self.context.ledger
        for stale in set(ledger.bridges()) - bridges:
            await run("ip", "link", "del", stale, check=False)
            ledger.forget(stale)
        host = [(i, ipaddress.IPv4Network(c, strict=False)) for i, c in await host_networks() if i not in bridges]
        plan_addresses(self.groups.values(), self.tag, host)
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
        if self._filtered or self.context.ledger.bridges():
            t = self.table
            await nft(f"add table bridge {t}\ndelete table bridge {t}\nadd table inet {t}\ndelete table inet {t}\n",
                      check=False)
        for g in self._kernel_groups:
            with contextlib.suppress(NetworkError):
                await g.teardown()
        self.context.helpers.terminate()

    async def remove_stale_taps(self) -> list[str]:
        """Delete the TAPs of this data directory that no VM of ours holds (after adoption): a
        VMM may have made its TAP persistent before it ended while no daemon ran."""
        held = {tap for g in self.groups.values() if isinstance(g, BridgeNetwork) for tap in g.taps.values()}
        ours = self.names.default_tap_prefix  # never another program's (a custom prefix)
        prefixes = (self.template_tap_prefix, self.staging_tap_prefix,
                    *(g.tap_prefix for g in self.groups.values() if isinstance(g, BridgeNetwork)
                      and g.tap_prefix.startswith(ours)))
        stale = [t for t in await tap_names() if t.startswith(prefixes) and t not in held]
        for tap in stale:
            log.warning("removing TAP %s: left behind by a VM that ended while no daemon ran", tap)
            await delete_tap(tap)
        return stale

    async def _remove_namespaces(self, keep: Collection[str] = ()) -> None:
        prefix = self.names.netns_prefix
        for ns in netns_names():
            if ns.startswith(prefix) and ns[len(prefix):] not in keep:
                await run("ip", "netns", "del", ns, check=False)

    def describe(self) -> dict:
        return {name: g.describe() for name, g in self.groups.items() if g.planned}
