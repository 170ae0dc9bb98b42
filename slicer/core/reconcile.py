"""What the daemon finds at start, reconciled with its record: VMs an earlier daemon left running
are adopted, records whose VM is gone are relaunched, kept or removed, services beyond a
group's count retire, and the missing services boot.

A part of :class:`slicer.core.manager.Manager`, kept apart to keep each module small: it uses
the manager's nodes, store, network, driver and launch steps.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from slicer.core.errors import SlicerError
from slicer.core.node import Node, host_index
from slicer.core.specs import vm_spec
from slicer.net import NetworkError
from slicer.vmm.base import VMMError, VMState

if TYPE_CHECKING:
    from slicer.core.config import Config, HostGroup
    from slicer.core.images import BootImages
    from slicer.core.state import NodeRecord, StateStore
    from slicer.core.templates import Templates
    from slicer.net import HostNetwork
    from slicer.vmm.base import Driver

log = logging.getLogger("slicer.core.manager")


class Reconciler:
    config: Config
    data_dir: Path
    driver: Driver
    images: BootImages
    net: HostNetwork
    nodes: dict[str, Node]
    run_root: Path
    store: StateStore
    templates: Templates

    # provided by Manager
    def run_dir(self, hostname: str) -> Path: ...
    def state_file(self, hostname: str) -> Path: ...
    def _spawn(self, coro) -> None: ...
    def _remove_files(self, rec: NodeRecord, disk: bool) -> None: ...
    def _collect_templates(self) -> None: ...
    async def _boot_service(self, group: HostGroup, hostname: str, old: NodeRecord | None) -> None: ...
    async def _stop_vm(self, node: Node, graceful: bool) -> None: ...
    async def _watch(self, node: Node) -> None: ...
    async def _provision(self, node: Node, vm, group: HostGroup) -> None: ...
    # _finish_commits is CommitActions' (no stub here: Reconciler comes first in Manager's MRO, so a
    # stub would be the one called, and commits cut short by a crash would never be finished)

    async def start(self) -> None:
        """Reconcile the record with what exists: QEMUs an earlier daemon left running are
        adopted (their guests go on), records whose QEMU is gone are relaunched (services),
        kept (persistent VMs) or removed; then the services that are missing are booted."""
        await self._finish_commits()
        for part in (self.data_dir / "snapshots").glob("*.part"):  # a suspend a crash cut short
            log.warning("removing %s, left by a suspend that did not finish", part.name)
            part.unlink(missing_ok=True)
        records = {rec.hostname: rec for rec in self.store.all()}
        running = {h: pid for h in records if (pid := self.driver.running(self.run_dir(h))) is not None}
        for rundir in self.run_root.iterdir() if self.run_root.is_dir() else ():
            if rundir.is_dir() and rundir.name not in records and not rundir.name.startswith("."):
                if self.driver.kill_stale(rundir):
                    log.warning("%s: stopped a QEMU that no record names", rundir.name)
                shutil.rmtree(rundir, ignore_errors=True)
        for name in self.templates.kill_stale_builds():
            log.warning("%s: killed a template VM left building by an earlier daemon", name)
        try:
            await self.net.start(keep=running)
        except NetworkError as e:
            await self.net.stop()  # what it made before failing
            raise SlicerError(str(e), "network_unavailable") from e
        adopted = set()
        for hostname, pid in running.items():
            if await self._adopt(records[hostname], pid):
                adopted.add(hostname)
        # A VMM an earlier daemon was starting when it died (no pidfile yet, or still in its jail's
        # helpers): nobody tracks it, and its record is judged below as if it had none.
        for pid in self.driver.kill_strays(self.run_root, {running[h] for h in adopted}):
            log.warning("stopped process %d: a VMM an earlier daemon was starting when it died", pid)
        await self.net.remove_stale_taps()
        for rec in records.values():
            group = self.config.group(rec.hostgroup)
            if rec.kind == "service" and (group is None or host_index(rec.hostname) > group.count):
                # The config's count went down (or the group went away): the service retires;
                # its disk stays, and serves it again if the count comes back up.
                log.info("%s: retired: no longer one of its host group's %s services", rec.hostname,
                         group.count if group else "(removed)")
                if rec.hostname in adopted:
                    self._spawn(self._retire(self.nodes.pop(rec.hostname)))
                else:
                    self._remove_files(rec, disk=False)
                self.store.delete(rec.hostname)
                continue
            if rec.hostname in adopted or rec.kind == "service":
                continue
            if not rec.persistent and not rec.suspended:  # a suspended one is kept: only a graceful stop deletes it
                log.info("%s: removing sandbox whose QEMU is gone", rec.hostname)
                self._remove_files(rec, disk=True)
                self.store.delete(rec.hostname)
            elif not Path(rec.disk).exists() and not rec.suspended:
                # Its disk is made at its first launch and removed first by a delete: a crash
                # came between its record and its first boot, or in the middle of its delete.
                log.info("%s: removing the record of a persistent VM that has no disk (a create or "
                         "delete cut short)", rec.hostname)
                self._remove_files(rec, disk=False)
                self.store.delete(rec.hostname)
            else:
                self.nodes[rec.hostname] = Node(rec, self.run_dir(rec.hostname))
        self._collect_templates()
        for group in self.config.host_groups:
            for i in range(1, group.count + 1):
                hostname = f"{group.name}-{i}"
                if hostname in adopted:
                    continue
                old = rec if (rec := records.get(hostname)) is not None and rec.kind == "service" else None
                self._spawn(self._boot_service(group, hostname, old))
            if self.config.warm and group.boot == "snapshot":
                self._spawn(self.templates.ensure(group))

    async def _retire(self, node: Node) -> None:
        await self._stop_vm(node, graceful=self.config.graceful_shutdown)
        if node.agent is not None:
            await node.agent.aclose()
        self._remove_files(node.record, disk=False)

    async def _adopt(self, rec: NodeRecord, pid: int) -> bool:
        """Take over the VM whose QEMU ``pid`` an earlier daemon left running; False (and the
        QEMU stopped) if it cannot be: its group or address no longer exists, or it fails."""
        group = self.config.group(rec.hostgroup)
        run_dir = self.run_dir(rec.hostname)
        why = None
        if group is None:
            why = f"its host group {rec.hostgroup} is no longer in the config"
        elif rec.ip not in self.net.group(group.name).addressing:
            why = f"its address {rec.ip} is no longer in host group {group.name}'s network"
        elif rec.suspended:
            why = "its record says it is suspended"
        if why is None:
            assert group is not None
            gnet = self.net.group(group.name)
            try:
                spec = vm_spec(self.images.boot(rec.spec.get("image")), group, gnet,
                               name=rec.hostname, cpus=rec.cpus, ram_bytes=rec.ram_bytes,
                               ip=rec.ip, disk=Path(rec.disk), run_dir=run_dir)
                if rec.template:
                    spec.memory_file = self.templates.memory_file(rec.template)
                vm = await self.driver.adopt(spec, pid)
            except SlicerError as e:
                why = f"its image cannot be used: {e.message}"
            except (VMMError, OSError) as e:
                why = f"taking over its QEMU failed: {e}"
            else:
                try:
                    await gnet.adopt(rec.hostname, rec.ip, pid, policy=rec.spec.get("network"))
                    if vm.state == VMState.PAUSED and not rec.paused:
                        # nobody asked for this pause: its daemon died between a restore and the resume
                        await vm.resume()
                        log.warning("%s: resumed: its daemon died before it ran again", rec.hostname)
                except (NetworkError, OSError, VMMError) as e:
                    await vm.kill()
                    why = f"taking back its network link (or resuming it) failed: {e}"
        if why is not None:
            log.warning("%s: stopping the QEMU an earlier daemon left running: %s", rec.hostname, why)
            self.driver.kill_stale(run_dir)
            return False
        self.state_file(rec.hostname).unlink(missing_ok=True)  # a suspend it outlived: not its state
        node = self.nodes[rec.hostname] = Node(rec, run_dir)
        node.attach(vm, "adopted")
        log.info("%s: adopted its running QEMU (pid %d)", rec.hostname, pid)
        self._spawn(self._watch(node))
        self._spawn(self._provision(node, vm, group))
        return True
