"""The dry-run network: the host network's surface and bookkeeping, nothing on the host."""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
from pathlib import Path

import pytest

from slicer.core.config import load_config
from slicer.net import host as net_host
from slicer.net import surface, system, tap
from slicer.net.addressing import Addressing
from slicer.net.dryrun import NO_DEVICE, DryRunNetwork
from slicer.net.host import HostNetwork
from slicer.net.names import Names
from slicer.net.system import NetworkError

CONFIG = """
config:
  host_groups:
  - name: br
    network: {gateway: 192.168.137.1/24}
  - name: auto
  - name: iso
    network: {mode: isolated, range: 169.254.100.0/22, allow: [198.51.100.0/24]}
  - name: pt
    network: {mode: passt}
"""


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def cfg():
    return load_config(CONFIG)


@pytest.fixture
def net(cfg, tmp_path) -> DryRunNetwork:
    n = DryRunNetwork(cfg.host_groups, tmp_path)
    run(n.start())
    return n


def first(net: DryRunNetwork, group: str, index: int = 1) -> str:
    address = net.group(group).addressing.service_address(index)
    assert address is not None
    return address


def test_built_from_the_core_config_like_the_host_network(cfg, tmp_path):
    n = DryRunNetwork(cfg.host_groups, tmp_path)
    assert list(n.groups) == ["br", "auto", "iso", "pt"]
    assert {name: g.mode for name, g in n.groups.items()} == {"br": "bridge", "auto": "bridge", "iso": "isolated",
                                                              "pt": "passt"}
    assert n.table == f"slicer_{Names.for_data_dir(tmp_path).tag}"
    assert DryRunNetwork(cfg.host_groups, tmp_path, default_mode="passt").group("auto").mode == "passt"
    with pytest.raises(KeyError):
        n.group("nope")


def test_nothing_is_planned_or_attachable_before_start(cfg, tmp_path):
    n = DryRunNetwork(cfg.host_groups, tmp_path)
    g = n.group("br")
    assert not g.planned and n.describe() == {}
    with pytest.raises(NetworkError, match="br: network not set up yet"):
        g.addressing  # noqa: B018
    n.group("br").addressing = Addressing(g.group, "x", [])
    with pytest.raises(NetworkError, match="not started"):
        run(g.attach("br-1", "192.168.137.2", Path("/nonexistent")))


def test_start_plans_every_group(net):
    assert str(net.group("br").addressing.gateway) == "192.168.137.1/24"
    assert net.group("auto").addressing.network.subnet_of(ipaddress.IPv4Network("192.168.128.0/17"))
    assert str(net.group("iso").addressing.network) == "169.254.100.0/22"
    described = net.describe()
    assert described["iso"] == {"mode": "isolated", "range": "169.254.100.0/22", "per_vm": "/30"}
    assert described["br"]["bridge"] == Names(net.tag).bridge("br")
    assert described["br"]["tap_prefix"] == f"st{net.tag}" and "bridge" not in described["pt"]


def test_attach_hands_back_a_device_without_a_descriptor(net, tmp_path):
    g = net.group("br")
    dev = run(g.attach("br-1", "192.168.137.2", tmp_path / "br-1"))
    assert (dev.kind, dev.fd, dev.pid) == (NO_DEVICE, None, None)
    assert g.placeholder().kind == NO_DEVICE == g.device_kind
    dev.close()  # what the manager does once the VMM holds it
    assert net.attached() == {"br-1": "192.168.137.2"}
    assert g.links["br-1"].run_dir == tmp_path / "br-1"


def test_attaching_a_vm_twice_is_refused(net, tmp_path):
    g = net.group("br")
    run(g.attach("br-1", "192.168.137.2", tmp_path))
    with pytest.raises(NetworkError, match="br-1: already attached"):
        run(g.attach("br-1", "192.168.137.2", tmp_path))


def test_an_address_attached_to_another_vm_is_refused(net, tmp_path):
    g = net.group("br")
    run(g.attach("br-1", "192.168.137.2", tmp_path))
    with pytest.raises(NetworkError, match="192.168.137.2 is attached to br-1"):
        run(g.attach("br-2", "192.168.137.2", tmp_path))


def test_detaching_what_is_not_attached_is_refused(net, tmp_path):
    g = net.group("br")
    with pytest.raises(NetworkError, match="br-1: not attached"):
        run(g.detach("br-1", "192.168.137.2", tmp_path))
    run(g.attach("br-1", "192.168.137.2", tmp_path))
    with pytest.raises(NetworkError, match="attached with 192.168.137.2, detached with 192.168.137.3"):
        run(g.detach("br-1", "192.168.137.3", tmp_path))
    run(g.detach("br-1", "192.168.137.2", tmp_path))
    assert net.attached() == {}


@pytest.mark.parametrize(("group", "ip"), [("br", "192.168.138.2"), ("br", "192.168.137.1"),
                                           ("iso", "169.254.100.1"), ("iso", "10.0.0.2")])
def test_an_address_outside_the_groups_pool_is_refused(net, tmp_path, group, ip):
    with pytest.raises(NetworkError, match=f"{ip} is not an address of host group {group}"):
        run(net.group(group).attach("x", ip, tmp_path))
    assert net.attached() == {}


def test_forgiving_mode_behaves_like_the_real_backends(cfg, tmp_path):
    n = DryRunNetwork(cfg.host_groups, tmp_path, strict=False)
    run(n.start())
    g = n.group("br")
    run(g.detach("br-1", "192.168.137.2", tmp_path))  # idempotent
    run(g.attach("br-1", "192.168.137.2", tmp_path))
    run(g.attach("br-1", "192.168.137.3", tmp_path))  # replaces the earlier attach
    assert n.attached() == {"br-1": "192.168.137.3"}
    with pytest.raises(NetworkError, match="not an address"):  # never forgiven
        run(g.attach("br-1", "10.1.1.1", tmp_path))


def test_a_vms_own_policy_only_in_isolated_groups(net, tmp_path):
    policy = {"allow": ["203.0.113.0/24"]}
    for group in ("br", "pt"):
        with pytest.raises(NetworkError, match=f"host group {group} .*apply to isolated host groups only"):
            run(net.group(group).attach(f"{group}-1", first(net, group), tmp_path, policy=policy))
    run(net.group("iso").attach("iso-1", first(net, "iso"), tmp_path, policy=policy))
    assert net.group("iso").links["iso-1"].policy == policy
    assert net.attached() == {"iso-1": "169.254.100.2"}


def test_adopt_takes_back_links_the_start_kept(cfg, tmp_path):
    n = DryRunNetwork(cfg.host_groups, tmp_path)
    run(n.start(keep=["iso-1"]))
    iso = n.group("iso")
    run(iso.adopt("iso-1", first(n, "iso"), 4242))
    with pytest.raises(NetworkError, match="iso-2: its network namespace is gone"):
        run(iso.adopt("iso-2", first(n, "iso", 2), 4243))
    run(n.group("br").adopt("br-1", "192.168.137.2", 4244))  # a bridge VM's TAP is held by its QEMU
    with pytest.raises(NetworkError, match="already attached"):
        run(n.group("br").adopt("br-1", "192.168.137.2", 4244))
    assert iso.links["iso-1"].vmm_pid == 4242
    run(iso.detach("iso-1", first(n, "iso"), tmp_path))
    assert n.attached() == {"br-1": "192.168.137.2"}


def test_stop_removes_everything_and_is_idempotent(net, tmp_path):
    run(net.group("br").attach("br-1", "192.168.137.2", tmp_path))
    run(net.group("br").template_device("tpl", tmp_path))
    run(net.stop())
    run(net.stop())
    assert net.attached() == {} and not net.group("br").template_devices
    with pytest.raises(NetworkError, match="not started"):
        run(net.group("br").attach("br-1", "192.168.137.2", tmp_path))
    run(net.start())
    run(net.group("br").attach("br-1", "192.168.137.2", tmp_path))


def test_template_devices_are_handed_out_and_released(net, tmp_path):
    g = net.group("auto")
    dev = run(g.template_device("auto-tpl", tmp_path))
    assert dev.kind == NO_DEVICE and dev.fd is None and dev.name and dev.name.startswith(f"x{net.tag}")
    with pytest.raises(NetworkError, match="in use"):
        run(g.template_device("auto-tpl", tmp_path))
    run(g.release(dev))
    assert not g.template_devices
    run(g.release(run(g.template_device("auto-tpl", tmp_path))))


def test_a_whole_lifecycle_touches_nothing_on_the_host(cfg, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"the dry run touched the host: {args}")

    for module, name in ((system, "run"), (system, "sysctl"), (system, "host_networks"), (tap, "open_tap"),
                         (tap, "delete_tap"), (asyncio, "create_subprocess_exec")):
        monkeypatch.setattr(module, name, refuse)
    n = DryRunNetwork(cfg.host_groups, tmp_path / "data")
    run(n.start())
    for group in n.groups:
        g = n.group(group)
        run(g.attach(f"{group}-1", first(n, group), tmp_path))
        run(g.release(run(g.template_device(f"{group}-t", tmp_path))))
    assert run(n.remove_stale_taps()) == []
    for group in n.groups:
        run(n.group(group).detach(f"{group}-1", first(n, group), tmp_path))
    run(n.stop())
    assert not (tmp_path / "data").exists()  # not even the data directory


def test_the_dry_run_has_the_surface_of_the_real_network(cfg, tmp_path, monkeypatch):
    """Every member the lifecycle may use, with the same parameters, on the real networks and the dry run."""
    monkeypatch.setattr(net_host, "has_net_admin", lambda: True)
    monkeypatch.setattr(net_host.shutil, "which", lambda tool: f"/usr/sbin/{tool}")
    networks = [HostNetwork(cfg.host_groups, tmp_path), DryRunNetwork(cfg.host_groups, tmp_path)]
    groups = [g for n in networks for g in n.groups.values()]
    assert {type(g).__name__ for g in groups} == {"BridgeNetwork", "IsolatedNetwork", "PasstNetwork",
                                                  "DryRunGroupNetwork"}
    for protocol, objects in ((surface.Network, networks), (surface.GroupNet, groups)):
        members = [m for m in vars(protocol) if not m.startswith("_")] + list(protocol.__annotations__)
        for obj in objects:
            for member in members:
                assert hasattr(type(obj), member) or member in vars(obj), (obj, member)
                wanted = getattr(protocol, member, None)
                if inspect.isfunction(wanted):
                    got = getattr(obj, member)
                    assert list(inspect.signature(got).parameters) == list(inspect.signature(wanted).parameters)[1:]
                    assert inspect.iscoroutinefunction(got) == inspect.iscoroutinefunction(wanted), (obj, member)
