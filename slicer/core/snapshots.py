"""Suspend, restore and relaunch of one VM, templates on demand, and disk accounting.

"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from slicer.core.actions import NodeAction
from slicer.core.config import Config, HostGroup
from slicer.core.error_codes import ErrorCode
from slicer.core.errors import AgentUnreachable, Conflict, SlicerError
from slicer.core.lifecycle import Lifecycle
from slicer.core.node import Node
from slicer.core.records import Suspended
from slicer.core.registry import Registry
from slicer.core.templates import Templates, allocated_bytes
from slicer.vmm.base import VMMError, VMState, VMStateError

log = logging.getLogger(__name__)
SETUP_WAIT = 30.0  # how long a suspend waits for a guest's setup under way
SHUTDOWN_WAIT = 45.0  # a graceful shutdown's timeout (GRACEFUL_TIMEOUT) and its kill, with room


class Snapshots:
    def __init__(self, config: Config, registry: Registry, lifecycle: Lifecycle, templates: Templates) -> None:
        self.config = config
        self.registry = registry
        self.lifecycle = lifecycle
        self.templates = templates

    async def suspend(self, hostname: str) -> None:
        node = self.registry.get(hostname)
        # A guest being set up (hostname, secrets, keys) is saved once that is done: a state saved
        # halfway would come back never set up. One whose agent does not come is saved anyway.
        with contextlib.suppress(AgentUnreachable):
            await node.until_set_up(SETUP_WAIT)
        async with node.act(NodeAction.SUSPEND):
            await self._save(node, Suspended.API)

    async def _save(self, node: Node, why: Suspended) -> None:
        """Save the VM's memory and device state to its state file and end its process
        (the caller checked that the node may be suspended)."""
        vm = node.vm
        assert vm is not None
        path = self.registry.state_file(node.hostname)
        node.stopping = True
        t0 = asyncio.get_running_loop().time()
        try:
            await vm.save(path)
        except VMMError as e:
            node.stopping = False
            if isinstance(e, VMStateError):
                raise Conflict(f"{node.hostname}: {e}", ErrorCode.INVALID_STATE) from e
            raise SlicerError(f"{node.hostname}: suspend failed: {e}", ErrorCode.SUSPEND_FAILED) from e
        node.record.suspended = why
        self.registry.store.put(node.record)
        if node.agent is not None:
            await node.agent.aclose()
        # Its link goes now: the watcher of this VM finds it no longer the node's and leaves it.
        await self.lifecycle.detach(node)
        node.vm = node.agent = None
        log.info("%s: suspended in %.2fs (%d MiB of state)", node.hostname,
                 asyncio.get_running_loop().time() - t0, allocated_bytes(path) >> 20)

    async def suspend_or_stop(self, node: Node) -> None:
        try:
            node.check(NodeAction.SUSPEND)
            await self._save(node, Suspended.SHUTDOWN)
        except SlicerError as e:
            log.error("%s: not suspended (%s); shutting it down", node.hostname, e.message)
            await self.lifecycle.stop_vm(node, graceful=self.config.graceful_shutdown)

    async def restore(self, hostname: str, wait: str | None, timeout: float) -> Node:
        node = self.registry.get(hostname)
        group = self.registry.group(node.record.hostgroup)
        async with node.act(NodeAction.RESTORE):
            await self.restore_node(node, group)
        if wait:
            await self.lifecycle.wait_setup(node, wait, timeout)
        return node

    async def restore_node(self, node: Node, group: HostGroup) -> None:
        path = self.registry.state_file(node.hostname)
        if not path.exists():
            raise SlicerError(f"{node.hostname}: its saved state {path} is missing", ErrorCode.STATE_MISSING)
        t0 = asyncio.get_running_loop().time()
        await self.lifecycle.launch(node, group, restore_from=path)
        node.record.suspended = Suspended.NO
        self.registry.store.put(node.record)
        path.unlink(missing_ok=True)
        log.info("%s: restored in %.2fs", node.hostname, asyncio.get_running_loop().time() - t0)

    async def relaunch(self, hostname: str, wait: str | None, timeout: float) -> Node:
        """Boot a VM that is not running (shut down, crashed or suspended) again from its disk."""
        node = self.registry.get(hostname)
        group = self.registry.group(node.record.hostgroup)
        async with node.act(NodeAction.RELAUNCH):
            if node.vm is not None and node.vm.state != VMState.STOPPED:  # Stopping (the table allows no other)
                if not node.is_service and not node.record.persistent:
                    raise Conflict(f"{hostname} is a sandbox being shut down, which deletes it", ErrorCode.DELETED)
                # A shutdown is under way (clients relaunch a moment after asking for one): it
                # ends within the graceful timeout (the VM is killed at its end); then its
                # network link is gone and the VM can start again.
                try:
                    await asyncio.wait_for(node.exited.wait(), SHUTDOWN_WAIT)
                except TimeoutError:
                    raise Conflict(f"{hostname} is still shutting down", ErrorCode.RUNNING) from None
            if node.record.suspended:
                log.warning("%s: relaunched while suspended: its saved memory is discarded", hostname)
                self.registry.state_file(hostname).unlink(missing_ok=True)
                node.record.suspended = Suspended.NO
                self.registry.store.put(node.record)
            await self.lifecycle.launch(node, group)
        if wait:
            await self.lifecycle.wait_setup(node, wait, timeout)
        return node

    def storage(self) -> dict:
        """What templates, disks and saved states take on the host's disk."""
        templates = self.templates.usage(self.lifecycle.templates_in_use())
        nodes = [
            {"hostname": n.hostname, "hostgroup": n.record.hostgroup, "status": n.status,
             "template": n.record.template or None, "disk": n.record.disk,
             "disk_bytes": allocated_bytes(Path(n.record.disk)),
             "state_bytes": allocated_bytes(self.registry.state_file(n.hostname))}
            for n in self.registry.list()
        ]
        # Disks of deleted persistent VMs are kept (as Slicer does); a create of the same
        # hostname replaces one, or remove the file.
        used = {Path(n.record.disk) for n in self.registry.nodes.values()}
        kept = [{"disk": str(p), "disk_bytes": allocated_bytes(p)}
                for p in sorted((self.registry.data_dir / "disks").glob("*.qcow2")) if p not in used]
        commits = [{"commit_id": c.commit_id, "source_hostname": c.source_hostname,
                    "disk_bytes": allocated_bytes(self.registry.data_dir / "commits" / c.commit_id / "disk.qcow2")}
                   for c in self.registry.store.commits()]
        total = sum(t["state_bytes"] + t["disk_bytes"] for t in templates)
        total += sum(n["disk_bytes"] + n["state_bytes"] for n in nodes) + sum(k["disk_bytes"] for k in kept)
        total += sum(c["disk_bytes"] for c in commits)
        return {"templates": templates, "nodes": nodes, "commits": commits, "kept_disks": kept,
                "total_bytes": total}

    async def build_template(self, group_name: str) -> dict:
        """Build the group's template now if it has none that is current."""
        group = self.registry.group(group_name)
        if group.boot == "cold":
            raise Conflict(f"host group {group_name} boots cold (boot: cold); it has no template", ErrorCode.BOOT_COLD)
        tpl = await self.templates.ensure(group, retry=True)
        if tpl is None:
            raise SlicerError(f"the template of {group_name} could not be built; see the daemon log",
                              ErrorCode.TEMPLATE_FAILED)
        return tpl.describe(self.lifecycle.templates_in_use()[tpl.name])
