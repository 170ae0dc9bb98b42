"""What the daemon finds at start, reconciled with its record: VMs an earlier daemon left running
are adopted, records whose VM is gone are relaunched, kept or removed, services beyond a
group's count retire, and the missing services boot.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from slicer.core.actions import NodeAction
from slicer.core.commits import Commits
from slicer.core.config import Config, HostGroup
from slicer.core.error_codes import ErrorCode
from slicer.core.errors import SlicerError
from slicer.core.images import BootImages
from slicer.core.lifecycle import Lifecycle
from slicer.core.node import Node, host_index
from slicer.core.records import BootKind, NodeKind, NodeSpec, Suspended
from slicer.core.registry import Registry, Tasks
from slicer.core.snapshots import Snapshots
from slicer.core.specs import as_recorded, vm_spec
from slicer.core.state import NodeRecord, now_rfc3339
from slicer.core.templates import Templates
from slicer.net import NetworkError
from slicer.net.surface import Network
from slicer.vmm.base import Driver, VMMError, VMState
from slicer.vmm.disks import PART, remove_disk

log = logging.getLogger("slicer.core.manager")


class Reconciler:
    def __init__(self, config: Config, registry: Registry, lifecycle: Lifecycle, snapshots: Snapshots,
                 commits: Commits, driver: Driver, net: Network, images: BootImages, templates: Templates,
                 tasks: Tasks) -> None:
        self.config = config
        self.registry = registry
        self.lifecycle = lifecycle
        self.snapshots = snapshots
        self.commits = commits
        self.driver = driver
        self.net = net
        self.images = images
        self.templates = templates
        self.tasks = tasks

    async def start(self) -> None:
        """Reconcile the record with what exists: VMMs an earlier daemon left running are
        adopted (their guests go on), records whose VMM is gone are relaunched (services),
        kept (persistent VMs) or removed; then the services that are missing are booted."""
        await self.commits.finish()
        records = {rec.hostname: rec for rec in self.registry.store.all()}
        running = {h: pid for h in records if (pid := self.driver.running(self.registry.run_dir(h))) is not None}
        self._remove_leftovers(records)
        try:
            await self.net.start(keep=running)
        except NetworkError as e:
            await self.net.stop()  # what it made before failing
            raise SlicerError(str(e), ErrorCode.NETWORK_UNAVAILABLE) from e
        adopted = {h for h, pid in running.items() if await self._adopt(records[h], pid)}
        # A VMM an earlier daemon was starting when it died (no pidfile yet, or still in its jail's
        # helpers): nobody tracks it, and its record is judged below as if it had none.
        for pid in self.driver.kill_strays(self.registry.run_root, {running[h] for h in adopted}):
            log.warning("stopped process %d: a VMM an earlier daemon was starting when it died", pid)
        await self.net.remove_stale_taps()
        for rec in records.values():
            self._judge(rec, adopted=rec.hostname in adopted)
        # Services are registered as they boot: a suspended one restores into its template's RAM.
        self.lifecycle.collect_templates(also=[r.template for r in records.values() if r.suspended and r.template])
        self._boot_missing(records, adopted)

    def _remove_leftovers(self, records: dict[str, NodeRecord]) -> None:
        """What a crash left half-done: a suspend's partial state, run directories no record
        names (and a VMM still in one), template builds."""
        for part in (self.registry.data_dir / "snapshots").glob("*.part"):
            log.warning("removing %s, left by a suspend that did not finish", part.name)
            part.unlink(missing_ok=True)
        for part in (self.registry.data_dir / "disks").glob(f"*{PART}*"):  # and its .backing record
            log.warning("removing %s, left by a copy of a template's disk that did not finish", part.name)
            remove_disk(part)
        for rec in records.values():  # a suspend that saved the state but died before its record said so
            if not rec.suspended and (state := self.registry.state_file(rec.hostname)).exists():
                log.warning("%s: removing %s: its record does not say it was suspended", rec.hostname, state.name)
                state.unlink(missing_ok=True)
        run_root = self.registry.run_root
        for rundir in run_root.iterdir() if run_root.is_dir() else ():
            if rundir.is_dir() and rundir.name not in records and not rundir.name.startswith("."):
                if self.driver.kill_stale(rundir):
                    log.warning("%s: stopped a QEMU that no record names", rundir.name)
                shutil.rmtree(rundir, ignore_errors=True)
        for name in self.templates.kill_stale_builds():
            log.warning("%s: killed a template VM left building by an earlier daemon", name)

    def _judge(self, rec: NodeRecord, adopted: bool) -> None:
        """Keep, retire or remove the record ``rec`` (services are booted afterwards)."""
        group = self.config.group(rec.hostgroup)
        store = self.registry.store
        if rec.kind == NodeKind.SERVICE and (group is None or host_index(rec.hostname) > group.count):
            # The config's count went down (or the group went away): the service retires;
            # its disk stays, and serves it again if the count comes back up.
            log.info("%s: retired: no longer one of its host group's %s services", rec.hostname,
                     group.count if group else "(removed)")
            if adopted:
                self.tasks.spawn(self.lifecycle.retire(self.registry.nodes.pop(rec.hostname)))
            else:
                self.lifecycle.remove_files(rec, disk=False)
            store.delete(rec.hostname)
        elif adopted or rec.kind == NodeKind.SERVICE:
            return
        elif not rec.persistent and not rec.suspended:  # a suspended one is kept: only a graceful stop deletes it
            log.info("%s: removing sandbox whose QEMU is gone", rec.hostname)
            self.lifecycle.remove_files(rec, disk=True)
            store.delete(rec.hostname)
        elif not Path(rec.disk).exists() and not rec.suspended:
            # Its disk is made at its first launch and removed first by a delete: a crash
            # came between its record and its first boot, or in the middle of its delete.
            log.info("%s: removing the record of a persistent VM that has no disk (a create or "
                     "delete cut short)", rec.hostname)
            self.lifecycle.remove_files(rec, disk=False)
            store.delete(rec.hostname)
        else:
            if rec.own_disk and rec.template and not rec.suspended:
                rec.template = ""  # its QEMU is gone: its disk is its own, and its next boot is cold
                store.put(rec)
            self.registry.add(Node(rec, self.registry.run_dir(rec.hostname)))

    def _boot_missing(self, records: dict[str, NodeRecord], adopted: set[str]) -> None:
        for group in self.config.host_groups:
            for i in range(1, group.count + 1):
                hostname = f"{group.name}-{i}"
                if hostname in adopted:
                    continue
                old = rec if (rec := records.get(hostname)) is not None and rec.kind == NodeKind.SERVICE else None
                self.tasks.spawn(self.boot_service(group, hostname, old))
            if self.config.warm and group.boot == "snapshot":
                self.tasks.spawn(self.templates.ensure(group))

    # -- adopt --------------------------------------------------------------------------------------
    async def _adopt(self, rec: NodeRecord, pid: int) -> bool:
        """Take over the VM whose VMM ``pid`` an earlier daemon left running; False (and the
        VMM stopped) if it cannot be: its group or address no longer exists, or it fails."""
        group = self.config.group(rec.hostgroup)
        run_dir = self.registry.run_dir(rec.hostname)
        why = self._why_not_adopt(rec, group)
        vm = None
        if why is None:
            assert group is not None
            vm, why = await self._take_over(rec, group, pid)
        if why is not None:
            log.warning("%s: stopping the QEMU an earlier daemon left running: %s", rec.hostname, why)
            self.driver.kill_stale(run_dir)
            return False
        assert vm is not None and group is not None
        node = self.registry.add(Node(rec, run_dir))
        self.lifecycle.run(node, vm, BootKind.ADOPTED, group)
        log.info("%s: adopted its running QEMU (pid %d)", rec.hostname, pid)
        return True

    def _why_not_adopt(self, rec: NodeRecord, group: HostGroup | None) -> str | None:
        if group is None:
            return f"its host group {rec.hostgroup} is no longer in the config"
        if rec.ip not in self.net.group(group.name).addressing:
            return f"its address {rec.ip} is no longer in host group {group.name}'s network"
        if rec.suspended:
            return "its record says it is suspended"
        return None

    async def _take_over(self, rec: NodeRecord, group: HostGroup, pid: int):
        """The adopted VM, or why it could not be taken over."""
        gnet = self.net.group(group.name)
        try:
            spec = vm_spec(self.images.boot(rec.spec.image), group, gnet,
                           name=rec.hostname, cpus=rec.cpus, ram_bytes=rec.ram_bytes,
                           ip=rec.ip, disk=Path(rec.disk), run_dir=self.registry.run_dir(rec.hostname))
            if rec.template:
                spec.memory_file = self.templates.memory_file(rec.template)
            as_recorded(spec, rec)  # as it was started
            vm = await self.driver.adopt(spec, pid)
        except SlicerError as e:
            return None, f"its image cannot be used: {e.message}"
        except (VMMError, OSError) as e:
            return None, f"taking over its QEMU failed: {e}"
        try:
            await gnet.adopt(rec.hostname, rec.ip, pid, policy=rec.spec.network)
            if vm.state == VMState.PAUSED and not rec.paused:
                # nobody asked for this pause: its daemon died between a restore and the resume
                await vm.resume()
                log.warning("%s: resumed: its daemon died before it ran again", rec.hostname)
        except (NetworkError, OSError, VMMError) as e:
            await vm.kill()
            return None, f"taking back its network link (or resuming it) failed: {e}"
        return vm, None

    # -- services -----------------------------------------------------------------------------------
    async def boot_service(self, group: HostGroup, hostname: str, old: NodeRecord | None) -> None:
        """Boot (or restore, after a suspend with the daemon) the service ``hostname``."""
        if old is not None and old.suspended:
            node = self.registry.add(Node(old, self.registry.run_dir(hostname)))
            if old.suspended != Suspended.SHUTDOWN:
                return  # suspended through the API: it stays so until restored
            try:
                await self.snapshots.restore_node(node, group)
                return
            except SlicerError as e:
                log.error("%s: could not restore its saved state (%s); booting it", hostname, e.message)
                self.registry.state_file(hostname).unlink(missing_ok=True)
        rec = self._service_record(group, hostname, old)
        if rec is None:
            return
        self.registry.store.put(rec)
        node = self.registry.add(Node(rec, self.registry.run_dir(hostname)))
        try:
            async with node.act(NodeAction.LAUNCH):  # Starting, also while its template is made
                # A new disk starts as a copy of the group's template, restored in a second; a
                # kept disk (or no template) boots cold.
                template = None
                if group.boot == "snapshot" and not Path(rec.disk).exists():
                    template = await self.templates.ensure(group)
                await self.lifecycle.launch(node, group, template=template)
            log.info("%s: service %s", hostname, "restored from its group's template" if template else "booted")
        except SlicerError as e:
            log.error("%s: service failed to boot: %s", hostname, e.message)

    def _service_record(self, group: HostGroup, hostname: str, old: NodeRecord | None) -> NodeRecord | None:
        """The record a service boots with: its old address and disk where they still fit."""
        persistent = group.service_persistent
        disk = self.registry.persistent_disk(hostname) if persistent else self.registry.run_dir(hostname) / "disk.qcow2"
        if not persistent:
            remove_disk(disk)
        used = self.registry.used_ips()
        addressing = self.net.group(group.name).addressing
        ip = addressing.service_address(host_index(hostname))
        if old and old.ip not in used and old.ip in addressing:
            ip = old.ip
        elif ip is None or ip in used:
            ip = addressing.free(used)
            if ip is None:
                log.error("%s: not started: host group %s has no free address", hostname, group.name)
                return None
        spec = NodeSpec(userdata=group.userdata or None)
        # A kept disk goes on booting the image it was made from (None: the project's); a new
        # one, the group's.
        kept = old is not None and persistent and disk.exists()
        if kept:
            image = old.spec.image
        else:
            try:
                image = self.images.group_choice(group.name)
            except SlicerError as e:
                log.error("%s: not started: %s", hostname, e.message)
                return None
        spec.image = dict(image) if image else None
        return NodeRecord(hostname=hostname, hostgroup=group.name, kind=NodeKind.SERVICE, ip=ip, cpus=group.vcpu,
                          ram_bytes=group.ram, persistent=persistent,
                          created_at=old.created_at if old else now_rfc3339(), disk=str(disk), spec=spec,
                          # a kept copy of a template's disk whose reset never came still holds its identity
                          identity_pending=kept and old.identity_pending)
