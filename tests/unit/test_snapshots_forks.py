"""Suspend, restore, relaunch, live forks and concurrent requests, on the fake driver."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from slicer.core.errors import BadRequest, Conflict, NotFound, SlicerError
from slicer.core.templates import Template
from slicer.vmm.base import LAYOUT
from tests.unit.conftest import Lab, create_args


async def test_suspend_saves_the_vm_and_restore_brings_it_back(lab: Lab):
    m = await lab.daemon()
    node = await m.create("cold", **create_args())
    await m.snapshots.suspend(node.hostname)
    state = lab.data_dir / "snapshots" / f"{node.hostname}.state"
    assert node.status == "Suspended" and state.exists() and node.vm is None
    await m.snapshots.restore(node.hostname, wait="agent", timeout=5)
    assert node.status == "Running" and node.boot == "suspend" and not state.exists()
    assert node.record.suspended == ""


async def test_suspend_and_restore_follow_the_state_table(lab: Lab):
    m = await lab.daemon()
    node = await m.create("cold", **create_args())
    with pytest.raises(Conflict) as e:
        await m.snapshots.restore(node.hostname, wait=None, timeout=5)
    assert e.value.code == "not_suspended"
    await m.snapshots.suspend(node.hostname)
    with pytest.raises(Conflict) as e:
        await m.snapshots.suspend(node.hostname)
    assert e.value.code == "suspended"
    with pytest.raises(Conflict) as e:
        await m.power.pause(node.hostname)
    assert e.value.code == "suspended"


async def test_a_suspended_vm_whose_state_is_gone_cannot_be_restored(lab: Lab):
    m = await lab.daemon()
    node = await m.create("cold", **create_args())
    await m.snapshots.suspend(node.hostname)
    (lab.data_dir / "snapshots" / f"{node.hostname}.state").unlink()
    with pytest.raises(SlicerError) as e:
        await m.snapshots.restore(node.hostname, wait=None, timeout=5)
    assert e.value.code == "state_missing"


async def test_relaunching_a_suspended_vm_discards_its_memory(lab: Lab):
    m = await lab.daemon()
    node = await m.create("cold", **create_args(persistent=True))
    await m.snapshots.suspend(node.hostname)
    await m.snapshots.relaunch(node.hostname, wait="agent", timeout=5)
    assert node.boot == "boot" and node.record.suspended == ""
    assert not (lab.data_dir / "snapshots" / f"{node.hostname}.state").exists()


async def test_relaunching_a_running_vm_is_refused(lab: Lab):
    m = await lab.daemon()
    with pytest.raises(Conflict) as e:
        await m.snapshots.relaunch("svc-1", wait=None, timeout=5)
    assert e.value.code == "running"


async def test_a_save_that_fails_leaves_the_vm_running(lab: Lab, monkeypatch):
    from slicer.vmm.base import VMMError

    m = await lab.daemon()
    node = await m.create("cold", **create_args())

    async def broken(path: Path) -> None:
        raise VMMError("disk full")

    monkeypatch.setattr(lab.host.vm(node.hostname), "save", broken)
    with pytest.raises(SlicerError) as e:
        await m.snapshots.suspend(node.hostname)
    assert e.value.code == "suspend_failed" and node.status == "Running"


async def test_storage_counts_templates_nodes_and_kept_disks(lab: Lab):
    m = await lab.daemon()
    clone = await m.create("sbx", **create_args())
    kept = await m.create("sbx", **create_args(persistent=True))
    await m.power.delete("sbx", kept.hostname)
    usage = m.snapshots.storage()
    # the services' template: both map its RAM; the sandboxes': the clone (the deleted VM had a copy)
    assert sorted((t["hostgroup"], t["clones"]) for t in usage["templates"]) == [("sbx", 1), ("svc", 2)]
    assert {n["hostname"] for n in usage["nodes"]} == {"svc-1", "svc-2", clone.hostname}
    assert [Path(k["disk"]).name for k in usage["kept_disks"]] == [f"{kept.hostname}.qcow2"]


async def test_build_template_on_request(lab: Lab):
    m = await lab.daemon()
    described = await m.snapshots.build_template("sbx")
    assert described["hostgroup"] == "sbx" and described["clones"] == 0 and not described["retired"]
    with pytest.raises(Conflict) as e:
        await m.snapshots.build_template("cold")
    assert e.value.code == "boot_cold"
    with pytest.raises(NotFound):
        await m.snapshots.build_template("nope")


async def test_a_template_that_cannot_be_built_makes_creates_boot_cold(lab: Lab):
    m = await lab.daemon()
    lab.host.fail_next_start.append("no template for you")
    node = await m.create("sbx", **create_args())
    assert node.boot == "boot" and node.record.template == ""


async def test_the_last_clone_of_a_superseded_template_takes_it_along(lab: Lab):
    m = await lab.daemon()
    first = await m.create("sbx", **create_args())
    old = m.templates.root / first.record.template
    m.templates.retire(m.templates.current(m.group("sbx")), "superseded in this test")
    second = await m.create("sbx", **create_args())
    assert second.record.template != first.record.template and old.exists()
    await m.power.delete("sbx", first.hostname)
    assert not old.exists()


# -- live forks -------------------------------------------------------------------------------------
async def test_a_live_fork_makes_running_copies_and_the_source_goes_on(lab: Lab):
    m = await lab.daemon()
    source = await m.create("sbx", **create_args(spec={"tags": ["a"]}))
    copies = await m.forks.fork(source.hostname, 2, ["b"], wait="agent", timeout=10)
    assert len(copies) == 2 and source.status == "Running"
    assert "capture" in lab.host.vm(source.hostname).actions
    for copy in copies:
        assert copy.status == "Running" and copy.boot == "template"
        assert copy.record.tags == ["a", "b"] and copy.record.spec.forked_from == source.hostname
        assert lab.host.vm(copy.hostname).guest.called("identity")[0]["hostname"] == copy.hostname
    snapshot = copies[0].record.template
    assert "-fork-" in snapshot and copies[1].record.template == snapshot
    assert m.templates.base_of(snapshot) == source.record.template, "the copies' disks rest on it"
    for copy in copies:
        await m.power.delete("sbx", copy.hostname)
    assert not (m.templates.root / snapshot).exists()  # gone with its last copy


async def test_a_fork_of_a_vm_on_a_disk_of_its_own_rests_on_no_template(lab: Lab):
    m = await lab.daemon()
    (copy,) = await m.forks.fork("svc-1", 1, [], wait="agent", timeout=10)
    assert m.get("svc-1").record.template and m.templates.base_of(copy.record.template) == ""


async def test_a_fork_is_all_or_nothing(lab: Lab):
    m = await lab.daemon()
    source = await m.create("sbx", **create_args())
    before = set(m.nodes)
    lab.host.fail_next_start.extend([None, None, "the second copy fails", "and so does its cold boot"])
    with pytest.raises(SlicerError):
        await m.forks.fork(source.hostname, 2, [], wait="agent", timeout=10)
    assert set(m.nodes) == before
    assert not [t for t in m.templates.root.iterdir() if "-fork-" in t.name]


@pytest.mark.parametrize("count", [0, 33])
async def test_a_fork_count_out_of_range_is_400(lab: Lab, count: int):
    m = await lab.daemon()
    with pytest.raises(BadRequest) as e:
        await m.forks.fork("svc-1", count, [], wait=None, timeout=5)
    assert e.value.code == "invalid_count"


async def test_a_fork_the_host_has_no_memory_for_is_refused(lab: Lab):
    m = await lab.daemon()
    m.forks.free_memory = lambda: 100 << 20
    with pytest.raises(Conflict) as e:
        await m.forks.fork("svc-1", 1, [], wait=None, timeout=5)
    assert e.value.code == "insufficient_memory"
    assert "capture" not in lab.host.vm("svc-1").actions


async def test_a_stopped_vm_cannot_be_forked(lab: Lab):
    m = await lab.daemon()
    node = await m.create("cold", **create_args(persistent=True))
    await m.power.shutdown(node.hostname, "shutdown")
    await node.exited.wait()
    with pytest.raises(Conflict) as e:
        await m.forks.fork(node.hostname, 1, [], wait=None, timeout=5)
    assert e.value.code == "not_running"


# -- races ------------------------------------------------------------------------------------------
async def test_concurrent_creates_get_distinct_names_and_addresses_and_one_template(lab: Lab):
    m = await lab.daemon()
    nodes = await asyncio.gather(*(m.create("sbx", **create_args()) for _ in range(6)))
    assert len({n.hostname for n in nodes}) == 6 and len({n.record.ip for n in nodes}) == 6
    assert len([vm for vm in lab.host.started if vm.spec.name.startswith("tpl-sbx")]) == 1


async def test_a_delete_during_a_create_waits_and_leaves_nothing(lab: Lab):
    m = await lab.daemon()
    create = asyncio.create_task(m.create("cold", **create_args()))
    async with asyncio.timeout(5):
        while "cold-1" not in m.nodes:
            await asyncio.sleep(0)
    deleted = await m.power.delete("cold", "cold-1")
    with pytest.raises(SlicerError):
        await create
    assert deleted is True and "cold-1" not in m.nodes
    assert all(vm.state.value == "stopped" for vm in lab.host.started if vm.spec.name == "cold-1")
    assert "cold-1" not in m.net.group("cold").links


async def test_two_deletes_of_one_vm_remove_it_once(lab: Lab):
    m = await lab.daemon()
    node = await m.create("cold", **create_args())
    results = await asyncio.gather(m.power.delete("cold", node.hostname), m.power.delete("cold", node.hostname),
                                   return_exceptions=True)
    assert results.count(True) == 1
    assert [type(r) for r in results if r is not True] == [NotFound]


async def test_a_pause_that_waited_for_a_delete_finds_nothing(lab: Lab):
    m = await lab.daemon()
    node = await m.create("cold", **create_args())
    results = await asyncio.gather(m.power.delete("cold", node.hostname), m.power.pause(node.hostname),
                                   return_exceptions=True)
    assert results[0] is True and isinstance(results[1], NotFound)


# -- machine layouts (the bulk port) ----------------------------------------------------------------
async def test_a_vm_keeps_the_layout_its_saved_state_has_until_it_boots_cold(lab: Lab):
    """A VM an older daemon booted (layout 0: no bulk port) restores its own state, and is forked
    live, in that layout; a cold boot, a template's clone and a new VM get today's."""
    m = await lab.daemon()
    new = await m.create("sbx", **create_args())
    assert new.record.spec.layout == LAYOUT and lab.host.vm(new.hostname).spec.bulk
    old = await m.create("cold", **create_args(persistent=True))
    old.record.spec.layout = None  # as an older daemon recorded it
    m.store.put(old.record)
    await m.snapshots.suspend(old.hostname)
    await m.snapshots.restore(old.hostname, wait="agent", timeout=5)
    assert lab.host.vm(old.hostname).spec.layout == 0 and not old.record.spec.layout
    copies = await m.forks.fork(old.hostname, 1, [], wait="agent", timeout=10)
    assert lab.host.vm(copies[0].hostname).spec.layout == 0  # the captured state's layout
    assert Template.load(m.templates.root / copies[0].record.template).layout == 0
    await m.power.shutdown(old.hostname, "shutdown")
    await m.snapshots.relaunch(old.hostname, wait="agent", timeout=5)  # a cold boot: today's layout
    assert lab.host.vm(old.hostname).spec.layout == LAYOUT and old.record.spec.layout == LAYOUT


async def test_a_restore_right_after_a_suspend_keeps_its_network_link(lab: Lab, monkeypatch):
    """The watcher of the saved VM removes its link too. A bridge's detach forgets the TAP at once
    and deletes the device (by name) a moment later: a restore that came in meanwhile got the same
    name and lost its new TAP to that late deletion (a 500, network_failed)."""
    m = await lab.daemon()
    node = await m.create("cold", **create_args())
    gnet = m.net.group("cold")
    detach = gnet.detach

    async def late_delete(name: str, ip: str, run_dir: Path) -> None:
        linked = name in gnet.links
        await detach(name, ip, run_dir)
        if linked:
            await asyncio.sleep(0.1)  # `ip link del`, spawned on a busy host
            gnet.links.pop(name, None)

    vm = lab.host.vm(node.hostname)
    save = vm.save

    async def save_and_quit(path: Path) -> None:  # as QEMU's: the watcher sees the exit before it returns
        await save(path)
        for _ in range(3):
            await asyncio.sleep(0)

    monkeypatch.setattr(gnet, "detach", late_delete)
    monkeypatch.setattr(vm, "save", save_and_quit)
    await m.snapshots.suspend(node.hostname)
    await m.snapshots.restore(node.hostname, wait="agent", timeout=5)
    await asyncio.sleep(0.3)
    assert node.hostname in gnet.links and node.status == "Running"


async def test_a_relaunch_keeps_its_link_from_the_crashed_vms_late_watcher(lab: Lab, monkeypatch):
    """A crashed VM's watcher can wake while a relaunch is starting the new VM (the node's VM is
    still the old one until it runs): it must leave the link the relaunch attached."""
    from slicer.vmm.fake import FakeDriver, FakeVM

    m = await lab.daemon()
    m.net.strict = False  # as a bridge: an attach first removes what is left of the old link
    node = await m.create("cold", **create_args(persistent=True))
    gnet = m.net.group("cold")
    wait, start = FakeVM.wait, FakeDriver.start

    async def late_wait(self: FakeVM) -> int:  # QEMU's: the QMP and console tasks end first
        code = await wait(self)
        await asyncio.sleep(0.1)
        return code

    async def slow_start(self: FakeDriver, spec, restore_from=None):
        vm = await start(self, spec, restore_from)
        await asyncio.sleep(0.3)  # the old watcher wakes meanwhile
        return vm

    monkeypatch.setattr(FakeVM, "wait", late_wait)
    lab.host.vm(node.hostname).end(1)  # a crash
    monkeypatch.setattr(FakeDriver, "start", slow_start)
    await m.snapshots.relaunch(node.hostname, wait="agent", timeout=5)
    await asyncio.sleep(0.2)
    assert node.status == "Running" and node.hostname in gnet.links
