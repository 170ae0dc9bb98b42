"""The daemon's lifecycle layer, as the API sees it: one object that owns the node registry, the
state store and address allocation, and hands every other kind of work to a collaborator:

- :class:`~slicer.core.lifecycle.Lifecycle` launches, watches, stops and destroys one VM;
- :class:`~slicer.core.reconcile.Reconciler` squares the record with what runs at start;
- :class:`~slicer.core.power.Power` pauses, resumes, shuts down, reboots and deletes;
- :class:`~slicer.core.snapshots.Snapshots` suspends, restores, relaunches (and storage);
- :class:`~slicer.core.commits.Commits` and :class:`~slicer.core.forks.Forks` freeze and copy VMs.

Services are the VMs of a group's YAML ``count``: started with the daemon, shut down
gracefully with it (or suspended, with ``suspend_on_shutdown``), never deleted through the
API. Sandboxes are created through the API: deleted (process and disk) when asked, when their
guest powers off, and when the daemon stops. A new VM restores from a template of its group
and size (see :mod:`slicer.core.templates`) unless it or its group asks to boot cold: a
sandbox's disk is an overlay on the template's, a service's or persistent VM's a copy of it
(so it outlives the template); a kept disk boots cold.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from pathlib import Path

from slicer.channel.host import ChannelError
from slicer.channel.yamux import Stream
from slicer.core import telemetry
from slicer.core.actions import NodeAction
from slicer.core.agent import AgentClient
from slicer.core.commits import Commits
from slicer.core.config import Config, HostGroup
from slicer.core.error_codes import ErrorCode
from slicer.core.errors import BadRequest, Conflict, SlicerError, UpstreamUnreachable
from slicer.core.forks import Forks
from slicer.core.images import BootImages
from slicer.core.lifecycle import Lifecycle
from slicer.core.node import Node, host_index
from slicer.core.pool import Pool
from slicer.core.power import Power
from slicer.core.provision import Provisioner, ca_bundles
from slicer.core.reconcile import Reconciler
from slicer.core.records import NodeKind, NodeSpec
from slicer.core.registry import HOSTNAME_RE, Registry, Tasks
from slicer.core.rundir import RunDirError, run_root
from slicer.core.secrets import SecretStore
from slicer.core.snapshots import Snapshots
from slicer.core.state import NodeRecord, StateStore, now_rfc3339
from slicer.core.template_cache import TemplateCache
from slicer.core.templates import Template, Templates
from slicer.core.views import bg_execs, console_tail
from slicer.net import HostNetwork, NetworkError
from slicer.net.surface import Network
from slicer.vmm.base import Driver, Laps, VMState
from slicer.vmm.disks import remove_disk

log = logging.getLogger(__name__)

FORWARD_TARGET = re.compile(r"^(unix:/\S{1,200}|([A-Za-z0-9.\-]{1,253}:|\[[0-9a-fA-F:]+\]:)?\d{1,5})$")
MAX_TAGS = 64
AGENT_WAIT = 120.0  # seconds a call on a VM that is still booting waits for its agent and setup
MIN_RAM = 64 << 20
RESERVED_NAMES = {"commits"}  # /vm/commits is the commits' collection
PRIVATE_DIRS = ("run", "disks", "snapshots", "templates", "commits")


def host_network(config: Config, data_dir: Path) -> HostNetwork:
    """The real host network of the config's groups (bridges, TAPs, nftables)."""
    try:
        return HostNetwork(config.host_groups, data_dir)
    except NetworkError as e:
        raise SlicerError(str(e), ErrorCode.NETWORK_UNAVAILABLE) from e


def observe_phases(node: Node, boot: str) -> str:
    """Record the phases of ``node``'s start in their histogram; say them in one line."""
    for phase, seconds in node.phases.items():
        telemetry.START_PHASE_SECONDS.labels(node.record.hostgroup, boot, phase).observe(seconds)
    return ", ".join(f"{phase} {seconds * 1000:.0f} ms" for phase, seconds in node.phases.items())


class Manager:
    def __init__(self, config: Config, data_dir: Path, driver: Driver, images: BootImages,
                 net: Network | None = None) -> None:
        """``net``: the network to attach VMs to (default: the host's, made from the config)."""
        self.config = config
        self.data_dir = data_dir
        self.driver = driver
        self.images = images
        self.secrets = SecretStore(data_dir / "secrets")
        self.net = net if net is not None else host_network(config, data_dir)
        # Guest memory (saved states, template RAM) and disks are for root's eyes only.
        for private in PRIVATE_DIRS:
            (data_dir / private).mkdir(parents=True, exist_ok=True)
            (data_dir / private).chmod(0o700)
        try:
            short_root = run_root(data_dir)
        except (RunDirError, OSError) as e:
            raise SlicerError(f"cannot make a short path for unix sockets: {e}", ErrorCode.DATA_DIR) from e
        self.store = StateStore(data_dir / "state.db")
        self.registry = Registry(config, data_dir, short_root, self.store)
        self.tasks = Tasks()
        cache = TemplateCache.open(Path(config.template_cache)) if config.template_cache else None
        self.templates = Templates(data_dir / "templates", short_root, driver, images, self.net, cache)
        self.provisioner = Provisioner(config, self.registry, self.secrets, self.tasks, ca_bundles(config, data_dir))
        self.lifecycle = Lifecycle(config, self.registry, driver, self.net, images, self.templates,
                                   self.provisioner, self.tasks)
        self.power = Power(self.registry, self.lifecycle, self.tasks)
        self.snapshots = Snapshots(config, self.registry, self.lifecycle, self.templates)
        self.commits = Commits(self.registry, self.create, getattr(driver, "legacy_roots", ()))
        self.forks = Forks(self.registry, self.lifecycle, self.templates, self.create)
        self.pool = Pool(config, self.registry, self.lifecycle, self.templates, self.provisioner, self.tasks,
                         self._pool_node)
        self.reconciler = Reconciler(config, self.registry, self.lifecycle, self.snapshots, self.commits, driver,
                                     self.net, images, self.templates, self.tasks)
        self._alloc = asyncio.Lock()  # hostname and IP allocation
        self.started_at = now_rfc3339()
        self.leave_running = False  # set by SIGQUIT: stop without touching a VM (see stop)

    @property
    def nodes(self) -> dict[str, Node]:
        return self.registry.nodes

    @property
    def run_root(self) -> Path:
        return self.registry.run_root

    # -- daemon lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        await self.reconciler.start()
        self.pool.start()

    async def stop(self) -> None:
        """Delete sandboxes, shut services down gracefully (killed after a timeout); with
        ``leave_running`` (an upgrade), touch no VM: the next daemon adopts them."""
        self.tasks.cancel_all()
        if self.leave_running:
            running = [n.hostname for n in self.nodes.values() if n.vm is not None and n.vm.state != VMState.STOPPED]
            log.info("leaving %d VMs running for the next daemon: %s", len(running), ", ".join(running) or "none")
            self.store.close()
            return
        jobs = []
        for node in list(self.nodes.values()):
            keep = node.is_service or node.record.persistent
            if keep and self.config.suspend_on_shutdown and node.is_service and not node.record.suspended:
                jobs.append(self.snapshots.suspend_or_stop(node))
            elif keep:
                jobs.append(self.lifecycle.stop_vm(node, graceful=self.config.graceful_shutdown))
            else:
                jobs.append(self.lifecycle.destroy(node))
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                log.error("stop: %r", r)
        await self.net.stop()
        self.store.close()

    # -- queries ----------------------------------------------------------------------------------
    def group(self, name: str) -> HostGroup:
        return self.registry.group(name)

    def host_groups(self) -> list[dict]:
        return [
            {"name": g.name, "count": g.count, "ram_bytes": g.ram, "cpus": g.vcpu,
             "gpu_count": g.gpu_count, "arch": "x86_64"}
            for g in self.config.host_groups
        ]

    def list(self, group: str | None = None, tag: str | None = None, tag_prefix: str | None = None) -> list[Node]:
        return self.registry.list(group, tag, tag_prefix)

    def get(self, hostname: str) -> Node:
        return self.registry.get(hostname)

    def secrets_changed(self) -> None:
        self.provisioner.secrets_changed()

    async def describe(self, hostname: str) -> dict:
        """One VM as the Go SDK's ``DescribeVM`` reads it: the node, its storage, image and
        network policy (the group's, and the VM's own allow/drop if it has them), its VMM, its open
        agent connections and its background execs (left out when the agent does not answer)."""
        node = self.registry.get(hostname)
        group = self.config.group(node.record.hostgroup)
        view = node.view(vmm=True)
        view["open_agent_connections"] = node.agent.channel.open_streams if node.agent else 0
        if (execs := await bg_execs(node)) is not None:
            view["bg_execs"] = execs
        if group is None:  # its group left the config: nothing to say about a policy, but the field is there
            empty: dict[str, list[str]] = {"allow": [], "drop": []}
            return {**view, "network": {"mode": "", "policy_source": "host_group", "host_group": empty,
                                        "effective": empty}}
        policy = {"allow": list(group.network.allow), "drop": list(group.network.drop)}
        override = node.record.spec.network
        mode = self.net.group(group.name).mode if group.name in self.net.groups else group.network.mode
        spec = node.record.spec
        return {**view, "storage": group.storage, "image": self.images.label(spec.image),
                **({"commit_id": spec.commit_id} if spec.commit_id else {}),
                **({"parent_commit_id": spec.parent_commit} if spec.parent_commit else {}),
                "network": {"mode": mode, "policy_source": "vm" if override else "host_group",
                            "host_group": policy, **({"override": override} if override else {}),
                            "effective": {**policy, **(override or {})}}}

    # -- tags -------------------------------------------------------------------------------------
    def tags(self, hostname: str) -> dict:
        node = self.registry.get(hostname)
        return {"hostname": hostname, "tags": node.record.tags}

    def update_tags(self, hostname: str, add: list[str], remove: list[str], replace: list[str] | None) -> dict:
        """One atomic change of a VM's tags: ``replace`` them all, or ``add`` and ``remove``."""
        node = self.registry.get(hostname)
        if replace is not None and (add or remove):
            raise BadRequest("replace cannot be combined with add or remove", ErrorCode.INVALID_REQUEST)
        tags = list(replace) if replace is not None else node.record.tags
        tags = [t for t in tags if t not in remove] + [t for t in add if t not in tags]
        tags = list(dict.fromkeys(tags))
        if len(tags) > MAX_TAGS:
            raise BadRequest(f"a VM has at most {MAX_TAGS} tags", ErrorCode.INVALID_REQUEST)
        node.record.spec.tags = tags
        self.store.put(node.record)
        return {"hostname": hostname, "tags": tags}

    # -- create -----------------------------------------------------------------------------------
    async def create(
        self, group_name: str, *, cpus: int | None, ram_bytes: int | None, persistent: bool,
        hostname: str | None, ip: str | None, spec: NodeSpec, wait: str | None, timeout: float,
        template: Template | None = None,
    ) -> Node:
        """A new sandbox (or persistent VM), booted; ``template``: restore it from that one (a
        live fork's snapshot) rather than the group's. On any failure nothing of it is left."""
        group = self.registry.group(group_name)
        cpus, ram = self._size(group, cpus, ram_bytes)
        if spec.network and (mode := self.net.group(group.name).mode) != "isolated":
            raise BadRequest(f"network: a VM's own allow/drop apply to isolated host groups; {group.name} is "
                             f"{mode} (its VMs share their subnet)", ErrorCode.INVALID_NETWORK)
        group_image = await self._choose_image(group, spec, inherited=template is not None)
        # Forks of a commit boot cold (their disk rests on it), and so does a VM of another image
        # than its group's (templates are the group's image). A persistent VM is restored from the
        # template with a copy of its disk (lifecycle), never from the pool (whose disks rest on it).
        cold = "cold" in (group.boot, spec.boot) or bool(spec.parent_commit) or spec.image != group_image
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        lap = Laps()
        if (template is None and not cold and not persistent and hostname is None and ip is None
                and not spec.network and (cpus, ram) == (group.vcpu, group.ram) and group.warm_pool):
            node = await self.pool.take(group, spec)
            if node is not None:
                return await self._wait_pooled(node, wait, timeout, t0)
        if hostname is not None or ip is not None:
            await self.pool.release(hostname, ip)  # a pooled VM holding them steps aside
        node = await self._new_node(group, hostname, ip, cpus, ram, persistent, spec)
        lap("alloc")
        node.phases = lap.laps
        node.creating = True
        try:
            if template is None and not cold:
                template = await self.templates.ensure(group, (cpus, ram))
            lap("template")
            node.creating = False
            # Held while the VMM starts: a DELETE that comes meanwhile waits, then removes what started.
            async with node.act(NodeAction.LAUNCH):
                await self.lifecycle.launch(node, group, template=template)
            log.info("%s: QEMU up in %.2fs (%s)", node.hostname, loop.time() - t0, node.boot)
            if wait:
                await self.lifecycle.wait_setup(node, wait, timeout - (loop.time() - t0))
                log.info("%s: ready %.2fs after the request (%s)", node.hostname, loop.time() - t0,
                         observe_phases(node, str(node.boot)))
        except BaseException:
            node.creating = False
            await self.lifecycle.destroy(node)
            raise
        return node

    async def _wait_pooled(self, node: Node, wait: str | None, timeout: float, t0: float) -> Node:
        """A create served by the warm pool: ``node`` runs; wait for its setup as asked."""
        loop = asyncio.get_running_loop()
        log.info("%s: handed out from the warm pool in %.0f ms", node.hostname, (loop.time() - t0) * 1000)
        if wait:
            try:
                await self.lifecycle.wait_setup(node, wait, timeout - (loop.time() - t0))
            except BaseException:
                await self.lifecycle.destroy(node)
                raise
            log.info("%s: ready %.3fs after the request (%s)", node.hostname, loop.time() - t0,
                     observe_phases(node, "pool"))
        return node

    async def _pool_node(self, group: HostGroup, spec: NodeSpec) -> Node:
        """A new node for ``group``'s warm pool: the group's size and image, a name and an address."""
        await self._choose_image(group, spec, inherited=False)
        return await self._new_node(group, None, None, group.vcpu, group.ram, False, spec, kind=NodeKind.POOL)

    @staticmethod
    def _size(group: HostGroup, cpus: int | None, ram_bytes: int | None) -> tuple[int, int]:
        cpus = cpus or group.vcpu
        ram = ram_bytes or group.ram
        if cpus > group.vcpu:
            raise BadRequest(f"cpus {cpus} exceeds the host group's limit of {group.vcpu}", ErrorCode.LIMIT_EXCEEDED)
        if ram > group.ram:
            raise BadRequest(f"ram_bytes {ram} exceeds the host group's limit of {group.ram}", ErrorCode.LIMIT_EXCEEDED)
        if ram < MIN_RAM:
            raise BadRequest("ram_bytes must be at least 64 MiB", ErrorCode.INVALID_SIZE)
        return cpus, ram

    async def _choose_image(self, group: HostGroup, spec: NodeSpec, inherited: bool) -> dict | None:
        """Set ``spec.image`` (a request's ``disk_image``, else the group's); the group's image.
        ``inherited``: a live fork's copy, which boots its source's (None: the project's)."""
        requested, spec.disk_image = spec.disk_image, None
        inherited = inherited or bool(spec.parent_commit)  # so does a commit's child
        if inherited or requested:
            group_image = self.images.groups.get(group.name)  # the group's may be unavailable
            if requested and not inherited:
                spec.image = await self.images.request_choice(requested, group)
        elif group_image := self.images.group_choice(group.name):
            spec.image = dict(group_image)
        if spec.image:
            spec.image = await self.images.present(spec.image)
        return group_image

    async def _new_node(self, group: HostGroup, hostname: str | None, ip: str | None, cpus: int, ram: int,
                        persistent: bool, spec: NodeSpec, kind: NodeKind = NodeKind.SANDBOX) -> Node:
        """A name, an address and a record for a new VM, registered (not yet booted)."""
        async with self._alloc:
            hostname, addr = self._allocate(group, hostname, ip)
            disk = (self.registry.persistent_disk(hostname) if persistent
                    else self.registry.run_dir(hostname) / "disk.qcow2")
            rec = NodeRecord(
                hostname=hostname, hostgroup=group.name, kind=kind, ip=addr, cpus=cpus,
                ram_bytes=ram, persistent=persistent, created_at=now_rfc3339(), disk=str(disk), spec=spec,
            )
            remove_disk(disk)  # a leftover with no record is not anyone's disk
            self.store.put(rec)  # first: a record that cannot be written (a full disk) leaves no node
            return self.registry.add(Node(rec, self.registry.run_dir(hostname)))

    def _free_ip(self, group: HostGroup, used: set[str]) -> str:
        addressing = self.net.group(group.name).addressing
        ip = addressing.free(used)
        if ip is None:
            raise Conflict(f"host group {group.name} has no free address in {addressing.network}",
                           ErrorCode.NO_FREE_ADDRESS)
        return ip

    def _allocate(self, group: HostGroup, hostname: str | None, ip: str | None) -> tuple[str, str]:
        """The new VM's hostname and address: the ones asked for (checked) or the next free."""
        used_ips = self.registry.used_ips()
        if hostname is not None:
            if not HOSTNAME_RE.fullmatch(hostname):
                raise BadRequest(f"invalid hostname {hostname!r}", ErrorCode.INVALID_HOSTNAME)
            if hostname in self.nodes:
                raise Conflict(f"VM {hostname!r} already exists", ErrorCode.EXISTS)
            if hostname in RESERVED_NAMES:
                raise BadRequest(f"{hostname!r} is a reserved name", ErrorCode.INVALID_HOSTNAME)
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
                raise BadRequest(f"invalid ip {ip!r}", ErrorCode.INVALID_IP) from None
            addressing = self.net.group(group.name).addressing
            if str(addr) not in addressing:
                raise BadRequest(f"ip {ip} is not one of host group {group.name}'s VM addresses "
                                 f"({addressing.network})", ErrorCode.INVALID_IP)
            if str(addr) in used_ips:
                raise Conflict(f"ip {ip} is already in use", ErrorCode.IP_IN_USE)
            return hostname, str(addr)
        return hostname, self._free_ip(group, used_ips)

    # -- logs, agent, stats --------------------------------------------------------------------
    def logs(self, hostname: str, lines: int) -> str:
        node = self.registry.get(hostname)
        if lines < 0:
            raise BadRequest("lines must be 0 (everything) or more", ErrorCode.INVALID_LINES)
        return console_tail(node.run_dir / "console.log", hostname, lines)

    async def agent(self, hostname: str, wait: float = AGENT_WAIT) -> AgentClient:
        """The agent of a running VM once it is set up: a call made while the VM boots (or is
        restored, or set up) waits for that, up to ``wait`` seconds, without touching the VM
        meanwhile. 404 unknown, 409 paused or stopped, 503 if its agent has not come in time."""
        node = self.registry.get(hostname)
        await node.until_set_up(wait)
        return node.running_agent()

    async def open_exec(self, hostname: str, params: list[tuple[str, str]], stdin=None):
        """Start a command in the VM; returns the agent's streamed response (caller closes it)."""
        if not any(k == "cmd" and v for k, v in params):
            raise BadRequest("cmd is required", ErrorCode.INVALID_REQUEST)
        return await (await self.agent(hostname)).open_exec(params, stdin)

    async def open_stream(self, hostname: str, target: str) -> Stream:
        """A byte stream to ``target`` inside the VM: ``port``, ``host:port`` or ``unix:/path``."""
        if not FORWARD_TARGET.fullmatch(target):
            raise BadRequest(f"target {target!r} must be host:port, a port, or unix:/path", ErrorCode.INVALID_TARGET)
        agent = await self.agent(hostname)
        try:
            return await agent.channel.open(target, timeout=15.0)
        except ChannelError as e:
            raise UpstreamUnreachable(f"cannot reach {target} in {hostname}: {e}") from e

    async def node_stats(self, node: Node, timeout: float = 5.0) -> dict:
        """The node's view plus its meter snapshot, or an ``error`` if the agent does not answer."""
        view = node.view()
        try:
            agent = node.running_agent()
            snapshot = await asyncio.wait_for(agent.stats(timeout=timeout), timeout)
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
        """The agent's health now: never waits for a VM that boots (it is how clients find out).
        Uptimes go out in nanoseconds, as Slicer's Go agent sends a ``time.Duration`` (the Go SDK
        reads them so), with whole seconds beside them; ``ip`` is the VM's address."""
        node = self.registry.get(hostname)
        # 30 s: a running agent that is busy (dozens of execs starting under TCG) still answers
        answer: dict = dict(await node.running_agent().health(timeout=30.0))
        for key in ("agent_uptime", "system_uptime"):
            seconds = answer.get(key)
            if isinstance(seconds, int) and not isinstance(seconds, bool) and 0 <= seconds < 1 << 33:
                answer[key], answer[f"{key}_seconds"] = seconds * 1_000_000_000, seconds
            else:  # the guest's word, unusable: no uptime rather than a wrong one
                answer[key], answer[f"{key}_seconds"] = 0, 0
        answer["ip"] = node.record.ip or ""
        return answer
