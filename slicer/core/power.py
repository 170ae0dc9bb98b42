"""Power actions on one VM through the API: pause, resume, shut down, reboot, delete."""

from __future__ import annotations

import contextlib
import logging

from slicer.core.actions import NodeAction
from slicer.core.error_codes import ErrorCode
from slicer.core.errors import BadRequest, Conflict, Forbidden, NotFound, SlicerError
from slicer.core.lifecycle import Lifecycle
from slicer.core.node import Node
from slicer.core.registry import Registry, Tasks
from slicer.vmm.base import VMMError, VMStateError

log = logging.getLogger("slicer.core.manager")


class Power:
    def __init__(self, registry: Registry, lifecycle: Lifecycle, tasks: Tasks) -> None:
        self.registry = registry
        self.lifecycle = lifecycle
        self.tasks = tasks

    async def pause(self, hostname: str) -> None:
        await self._vm_action(hostname, NodeAction.PAUSE)
        self._record_pause(hostname, True)

    async def resume(self, hostname: str) -> None:
        await self._vm_action(hostname, NodeAction.RESUME)
        self._record_pause(hostname, False)

    def _record_pause(self, hostname: str, paused: bool) -> None:
        """Remembered so that a daemon adopting the VM keeps a pause someone asked for (and only then)."""
        if (node := self.registry.nodes.get(hostname)) is not None and node.record.paused != paused:
            node.record.paused = paused
            self.registry.store.put(node.record)

    async def _vm_action(self, hostname: str, action: NodeAction) -> None:
        node = self.registry.get(hostname)
        async with node.act(action):
            assert node.vm is not None
            try:
                await getattr(node.vm, action.value)()
            except VMStateError as e:
                raise Conflict(f"{hostname}: {e}", ErrorCode.INVALID_STATE) from e
            except VMMError as e:
                raise SlicerError(str(e)) from e

    async def shutdown(self, hostname: str, action: str) -> None:
        """Power off (ACPI, killed after a timeout) or reboot the guest; returns once started.
        As in Slicer on Linux (Firecracker has no reboot) a reboot ends a sandbox or persistent
        VM, like a power-off; a service, which the config says should run, boots again in place."""
        if action not in ("shutdown", "reboot"):
            raise BadRequest(f"action must be shutdown or reboot, not {action!r}", ErrorCode.INVALID_ACTION)
        node = self.registry.get(hostname)
        async with node.act(NodeAction(action)):
            if action == "reboot" and node.is_service:
                await self.lifecycle.reboot(node)
                return
            node.stopping = True  # from here on the node is Stopping; a relaunch waits for its end
        self.tasks.spawn(self._power_off(node, reboot=action == "reboot"))

    async def _power_off(self, node: Node, reboot: bool) -> None:
        await self.lifecycle.stop_vm(node, graceful=True, reboot=reboot)
        if not node.is_service and not node.record.persistent:
            with contextlib.suppress(SlicerError):  # deleted meanwhile
                async with node.act(NodeAction.DELETE):
                    await self.lifecycle.destroy(node)  # a sandbox's disk goes with its shutdown

    async def delete(self, group_name: str, hostname: str) -> bool:
        """Delete a sandbox or persistent VM (never a service); whether its disk was removed."""
        self.registry.group(group_name)
        node = self.registry.get(hostname)
        if node.record.hostgroup != group_name:
            raise NotFound(f"VM {hostname!r} is not in host group {group_name!r}", ErrorCode.VM_NOT_FOUND)
        if node.record.spec.protected:
            raise Forbidden(f"{hostname} is protected; it cannot be deleted", ErrorCode.PROTECTED)
        if node.is_service:
            raise Forbidden(
                f"{hostname} is a service from the config file; change its count there instead",
                ErrorCode.PROTECTED,
            )
        async with node.act(NodeAction.DELETE):
            return await self.lifecycle.destroy(node)
