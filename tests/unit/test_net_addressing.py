"""Which addresses a group's VMs take and what each guest is told; planning them at start."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from slicer.core.config import load_config
from slicer.net.addressing import BRIDGE_SPACE, CLOUD_METADATA, ISOLATED_SPACE, Addressing, _pick, mac_for
from slicer.net.config import NetGroup, NetworkConfig
from slicer.net.dryrun import DryRunGroupNetwork, DryRunNetwork
from slicer.net.planning import plan_addresses
from slicer.net.system import NetworkError

Net = ipaddress.IPv4Network
NOWHERE = Path("/nonexistent/data")  # only named: a dry run makes nothing there


def group(name: str = "g", **network: object) -> NetGroup:
    return NetGroup(name, NetworkConfig(**network), ("192.0.2.53",))


def test_mac_is_locally_administered_and_made_of_the_address():
    assert mac_for("10.0.0.1") == "02:5c:0a:00:00:01"
    assert int(mac_for("255.255.255.255").split(":")[0], 16) & 0b11 == 0b10  # local, unicast
    assert mac_for("10.0.0.1") != mac_for("10.0.0.2")


def test_a_gateway_in_the_middle_of_its_subnet_is_left_out_of_the_pool():
    a = Addressing(group(gateway="192.168.1.100/24"), "s", [])
    assert a.gateway == ipaddress.IPv4Interface("192.168.1.100/24")
    assert "192.168.1.100" not in a and "192.168.1.99" in a and "192.168.1.101" in a
    assert "192.168.1.0" not in a and "192.168.1.255" not in a and "192.168.2.1" not in a
    assert a.describe() == {"gateway": "192.168.1.100/24", "first": "192.168.1.1", "last": "192.168.1.254"}
    assert a.guest("192.168.1.7").ip_cidr == "192.168.1.7/24" and a.guest("192.168.1.7").gateway == "192.168.1.100"


def test_services_take_explicit_addresses_in_order():
    a = Addressing(group(gateway="10.1.0.1/24", addresses=["10.1.0.50", "10.1.0.9"]), "s", [])
    assert [a.service_address(i) for i in (0, 1, 2, 3)] == [None, "10.1.0.50", "10.1.0.9", None]
    assert a.free({"10.1.0.50"}) == "10.1.0.9" and a.free({"10.1.0.50", "10.1.0.9"}) is None


def test_a_range_bounds_the_pool():
    a = Addressing(group(gateway="10.2.0.1/24", range="10.2.0.20-10.2.0.22"), "s", [])
    assert [str(x) for x in a.pool] == ["10.2.0.20", "10.2.0.21", "10.2.0.22"] and "10.2.0.23" not in a


def test_isolated_vms_get_one_slash_30_each():
    a = Addressing(group(mode="isolated", range="169.254.8.0/29"), "s", [])
    assert [str(x) for x in a.pool] == ["169.254.8.2", "169.254.8.6"] and a.gateway is None
    guest = a.guest("169.254.8.6")
    assert (guest.ip_cidr, guest.gateway, guest.mac) == ("169.254.8.6/30", "169.254.8.5", mac_for("169.254.8.6"))
    assert a.describe() == {"range": "169.254.8.0/29", "per_vm": "/30"}


def test_a_default_block_depends_on_the_seed_and_avoids_what_is_taken():
    one = _pick(BRIDGE_SPACE, 24, "seed-1", [])
    assert one == _pick(BRIDGE_SPACE, 24, "seed-1", []) and one.subnet_of(BRIDGE_SPACE)
    assert len({_pick(BRIDGE_SPACE, 24, f"seed-{i}", []) for i in range(8)}) > 1
    assert _pick(BRIDGE_SPACE, 24, "seed-1", [one]) != one
    everything_else = [b for b in BRIDGE_SPACE.subnets(new_prefix=24) if b != Net("192.168.200.0/24")]
    assert _pick(BRIDGE_SPACE, 24, "seed-1", everything_else) == Net("192.168.200.0/24")


def test_the_cloud_metadata_block_is_never_a_default():
    blocks = list(ISOLATED_SPACE.subnets(new_prefix=22))
    metadata = next(b for b in blocks if CLOUD_METADATA in b)
    taken = [b for b in blocks if b != metadata]
    with pytest.raises(ValueError, match="no free /22"):
        _pick(ISOLATED_SPACE, 22, "s", taken)


def test_the_core_host_group_and_the_net_group_address_alike():
    cfg = load_config("config:\n  host_groups:\n  - name: g\n    dns_servers: [192.0.2.53]\n")
    core = cfg.host_groups[0]
    assert NetGroup.of(core) == group()
    assert Addressing(core, "seed", []).pool == Addressing(NetGroup.of(core), "seed", []).pool


def planned(*groups: NetGroup, host: list[tuple[str, Net]] = ()) -> dict[str, DryRunGroupNetwork]:
    net = DryRunNetwork(groups, NOWHERE)
    plan_addresses(net.groups.values(), net.tag, host)
    return net.groups


def test_defaults_keep_out_of_explicit_subnets():
    default = Addressing(group("auto"), DryRunNetwork([], NOWHERE).tag + "auto", [])
    gw = f"{default.network.network_address + 1}/24"
    groups = planned(group("auto"), group("fixed", gateway=gw))  # listed first, planned after
    assert str(groups["fixed"].addressing.network) == str(default.network)
    assert not groups["auto"].addressing.network.overlaps(default.network)


def test_an_explicit_subnet_on_a_host_interface_is_refused_but_for_passt():
    host = [("eth0", Net("192.168.50.0/24"))]
    with pytest.raises(NetworkError, match="host group br: network 192.168.50.0/24 overlaps 192.168.50.0/24 "
                                           "on host interface eth0"):
        planned(group("br", gateway="192.168.50.1/24"), host=host)
    assert str(planned(group("pt", mode="passt", gateway="192.168.50.1/24"), host=host)["pt"]
               .addressing.network) == "192.168.50.0/24"  # passt's subnet is the guest's alone


def test_defaults_avoid_the_hosts_networks_and_say_what_to_set_when_none_is_left():
    groups = planned(group("auto"), host=[("eth0", Net("192.168.128.0/18"))])
    assert not groups["auto"].addressing.network.overlaps(Net("192.168.128.0/18"))
    with pytest.raises(NetworkError, match="host group auto: no free /24 .*; set network.gateway or range"):
        planned(group("auto"), host=[("eth0", Net("192.168.0.0/16"))])
