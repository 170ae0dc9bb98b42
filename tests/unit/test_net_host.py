"""Names, the bridge ledger, and the host network and its backends as far as they go without the
host: construction from the config, names per data directory, policies."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from slicer.core.config import load_config
from slicer.net import host as net_host
from slicer.net.backends import BridgeNetwork, IsolatedNetwork, PasstNetwork
from slicer.net.config import NetGroup, NetworkConfig
from slicer.net.firewall import IsolatedGroup
from slicer.net.ledger import BridgeLedger
from slicer.net.names import Names
from slicer.net.planning import plan_addresses
from slicer.net.system import IFNAMSIZ, NetworkError, ifname

CONFIG = """
config:
  host_groups:
  - name: br
    dns_servers: [192.0.2.53]
  - name: own
    network: {bridge: mybr0, tap_prefix: mytap, gateway: 10.9.0.1/24}
  - name: iso
    dns_servers: [192.0.2.53]
    network: {mode: isolated, range: 169.254.100.0/22, allow: [198.51.100.0/24], drop: [198.51.100.7/32]}
  - name: pt
    network: {mode: passt}
"""


@pytest.fixture
def privileged(monkeypatch):
    """The daemon as root with every tool, without asking the host."""
    monkeypatch.setattr(net_host, "has_net_admin", lambda: True)
    monkeypatch.setattr(net_host.shutil, "which", lambda tool: f"/usr/sbin/{tool}")
    monkeypatch.setattr(net_host, "helper_uid", lambda tag: 1_900_000_007)


@pytest.fixture
def host(privileged, tmp_path) -> net_host.HostNetwork:
    return net_host.HostNetwork(load_config(CONFIG).host_groups, tmp_path)


def test_ifname_keeps_short_names_and_digests_long_ones():
    assert ifname("st", "vm-1") == "stvm-1"
    long = ifname("sbab12", "a-host-group-name")
    assert len(long) == IFNAMSIZ and long.startswith("sbab12") and long == ifname("sbab12", "a-host-group-name")
    assert ifname("sbab12", "a-host-group-name") != ifname("sbab12", "a-host-group-namf")
    assert ifname("p" * 10, "12345") == "p" * 10 + "12345"  # exactly IFNAMSIZ: as it is


def test_names_follow_the_resolved_data_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = Names.for_data_dir(Path("data"))
    assert names == Names.for_data_dir(tmp_path / "data") != Names.for_data_dir(tmp_path / "other")
    t = names.tag
    assert len(t) == 4 and names.table == f"slicer_{t}" and names.netns("vm-1") == f"slicer-{t}-vm-1"
    prefixes = {names.veth_prefix, names.template_tap_prefix, names.staging_tap_prefix, names.default_tap_prefix}
    assert len(prefixes) == 4 and all(len(p) <= 6 for p in prefixes)
    assert names.bridge("a-very-long-group-name").startswith(f"sb{t}") and len(names.bridge("x" * 40)) == IFNAMSIZ


def test_the_ledger_keeps_what_was_made_across_instances(tmp_path):
    ledger = BridgeLedger.for_data_dir(tmp_path)
    assert ledger.bridges() == [] and not ledger.owns("b1")
    ledger.made("b2")
    ledger.made("b1")
    ledger.made("b2")
    again = BridgeLedger.for_data_dir(tmp_path)
    assert again.bridges() == ["b1", "b2"] and again.owns("b1")
    again.forget("b1")
    again.forget("never")
    assert ledger.bridges() == ["b2"]
    assert json.loads((tmp_path / "run" / "network.json").read_text()) == {"bridges": ["b2"]}
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["network.json"]  # no temporary left


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"bridges": 3}'])
def test_an_unreadable_ledger_names_nothing(tmp_path, text):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "network.json").write_text(text)
    ledger = BridgeLedger.for_data_dir(tmp_path)
    assert ledger.bridges() == []
    ledger.made("b1")
    assert ledger.bridges() == ["b1"]


def test_host_network_is_built_from_the_core_config(host, tmp_path):
    assert {n: type(g) for n, g in host.groups.items()} == {"br": BridgeNetwork, "own": BridgeNetwork,
                                                            "iso": IsolatedNetwork, "pt": PasstNetwork}
    names = Names.for_data_dir(tmp_path)
    assert (host.tag, host.table, host.veth_prefix) == (names.tag, names.table, names.veth_prefix)
    assert host.group("br").bridge == names.bridge("br") and host.group("br").tap_prefix == f"st{names.tag}"
    assert (host.group("own").bridge, host.group("own").tap_prefix) == ("mybr0", "mytap")
    assert host.helper_uid == 1_900_000_007  # a passt group under root: passt gets a uid of its own
    assert all(g.context is host.context for g in host.groups.values())
    assert host.describe() == {}  # nothing planned before start


def test_host_network_takes_net_groups_alike(privileged, tmp_path):
    cfg = load_config(CONFIG)
    duck = net_host.HostNetwork([NetGroup.of(g) for g in cfg.host_groups], tmp_path)
    real = net_host.HostNetwork(cfg.host_groups, tmp_path)
    assert {n: g.group for n, g in duck.groups.items()} == {n: g.group for n, g in real.groups.items()}
    assert real.group("iso").group == NetGroup("iso", cfg.group("iso").network, ("192.0.2.53",))


def test_a_missing_tool_is_named(privileged, monkeypatch, tmp_path):
    monkeypatch.setattr(net_host.shutil, "which", lambda tool: None if tool == "passt" else f"/usr/sbin/{tool}")
    groups = [NetGroup("pt", NetworkConfig(mode="passt"))]
    with pytest.raises(NetworkError, match="host group pt: network mode passt needs `passt`: install Debian's passt"):
        net_host.HostNetwork(groups, tmp_path)


def test_no_passt_group_no_helper_uid(privileged, tmp_path):
    assert net_host.HostNetwork([NetGroup("br", NetworkConfig())], tmp_path).helper_uid is None


def test_only_isolated_groups_take_a_vms_own_policy(host, tmp_path):
    policy = {"drop": ["203.0.113.0/24"]}
    for name in ("br", "pt"):
        with pytest.raises(NetworkError, match=f"host group {name} .*isolated host groups only"):
            host.group(name).check_policy(policy)
        with pytest.raises(NetworkError, match="isolated host groups only"):
            asyncio.run(host.group(name).adopt("vm", "10.0.0.2", 1, policy=policy))
    host.group("iso").check_policy(policy)
    host.group("br").check_policy({})  # an empty one is no policy


def test_an_isolated_groups_firewall_comes_from_its_config(host):
    iso = host.group("iso")
    with pytest.raises(NetworkError, match="iso: network not set up yet"):
        iso.firewall  # noqa: B018
    plan_addresses(host.groups.values(), host.tag, [])  # as start does, on a host without networks
    assert iso.firewall == IsolatedGroup("iso", "169.254.100.0/22", ["198.51.100.0/24"], ["198.51.100.7/32"],
                                         ["192.0.2.53"])
    mine = iso.policy_of({"allow": ["203.0.113.0/24"]})
    assert mine is not None and (mine.allow, mine.drop) == (["203.0.113.0/24"], ["198.51.100.7/32"])
    assert iso.policy_of(None) is None and iso.policy_of({}) is None
    assert iso.netns("iso-1") == f"slicer-{host.tag}-iso-1" and iso.veth("iso-1").startswith(host.veth_prefix)


def test_placeholders_are_of_the_kind_each_backend_hands_out(host):
    kinds = {name: (g.placeholder().kind, g.placeholder().fd) for name, g in host.groups.items()}
    assert kinds == {"br": ("tap", -1), "own": ("tap", -1), "iso": ("tap", -1), "pt": ("stream", -1)}


def test_a_tap_name_stays_taken_until_its_removal_has_ended(host, monkeypatch, tmp_path):
    """A bridge removes a VM's TAP by name, a moment after the VM's end; a VM attached meanwhile
    must not get that name (its QEMU gone, the device is no longer busy), or the late removal
    takes its TAP and its port."""
    from slicer.net import backends

    created, deleted = [], []

    def open_tap(name: str) -> int:
        created.append(name)
        return os.open(os.devnull, os.O_RDONLY)

    async def delete_tap(name: str) -> None:
        await asyncio.sleep(0.05)
        deleted.append(name)

    async def nothing(*args, **kwargs) -> None:
        pass

    monkeypatch.setattr(backends, "open_tap", open_tap)
    monkeypatch.setattr(backends, "delete_tap", delete_tap)
    monkeypatch.setattr(backends, "nft", nothing)
    monkeypatch.setattr(backends, "ip_batch", nothing)
    from slicer.net.addressing import Addressing

    group = host.group("own")  # its own gateway: no plan around the host's networks needed
    group.addressing = Addressing(group.group, "own", [])
    ip_a, ip_b = (str(a) for a in list(group.addressing.network.hosts())[10:12])

    async def scenario() -> None:
        (await group.attach("a", ip_a, tmp_path)).close()
        leaving = asyncio.create_task(group.detach("a", ip_a, tmp_path))
        await asyncio.sleep(0.01)
        (await group.attach("b", ip_b, tmp_path)).close()
        await leaving

    asyncio.run(scenario())
    assert created[0] != created[1] and deleted == [created[0]] and group.taps == {"b": created[1]}
