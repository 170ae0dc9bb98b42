"""Warm pools: per host group, ``warm_pool: N`` VMs restored from the group's template, agent
answered, network attached, then paused (no CPU), waiting for a create to take one.

A pooled VM is a node of kind ``pool``: it holds its name and address like any node (so
nothing else is given them) but the API never shows it. A create the pool can serve (the
group's size and image, a snapshot boot, no hostname, address or network policy of its own,
not persistent) takes the oldest, makes it a sandbox with the create's spec, resumes it, and
hands it its clock, fresh randomness, secrets, SSH keys and userdata; the pool refills in the
background. Its identity (hostname, machine-id, SSH host keys, address) was reset when it was
filled, as for any clone. A pooled VM never had a secret: it is filled with none.

A pooled VM is never recorded in the state store (see ``StateStore.put``): a daemon that
restarts finds its run dir named by no record and removes it with its QEMU, then fills the pool
again. Taken, it is recorded as a sandbox like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from slicer.core.actions import NodeAction
from slicer.core.config import Config, HostGroup
from slicer.core.errors import SlicerError
from slicer.core.identity import refresh_body
from slicer.core.lifecycle import Lifecycle
from slicer.core.node import Node
from slicer.core.provision import Provisioner
from slicer.core.records import NodeKind, NodeSpec
from slicer.core.registry import Registry, Tasks
from slicer.core.state import now_rfc3339
from slicer.core.templates import Templates
from slicer.vmm.base import Laps, VMState

log = logging.getLogger("slicer.core.pool")

FILL_TIMEOUT = 300.0
RETRY_AFTER = 30.0  # after a fill failed: the template, the image or the host may be broken for a while

# (group, spec) -> a new node of kind POOL, registered and recorded, with a name and an address
NewNode = Callable[[HostGroup, NodeSpec], Awaitable[Node]]


@dataclass
class PoolStats:
    size: int
    ready: int
    filling: int
    hits: int
    misses: int


class Pool:
    def __init__(self, config: Config, registry: Registry, lifecycle: Lifecycle, templates: Templates,
                 provisioner: Provisioner, tasks: Tasks, new_node: NewNode) -> None:
        self.config = config
        self.registry = registry
        self.lifecycle = lifecycle
        self.templates = templates
        self.provisioner = provisioner
        self.tasks = tasks
        self.new_node = new_node
        self.ready: dict[str, deque[Node]] = {g.name: deque() for g in config.host_groups}
        self.filling: Counter[str] = Counter()
        self.hits: Counter[str] = Counter()
        self.misses: Counter[str] = Counter()
        self._fillers: dict[str, asyncio.Task] = {}

    def start(self) -> None:
        for group in self.config.host_groups:
            self.refill(group)

    def stats(self) -> dict[str, PoolStats]:
        return {g.name: PoolStats(g.warm_pool, len(self._live(g.name)), self.filling[g.name], self.hits[g.name],
                                  self.misses[g.name])
                for g in self.config.host_groups if g.warm_pool}

    # -- hand out -----------------------------------------------------------------------------------
    async def take(self, group: HostGroup, spec: NodeSpec) -> Node | None:
        """A pooled VM of ``group`` made a sandbox with ``spec``, running, its setup under way
        (``node.provisioned`` is set when done); None when the pool has none ready."""
        ready = self.ready[group.name]
        while ready:
            node = ready.popleft()
            if node.deleted or node.vm is None or node.vm.state != VMState.PAUSED:
                self.tasks.spawn(self._discard(node, "it stopped while pooled"))
                continue
            self.hits[group.name] += 1
            self.refill(group)
            rec = node.record
            rec.kind, rec.spec, rec.created_at = NodeKind.SANDBOX, spec, now_rfc3339()
            node.provisioned.clear()
            node.setup_error = None
            lap = Laps()
            try:
                async with node.act(NodeAction.RESUME):
                    await node.vm.resume()
                lap("resume")
                self.registry.store.put(rec)  # a sandbox from now on, for a daemon that restarts too
                lap("record")
                node.phases = lap.laps
            except BaseException:
                await self.lifecycle.destroy(node)
                raise
            self.tasks.spawn(self._hand_over(node))
            return node
        self.misses[group.name] += 1
        self.refill(group)
        return None

    async def _hand_over(self, node: Node) -> None:
        """What the create asked for: a clock that is right now (it stood still while paused),
        fresh randomness, then secrets, SSH keys and userdata as after any boot."""
        try:
            lap = Laps()
            agent = node.running_agent(setup=True)
            await agent.identity(refresh_body(), timeout=30)
            lap("identity")
            node.phases.update(lap.laps)
            await self.provisioner.configure(node)
        except SlicerError as e:
            log.warning("%s: setting up the guest failed: %s", node.hostname, e.message)
            node.setup_error = f"setting up a pooled VM failed: {e.message}"
        node.provisioned.set()

    # -- fill -----------------------------------------------------------------------------------------
    def _live(self, group: str) -> list[Node]:
        return [n for n in self.ready[group] if not n.deleted and n.vm is not None and n.vm.state == VMState.PAUSED]

    def refill(self, group: HostGroup) -> None:
        """Fill ``group``'s pool up to its size in the background (one filler per group)."""
        if not group.warm_pool or ((task := self._fillers.get(group.name)) and not task.done()):
            return
        self._fillers[group.name] = self.tasks.spawn(self._fill(group))

    async def _fill(self, group: HostGroup) -> None:
        # One VM at a time: a refill must not take the CPU from the creates it serves.
        while len(self._live(group.name)) < group.warm_pool:
            self.filling[group.name] = 1
            try:
                node = await self._make(group)
            except Exception as e:  # noqa: BLE001 - whatever failed, the filler lives on: it is the pool's only one
                if (task := asyncio.current_task()) is not None and task.cancelling():
                    raise  # failed on its way out (the daemon stops): nothing to retry, and it must end
                log.error("host group %s: warm pool not filled: %s; retrying in %.0fs", group.name,
                          e if isinstance(e, SlicerError | OSError | TimeoutError) else repr(e), RETRY_AFTER)
                await asyncio.sleep(RETRY_AFTER)
                continue
            finally:
                self.filling[group.name] = 0
            if node is not None:  # None: released (or deleted) while it was being filled
                self.ready[group.name].append(node)
        for node in [n for n in self.ready[group.name] if n not in self._live(group.name)]:
            self.ready[group.name].remove(node)
            self.tasks.spawn(self._discard(node, "it stopped while pooled"))

    async def _make(self, group: HostGroup) -> Node | None:
        """One pooled VM: restored from the group's template, set up, paused."""
        template = await self.templates.ensure(group)
        if template is None:
            raise SlicerError(f"host group {group.name} has no template")
        node = await self.new_node(group, NodeSpec(secrets=[]))
        try:
            async with node.act(NodeAction.LAUNCH):
                await self.lifecycle.launch(node, group, template=template)
            await self.lifecycle.wait_setup(node, "agent", FILL_TIMEOUT)
            async with node.act(NodeAction.PAUSE):
                assert node.vm is not None
                await node.vm.pause()
        except BaseException as e:
            released = node.deleted and not isinstance(e, asyncio.CancelledError)
            await self.lifecycle.destroy(node)
            if released:
                return None
            raise
        log.info("host group %s: %s is pooled", group.name, node.hostname)
        return node

    async def release(self, hostname: str | None, ip: str | None) -> None:
        """Give up the pooled VMs holding ``hostname`` or ``ip``: a create asked for them."""
        for node in [n for n in self.registry.nodes.values() if n.record.kind == NodeKind.POOL
                     and (n.hostname == hostname or n.record.ip == ip)]:
            with contextlib.suppress(ValueError):
                self.ready[node.record.hostgroup].remove(node)
            await self._discard(node, "a create asked for its name or address")
            if (group := self.config.group(node.record.hostgroup)) is not None:
                self.refill(group)

    async def _discard(self, node: Node, why: str) -> None:
        log.info("%s: removed from its warm pool: %s", node.hostname, why)
        with contextlib.suppress(SlicerError):
            await self.lifecycle.destroy(node)
