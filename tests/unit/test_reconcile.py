"""A daemon that starts after another one died (or stopped) squares its record with what runs."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.unit.conftest import CONFIG, Lab, create_args


async def test_a_new_daemon_adopts_the_vms_a_dead_one_left_running(lab: Lab):
    m = await lab.daemon()
    node = await m.create("sbx", **create_args(spec={"tags": ["keep"]}))
    vms = {h: lab.host.vm(h) for h in ("svc-1", "svc-2", node.hostname)}
    await lab.crash(m)
    m2 = await lab.daemon()
    for hostname, vm in vms.items():
        adopted = m2.get(hostname)
        assert adopted.vm is vm and adopted.boot == "adopted" and adopted.status == "Running"
    assert m2.get(node.hostname).record.tags == ["keep"]
    assert len(lab.host.started) == len(vms) + 2  # + the two template VMs: nothing booted again
    assert set(m2.net.group("sbx").links) == {node.hostname}


async def test_an_adopted_vm_answers_through_its_agent(lab: Lab):
    m = await lab.daemon()
    node = await m.create("cold", **create_args())
    await lab.crash(m)
    m2 = await lab.daemon()
    health = await m2.health(node.hostname)
    assert health["hostname"] == node.hostname


async def test_a_sandbox_whose_vmm_died_meanwhile_is_removed_with_its_disk(lab: Lab):
    m = await lab.daemon()
    node = await m.create("sbx", **create_args())
    disk = Path(node.record.disk)
    await lab.crash(m)
    lab.host.vm(node.hostname).end(-9)
    m2 = await lab.daemon()
    assert node.hostname not in m2.nodes and not disk.exists()
    assert all(r.hostname != node.hostname for r in m2.store.all())


async def test_a_persistent_vm_whose_vmm_died_is_kept_stopped(lab: Lab):
    m = await lab.daemon()
    node = await m.create("sbx", **create_args(persistent=True))
    await lab.crash(m)
    lab.host.vm(node.hostname).end(-9)
    m2 = await lab.daemon()
    kept = m2.get(node.hostname)
    assert kept.status == "Stopped" and Path(kept.record.disk).exists()
    await m2.snapshots.relaunch(node.hostname, wait="agent", timeout=5)
    assert kept.status == "Running"


async def test_a_persistent_record_without_a_disk_is_a_create_cut_short(lab: Lab):
    m = await lab.daemon()
    node = await m.create("sbx", **create_args(persistent=True))
    await lab.crash(m)
    lab.host.vm(node.hostname).end(-9)
    Path(node.record.disk).unlink()
    m2 = await lab.daemon()
    assert node.hostname not in m2.nodes


async def test_a_service_whose_vmm_died_boots_again_at_its_address(lab: Lab):
    m = await lab.daemon()
    ip = m.get("svc-2").record.ip
    await lab.crash(m)
    old = lab.host.vm("svc-2")
    old.end(-9)
    m2 = await lab.daemon()
    node = m2.get("svc-2")
    assert node.vm is not old and node.boot == "boot" and node.record.ip == ip


async def test_services_beyond_a_lower_count_retire_and_keep_their_disk(lab: Lab):
    m = await lab.daemon()
    disk = Path(m.get("svc-2").record.disk)
    vm = lab.host.vm("svc-2")
    await lab.crash(m)
    m2 = await lab.daemon(CONFIG.replace("count: 2", "count: 1"))
    async with asyncio.timeout(5):
        while vm.state.value != "stopped":
            await asyncio.sleep(0.01)
    assert "svc-2" not in m2.nodes and disk.exists()
    assert all(r.hostname != "svc-2" for r in m2.store.all())


async def test_a_vm_whose_group_left_the_config_is_stopped(lab: Lab):
    m = await lab.daemon()
    node = await m.create("cold", **create_args())
    vm = lab.host.vm(node.hostname)
    await lab.crash(m)
    without_cold = CONFIG[:CONFIG.index("  - name: cold")] + CONFIG[CONFIG.index("  api:"):]
    m2 = await lab.daemon(without_cold)
    assert vm.state.value == "stopped" and node.hostname not in m2.nodes


async def test_a_vmm_that_no_record_names_is_stopped_and_its_run_dir_removed(lab: Lab):
    m = await lab.daemon()
    node = await m.create("cold", **create_args())
    vm = lab.host.vm(node.hostname)
    await lab.crash(m)
    m.store.__init__(lab.data_dir / "state.db")  # reopen, and forget it as a crash mid-delete would
    m.store.delete(node.hostname)
    m.store.close()
    m2 = await lab.daemon()
    assert vm.state.value == "stopped" and not vm.spec.run_dir.exists()
    assert node.hostname not in m2.nodes


async def test_a_pause_someone_asked_for_survives_the_restart(lab: Lab):
    m = await lab.daemon()
    node = await m.create("cold", **create_args())
    await m.power.pause(node.hostname)
    await lab.crash(m)
    m2 = await lab.daemon()
    assert m2.get(node.hostname).status == "Paused"


async def test_a_pause_nobody_asked_for_is_resumed(lab: Lab):
    """A daemon that died between a restore and its resume leaves the vCPUs stopped."""
    m = await lab.daemon()
    node = await m.create("cold", **create_args())
    vm = lab.host.vm(node.hostname)
    await lab.crash(m)
    await vm.pause()
    m2 = await lab.daemon()
    assert m2.get(node.hostname).status == "Running"


async def test_leftovers_of_a_crash_are_removed(lab: Lab):
    m = await lab.daemon()
    await lab.crash(m)
    part = lab.data_dir / "snapshots" / "svc-1.state.part"
    part.write_text("half a state")
    building = lab.data_dir / "templates" / ".building-tpl-sbx-2c512m"
    building.mkdir()
    unfinished = lab.data_dir / "templates" / "sbx-0123-1"  # no meta.json: never finished
    unfinished.mkdir()
    await lab.daemon()
    assert not part.exists() and not building.exists() and not unfinished.exists()


async def test_suspend_on_shutdown_suspends_services_and_the_next_daemon_restores_them(lab: Lab):
    config = CONFIG.replace("  api:", "  suspend_on_shutdown: true\n  api:")
    m = await lab.daemon(config)
    before = lab.host.vm("svc-1")
    await m.stop()
    assert m.get("svc-1").record.suspended == "shutdown"
    assert (lab.data_dir / "snapshots" / "svc-1.state").exists()
    lab.managers.remove(m)
    m2 = await lab.daemon(config)
    node = m2.get("svc-1")
    assert node.boot == "suspend" and node.status == "Running" and node.vm is not before
    assert not (lab.data_dir / "snapshots" / "svc-1.state").exists()
    identity = lab.host.vm("svc-1").guest.called("identity")
    assert len(identity) == 1 and set(identity[0]) == {"seed", "time_ns"}  # fresh entropy and clock, same name


async def test_leave_running_touches_no_vm(lab: Lab):
    m = await lab.daemon()
    node = await m.create("sbx", **create_args())
    m.leave_running = True
    await m.stop()
    lab.managers.remove(m)
    assert lab.host.vm(node.hostname).state.value == "running"
    m2 = await lab.daemon()
    assert m2.get(node.hostname).boot == "adopted"


async def test_a_graceful_stop_kills_a_guest_that_ignores_the_power_button(lab: Lab, monkeypatch):
    from slicer.core import lifecycle

    monkeypatch.setattr(lifecycle, "GRACEFUL_TIMEOUT", 0.2)
    m = await lab.daemon()
    lab.host.ignore_powerdown = True
    vm = lab.host.vm("svc-1")
    await m.stop()
    assert vm.actions[-2:] == ["powerdown", "kill"] and vm.exit_code == -9


async def test_a_state_saved_by_a_suspend_that_died_before_its_record_is_removed(lab: Lab):
    """Killed between the state's rename into place and the record's ``suspended``: the VM is
    not suspended (stopped, or adopted if its QEMU lived), and the state is nobody's."""
    m = await lab.daemon()
    node = await m.create("sbx", **create_args(persistent=True))
    await lab.crash(m)
    lab.host.vm(node.hostname).end(-9)  # save's end: its QEMU quit
    state = lab.data_dir / "snapshots" / f"{node.hostname}.state"
    state.write_text("a whole state")
    m2 = await lab.daemon()
    assert not state.exists() and m2.get(node.hostname).status == "Stopped"


async def test_a_vm_adopted_before_its_identity_reset_gets_it_then(lab: Lab):
    """Its daemon died between the restore from a template and the identity reset: the record
    says so, and the next daemon gives the adopted VM the whole reset (not just a fresh clock)."""
    m = await lab.daemon()
    rec = m.get("svc-1").record
    rec.identity_pending = True  # as the record stands between the restore and the reset
    m.store.put(rec)
    await lab.crash(m)
    m2 = await lab.daemon()
    node = m2.get("svc-1")
    assert node.boot == "adopted" and node.status == "Running"
    last = lab.host.vm("svc-1").guest.called("identity")[-1]
    assert last["hostname"] == "svc-1" and last["ip"] == f"{node.record.ip}/24"
    assert "machine_id" in last and "ssh_host_keys" in last
    assert not {r.hostname: r for r in m2.store.all()}["svc-1"].identity_pending


async def test_a_suspended_services_template_is_kept_at_start(lab: Lab):
    """A service restored from a template and suspended with its daemon maps the template's RAM
    when it is restored: the next start must not remove that template first, stale or not."""
    config = CONFIG.replace("  api:", "  suspend_on_shutdown: true\n  api:")
    m = await lab.daemon(config)
    name = m.get("svc-1").record.template
    m.templates.retire(next(t for t in m.templates._all() if t.name == name), "superseded")
    await m.stop()
    lab.managers.remove(m)
    m2 = await lab.daemon(config)
    node = m2.get("svc-1")
    assert node.boot == "suspend" and node.status == "Running" and node.record.template == name
    assert (m2.templates.root / name).exists(), "its RAM maps the template's file"


async def test_a_stopped_persistent_vm_lets_go_of_its_template_at_start(lab: Lab):
    """Restored from a template on a copy of its disk, then its QEMU died with the host: the next
    daemon keeps it Stopped, and its template is no longer its (its next boot is cold)."""
    m = await lab.daemon()
    node = await m.create("sbx", **create_args(persistent=True))
    assert node.record.template
    await lab.crash(m)
    lab.host.vm(node.hostname).end(-9)
    m2 = await lab.daemon()
    assert m2.get(node.hostname).status == "Stopped" and m2.get(node.hostname).record.template == ""
    assert {r.hostname: r.template for r in m2.store.all()}[node.hostname] == ""


async def test_a_copy_of_a_templates_disk_cut_short_is_removed_at_start(lab: Lab):
    m = await lab.daemon()
    await lab.crash(m)
    part = lab.data_dir / "disks" / "sbx-9.qcow2.part"
    part.write_text("half a disk")
    part.with_name(part.name + ".backing").write_text("{}")
    record_only = lab.data_dir / "disks" / "sbx-8.qcow2.part.backing"  # killed before cp began
    record_only.write_text("{}")
    await lab.daemon()
    assert not part.exists() and not part.with_name(part.name + ".backing").exists()
    assert not record_only.exists()


async def test_a_service_whose_reset_never_came_gets_it_at_its_cold_boot(lab: Lab):
    """Killed with its host between its restore from a template and its identity reset: its
    kept disk (a copy of the template's) still holds the template's machine-id and host keys."""
    m = await lab.daemon()
    rec = m.get("svc-1").record
    rec.identity_pending = True
    m.store.put(rec)
    await lab.crash(m)
    for vm in list(lab.host.processes.values()):
        vm.end(-9)
    m2 = await lab.daemon()
    node = m2.get("svc-1")
    assert node.boot == "boot" and node.status == "Running"
    (identity,) = lab.host.vm("svc-1").guest.called("identity")
    assert identity["hostname"] == "svc-1" and "machine_id" in identity and "ssh_host_keys" in identity
    assert not {r.hostname: r for r in m2.store.all()}["svc-1"].identity_pending
    assert m2.get("svc-2").boot == "boot" and not lab.host.vm("svc-2").guest.called("identity")
