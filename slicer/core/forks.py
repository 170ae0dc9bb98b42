"""Live fork: N copies of a running VM, each with its memory, processes and files.

The source is paused only while its state is written and its disk overlay copied (the end of a
migration flushes the disk and leaves it quiet), then goes on. What was captured becomes a
template of its own (:meth:`slicer.core.templates.Templates.from_capture`): its RAM in a file
that every copy maps copy-on-write, its disk the frozen base of every copy's overlay. The copies
restore from it as any template's clones do, and get their own identity (hostname, address,
machine-id, SSH host keys, entropy, clock). The snapshot is removed with its last copy.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from pathlib import Path

from slicer.core import telemetry
from slicer.core.actions import NodeAction
from slicer.core.commits import CreateVM
from slicer.core.error_codes import ErrorCode
from slicer.core.errors import BadRequest, Conflict, SlicerError
from slicer.core.lifecycle import Lifecycle
from slicer.core.node import Node
from slicer.core.registry import Registry
from slicer.core.templates import Templates
from slicer.vmm.base import VMMError
from slicer.vmm.disks import copy_disk

log = logging.getLogger(__name__)
MAX_COPIES = 32
COPY_OVERHEAD = 160 << 20  # a restored copy's QEMU, TCG cache and first dirty pages (measured ~120 MiB)


def available_memory() -> int:
    """MemAvailable of the host, in bytes."""
    return telemetry.host_meminfo().get("MemAvailable", 0)


class Forks:
    def __init__(self, registry: Registry, lifecycle: Lifecycle, templates: Templates, create: CreateVM,
                 free_memory: Callable[[], int] = available_memory) -> None:
        self.registry = registry
        self.lifecycle = lifecycle
        self.templates = templates
        self.create = create
        self.free_memory = free_memory

    async def fork(self, hostname: str, count: int, tags: list[str], wait: str | None, timeout: float) -> list[Node]:
        """``count`` live copies of the running VM ``hostname``; all made, or none."""
        if not 1 <= count <= MAX_COPIES:
            raise BadRequest(f"count must be 1 to {MAX_COPIES}, not {count}", ErrorCode.INVALID_COUNT)
        source = self.registry.get(hostname)
        group = self.registry.group(source.record.hostgroup)
        rec = source.record
        need = count * COPY_OVERHEAD + rec.ram_bytes
        if (free := self.free_memory()) < need:
            raise Conflict(f"{count} copies of {hostname} need about {need >> 20} MiB; the host has "
                           f"{free >> 20} MiB available", ErrorCode.INSUFFICIENT_MEMORY)
        name = f"{group.name}-fork-{secrets.token_hex(4)}"
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        # The lock keeps other actions off the source until the snapshot is made (~1 s); its
        # vCPUs stop only inside capture(), and its agent answers throughout.
        async with source.act(NodeAction.FORK):
            vm = source.vm
            assert vm is not None

            async def capture(state: Path, disk: Path) -> None:
                paused_at = loop.time()
                await vm.capture(state, lambda: copy_disk(Path(rec.disk), disk))
                log.info("%s: paused %.2fs to be forked", hostname, loop.time() - paused_at)

            base = "" if rec.own_disk else rec.template  # the template the copy of its disk rests on
            try:
                snapshot = await self.templates.from_capture(group, name, rec.cpus, rec.ram_bytes, base,
                                                             rec.spec.image, capture, layout=rec.spec.layout or 0)
            except VMMError as e:
                raise SlicerError(f"{hostname}: fork failed: {e}", ErrorCode.FORK_FAILED) from e
        spec = rec.spec.copy(protected=False, commit_id=None, parent_commit=None, forked_from=hostname,
                             tags=list(dict.fromkeys(rec.tags + list(tags))))
        try:
            results = await asyncio.gather(*(
                self.create(group.name, cpus=rec.cpus, ram_bytes=rec.ram_bytes, persistent=False, hostname=None,
                            ip=None, spec=spec.copy(), wait=wait, timeout=timeout, template=snapshot)
                for _ in range(count)), return_exceptions=True)
        finally:
            self.templates.pinned.discard(snapshot.name)
        copies = [r for r in results if not isinstance(r, BaseException)]
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            for node in copies:  # all or none: the copies made go again
                await self.lifecycle.destroy(node)
            self.lifecycle.collect_templates()
            raise failed[0]
        log.info("%s: forked into %s in %.2fs", hostname, ", ".join(n.hostname for n in copies), loop.time() - t0)
        return copies

