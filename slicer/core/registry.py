"""The nodes the daemon knows, their record, and where their files live.

Every collaborator of :class:`slicer.core.manager.Manager` (lifecycle, reconcile, snapshots,
commits, forks) is handed this one object instead of reaching into the manager: it holds the
node table, the state store and the paths, and answers the lookups every request starts with.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from slicer.core.config import Config, HostGroup
from slicer.core.error_codes import ErrorCode
from slicer.core.errors import BadRequest, NotFound
from slicer.core.node import Node, host_index
from slicer.core.records import NodeKind
from slicer.core.state import StateStore

HOSTNAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class Tasks:
    """Background work the daemon owns (watchers, provisioners, template builds): kept
    referenced while it runs, cancelled together when the daemon stops."""

    def __init__(self) -> None:
        self._running: set[asyncio.Task] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return task

    def cancel_all(self) -> None:
        for task in list(self._running):
            task.cancel()

    def __len__(self) -> int:
        return len(self._running)


class Registry:
    def __init__(self, config: Config, data_dir: Path, run_root: Path, store: StateStore) -> None:
        self.config = config
        self.data_dir = data_dir
        self.run_root = run_root
        self.store = store
        self.nodes: dict[str, Node] = {}

    # -- paths --------------------------------------------------------------------------------------
    def run_dir(self, hostname: str) -> Path:
        return self.run_root / hostname

    def persistent_disk(self, hostname: str) -> Path:
        return self.data_dir / "disks" / f"{hostname}.qcow2"

    def state_file(self, hostname: str) -> Path:
        """Where a suspended VM's memory and device state is kept."""
        return self.data_dir / "snapshots" / f"{hostname}.state"

    def commit_disk(self, commit_id: str) -> Path:
        return self.data_dir / "commits" / commit_id / "disk.qcow2"

    # -- lookups --------------------------------------------------------------------------------------
    def group(self, name: str) -> HostGroup:
        group = self.config.group(name)
        if group is None:
            raise NotFound(f"host group {name!r} not found", ErrorCode.HOSTGROUP_NOT_FOUND)
        return group

    def get(self, hostname: str) -> Node:
        if not HOSTNAME_RE.fullmatch(hostname):
            raise BadRequest(f"invalid hostname {hostname!r}", ErrorCode.INVALID_HOSTNAME)
        node = self.nodes.get(hostname)
        if node is None or node.record.kind == NodeKind.POOL:  # a warm pool's VM is no one's yet
            raise NotFound(f"VM {hostname!r} not found", ErrorCode.VM_NOT_FOUND)
        return node

    def list(self, group: str | None = None, tag: str | None = None, tag_prefix: str | None = None) -> list[Node]:
        if tag is not None and tag_prefix is not None:
            raise BadRequest("give only one of tag and tag_prefix")
        if group is not None:
            self.group(group)
        nodes = [n for n in self.nodes.values()
                 if n.record.kind != NodeKind.POOL and (group is None or n.record.hostgroup == group)]
        if tag is not None:
            nodes = [n for n in nodes if tag in n.record.tags]
        if tag_prefix is not None:
            nodes = [n for n in nodes if any(t.startswith(tag_prefix) for t in n.record.tags)]
        return sorted(nodes, key=lambda n: (n.record.hostgroup, host_index(n.hostname)))

    def used_ips(self) -> set[str]:
        # Across groups: groups may share a subnet, and every VM's address must be unique.
        return {n.record.ip for n in self.nodes.values()}

    def add(self, node: Node) -> Node:
        self.nodes[node.hostname] = node
        return node

    def forget(self, node: Node) -> None:
        """Drop ``node`` and its record (only that node: a newer one of the same name stays)."""
        self.store.delete(node.hostname)
        if self.nodes.get(node.hostname) is node:
            del self.nodes[node.hostname]
