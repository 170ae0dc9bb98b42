"""A node: its record (what should exist) joined to its VM and agent (what does exist)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from slicer.channel.bulk import BulkLink
from slicer.channel.host import Channel, ChannelError
from slicer.core.actions import NodeAction, NodeState, check
from slicer.core.agent import AgentClient
from slicer.core.error_codes import ErrorCode
from slicer.core.errors import AgentUnreachable, Conflict, WaitTimeout
from slicer.core.records import BootKind, NodeKind
from slicer.core.state import NodeRecord
from slicer.vmm.base import VM, VMState

ARCH = "x86_64"


def host_index(hostname: str) -> int:
    """N of ``<group>-<N>`` (0 when the name has no number)."""
    tail = hostname.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class Node:
    def __init__(self, record: NodeRecord, run_dir: Path) -> None:
        self.record = record
        self.run_dir = run_dir
        self.vm: VM | None = None
        self.agent: AgentClient | None = None
        self.stopping = False  # a stop we asked for: its exit is not a crash
        self.busy = asyncio.Lock()  # serialises lifecycle actions on this node (see act)
        self.link = asyncio.Lock()  # serialises attaching and removing its network link
        self.link_serial = 0  # counts its link's attaches and removals (see Lifecycle.detach)
        self.operation: NodeAction | None = None  # the action holding ``busy``
        self.deleted = False
        self.last_snapshot: dict | None = None  # the meter's latest, for /metrics
        self.provisioned = asyncio.Event()  # set once this boot's secrets/keys/userdata are handed over
        self.rebooted = asyncio.Event()
        self.exited = asyncio.Event()  # the VM's process ended and what it held on the host is released
        self.warnings: list[str] = []  # e.g. SSH keys that could not be fetched
        self.boot = BootKind.BOOT  # how the running VM came to be
        self.identity_pending = False
        self.setup_error: str | None = None  # set when this boot's setup failed
        self.phases: dict[str, float] = {}  # seconds of each phase of its latest start (see telemetry)
        self.creating = False  # a create is choosing its template: Starting, though no launch holds it yet

    @property
    def hostname(self) -> str:
        return self.record.hostname

    @property
    def is_service(self) -> bool:
        return self.record.kind == NodeKind.SERVICE

    def attach(self, vm: VM, boot: BootKind = BootKind.BOOT) -> None:
        self.vm = vm
        self.agent = AgentClient(Channel(str(vm.spec.channel_socket)),
                                 bulk=BulkLink(vm.spec.bulk_sockets) if vm.spec.bulk else None)
        self.boot = boot
        self.identity_pending = boot.needs_identity or self.record.identity_pending
        self.setup_error = None
        self.provisioned.clear()
        self.exited.clear()
        vm.on_reset = self._on_reset

    def _on_reset(self) -> None:
        # After a reboot or reset the guest's end of the channel starts over, and what the
        # host sets up after a boot (secrets on tmpfs, keys) must be set up again.
        assert self.agent is not None
        self.agent.channel.disconnect()
        self.provisioned.clear()
        self.rebooted.set()

    @property
    def state(self) -> NodeState:
        """Derived from what is true now (the record, the VMM process, the action under way),
        so it cannot drift from it."""
        if self.deleted:
            return NodeState.DELETED
        if self.operation == NodeAction.DELETE:
            return NodeState.DELETING
        if self.operation == NodeAction.SUSPEND:
            return NodeState.SUSPENDING
        if self.record.suspended:
            return NodeState.SUSPENDED
        vm = self.vm
        if vm is None or vm.state == VMState.STOPPED:
            if self.operation in (NodeAction.LAUNCH, NodeAction.RESTORE, NodeAction.RELAUNCH) or self.creating:
                return NodeState.STARTING
            if vm is None or self.stopping or vm.exit_code == 0:
                return NodeState.STOPPED
            return NodeState.CRASHED
        if self.stopping:
            return NodeState.STOPPING
        return {VMState.RUNNING: NodeState.RUNNING, VMState.PAUSED: NodeState.PAUSED,
                VMState.STARTING: NodeState.STARTING}[vm.state]

    @property
    def status(self) -> str:
        return self.state.value

    def check(self, action: NodeAction) -> None:
        check(action, self.state, self.hostname)

    @contextlib.asynccontextmanager
    async def act(self, action: NodeAction) -> AsyncIterator[None]:
        """Run ``action`` alone on this node: wait for the one under way, then check that the
        node's state (as that action left it) allows this one."""
        async with self.busy:
            self.check(action)
            self.operation = action
            try:
                yield
            finally:
                self.operation = None

    async def until_set_up(self, timeout: float) -> None:
        """Wait while the VM starts or its guest is being set up (after a boot, a restore, a
        reset); return at once in any other state (the caller's check says what it allows)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Polled as well as awaited: a create that fails, or a delete, ends the wait too.
        while self.state in (NodeState.STARTING, NodeState.RUNNING) and not self.provisioned.is_set():
            if (left := deadline - loop.time()) <= 0:
                raise AgentUnreachable(f"{self.hostname} is running but its agent has not answered within "
                                       f"{timeout:g}s (still booting? its console: GET /vm/{self.hostname}/logs)")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.provisioned.wait(), min(left, 0.25))

    def running_agent(self, setup: bool = False) -> AgentClient:
        """The agent of a VM that can answer now, or a clear error why not. A restored VM is
        not handed out before it has its own identity, except to the setup doing that."""
        self.check(NodeAction.AGENT)
        if self.identity_pending and not setup:
            raise Conflict(f"{self.hostname} is being restored; it answers once its identity is reset",
                           ErrorCode.STARTING)
        assert self.agent is not None
        return self.agent

    async def wait_ready(self, timeout: float, userdata: bool = False, health: bool = True) -> dict:
        """Wait until the agent answers health (and userdata has run, if asked); with
        ``health=False``, until the channel handshake is done (the guest answered HELLO)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last = "no answer yet"
        while (left := deadline - loop.time()) > 0:
            if self.vm is None or self.vm.state == VMState.STOPPED:
                code = self.vm.exit_code if self.vm else None
                raise AgentUnreachable(f"{self.hostname} stopped while booting (QEMU exit {code})")
            try:
                agent = self.running_agent(setup=True)
                await agent.channel.session(timeout=min(left, 5.0))
                if not health:
                    return {}
                answer = await agent.health(timeout=min(left, 5.0))
                if not userdata or answer.get("userdata_ran") or not self.record.spec.userdata:
                    return answer
                last = "userdata has not finished"
            except (AgentUnreachable, ChannelError, Conflict) as e:
                last = str(e)
            await asyncio.sleep(min(0.2, max(deadline - loop.time(), 0)))
        raise WaitTimeout(f"{self.hostname} was not ready within {timeout:g}s ({last})")

    def view(self, vmm: bool = False) -> dict:
        """What the API shows; ``vmm``: also the VMM process, its confinement and cgroup usage."""
        r = self.record
        process = None
        if vmm and self.vm is not None and self.vm.state != VMState.STOPPED:
            process = {"pid": self.vm.pid, **self.vm.confinement()}
        return {
            "hostname": r.hostname,
            "hostgroup": r.hostgroup,
            "ip": r.ip,
            "ram_bytes": r.ram_bytes,
            "cpus": r.cpus,
            "created_at": r.created_at,
            "tags": r.tags,
            "arch": ARCH,
            "status": self.status,
            "persistent": r.persistent,
            "kind": r.kind,
            **({"boot": self.boot} if self.vm is not None else {}),
            **({"warnings": self.warnings} if self.warnings else {}),
            **({"vmm": process} if process is not None else {}),
            **({"last_agent_call": last.isoformat()} if self.agent and (last := self.agent.channel.last_stream_at)
               else {}),
            # The guest broke or flooded its channel and was cut off (until its next good handshake).
            **({"channel_fault": self.agent.channel.fault} if self.agent and self.agent.channel.fault else {}),
        }
