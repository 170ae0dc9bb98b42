"""One VM's life: launch (boot, clone from a template, restore), watch, stop, destroy.

The steps every other collaborator builds on: a create, a relaunch, a restore, an adoption and
a fork all end in :meth:`Lifecycle.launch` or :meth:`Lifecycle.run`; every way out goes
through :meth:`Lifecycle.stop_vm` or :meth:`Lifecycle.destroy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from slicer.core import telemetry
from slicer.core.config import Config, HostGroup
from slicer.core.error_codes import ErrorCode
from slicer.core.errors import Conflict, SlicerError, WaitTimeout
from slicer.core.images import BootImages
from slicer.core.node import Node
from slicer.core.provision import Provisioner
from slicer.core.records import BootKind
from slicer.core.registry import Registry, Tasks
from slicer.core.specs import as_recorded, vm_spec
from slicer.core.state import NodeRecord
from slicer.core.templates import Template, Templates
from slicer.net import NetworkError
from slicer.net.surface import Network
from slicer.vmm.base import LAYOUT, VM, Driver, HostError, Laps, VMMError, VMSpec, VMState
from slicer.vmm.disks import TamperedDisk, copy_disk, remove_disk

log = logging.getLogger("slicer.core.manager")
GRACEFUL_TIMEOUT = 30.0


class Lifecycle:
    def __init__(self, config: Config, registry: Registry, driver: Driver, net: Network, images: BootImages,
                 templates: Templates, provisioner: Provisioner, tasks: Tasks) -> None:
        self.config = config
        self.registry = registry
        self.driver = driver
        self.net = net
        self.images = images
        self.templates = templates
        self.provisioner = provisioner
        self.tasks = tasks

    # -- launch -------------------------------------------------------------------------------------
    async def launch(self, node: Node, group: HostGroup, template: Template | None = None,
                     restore_from: Path | None = None) -> None:
        """Boot the node's VM; or restore it, from ``template`` (a new clone) or from its own
        saved state ``restore_from``. A clone whose restore fails boots cold instead."""
        rec = node.record
        spec, boot, restore_from = self._boot_spec(node, group, template, restore_from)
        node.stopping = False
        if template is not None and rec.own_disk:  # starts as a copy of the template's, then its own
            try:
                await copy_disk(template.disk, Path(rec.disk))
            except VMMError as e:
                raise SlicerError(f"{rec.hostname}: could not copy its template's disk: {e}",
                                  ErrorCode.VM_START_FAILED) from e
        if rec.paused:  # a new QEMU runs
            rec.paused = False
            self.registry.store.put(rec)
        try:
            vm = await self._start(node, spec, restore_from)
        except VMMError as e:
            if isinstance(e, TamperedDisk):
                raise Conflict(f"{rec.hostname}: {e}", ErrorCode.DISK_TAMPERED) from e
            if restore_from is not None:
                telemetry.RESTORES.labels(rec.hostgroup, boot, "failed").inc()
            if template is None or isinstance(e, HostError):
                raise SlicerError(f"{rec.hostname}: could not start the VM: {e}", ErrorCode.VM_START_FAILED) from e
            await self._boot_cold_instead(node, template, spec, e)
            return await self.launch(node, group)
        if restore_from is not None:
            telemetry.RESTORES.labels(rec.hostgroup, boot, "ok").inc()
        telemetry.VM_STARTS.labels(rec.hostgroup, rec.kind).inc()
        telemetry.VM_LAUNCHES.labels(rec.hostgroup).inc()
        self.run(node, vm, boot, group)

    def _boot_spec(self, node: Node, group: HostGroup, template: Template | None,
                   restore_from: Path | None) -> tuple[VMSpec, BootKind, Path | None]:
        """The VM's spec, how it boots and the state to restore."""
        rec = node.record
        # The machine's layout: a clone's is its template's, a VM restoring its own state keeps the
        # one it was saved with, and any other boot gets today's.
        layout = template.layout if template is not None else LAYOUT if restore_from is None else rec.spec.layout or 0
        if (rec.spec.layout or 0) != layout:
            rec.spec.layout = layout
            self.registry.store.put(rec)
        spec = vm_spec(self.images.boot(rec.spec.image), group, self.net.group(group.name),
                       name=rec.hostname, cpus=rec.cpus, ram_bytes=rec.ram_bytes,
                       ip=rec.ip, disk=Path(rec.disk), run_dir=node.run_dir)
        boot = BootKind.SUSPEND if restore_from is not None else BootKind.BOOT
        if (parent := rec.spec.parent_commit) and not Path(rec.disk).exists():
            # The first boot of a commit's child: its disk starts as an overlay on the commit,
            # and it gets its own identity (the commit holds its source's).
            spec.base_disk, spec.base_format = self.registry.commit_disk(parent), "qcow2"
            boot = BootKind.FORK
        if template is not None:
            rec.template, rec.identity_pending = template.name, True
            self.registry.store.put(rec)
            if not rec.own_disk:  # a sandbox's disk is an overlay on the template's
                spec.base_disk, spec.base_format = template.disk, "qcow2"
            template.start_console_log(spec.serial_log, rec.hostname)
            restore_from, boot = template.state, BootKind.TEMPLATE
        elif rec.template and rec.own_disk and restore_from is None:
            rec.template = ""  # it boots its own disk: nothing of the template's is used any more
            self.registry.store.put(rec)
        if rec.template:  # a clone's memory is mapped from its template's: same machine, same layout
            spec.memory_file = self.templates.memory_file(rec.template)
        return as_recorded(spec, rec), boot, restore_from

    async def _start(self, node: Node, spec: VMSpec, restore_from: Path | None) -> VM:
        """Attach the NIC and start the VMM, running; on any failure nothing of it is left."""
        rec = node.record
        gnet = self.net.group(rec.hostgroup)
        lap = Laps()
        try:
            async with node.link:
                node.link_serial += 1
                spec.net = await gnet.attach(rec.hostname, rec.ip, node.run_dir, policy=rec.spec.network)
        except NetworkError as e:
            raise SlicerError(f"{rec.hostname}: network setup failed: {e}", ErrorCode.NETWORK_FAILED) from e
        lap("attach")
        vm = None
        try:
            try:
                vm = await self.driver.start(spec, restore_from)
            except OSError as e:  # a file it needs went away (a template's RAM, say)
                raise VMMError(f"cannot start it: {e}") from e
            lap.laps.update(vm.phases)  # the driver timed its own steps
            lap.restart()
            if vm.state == VMState.PAUSED:
                await vm.resume()
            lap("resume")
            node.phases.update(lap.laps)
        except BaseException:
            spec.net.close()
            if vm is not None:
                await vm.kill()
            await self.detach(node)
            raise
        spec.net.close()  # the VMM holds the TAP now; it goes away with the VMM
        return vm

    async def _boot_cold_instead(self, node: Node, template: Template, spec: VMSpec, e: VMMError) -> None:
        rec = node.record
        self.templates.retire(template, f"restoring {rec.hostname} failed: {e}")
        log.warning("%s: restore from template %s failed (%s); booting cold", rec.hostname, template.name, e)
        remove_disk(Path(rec.disk))
        spec.serial_log.unlink(missing_ok=True)
        rec.template = ""
        self.registry.store.put(rec)
        self.collect_templates()

    def run(self, node: Node, vm: VM, boot: BootKind, group: HostGroup) -> None:
        """``vm`` is the node's from now on: watch its end, set its guest up after each boot."""
        node.attach(vm, boot)
        self.tasks.spawn(self.watch(node, node.link_serial))
        self.tasks.spawn(self.provisioner.run(node, vm, group.name))

    async def watch(self, node: Node, link: int) -> None:
        """React to the VM's process ending: a powered-off sandbox is deleted. ``link``: the
        node's link serial while this VM holds the link."""
        vm = node.vm
        assert vm is not None
        code = await vm.wait()
        node.rebooted.set()  # wakes the provisioner of this VM, which then sees it stopped and ends
        if node.vm is vm and not node.deleted:  # not yet relaunched (nor destroyed): its link goes with it
            await self.detach(node, link)
            node.exited.set()
        if node.vm is not vm or node.stopping:
            return
        if code == 0:
            log.info("%s: guest powered off or rebooted (a VM ends with its guest)", node.hostname)
            if not node.is_service and not node.record.persistent:
                await self.destroy(node)
        else:
            telemetry.QEMU_EXITS.labels(node.record.hostgroup, "crash").inc()
            log.error("%s: QEMU died (exit %s); see %s", node.hostname, code, node.run_dir / "qemu.log")

    async def wait_setup(self, node: Node, wait: str, timeout: float) -> None:
        """Wait until the agent answers and this boot's setup is done (and userdata ran)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.1)
        # The provisioner asks the agent itself; here only the handshake (and the VM's death) is watched.
        await node.wait_ready(max(0.1, deadline - loop.time()), health=False)
        try:
            await asyncio.wait_for(node.provisioned.wait(), max(0.1, deadline - loop.time()))
        except TimeoutError:
            raise WaitTimeout(f"{node.hostname} was not set up within {timeout:g}s") from None
        if node.setup_error:
            raise SlicerError(f"{node.hostname}: {node.setup_error}", ErrorCode.SETUP_FAILED)
        if wait == "userdata":
            await node.wait_ready(max(0.1, deadline - loop.time()), userdata=True)

    # -- ending -------------------------------------------------------------------------------------
    async def stop_vm(self, node: Node, graceful: bool, reboot: bool = False) -> None:
        """Stop the VM: by its power button (``graceful``; killed if it does not go in time), by
        rebooting the guest (``reboot``: a VM without ``spec.reboot`` ends with it), or killed."""
        vm = node.vm
        if vm is None or vm.state == VMState.STOPPED:
            return
        node.stopping = True
        if reboot:
            with contextlib.suppress(VMMError, SlicerError):
                await self.reboot(node)
        elif graceful:
            with contextlib.suppress(VMMError):
                await vm.powerdown()
        if graceful or reboot:
            try:
                await asyncio.wait_for(asyncio.shield(vm.wait()), GRACEFUL_TIMEOUT)
                return
            except TimeoutError:
                log.warning("%s: guest did not power off in %gs; killing it", node.hostname, GRACEFUL_TIMEOUT)
        await vm.kill()

    async def reboot(self, node: Node) -> None:
        """Reboot the guest: orderly through its agent (processes stopped, disks synced), or by
        resetting the machine when the agent cannot."""
        vm = node.vm
        assert vm is not None
        if vm.state == VMState.PAUSED:
            await vm.resume()
        try:  # the agent itself, whatever the node's state: a reboot that ends the VM is Stopping
            if node.agent is None:
                raise SlicerError("no channel to the agent")
            await node.agent.power("reboot")
        except SlicerError as e:
            log.warning("%s: agent could not reboot (%s); resetting the machine", node.hostname, e.message)
            await vm.reset()

    async def destroy(self, node: Node) -> bool:
        """Stop the VM and forget a sandbox; returns whether its disk was removed. Once only:
        a node destroyed twice (a failed create after a delete) has nothing left to remove."""
        if node.deleted:
            return False
        node.stopping = True
        if node.vm is not None:
            await node.vm.kill()
        await self.detach(node)
        if node.agent is not None:
            await node.agent.aclose()
        disk = not node.record.persistent
        self.remove_files(node.record, disk=disk)
        self.registry.forget(node)
        node.deleted = True
        if node.record.template and node.record.template not in self.templates_in_use():
            self.collect_templates()  # its last clone is gone: a stale template may go too
        return disk

    async def retire(self, node: Node) -> None:
        """Stop a service that is no longer one of its group's (its disk stays)."""
        await self.stop_vm(node, graceful=self.config.graceful_shutdown)
        if node.agent is not None:
            await node.agent.aclose()
        self.remove_files(node.record, disk=False)

    async def detach(self, node: Node, link: int | None = None) -> None:
        """Remove the node's network link. It returns once any removal under way has ended: a
        bridge deletes the TAP by name a moment after forgetting it, so a restore right after a
        suspend would lose the new TAP of that name. ``link`` (a VM's watcher): only if the link
        serial is still that, i.e. nobody removed the link since and no VM being started (a
        relaunch, whose ``node.vm`` is still the old one) attached its own."""
        async with node.link:
            if link is not None and link != node.link_serial:
                return
            node.link_serial += 1
            try:
                await self.net.group(node.record.hostgroup).detach(node.hostname, node.record.ip, node.run_dir)
            except (NetworkError, KeyError) as e:
                log.warning("%s: network cleanup: %s", node.hostname, e)

    def remove_files(self, rec: NodeRecord, disk: bool) -> None:
        if disk:
            remove_disk(Path(rec.disk))
        self.registry.state_file(rec.hostname).unlink(missing_ok=True)
        shutil.rmtree(self.registry.run_dir(rec.hostname), ignore_errors=True)

    # -- templates in use ---------------------------------------------------------------------------
    def templates_in_use(self) -> Counter[str]:
        """How many nodes use each template, by their disk or their RAM (a fork's snapshot keeps
        its base in use)."""
        used = Counter(n.record.template for n in self.registry.nodes.values() if n.record.template)
        todo = list(used)
        while todo:  # a fork of a fork: every snapshot down the chain
            if base := self.templates.base_of(todo.pop()):
                todo += [base] if base not in used else []
                used[base] += 1
        return used

    def collect_templates(self, also: Iterable[str] = ()) -> None:
        """Remove the templates nothing uses; ``also``: used by records not yet registered."""
        self.templates.collect(self.config.host_groups, self.templates_in_use() + Counter(also))
