"""The names one daemon gives what it makes on the host, all carrying its data directory's tag,
so two daemons on one host never touch each other's bridges, TAPs, namespaces or tables."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from slicer.net.system import ifname


@dataclass(frozen=True)
class Names:
    tag: str

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> Names:
        return cls(hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:4])

    @property
    def table(self) -> str:
        """Both nftables tables (bridge and inet families)."""
        return f"slicer_{self.tag}"

    @property
    def veth_prefix(self) -> str:
        """The host's end of every isolated VM's veth pair."""
        return f"s{self.tag}-"

    @property
    def template_tap_prefix(self) -> str:
        """Template VMs' TAPs, connected to nothing."""
        return f"x{self.tag}"

    @property
    def staging_tap_prefix(self) -> str:
        """An isolated VM's TAP before it is moved into its namespace."""
        return f"t{self.tag}-"

    @property
    def default_tap_prefix(self) -> str:
        """A bridge group's TAPs unless its config names a prefix."""
        return f"st{self.tag}"

    @property
    def netns_prefix(self) -> str:
        return f"slicer-{self.tag}-"

    def netns(self, vm: str) -> str:
        return self.netns_prefix + vm

    def bridge(self, group: str) -> str:
        """A bridge group's bridge unless its config names one."""
        return ifname("sb" + self.tag, group)
