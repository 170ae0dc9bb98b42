"""Warm pools on the fake driver: filling, hand-out, refill, misses, restart and stop."""

from __future__ import annotations

import asyncio

import pytest

from slicer.core import pool
from slicer.core.config import load_config
from slicer.core.errors import BadRequest, NotFound
from slicer.core.records import NodeKind
from slicer.vmm.base import HostError, VMState
from tests.unit.conftest import Lab, create_args

POOLED = """\
config:
  host_groups:
  - name: sbx
    count: 0
    vcpu: 2
    ram_mb: 512
    warm_pool: 3
    network: {gateway: 10.78.0.1/24}
  - name: plain
    count: 0
    vcpu: 1
    ram_mb: 256
    network: {gateway: 10.79.0.1/24}
  api: {bind_address: 127.0.0.1, port: 8080}
"""


async def filled(m, group: str = "sbx", n: int = 3) -> None:
    async with asyncio.timeout(10):
        while m.pool.stats()[group].ready < n:
            await asyncio.sleep(0.01)


def pooled(m) -> list:
    return [n for n in m.nodes.values() if n.record.kind == NodeKind.POOL]


async def test_the_pool_fills_with_paused_vms_nobody_sees(lab: Lab):
    m = await lab.daemon(POOLED)
    await filled(m)
    vms = pooled(m)
    assert len(vms) == 3 and all(n.vm.state == VMState.PAUSED for n in vms)
    assert all(n.boot == "template" and not n.identity_pending for n in vms)  # each is itself already
    assert m.list() == [] and m.list("sbx") == []
    with pytest.raises(NotFound):
        m.get(vms[0].hostname)
    for n in vms:  # filled with no secret at all
        assert lab.host.vm(n.hostname).guest.called("put_secrets") == [{}]
    assert m.pool.stats()["sbx"].hits == 0 and "plain" not in m.pool.stats()


async def test_a_create_takes_a_pooled_vm_and_hands_it_the_create(lab: Lab):
    m = await lab.daemon(POOLED)
    m.secrets.create({"name": "token", "data": "c2VjcmV0"})
    await filled(m)
    first = min(pooled(m), key=lambda n: n.hostname)
    node = await m.create("sbx", **create_args(spec={"userdata": "echo hi", "tags": ["ci"],
                                                       "ssh_keys": ["ssh-ed25519 AAAA k"]}, wait="userdata"))
    assert node is first and node.record.kind == NodeKind.SANDBOX and node.vm.state == VMState.RUNNING
    assert m.get(node.hostname) is node and [n.hostname for n in m.list()] == [node.hostname]
    assert [(r.hostname, r.kind) for r in m.store.all()] == [(node.hostname, NodeKind.SANDBOX)]  # pooled: unrecorded
    assert node.record.tags == ["ci"]
    guest = lab.host.vm(node.hostname).guest
    refresh = guest.called("identity")[-1]
    assert set(refresh) == {"seed", "time_ns"}  # its clock and randomness, after standing still
    assert list(guest.called("put_secrets")[-1]) == ["token"]
    assert guest.called("put_ssh_keys")[-1] == {"keys": ["ssh-ed25519 AAAA k"]}
    assert guest.called("userdata") == [{"script": "echo hi"}]
    assert {"resume", "record", "identity", "setup"} <= set(node.phases)  # a hit's own phases only
    assert "template" not in node.phases
    stats = m.pool.stats()["sbx"]
    assert stats.hits == 1 and stats.misses == 0
    await filled(m)  # refilled behind it
    assert len(pooled(m)) == 3 and node not in pooled(m)


async def test_creates_the_pool_cannot_serve_pass_it_by(lab: Lab):
    m = await lab.daemon(POOLED)
    await filled(m)
    names = {n.hostname for n in pooled(m)}
    for kw in ({"hostname": "mine"}, {"ip": "10.78.0.200"}, {"cpus": 1}, {"persistent": True},
               {"spec": {"boot": "cold"}}):
        node = await m.create("sbx", **create_args(**kw))
        assert node.hostname not in names and node.boot != "adopted"
    assert {n.hostname for n in pooled(m)} == names  # untouched
    assert m.pool.stats()["sbx"].hits == 0 and m.pool.stats()["sbx"].misses == 0


async def test_a_name_or_address_a_pooled_vm_holds_can_still_be_asked_for(lab: Lab):
    m = await lab.daemon(POOLED)
    await filled(m)
    a, b = sorted(pooled(m), key=lambda n: n.hostname)[:2]
    mine = await m.create("sbx", **create_args(hostname=a.hostname))
    other = await m.create("sbx", **create_args(ip=b.record.ip))
    assert mine is not a and mine.hostname == a.hostname and a.deleted
    assert other is not b and other.record.ip == b.record.ip and b.deleted
    await filled(m)


async def test_an_empty_pool_is_a_miss_and_the_create_restores_as_usual(lab: Lab):
    m = await lab.daemon(POOLED)
    await filled(m)
    taken = await asyncio.gather(*(m.create("sbx", **create_args()) for _ in range(5)))
    assert len({n.hostname for n in taken}) == 5
    assert len({id(n.vm) for n in taken}) == 5  # never the same VM twice
    assert all(n.vm.state == VMState.RUNNING and n.record.kind == NodeKind.SANDBOX for n in taken)
    stats = m.pool.stats()["sbx"]
    assert stats.hits == 3 and stats.misses == 2


async def test_twenty_concurrent_creates_never_share_a_vm(lab: Lab):
    m = await lab.daemon(POOLED.replace("warm_pool: 3", "warm_pool: 20"))
    await filled(m, n=20)
    taken = await asyncio.gather(*(m.create("sbx", **create_args()) for _ in range(20)))
    assert len({n.hostname for n in taken}) == 20 and len({n.record.ip for n in taken}) == 20
    assert len({n.vm.pid for n in taken}) == 20
    assert m.pool.stats()["sbx"].hits == 20


async def test_a_pooled_vm_that_died_is_not_handed_out(lab: Lab):
    m = await lab.daemon(POOLED)
    await filled(m)
    dead = min(pooled(m), key=lambda n: n.hostname)
    lab.host.vm(dead.hostname).end(-9)
    node = await m.create("sbx", **create_args())
    assert node is not dead and node.vm.state == VMState.RUNNING
    await filled(m)


async def test_a_restarted_daemon_discards_the_old_pool_and_fills_a_new_one(lab: Lab):
    m = await lab.daemon(POOLED)
    await filled(m)
    kept = await m.create("sbx", **create_args())
    await filled(m)
    old = {n.hostname: n.vm.pid for n in pooled(m)}
    await lab.crash(m)
    m2 = await lab.daemon(POOLED)
    assert [n.hostname for n in m2.list()] == [kept.hostname]  # the sandbox is adopted
    await filled(m2)
    running = {vm.pid for vm in lab.host.processes.values()}
    assert not running & set(old.values())  # the old pool's QEMUs were stopped
    assert all(n.vm.pid not in old.values() for n in pooled(m2))


async def test_the_pool_goes_on_filling_after_any_error(lab: Lab, monkeypatch):
    monkeypatch.setattr(pool, "RETRY_AFTER", 0.01)
    # the template's build goes through; the first two restores from it fail
    lab.host.fail_next_start.extend([None, RuntimeError("a bug"), HostError("cannot make its cgroup: File exists")])
    m = await lab.daemon(POOLED)
    await filled(m)  # its one filler lived through both
    assert not lab.host.fail_next_start


async def test_stop_removes_the_pool(lab: Lab):
    m = await lab.daemon(POOLED)
    await filled(m)
    await m.stop()
    lab.managers.remove(m)
    assert not lab.host.processes  # every pooled VM ended with the daemon


def test_a_cold_group_cannot_have_a_pool():
    with pytest.raises(BadRequest, match="warm_pool"):
        load_config(POOLED.replace("warm_pool: 3", "warm_pool: 3\n    boot: cold"))
