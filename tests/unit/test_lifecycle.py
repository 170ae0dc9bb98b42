"""Create, delete, power actions and the services of the config, on the fake driver."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from slicer.core.errors import BadRequest, Conflict, Forbidden, NotFound, SlicerError
from slicer.vmm.base import HostError
from tests.unit.conftest import Lab, create_args


async def test_services_start_with_the_daemon_from_one_template_and_are_set_up(lab: Lab):
    m = await lab.daemon()
    assert sorted(m.nodes) == ["svc-1", "svc-2"]
    builds = [vm for vm in lab.host.started if vm.spec.name.startswith("tpl-svc")]
    assert len(builds) == 1, "one template for both services"
    for node in m.nodes.values():
        assert node.status == "Running" and node.boot == "template" and node.record.template
        guest = lab.host.vm(node.hostname).guest
        (identity,) = guest.called("identity")
        assert identity["hostname"] == node.hostname and identity["ip"] == f"{node.record.ip}/24"
        assert guest.called("put_secrets") == [{}]  # no secrets yet: an empty set, still pushed
        assert guest.called("put_ssh_keys") == [{"keys": []}]
    assert {n.record.ip for n in m.nodes.values()} == {"10.77.0.2", "10.77.0.3"}


async def test_a_service_restored_from_a_template_has_a_disk_of_its_own(lab: Lab):
    """Its disk starts as a copy of the template's (nothing of it rests on the template), so a
    cold boot of it later leaves the template unused, and collected once superseded."""
    m = await lab.daemon()
    node = m.get("svc-1")
    (template,) = [t for t in m.templates._all() if t.group == "svc"]
    disk = Path(node.record.disk)
    assert disk == lab.data_dir / "disks" / "svc-1.qcow2"
    assert disk.read_bytes() == template.disk.read_bytes() and not disk.samefile(template.disk)
    assert node.vm.spec.base_disk != template.disk
    assert node.vm.spec.memory_file == m.templates.memory_file(template.name)
    assert m.lifecycle.templates_in_use()[template.name] == 2, "its RAM is mapped from the template's"
    await m.power.shutdown("svc-1", "shutdown")
    await node.exited.wait()
    await m.snapshots.relaunch("svc-1", wait="agent", timeout=5)
    assert node.boot == "boot" and node.record.template == "" and node.vm.spec.memory_file is None
    assert {r.hostname: r.template for r in m.store.all()}["svc-1"] == "", "the record says so too"
    assert m.lifecycle.templates_in_use()[template.name] == 1


async def test_a_service_with_a_kept_disk_boots_it_cold(lab: Lab):
    m = await lab.daemon()
    await lab.crash(m)
    (lab.data_dir / "disks" / "svc-1.qcow2").write_text("kept\n")
    for vm in list(lab.host.processes.values()):
        vm.end(-9)  # the VMs died with the host
    m = await lab.daemon()
    assert m.get("svc-1").boot == "boot" and m.get("svc-1").record.template == ""
    assert (lab.data_dir / "disks" / "svc-1.qcow2").read_text() == "kept\n"


async def test_a_sandbox_restores_from_its_groups_template(lab: Lab):
    m = await lab.daemon()
    node = await m.create("sbx", **create_args())
    assert node.hostname == "sbx-1" and node.status == "Running"
    assert node.boot == "template" and node.record.template
    guest = lab.host.vm("sbx-1").guest
    identity = guest.called("identity")
    assert len(identity) == 1 and identity[0]["hostname"] == "sbx-1"  # its own name, not the template's
    assert "ssh_host_keys" in identity[0] and identity[0]["ip"] == "10.78.0.2/24"
    template_vm = next(vm for vm in lab.host.started if vm.spec.name.startswith("tpl-sbx"))
    assert template_vm.actions[-1] == "save" and template_vm.guest.called("settle")


async def test_the_second_sandbox_reuses_the_template(lab: Lab):
    m = await lab.daemon()
    a = await m.create("sbx", **create_args())
    b = await m.create("sbx", **create_args())
    assert a.record.template == b.record.template
    assert len([vm for vm in lab.host.started if vm.spec.name.startswith("tpl-sbx")]) == 1


async def test_a_cold_group_boots_without_a_template(lab: Lab):
    m = await lab.daemon()
    node = await m.create("cold", **create_args())
    assert node.boot == "boot" and node.record.template == ""
    assert not any(vm.spec.name.startswith("tpl-cold") for vm in lab.host.started)


async def test_a_persistent_vm_restores_from_the_template_on_a_copy_of_its_disk(lab: Lab):
    m = await lab.daemon()
    node = await m.create("sbx", **create_args(persistent=True))
    assert node.boot == "template" and node.record.template
    disk = Path(node.record.disk)
    assert disk == lab.data_dir / "disks" / f"{node.hostname}.qcow2"
    assert disk.read_text().startswith("overlay on ") and node.record.template not in disk.read_text()
    assert not list(disk.parent.glob("*.part"))


async def test_hostnames_skip_the_services_and_numbers_in_use(lab: Lab):
    m = await lab.daemon()
    names = [(await m.create("svc", **create_args())).hostname for _ in range(2)]
    assert names == ["svc-3", "svc-4"]


async def test_a_hostname_and_address_can_be_asked_for(lab: Lab):
    m = await lab.daemon()
    node = await m.create("sbx", **create_args(hostname="web", ip="10.78.0.50"))
    assert (node.hostname, node.record.ip) == ("web", "10.78.0.50")
    with pytest.raises(Conflict) as e:
        await m.create("sbx", **create_args(hostname="web"))
    assert e.value.code == "exists"
    with pytest.raises(Conflict) as e:
        await m.create("sbx", **create_args(ip="10.78.0.50"))
    assert e.value.code == "ip_in_use"


@pytest.mark.parametrize(("kw", "code"), [
    ({"hostname": "Bad_Name"}, "invalid_hostname"),
    ({"hostname": "commits"}, "invalid_hostname"),
    ({"ip": "10.77.0.9"}, "invalid_ip"),  # another group's network
    ({"ip": "not-an-ip"}, "invalid_ip"),
    ({"cpus": 3}, "limit_exceeded"),
    ({"ram_bytes": 1 << 30}, "limit_exceeded"),
    ({"ram_bytes": 32 << 20}, "invalid_size"),
    ({"spec": {"network": {"allow": ["10.0.0.0/8"]}}}, "invalid_network"),  # a bridge group
])
async def test_a_bad_create_is_refused_and_leaves_nothing(lab: Lab, kw: dict, code: str):
    m = await lab.daemon()
    before = set(m.nodes)
    with pytest.raises(BadRequest) as e:
        await m.create("sbx", **create_args(**kw))
    assert e.value.code == code
    assert set(m.nodes) == before and {r.hostname for r in m.store.all()} == before


async def test_an_unknown_group_is_404(lab: Lab):
    m = await lab.daemon()
    with pytest.raises(NotFound) as e:
        await m.create("nope", **create_args())
    assert e.value.code == "hostgroup_not_found"


async def test_a_failed_start_leaves_no_node_record_or_link(lab: Lab):
    m = await lab.daemon()
    lab.host.fail_next_start.append("no memory for you")
    with pytest.raises(Exception) as e:
        await m.create("cold", **create_args())
    assert getattr(e.value, "code", "") == "vm_start_failed"
    assert "cold-1" not in m.nodes and all(r.hostname != "cold-1" for r in m.store.all())
    assert "cold-1" not in m.net.group("cold").links
    node = await m.create("cold", **create_args())  # the name and address are free again
    assert (node.hostname, node.record.ip) == ("cold-1", "10.79.0.2")


async def test_a_failed_template_restore_boots_cold_and_retires_the_template(lab: Lab):
    m = await lab.daemon()
    first = await m.create("sbx", **create_args())
    lab.host.fail_next_start.append("restore failed")
    second = await m.create("sbx", **create_args())
    assert second.boot == "boot" and second.record.template == ""
    tpl = m.templates.root / first.record.template
    assert (tpl / "retired").exists()  # kept for the first clone, never used again
    third = await m.create("sbx", **create_args())
    assert third.boot == "template" and third.record.template != first.record.template


async def test_a_restore_the_host_could_not_confine_fails_and_keeps_the_template(lab: Lab):
    m = await lab.daemon()
    first = await m.create("sbx", **create_args())
    lab.host.fail_next_start.append(HostError("cannot make its cgroup: File exists"))
    with pytest.raises(SlicerError, match="cgroup") as e:
        await m.create("sbx", **create_args())
    assert e.value.code == "vm_start_failed"
    assert not (m.templates.root / first.record.template / "retired").exists()  # not the template's fault
    second = await m.create("sbx", **create_args())
    assert second.boot == "template" and second.record.template == first.record.template


async def test_delete_removes_the_vm_its_disk_and_its_record(lab: Lab):
    m = await lab.daemon()
    node = await m.create("sbx", **create_args())
    vm = lab.host.vm(node.hostname)
    disk = Path(node.record.disk)
    assert disk.exists()
    assert await m.power.delete("sbx", node.hostname) is True
    assert vm.state.value == "stopped" and not disk.exists()
    assert node.hostname not in m.nodes and node.hostname not in {r.hostname for r in m.store.all()}
    assert node.hostname not in m.net.group("sbx").links
    with pytest.raises(NotFound):
        m.get(node.hostname)


async def test_delete_keeps_a_persistent_disk(lab: Lab):
    m = await lab.daemon()
    node = await m.create("sbx", **create_args(persistent=True))
    assert await m.power.delete("sbx", node.hostname) is False
    assert Path(node.record.disk).exists()


async def test_services_and_protected_vms_cannot_be_deleted(lab: Lab):
    m = await lab.daemon()
    with pytest.raises(Forbidden):
        await m.power.delete("svc", "svc-1")
    node = await m.create("sbx", **create_args(spec={"protected": True}))
    with pytest.raises(Forbidden):
        await m.power.delete("sbx", node.hostname)
    with pytest.raises(NotFound):
        await m.power.delete("svc", node.hostname)  # not in that group


async def test_pause_and_resume_follow_the_state_table(lab: Lab):
    m = await lab.daemon()
    node = await m.create("sbx", **create_args())
    await m.power.pause(node.hostname)
    assert node.status == "Paused" and node.record.paused
    with pytest.raises(Conflict) as e:
        await m.power.pause(node.hostname)
    assert e.value.code == "invalid_state"
    with pytest.raises(Conflict) as e:
        await m.agent(node.hostname)
    assert e.value.code == "paused"
    await m.power.resume(node.hostname)
    assert node.status == "Running" and not node.record.paused
    with pytest.raises(Conflict):
        await m.power.resume(node.hostname)


async def test_a_sandbox_shut_down_is_deleted(lab: Lab):
    m = await lab.daemon()
    node = await m.create("sbx", **create_args())
    await m.power.shutdown(node.hostname, "shutdown")
    async with asyncio.timeout(5):
        while not node.deleted:
            await asyncio.sleep(0.01)
    assert node.hostname not in m.nodes


async def test_a_service_shut_down_stays_stopped_and_relaunches(lab: Lab):
    m = await lab.daemon()
    node = m.get("svc-1")
    first = node.vm
    await m.power.shutdown("svc-1", "shutdown")
    await node.exited.wait()
    assert node.status == "Stopped" and "svc-1" in m.nodes
    await m.snapshots.relaunch("svc-1", wait="agent", timeout=5)
    assert node.status == "Running" and node.vm is not first


async def test_a_guest_powering_itself_off_deletes_a_sandbox_only(lab: Lab):
    m = await lab.daemon()
    node = await m.create("sbx", **create_args())
    lab.host.vm(node.hostname).end(0)
    lab.host.vm("svc-1").end(0)
    async with asyncio.timeout(5):
        while not node.deleted:
            await asyncio.sleep(0.01)
    await m.get("svc-1").exited.wait()
    assert m.get("svc-1").status == "Stopped"


async def test_a_crashed_vmm_is_crashed_not_stopped(lab: Lab):
    m = await lab.daemon()
    node = await m.create("sbx", **create_args())
    lab.host.vm(node.hostname).end(1)
    await node.exited.wait()
    assert node.status == "Crashed" and node.hostname in m.nodes
    with pytest.raises(Conflict) as e:
        await m.agent(node.hostname)
    assert e.value.code == "not_running"
    await m.snapshots.relaunch(node.hostname, wait="agent", timeout=5)
    assert node.status == "Running"


async def test_a_service_reboots_through_its_agent_and_is_set_up_again(lab: Lab):
    m = await lab.daemon()
    node = m.get("svc-1")
    guest = lab.host.vm(node.hostname).guest
    assert len(guest.called("put_secrets")) == 1
    await m.power.shutdown(node.hostname, "reboot")
    async with asyncio.timeout(5):
        while len(guest.called("put_secrets")) < 2:
            await asyncio.sleep(0.01)
    assert guest.called("power") == [{"action": "reboot"}]
    assert node.status == "Running" and lab.host.vm(node.hostname).spec.reboot


async def test_a_reboot_ends_a_sandbox_as_in_slicer(lab: Lab):
    """Firecracker has no reboot: the API's reboot (Slicer's default action) or the guest's own
    ends the VM; a sandbox is then reaped, record and disk."""
    m = await lab.daemon()
    for how in ("api", "guest"):
        node = await m.create("cold", **create_args())
        vm = lab.host.vm(node.hostname)
        assert not vm.spec.reboot  # QEMU's -no-reboot
        if how == "api":
            await m.power.shutdown(node.hostname, "reboot")
        else:
            vm.guest_reboot()  # `sudo reboot` inside, or a panic
        async with asyncio.timeout(5):
            while node.hostname in m.nodes:
                await asyncio.sleep(0.01)
        assert vm.exit_code == 0 and not Path(node.record.disk).exists(), how
        assert vm.guest.called("power") == ([{"action": "reboot"}] if how == "api" else [])


async def test_a_reboot_stops_a_persistent_vm_and_relaunch_brings_it_back(lab: Lab):
    m = await lab.daemon()
    node = await m.create("cold", **create_args(persistent=True))
    await m.power.shutdown(node.hostname, "reboot")
    assert node.status == "Stopping"  # a relaunch now waits for the end (the TS SDK's roundtrip)
    await m.snapshots.relaunch(node.hostname, wait="agent", timeout=5)
    assert node.status == "Running" and Path(node.record.disk).exists()
    lab.host.vm(node.hostname).guest_reboot()  # the guest's own reboot: stopped, kept
    await node.exited.wait()
    assert node.status == "Stopped" and node.hostname in m.nodes and Path(node.record.disk).exists()


async def test_a_reboot_that_the_agent_refuses_resets_the_machine(lab: Lab):
    m = await lab.daemon()
    vm = lab.host.vm("svc-1")
    vm.guest.fail["power"] = 500
    await m.power.shutdown("svc-1", "reboot")
    assert "reset" in vm.actions


async def test_an_unknown_power_action_is_400(lab: Lab):
    m = await lab.daemon()
    with pytest.raises(BadRequest) as e:
        await m.power.shutdown("svc-1", "explode")
    assert e.value.code == "invalid_action"


async def test_userdata_runs_once_the_agent_is_up(lab: Lab):
    m = await lab.daemon()
    node = await m.create("cold", **create_args(spec={"userdata": "echo hi"}, wait="userdata"))
    guest = lab.host.vm(node.hostname).guest
    assert guest.called("userdata") == [{"script": "echo hi"}]


async def test_a_failed_identity_reset_fails_the_create(lab: Lab):
    m = await lab.daemon()
    await m.create("sbx", **create_args())  # the template exists now

    original = lab.host.fail_next_start
    assert original == []
    node_task = asyncio.create_task(m.create("sbx", **create_args()))
    async with asyncio.timeout(5):  # make its guest refuse the identity reset as soon as it exists
        while not any(vm.spec.name == "sbx-2" for vm in lab.host.processes.values()):
            await asyncio.sleep(0)
    lab.host.vm("sbx-2").guest.fail["identity"] = 500
    with pytest.raises(Exception) as e:
        await node_task
    assert getattr(e.value, "code", "") == "setup_failed"
    assert "sbx-2" not in m.nodes


async def test_secrets_changes_reach_running_vms(lab: Lab):
    m = await lab.daemon()
    m.secrets.create({"name": "token", "data": "c2VjcmV0"})
    await m.provisioner.sync_secrets()
    pushed = lab.host.vm("svc-1").guest.called("put_secrets")[-1]
    assert list(pushed) == ["token"]


async def test_a_vm_limited_to_some_secrets_gets_only_those(lab: Lab):
    m = await lab.daemon()
    m.secrets.create({"name": "a", "data": "YQ=="})
    m.secrets.create({"name": "b", "data": "Yg=="})
    node = await m.create("cold", **create_args(spec={"secrets": ["b"]}))
    assert list(lab.host.vm(node.hostname).guest.called("put_secrets")[-1]) == ["b"]


async def test_tags_filter_the_list(lab: Lab):
    m = await lab.daemon()
    a = await m.create("sbx", **create_args(spec={"tags": ["ci", "job-1"]}))
    await m.create("sbx", **create_args(spec={"tags": ["ci"]}))
    assert [n.hostname for n in m.list(tag="job-1")] == [a.hostname]
    assert len(m.list(tag="ci")) == 2 and len(m.list(tag_prefix="job-")) == 1
    assert m.update_tags(a.hostname, add=["x"], remove=["ci"], replace=None)["tags"] == ["job-1", "x"]
    with pytest.raises(BadRequest):
        m.list(tag="a", tag_prefix="b")


async def test_stop_deletes_sandboxes_and_stops_services(lab: Lab):
    m = await lab.daemon()
    node = await m.create("sbx", **create_args())
    sandbox_vm = lab.host.vm(node.hostname)
    service_vm = lab.host.vm("svc-1")
    await m.stop()
    assert sandbox_vm.state.value == "stopped" and service_vm.state.value == "stopped"
    assert "powerdown" in service_vm.actions  # gracefully
    assert not Path(node.record.disk).exists()
    assert lab.host.processes == {}


async def test_a_create_that_waits_says_where_its_time_went(lab: Lab):
    from slicer.core import telemetry

    m = await lab.daemon()
    node = await m.create("sbx", **create_args())
    assert {"alloc", "template", "attach", "resume", "ready", "identity", "setup"} <= set(node.phases)
    assert all(s >= 0 for s in node.phases.values())
    count = telemetry.REGISTRY.get_sample_value("slicer_vm_start_phase_seconds_count",
                                               {"hostgroup": "sbx", "boot": "template", "phase": "identity"})
    assert count and count >= 1


async def test_a_call_on_a_vm_still_booting_waits_for_it_and_then_gets_through(lab: Lab):
    m = await lab.daemon()
    creating = asyncio.create_task(m.create("sbx", **create_args(wait=None)))
    async with asyncio.timeout(5):
        while "sbx-1" not in m.nodes:
            await asyncio.sleep(0)
    agent = await m.agent("sbx-1")  # asked before the VM is even up: waits, then answers
    node = m.get("sbx-1")
    assert node.provisioned.is_set() and not node.identity_pending
    assert (await agent.health())["hostname"] == "sbx-1"
    await creating


async def test_a_vm_whose_agent_never_comes_says_so(lab: Lab):
    from slicer.core.errors import AgentUnreachable

    m = await lab.daemon()
    node = await m.create("sbx", **create_args())
    node.provisioned.clear()  # as while a reboot's setup is under way
    with pytest.raises(AgentUnreachable) as e:
        await m.agent(node.hostname, wait=0.2)
    assert e.value.code == "agent_unavailable" and "has not answered within 0.2s" in e.value.message


async def test_a_suspend_during_setup_waits_for_it(lab: Lab):
    m = await lab.daemon()
    node = await m.create("sbx", **create_args())
    node.provisioned.clear()  # its setup under way (after a reboot, say)
    suspending = asyncio.create_task(m.snapshots.suspend(node.hostname))
    await asyncio.sleep(0.3)
    assert not suspending.done() and node.status == "Running"
    node.provisioned.set()
    await suspending
    assert node.status == "Suspended"


async def test_metrics_carry_slicers_names_and_ours(lab: Lab):
    """``/metrics`` as rendered: Slicer's names (launches, running VMs, the host's figures) beside ours."""
    from prometheus_client.parser import text_string_to_metric_families

    from slicer.api.telemetry import render_metrics

    def samples() -> dict[tuple[str, tuple], float]:
        text = render_metrics(m)[0].decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    m = await lab.daemon()
    before = samples()
    await m.create("sbx", **create_args())
    after = samples()
    launched = ("slicer_vm_launch_total", (("hostgroup", "sbx"),))
    assert after[launched] == before.get(launched, 0) + 1
    assert after[("slicer_vm_running", (("hostgroup", "sbx"),))] == 1
    assert after[("slicer_vm_running", (("hostgroup", "svc"),))] == 2
    assert after[("slicer_vm_running", (("hostgroup", "cold"),))] == 0  # every group, even an empty one
    assert after[("slicer_system_cpus", ())] == os.cpu_count()
    assert 0 < after[("slicer_system_memory_available_bytes", ())] < after[("slicer_system_memory_total_bytes", ())]
    assert after[("slicer_system_uptime_seconds", ())] > 0


async def test_the_record_says_a_clone_is_not_itself_until_its_identity_reset(lab: Lab, monkeypatch):
    """So a daemon that dies before the reset leaves a record the next one acts on."""
    from slicer.core.provision import Provisioner

    seen = []
    configure = Provisioner.configure

    async def spy(self: Provisioner, node) -> None:
        seen.append({r.hostname: r.identity_pending for r in self.registry.store.all()}.get(node.hostname))
        await configure(self, node)

    monkeypatch.setattr(Provisioner, "configure", spy)
    m = await lab.daemon()
    node = await m.create("sbx", **create_args(persistent=True))
    assert seen[-1] is True, "recorded before the reset"
    assert not {r.hostname: r for r in m.store.all()}[node.hostname].identity_pending, "and cleared after it"
