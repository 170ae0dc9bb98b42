"""Node lifecycle: host groups, services and sandboxes, reconciled against the state store.

Services are the VMs of a group's YAML ``count``: started with the daemon, shut down
gracefully with it (or suspended, with ``suspend_on_shutdown``), never deleted through the
API. Sandboxes are created through the API: deleted (process and disk) when asked, when their
guest powers off, and when the daemon stops. A sandbox restores from a template of its group
and size (see :mod:`slicer.core.templates`) unless it or its group asks to boot cold.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import shutil
from collections import Counter, deque
from pathlib import Path

import httpx

from slicer.channel.host import ChannelError
from slicer.channel.yamux import Stream
from slicer.core import telemetry
from slicer.core.actions import NodeAction
from slicer.core.agent import AgentClient
from slicer.core.commits import CommitActions
from slicer.core.config import Config, HostGroup
from slicer.core.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    SlicerError,
    UpstreamUnreachable,
    WaitTimeout,
)
from slicer.core.forks import ForkActions
from slicer.core.identity import identity_body
from slicer.core.images import BootImages
from slicer.core.node import Node, host_index
from slicer.core.reconcile import Reconciler
from slicer.core.rundir import RunDirError, run_root
from slicer.core.secrets import SecretStore
from slicer.core.snapshots import SnapshotActions
from slicer.core.specs import vm_spec
from slicer.core.state import NodeRecord, StateStore, now_rfc3339
from slicer.core.templates import Template, Templates
from slicer.net import HostNetwork, NetworkError
from slicer.vmm.base import Driver, VMMError, VMState, VMStateError
from slicer.vmm.disks import TamperedDisk, remove_disk

log = logging.getLogger(__name__)

FORWARD_TARGET = re.compile(r"^(unix:/\S{1,200}|([A-Za-z0-9.\-]{1,253}:|\[[0-9a-fA-F:]+\]:)?\d{1,5})$")
HOSTNAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
GRACEFUL_TIMEOUT = 30.0
MAX_TAGS = 64
RESERVED_NAMES = {"commits"}  # /vm/commits is the commits' collection


class Manager(Reconciler, SnapshotActions, CommitActions, ForkActions):
    def __init__(self, config: Config, data_dir: Path, driver: Driver, images: BootImages) -> None:
        self.config = config
        self.data_dir = data_dir
        self.driver = driver
        self.images = images
        self.store = StateStore(data_dir / "state.db")
        self.secrets = SecretStore(data_dir / "secrets")
        try:
            self.net = HostNetwork(config.host_groups, data_dir)
        except NetworkError as e:
            raise SlicerError(str(e), "network_unavailable") from e
        # Guest memory (saved states, template RAM) and disks are for root's eyes only.
        for private in ("run", "disks", "snapshots", "templates", "commits"):
            (data_dir / private).mkdir(parents=True, exist_ok=True)
            (data_dir / private).chmod(0o700)
        try:
            self.run_root = run_root(data_dir)
        except (RunDirError, OSError) as e:
            raise SlicerError(f"cannot make a short path for unix sockets: {e}", "data_dir") from e
        self.templates = Templates(data_dir / "templates", self.run_root, driver, images, self.net)
        self.nodes: dict[str, Node] = {}
        self._alloc = asyncio.Lock()  # hostname and IP allocation
        self._tasks: set[asyncio.Task] = set()
        self.started_at = now_rfc3339()
        self.leave_running = False  # set by SIGQUIT: stop without touching a VM (see stop)

    # -- paths ----------------------------------------------------------------------------------
    def run_dir(self, hostname: str) -> Path:
        return self.run_root / hostname

    def persistent_disk(self, hostname: str) -> Path:
        return self.data_dir / "disks" / f"{hostname}.qcow2"

    def state_file(self, hostname: str) -> Path:
        """Where a suspended VM's memory and device state is kept."""
        return self.data_dir / "snapshots" / f"{hostname}.state"

    # -- daemon lifecycle -------------------------------------------------------------------------
    async def _boot_service(self, group: HostGroup, hostname: str, old: NodeRecord | None) -> None:
        if old is not None and old.suspended:
            node = self.nodes[hostname] = Node(old, self.run_dir(hostname))
            if old.suspended != "shutdown":
                return  # suspended through the API: it stays so until restored
            try:
                await self._restore(node, group)
                return
            except SlicerError as e:
                log.error("%s: could not restore its saved state (%s); booting it", hostname, e.message)
                self.state_file(hostname).unlink(missing_ok=True)
        persistent = group.service_persistent
        disk = self.persistent_disk(hostname) if persistent else self.run_dir(hostname) / "disk.qcow2"
        if not persistent:
            remove_disk(disk)
        used = self._used_ips()
        addressing = self.net.group(group.name).addressing
        ip = addressing.service_address(host_index(hostname))
        if old and old.ip not in used and old.ip in addressing:
            ip = old.ip
        elif ip is None or ip in used:
            ip = self._free_ip(group, used)
        spec: dict = {"userdata": group.userdata} if group.userdata else {}
        # A kept disk goes on booting the image it was made from (None: the project's); a new
        # one, the group's.
        if old is not None and persistent and disk.exists():
            image = old.spec.get("image")
        else:
            try:
                image = self.images.group_choice(group.name)
            except SlicerError as e:
                log.error("%s: not started: %s", hostname, e.message)
                return
        if image:
            spec["image"] = dict(image)
        rec = NodeRecord(
            hostname=hostname, hostgroup=group.name, kind="service",
            ip=ip, cpus=group.vcpu, ram_bytes=group.ram,
            persistent=persistent, created_at=old.created_at if old else now_rfc3339(),
            disk=str(disk), spec=spec,
        )
        self.store.put(rec)
        node = Node(rec, self.run_dir(hostname))
        self.nodes[hostname] = node
        try:
            await self._launch(node, group)
            log.info("%s: service booted", hostname)
        except SlicerError as e:
            log.error("%s: service failed to boot: %s", hostname, e.message)

    async def stop(self) -> None:
        """Delete sandboxes, shut services down gracefully (killed after a timeout); with
        ``leave_running`` (an upgrade), touch no VM: the next daemon adopts them."""
        for task in list(self._tasks):
            task.cancel()
        if self.leave_running:
            running = [n.hostname for n in self.nodes.values() if n.vm is not None and n.vm.state != VMState.STOPPED]
            log.info("leaving %d VMs running for the next daemon: %s", len(running), ", ".join(running) or "none")
            self.store.close()
            return
        jobs = []
        for node in list(self.nodes.values()):
            keep = node.is_service or node.record.persistent
            if keep and self.config.suspend_on_shutdown and node.is_service and not node.record.suspended:
                jobs.append(self._suspend_or_stop(node))
            elif keep:
                jobs.append(self._stop_vm(node, graceful=self.config.graceful_shutdown))
            else:
                jobs.append(self._destroy(node))
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                log.error("stop: %r", r)
        await self.net.stop()
        self.store.close()

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- queries ----------------------------------------------------------------------------------
    def group(self, name: str) -> HostGroup:
        group = self.config.group(name)
        if group is None:
            raise NotFound(f"host group {name!r} not found", "hostgroup_not_found")
        return group

    def host_groups(self) -> list[dict]:
        return [
            {"name": g.name, "count": g.count, "ram_bytes": g.ram, "cpus": g.vcpu,
             "gpu_count": g.gpu_count, "arch": "x86_64"}
            for g in self.config.host_groups
        ]

    def list(self, group: str | None = None, tag: str | None = None, tag_prefix: str | None = None) -> list[Node]:
        if tag is not None and tag_prefix is not None:
            raise BadRequest("give only one of tag and tag_prefix")
        if group is not None:
            self.group(group)
        nodes = [n for n in self.nodes.values() if group is None or n.record.hostgroup == group]
        if tag is not None:
            nodes = [n for n in nodes if tag in n.record.tags]
        if tag_prefix is not None:
            nodes = [n for n in nodes if any(t.startswith(tag_prefix) for t in n.record.tags)]
        return sorted(nodes, key=lambda n: (n.record.hostgroup, host_index(n.hostname)))

    def get(self, hostname: str) -> Node:
        if not HOSTNAME_RE.fullmatch(hostname):
            raise BadRequest(f"invalid hostname {hostname!r}", "invalid_hostname")
        node = self.nodes.get(hostname)
        if node is None:
            raise NotFound(f"VM {hostname!r} not found", "vm_not_found")
        return node

    async def describe(self, hostname: str) -> dict:
        """One VM as the Go SDK's ``DescribeVM`` reads it: the node, its storage, image and
        network policy (the group's, and the VM's own allow/drop if it has them), its VMM, its open
        agent connections and its background execs (left out when the agent does not answer)."""
        node = self.get(hostname)
        group = self.config.group(node.record.hostgroup)
        view = node.view(vmm=True)
        view["open_agent_connections"] = node.agent.channel.open_streams if node.agent else 0
        if (execs := await self._bg_execs(node)) is not None:
            view["bg_execs"] = execs
        if group is None:  # its group left the config: nothing to say about a policy, but the field is there
            empty: dict[str, list[str]] = {"allow": [], "drop": []}
            return {**view, "network": {"mode": "", "policy_source": "host_group", "host_group": empty,
                                        "effective": empty}}
        policy = {"allow": list(group.network.allow), "drop": list(group.network.drop)}
        override = node.record.spec.get("network")
        mode = self.net.group(group.name).mode if group.name in self.net.groups else group.network.mode
        lineage = {k: v for k in ("commit_id", "parent_commit") if (v := node.record.spec.get(k))}
        return {**view, "storage": group.storage, "image": self.images.label(node.record.spec.get("image")),
                **({"commit_id": lineage["commit_id"]} if "commit_id" in lineage else {}),
                **({"parent_commit_id": lineage["parent_commit"]} if "parent_commit" in lineage else {}),
                "network": {"mode": mode, "policy_source": "override" if override else "host_group",
                            "host_group": policy, **({"override": override} if override else {}),
                            "effective": {**policy, **(override or {})}}}

    @staticmethod
    async def _bg_execs(node: Node) -> list[dict] | None:
        """The agent's background execs in the SDK's summary shape; None if it cannot say."""
        try:
            found = await asyncio.wait_for(node.running_agent().call("GET", "/exec", timeout=2), 3)
        except (SlicerError, TimeoutError):
            return None
        if not isinstance(found, list):  # the guest's word: checked like input
            return None
        return [{"exec_id": str(e.get("exec_id", "")), "command": str(e.get("command", "")),
                 "pid": e["pid"] if isinstance(e.get("pid"), int) else 0,
                 "state": "running" if e.get("running") else "exited",
                 **({"started_at": e["started_at"]} if isinstance(e.get("started_at"), str) else {}),
                 **({"exit_code": e["exit_code"]} if isinstance(e.get("exit_code"), int) else {})}
                for e in found[:1000] if isinstance(e, dict)]

    # -- tags -------------------------------------------------------------------------------------
    def tags(self, hostname: str) -> dict:
        node = self.get(hostname)
        return {"hostname": hostname, "tags": node.record.tags}

    def update_tags(self, hostname: str, add: list[str], remove: list[str], replace: list[str] | None) -> dict:
        """One atomic change of a VM's tags: ``replace`` them all, or ``add`` and ``remove``."""
        node = self.get(hostname)
        if replace is not None and (add or remove):
            raise BadRequest("replace cannot be combined with add or remove", "invalid_request")
        tags = list(replace) if replace is not None else node.record.tags
        tags = [t for t in tags if t not in remove] + [t for t in add if t not in tags]
        tags = list(dict.fromkeys(tags))
        if len(tags) > MAX_TAGS:
            raise BadRequest(f"a VM has at most {MAX_TAGS} tags", "invalid_request")
        node.record.spec["tags"] = tags
        self.store.put(node.record)
        return {"hostname": hostname, "tags": tags}

    # -- create / delete --------------------------------------------------------------------------
    async def create(
        self, group_name: str, *, cpus: int | None, ram_bytes: int | None, persistent: bool,
        hostname: str | None, ip: str | None, spec: dict, wait: str | None, timeout: float,
        template: Template | None = None,
    ) -> Node:
        """A new sandbox (or persistent VM); ``template``: restore it from that one (a live
        fork's snapshot) rather than the group's."""
        group = self.group(group_name)
        cpus = cpus or group.vcpu
        ram = ram_bytes or group.ram
        if cpus > group.vcpu:
            raise BadRequest(f"cpus {cpus} exceeds the host group's limit of {group.vcpu}", "limit_exceeded")
        if ram > group.ram:
            raise BadRequest(f"ram_bytes {ram} exceeds the host group's limit of {group.ram}", "limit_exceeded")
        if ram < 64 << 20:
            raise BadRequest("ram_bytes must be at least 64 MiB", "invalid_size")
        if spec.get("network") and (mode := self.net.group(group.name).mode) != "isolated":
            raise BadRequest(f"network: a VM's own allow/drop apply to isolated host groups; {group.name} is "
                             f"{mode} (its VMs share their subnet)", "invalid_network")
        requested = spec.pop("disk_image", None)
        # Forks and commits' children boot their source's image (no "image": the project's).
        inherited = "image" in spec or bool(spec.get("parent_commit")) or template is not None
        if inherited or requested:
            group_image = self.images.groups.get(group.name)  # the group's may be unavailable
            if requested and not inherited:
                spec["image"] = await self.images.request_choice(requested, group)
        elif group_image := self.images.group_choice(group.name):
            spec["image"] = dict(group_image)
        if spec.get("image"):
            spec["image"] = await self.images.present(spec["image"])
        async with self._alloc:
            hostname, addr = self._allocate(group, hostname, ip)
            disk = self.persistent_disk(hostname) if persistent else self.run_dir(hostname) / "disk.qcow2"
            rec = NodeRecord(
                hostname=hostname, hostgroup=group.name, kind="sandbox", ip=addr, cpus=cpus,
                ram_bytes=ram, persistent=persistent, created_at=now_rfc3339(), disk=str(disk), spec=spec,
            )
            remove_disk(disk)  # a leftover with no record is not anyone's disk
            node = Node(rec, self.run_dir(hostname))
            self.store.put(rec)  # first: a record that cannot be written (a full disk) leaves no node
            self.nodes[hostname] = node
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        # Clones share their template's disk, so persistent VMs boot cold; so do forks of a commit.
        # So does a VM of another image than its group's (templates are the group's image).
        cold = persistent or "cold" in (group.boot, spec.get("boot")) or bool(spec.get("parent_commit"))
        cold = cold or spec.get("image") != group_image
        try:
            if template is None and not cold:
                template = await self.templates.ensure(group, (cpus, ram))
            # Held while QEMU starts: a DELETE that comes meanwhile waits, then removes what started.
            async with node.act(NodeAction.LAUNCH):
                await self._launch(node, group, template=template)
            log.info("%s: QEMU up in %.2fs (%s)", hostname, loop.time() - t0, node.boot)
            if wait:
                await self._wait_setup(node, wait, timeout - (loop.time() - t0))
                log.info("%s: ready %.2fs after the request", hostname, loop.time() - t0)
        except BaseException:
            await self._destroy(node)
            raise
        return node

    async def _wait_setup(self, node: Node, wait: str, timeout: float) -> None:
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
            raise SlicerError(f"{node.hostname}: {node.setup_error}", "setup_failed")
        if wait == "userdata":
            await node.wait_ready(max(0.1, deadline - loop.time()), userdata=True)

    def _used_ips(self) -> set[str]:
        # Across groups: groups may share a subnet, and every VM's address must be unique.
        return {n.record.ip for n in self.nodes.values()}

    def _free_ip(self, group: HostGroup, used: set[str]) -> str:
        addressing = self.net.group(group.name).addressing
        ip = addressing.free(used)
        if ip is None:
            raise Conflict(f"host group {group.name} has no free address in {addressing.network}", "no_free_address")
        return ip

    def _allocate(self, group: HostGroup, hostname: str | None, ip: str | None) -> tuple[str, str]:
        used_ips = self._used_ips()
        if hostname is not None:
            if not HOSTNAME_RE.fullmatch(hostname):
                raise BadRequest(f"invalid hostname {hostname!r}", "invalid_hostname")
            if hostname in self.nodes:
                raise Conflict(f"VM {hostname!r} already exists", "exists")
            if hostname in RESERVED_NAMES:
                raise BadRequest(f"{hostname!r} is a reserved name", "invalid_hostname")
        else:
            used = {host_index(h) for h in self.nodes if h.startswith(group.name + "-")}
            n = group.count + 1  # services own 1..count
            while n in used:
                n += 1
            hostname = f"{group.name}-{n}"
        if ip is not None:
            try:
                addr = ipaddress.IPv4Address(ip)
            except ValueError:
                raise BadRequest(f"invalid ip {ip!r}", "invalid_ip") from None
            addressing = self.net.group(group.name).addressing
            if str(addr) not in addressing:
                raise BadRequest(f"ip {ip} is not one of host group {group.name}'s VM addresses "
                                 f"({addressing.network})", "invalid_ip")
            if str(addr) in used_ips:
                raise Conflict(f"ip {ip} is already in use", "ip_in_use")
            return hostname, str(addr)
        return hostname, self._free_ip(group, used_ips)

    async def _launch(self, node: Node, group: HostGroup, template: Template | None = None,
                      restore_from: Path | None = None) -> None:
        """Boot the node's VM; or restore it, from ``template`` (a new clone) or from its own
        saved state ``restore_from``. A clone whose restore fails boots cold instead."""
        rec = node.record
        gnet = self.net.group(group.name)
        spec = vm_spec(self.images.boot(rec.spec.get("image")), group, gnet,
                       name=rec.hostname, cpus=rec.cpus, ram_bytes=rec.ram_bytes,
                       ip=rec.ip, disk=Path(rec.disk), run_dir=node.run_dir)
        boot = "suspend" if restore_from is not None else "boot"
        if (parent := rec.spec.get("parent_commit")) and not Path(rec.disk).exists():
            # The first boot of a commit's child: its disk starts as an overlay on the commit,
            # and it gets its own identity (the commit holds its source's).
            spec.base_disk, spec.base_format = self.commit_disk(parent), "qcow2"
            boot = "fork"
        if template is not None:
            rec.template = template.name
            self.store.put(rec)
            spec.base_disk, spec.base_format = template.disk, "qcow2"
            template.start_console_log(spec.serial_log, rec.hostname)
            restore_from, boot = template.state, "template"
        if rec.template:  # a clone's memory is mapped from its template's: same machine, same layout
            spec.memory_file = self.templates.memory_file(rec.template)
        node.stopping = False
        if rec.paused:  # a new QEMU runs
            rec.paused = False
            self.store.put(rec)
        vm = None
        try:
            spec.net = await gnet.attach(rec.hostname, rec.ip, node.run_dir, policy=rec.spec.get("network"))
        except NetworkError as e:
            raise SlicerError(f"{rec.hostname}: network setup failed: {e}", "network_failed") from e
        try:
            vm = await self.driver.start(spec, restore_from)
            if vm.state == VMState.PAUSED:
                await vm.resume()
        except BaseException as e:
            spec.net.close()
            if vm is not None:
                await vm.kill()
            await gnet.detach(rec.hostname, rec.ip, node.run_dir)
            if not isinstance(e, VMMError):
                raise
            if isinstance(e, TamperedDisk):
                raise Conflict(f"{rec.hostname}: {e}", "disk_tampered") from e
            if restore_from is not None:
                telemetry.RESTORES.labels(rec.hostgroup, boot, "failed").inc()
            if template is None:
                raise SlicerError(f"{rec.hostname}: could not start the VM: {e}", "vm_start_failed") from e
            self.templates.retire(template, f"restoring {rec.hostname} failed: {e}")
            log.warning("%s: restore from template %s failed (%s); booting cold", rec.hostname, template.name, e)
            remove_disk(Path(rec.disk))
            spec.serial_log.unlink(missing_ok=True)
            rec.template = ""
            self.store.put(rec)
            self._collect_templates()
            return await self._launch(node, group)
        spec.net.close()  # QEMU holds the TAP now; it goes away with QEMU
        node.attach(vm, boot)
        if restore_from is not None:
            telemetry.RESTORES.labels(rec.hostgroup, boot, "ok").inc()
        telemetry.VM_STARTS.labels(rec.hostgroup, rec.kind).inc()
        self._spawn(self._watch(node))
        self._spawn(self._provision(node, vm, group))

    async def _watch(self, node: Node) -> None:
        """React to the VM's process ending: a powered-off sandbox is deleted."""
        vm = node.vm
        assert vm is not None
        code = await vm.wait()
        node.rebooted.set()  # wakes the provisioner of this VM, which then sees it stopped and ends
        if node.vm is vm:  # not yet relaunched: its link goes with it
            await self._detach(node)
            node.exited.set()
        if node.vm is not vm or node.stopping:
            return
        if code == 0:
            log.info("%s: guest powered off", node.hostname)
            if not node.is_service and not node.record.persistent:
                await self._destroy(node)
        else:
            telemetry.QEMU_EXITS.labels(node.record.hostgroup, "crash").inc()
            log.error("%s: QEMU died (exit %s); see %s", node.hostname, code, node.run_dir / "qemu.log")

    async def _provision(self, node: Node, vm, group: HostGroup) -> None:
        """After every boot of ``vm``: wait for its agent, hand over secrets, SSH keys and
        (once per disk) userdata; then wait for the next reboot."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        first = True
        while node.vm is vm and vm.state != VMState.STOPPED:
            try:
                # A restored guest's agent was ready when it was saved: its handshake is enough,
                # and the identity reset that follows is the first request it answers.
                await node.wait_ready(timeout=600, health=not node.identity_pending)
            except SlicerError:
                continue  # the loop ends when the VM stops
            if first:
                telemetry.BOOT_SECONDS.labels(group.name).observe(loop.time() - t0)
                first = False
            try:
                await self._configure_guest(node)
            except SlicerError as e:
                log.warning("%s: setting up the guest failed: %s", node.hostname, e.message)
                node.warnings.append(f"guest setup: {e.message}")
                if node.identity_pending:  # a clone that is not yet itself must not be used
                    node.setup_error = f"identity reset after restore failed: {e.message}"
            node.provisioned.set()
            await node.rebooted.wait()
            node.rebooted.clear()

    async def _configure_guest(self, node: Node) -> None:
        agent = node.running_agent(setup=True)
        if node.identity_pending:
            assert node.vm is not None
            await agent.call("POST", "/identity", json=await identity_body(node, node.vm.spec), timeout=30)
            node.identity_pending = False
        spec = node.record.spec
        await self._push_secrets(node)
        keys = list(self.config.ssh_keys) + list(spec.get("ssh_keys") or [])
        for user in {u for u in (self.config.github_user, spec.get("import_user")) if u}:
            keys += await self._github_keys(node, user)
        await agent.call("PUT", "/ssh-keys", json={"keys": keys})
        if spec.get("userdata"):
            await agent.call("POST", "/userdata", json={"script": spec["userdata"]})

    async def _github_keys(self, node: Node, user: str) -> list[str]:
        url = f"{self.config.github_keys_url.rstrip('/')}/{user}.keys"
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                r = await client.get(url)
                r.raise_for_status()
        except httpx.HTTPError as e:
            msg = f"could not fetch SSH keys of {user} from {url}: {e}"
            log.warning("%s: %s", node.hostname, msg)
            node.warnings.append(msg)
            return []
        return [line for line in r.text.splitlines() if line.strip()]

    async def _push_secrets(self, node: Node) -> None:
        allowed = node.record.spec.get("secrets")  # None: all; []: none
        await node.running_agent().call("PUT", "/secrets", json=self.secrets.for_guest(allowed))

    async def sync_secrets(self) -> None:
        """Push the current secrets to every VM whose boot was set up (after each change)."""
        nodes = [n for n in self.nodes.values() if n.provisioned.is_set()]
        results = await asyncio.gather(*(self._push_secrets(n) for n in nodes), return_exceptions=True)
        for node, r in zip(nodes, results, strict=True):
            if isinstance(r, BaseException):
                log.warning("%s: secrets not updated: %s", node.hostname, r)

    def secrets_changed(self) -> None:
        self._spawn(self.sync_secrets())

    async def _stop_vm(self, node: Node, graceful: bool) -> None:
        vm = node.vm
        if vm is None or vm.state == VMState.STOPPED:
            return
        node.stopping = True
        if graceful:
            with contextlib.suppress(VMMError):
                await vm.powerdown()
            try:
                await asyncio.wait_for(asyncio.shield(vm.wait()), GRACEFUL_TIMEOUT)
                return
            except TimeoutError:
                log.warning("%s: guest did not power off in %gs; killing it", node.hostname, GRACEFUL_TIMEOUT)
        await vm.kill()

    async def _destroy(self, node: Node) -> bool:
        """Stop the VM and forget a sandbox; returns whether its disk was removed. Once only:
        a node destroyed twice (a failed create after a delete) has nothing left to remove."""
        if node.deleted:
            return False
        node.stopping = True
        if node.vm is not None:
            await node.vm.kill()
        await self._detach(node)
        if node.agent is not None:
            await node.agent.aclose()
        remove_disk = not node.record.persistent
        self._remove_files(node.record, disk=remove_disk)
        self.store.delete(node.hostname)
        if self.nodes.get(node.hostname) is node:
            del self.nodes[node.hostname]
        node.deleted = True
        if remove_disk and node.record.template and node.record.template not in self._templates_in_use():
            self._collect_templates()  # its last clone is gone: a stale template may go too
        return remove_disk

    async def _detach(self, node: Node) -> None:
        try:
            await self.net.group(node.record.hostgroup).detach(node.hostname, node.record.ip, node.run_dir)
        except (NetworkError, KeyError) as e:
            log.warning("%s: network cleanup: %s", node.hostname, e)

    def _remove_files(self, rec: NodeRecord, disk: bool) -> None:
        if disk:
            remove_disk(Path(rec.disk))
        self.state_file(rec.hostname).unlink(missing_ok=True)
        shutil.rmtree(self.run_dir(rec.hostname), ignore_errors=True)

    def _templates_in_use(self) -> Counter[str]:
        """How many nodes' disks each template backs (a fork's snapshot keeps its base in use)."""
        used = Counter(n.record.template for n in self.nodes.values() if n.record.template)
        todo = list(used)
        while todo:  # a fork of a fork: every snapshot down the chain
            if base := self.templates.base_of(todo.pop()):
                todo += [base] if base not in used else []
                used[base] += 1
        return used

    def _collect_templates(self) -> None:
        self.templates.collect(self.config.host_groups, self._templates_in_use())

    async def delete(self, group_name: str, hostname: str) -> bool:
        self.group(group_name)
        node = self.get(hostname)
        if node.record.hostgroup != group_name:
            raise NotFound(f"VM {hostname!r} is not in host group {group_name!r}", "vm_not_found")
        if node.record.spec.get("protected"):
            raise Forbidden(f"{hostname} is protected; it cannot be deleted", "protected")
        if node.is_service:
            raise Forbidden(
                f"{hostname} is a service from the config file; change its count there instead",
                "protected",
            )
        async with node.act(NodeAction.DELETE):
            return await self._destroy(node)

    # -- actions on a running VM ------------------------------------------------------------------
    async def pause(self, hostname: str) -> None:
        await self._vm_action(hostname, NodeAction.PAUSE)
        self._record_pause(hostname, True)

    async def resume(self, hostname: str) -> None:
        await self._vm_action(hostname, NodeAction.RESUME)
        self._record_pause(hostname, False)

    def _record_pause(self, hostname: str, paused: bool) -> None:
        """Remembered so that a daemon adopting the VM keeps a pause someone asked for (and only then)."""
        if (node := self.nodes.get(hostname)) is not None and node.record.paused != paused:
            node.record.paused = paused
            self.store.put(node.record)

    async def _vm_action(self, hostname: str, action: NodeAction) -> None:
        node = self.get(hostname)
        async with node.act(action):
            assert node.vm is not None
            try:
                await getattr(node.vm, action.value)()
            except VMStateError as e:
                raise Conflict(f"{hostname}: {e}", "invalid_state") from e
            except VMMError as e:
                raise SlicerError(str(e)) from e

    async def shutdown(self, hostname: str, action: str) -> None:
        """Power off (ACPI, killed after a timeout) or reboot the guest; returns once started."""
        if action not in ("shutdown", "reboot"):
            raise BadRequest(f"action must be shutdown or reboot, not {action!r}", "invalid_action")
        node = self.get(hostname)
        async with node.act(NodeAction(action)):
            if action == "reboot":
                await self._reboot(node)
                return
            node.stopping = True  # from here on the node is Stopping; a relaunch waits for its end
        self._spawn(self._power_off(node))

    async def _power_off(self, node: Node) -> None:
        await self._stop_vm(node, graceful=True)
        if not node.is_service and not node.record.persistent:
            with contextlib.suppress(SlicerError):  # deleted meanwhile
                async with node.act(NodeAction.DELETE):
                    await self._destroy(node)  # a sandbox's disk goes with its shutdown

    async def _reboot(self, node: Node) -> None:
        vm = node.vm
        assert vm is not None
        if vm.state == VMState.PAUSED:
            await vm.resume()
        try:
            await node.running_agent().power("reboot")  # orderly: processes stopped, disk synced
        except SlicerError as e:
            log.warning("%s: agent could not reboot (%s); resetting the machine", node.hostname, e.message)
            await vm.reset()

    def logs(self, hostname: str, lines: int) -> str:
        node = self.get(hostname)
        if lines < 0:
            raise BadRequest("lines must be 0 (everything) or more", "invalid_lines")
        log_file = node.run_dir / "console.log"
        parts = [log_file.with_name("console.log.1"), log_file]
        if not any(p.exists() for p in parts):
            raise NotFound(f"no console log for {hostname} yet", "log_not_found")
        tail: deque[str] = deque(maxlen=lines or None)
        for part in parts:
            with contextlib.suppress(FileNotFoundError), open(part, errors="replace", newline="") as f:
                for line in f:
                    tail.append(line)
        return "".join(tail)

    def agent(self, hostname: str) -> AgentClient:
        """The agent of a running VM (404 unknown, 409 paused or stopped)."""
        return self.get(hostname).running_agent()

    async def open_exec(self, hostname: str, params: list[tuple[str, str]], stdin=None):
        """Start a command in the VM; returns the agent's streamed response (caller closes it)."""
        if not any(k == "cmd" and v for k, v in params):
            raise BadRequest("cmd is required", "invalid_request")
        return await self.agent(hostname).open_exec(params, stdin)

    async def open_stream(self, hostname: str, target: str) -> Stream:
        """A byte stream to ``target`` inside the VM: ``port``, ``host:port`` or ``unix:/path``."""
        if not FORWARD_TARGET.fullmatch(target):
            raise BadRequest(f"target {target!r} must be host:port, a port, or unix:/path", "invalid_target")
        agent = self.get(hostname).running_agent()
        try:
            return await agent.channel.open(target, timeout=15.0)
        except ChannelError as e:
            raise UpstreamUnreachable(f"cannot reach {target} in {hostname}: {e}") from e

    async def node_stats(self, node: Node, timeout: float = 5.0) -> dict:
        """The node's view plus its meter snapshot, or an ``error`` if the agent does not answer."""
        view = node.view()
        try:
            agent = node.running_agent()
            snapshot = await asyncio.wait_for(agent.call("GET", "/stats", timeout=timeout), timeout)
            if not isinstance(snapshot, dict):  # the guest's word: a shape we do not expect is an error
                raise ValueError("not a JSON object")
            view["snapshot"] = node.last_snapshot = snapshot
        except (SlicerError, TimeoutError, ValueError) as e:
            view["error"] = (e.message if isinstance(e, SlicerError) else f"agent did not answer in {timeout:g}s"
                             if isinstance(e, TimeoutError) else f"agent answered with unusable stats: {e}")
        return view

    async def all_stats(self, timeout: float = 5.0) -> list[dict]:
        """Every node's stats, gathered concurrently: one slow VM costs its own timeout only."""
        return list(await asyncio.gather(*(self.node_stats(n, timeout) for n in self.list())))

    async def health(self, hostname: str) -> dict:
        return await self.agent(hostname).health(timeout=10.0)
