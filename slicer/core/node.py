"""A node: its record (what should exist) joined to its VM and agent (what does exist)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from slicer.channel.host import Channel, ChannelError
from slicer.core.agent import AgentClient
from slicer.core.errors import AgentUnreachable, Conflict, WaitTimeout
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
        self.busy = asyncio.Lock()  # serialises lifecycle actions on this node
        self.last_snapshot: dict | None = None  # the meter's latest, for /metrics
        self.provisioned = asyncio.Event()  # set once this boot's secrets/keys/userdata are handed over
        self.rebooted = asyncio.Event()
        self.exited = asyncio.Event()  # the VM's process ended and what it held on the host is released
        self.warnings: list[str] = []  # e.g. SSH keys that could not be fetched
        # How the running VM came to be: "boot", "template" (restored from the group's
        # template), "suspend" (restored from its own saved state) or "adopted" (left running
        # by an earlier daemon); "template" and "suspend" need the guest's identity reset first.
        self.boot = "boot"
        self.identity_pending = False
        self.setup_error: str | None = None  # set when this boot's setup failed

    @property
    def hostname(self) -> str:
        return self.record.hostname

    @property
    def is_service(self) -> bool:
        return self.record.kind == "service"

    def attach(self, vm: VM, boot: str = "boot") -> None:
        self.vm = vm
        self.agent = AgentClient(Channel(str(vm.spec.channel_socket)))
        self.boot = boot
        self.identity_pending = boot in ("template", "suspend")  # not "boot", nor "adopted" (running on)
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
    def status(self) -> str:
        if self.record.suspended:
            return "Suspended"
        if self.vm is None:
            return "Stopped"
        state = self.vm.state
        if state == VMState.STOPPED:
            return "Stopped" if self.stopping or self.vm.exit_code == 0 else "Crashed"
        return {VMState.RUNNING: "Running", VMState.PAUSED: "Paused", VMState.STARTING: "Starting"}[state]

    def running_agent(self, setup: bool = False) -> AgentClient:
        """The agent of a VM that can answer now, or a clear error why not. A restored VM is
        not handed out before it has its own identity, except to the setup doing that."""
        if self.record.suspended:
            raise Conflict(f"{self.hostname} is suspended; restore it first", "suspended")
        if self.vm is None or self.agent is None or self.vm.state == VMState.STOPPED:
            raise Conflict(f"{self.hostname} is not running", "not_running")
        if self.vm.state == VMState.PAUSED:
            raise Conflict(f"{self.hostname} is paused; resume it first", "paused")
        if self.identity_pending and not setup:
            raise Conflict(f"{self.hostname} is being restored; it answers once its identity is reset", "starting")
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
                if not userdata or answer.get("userdata_ran") or not self.record.spec.get("userdata"):
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
