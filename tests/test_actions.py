"""The node-level action table and the node state it is checked against (no VM needed:
these are the lifecycle's rules; tests with real VMs show each action doing its work)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest

from slicer.core.actions import ALLOWED, NodeAction, NodeState, check
from slicer.core.errors import Conflict, NotFound
from slicer.core.node import Node
from slicer.core.records import NodeKind, NodeSpec, Suspended
from slicer.core.state import NodeRecord
from slicer.vmm.base import VMState


def node(**record) -> Node:
    rec = NodeRecord(hostname="vm-1", hostgroup="vm", kind=NodeKind.SANDBOX, ip="192.168.1.2", cpus=1,
                     ram_bytes=256 << 20, persistent=False, created_at="", disk="/nonexistent", spec=NodeSpec(),
                     **record)
    return Node(rec, Path("/nonexistent"))


def with_vm(n: Node, state: VMState, exit_code: int | None = None) -> Node:
    n.vm = SimpleNamespace(state=state, exit_code=exit_code)  # the fields Node.state reads
    n.agent = SimpleNamespace()
    return n


def test_every_action_has_a_row_and_every_refusal_a_reason():
    assert set(ALLOWED) == set(NodeAction)
    for action in NodeAction:
        for state in NodeState:
            if state in ALLOWED[action]:
                check(action, state, "vm-1")
                continue
            with pytest.raises((Conflict, NotFound)) as e:
                check(action, state, "vm-1")
            assert e.value.message.startswith(("vm-1 ", "VM 'vm-1'")) and e.value.code


@pytest.mark.parametrize(("action", "state", "code"), [
    (NodeAction.AGENT, NodeState.PAUSED, "paused"),
    (NodeAction.AGENT, NodeState.SUSPENDED, "suspended"),
    (NodeAction.AGENT, NodeState.STOPPED, "not_running"),
    (NodeAction.AGENT, NodeState.STOPPING, "stopping"),
    (NodeAction.PAUSE, NodeState.PAUSED, "invalid_state"),
    (NodeAction.RESUME, NodeState.RUNNING, "invalid_state"),
    (NodeAction.RESTORE, NodeState.RUNNING, "not_suspended"),
    (NodeAction.SUSPEND, NodeState.SUSPENDED, "suspended"),
    (NodeAction.RELAUNCH, NodeState.RUNNING, "running"),
    (NodeAction.LAUNCH, NodeState.DELETED, "deleted"),
    (NodeAction.DELETE, NodeState.DELETED, "vm_not_found"),
    (NodeAction.SHUTDOWN, NodeState.SUSPENDED, "suspended"),
])
def test_refusals_carry_the_codes_clients_match(action, state, code):
    with pytest.raises((Conflict, NotFound)) as e:
        check(action, state, "vm-1")
    assert e.value.code == code


def test_state_is_derived_from_the_record_the_process_and_the_action():
    assert node().state == NodeState.STOPPED
    assert node(suspended=Suspended.API).state == NodeState.SUSPENDED
    assert with_vm(node(), VMState.RUNNING).state == NodeState.RUNNING
    assert with_vm(node(), VMState.PAUSED).state == NodeState.PAUSED
    assert with_vm(node(), VMState.STARTING).state == NodeState.STARTING
    assert with_vm(node(), VMState.STOPPED, exit_code=0).state == NodeState.STOPPED
    assert with_vm(node(), VMState.STOPPED, exit_code=-9).state == NodeState.CRASHED
    stopped_by_us = with_vm(node(), VMState.STOPPED, exit_code=-9)
    stopped_by_us.stopping = True
    assert stopped_by_us.state == NodeState.STOPPED
    going = with_vm(node(), VMState.RUNNING)
    going.stopping = True
    assert going.state == NodeState.STOPPING and going.status == "Stopping"
    booting = node()
    booting.operation = NodeAction.LAUNCH
    assert booting.state == NodeState.STARTING
    saving = with_vm(node(), VMState.RUNNING)
    saving.operation = NodeAction.SUSPEND
    assert saving.state == NodeState.SUSPENDING
    gone = with_vm(node(), VMState.RUNNING)
    gone.deleted = True
    assert gone.state == NodeState.DELETED


def test_agent_is_refused_with_the_reason():
    n = with_vm(node(), VMState.PAUSED)
    with pytest.raises(Conflict) as e:
        n.running_agent()
    assert e.value.code == "paused"
    n = with_vm(node(), VMState.RUNNING)
    n.identity_pending = True
    with pytest.raises(Conflict) as e:
        n.running_agent()
    assert e.value.code == "starting"
    assert n.running_agent(setup=True) is n.agent


def test_actions_run_one_at_a_time_and_check_the_state_they_find():
    """A delete that arrives during a create runs after it; a create that finds its node
    deleted starts nothing."""
    async def main() -> list[str]:
        n = node()
        order: list[str] = []

        async def launch() -> None:
            async with n.act(NodeAction.LAUNCH):
                order.append(f"launch sees {n.state}")
                await asyncio.sleep(0.05)
                with_vm(n, VMState.RUNNING)
                order.append("launched")

        async def delete() -> None:
            await asyncio.sleep(0.01)
            async with n.act(NodeAction.DELETE):
                order.append(f"delete sees {n.state}")
                n.deleted = True

        await asyncio.gather(launch(), delete())
        try:
            async with n.act(NodeAction.LAUNCH):
                order.append("launched again")
        except Conflict as e:
            order.append(e.code)
        return order

    assert asyncio.run(main()) == ["launch sees Starting", "launched", "delete sees Deleting", "deleted"]
