"""Network planning and rules without VMs: backend choice, addressing, and the nftables
ruleset checked by the real ``nft`` (in the session's own network namespace)."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import subprocess

import pytest

from slicer.core.config import load_config
from slicer.net import Addressing, HostNetwork, NetworkError, buildns, mac_for
from slicer.net import host as net_host
from slicer.net.firewall import IsolatedGroup, guard, ruleset

CONFIG = """
config:
  host_groups:
  - name: a
  - name: b
    network: {mode: isolated, allow: [198.51.100.0/24]}
"""


def test_backend_follows_privilege(tmp_path, monkeypatch):
    cfg = load_config(CONFIG)
    monkeypatch.setattr(net_host, "has_net_admin", lambda: True)
    assert HostNetwork(cfg.host_groups[:1], tmp_path).group("a").mode == "bridge"
    monkeypatch.setattr(net_host, "has_net_admin", lambda: False)
    assert HostNetwork(cfg.host_groups[:1], tmp_path).group("a").mode == "passt"  # never slirp
    with pytest.raises(NetworkError, match="b: network mode isolated needs CAP_NET_ADMIN"):
        HostNetwork(cfg.host_groups, tmp_path)


def test_names_differ_between_data_dirs(tmp_path):
    cfg = load_config(CONFIG)
    one, two = HostNetwork(cfg.host_groups, tmp_path / "x"), HostNetwork(cfg.host_groups, tmp_path / "y")
    assert one.table != two.table and one.group("a").bridge != two.group("a").bridge
    assert all(len(n.group("a").bridge) <= 15 for n in (one, two))


def test_addressing():
    cfg = load_config(CONFIG)
    taken = [ipaddress.IPv4Network("192.168.128.0/17")]  # every default /24 taken: a clear error
    with pytest.raises(ValueError, match="no free /24"):
        Addressing(cfg.group("a"), "seed", taken)
    a = Addressing(cfg.group("a"), "seed", [])
    assert a.network.prefixlen == 24 and a.network.subnet_of(ipaddress.IPv4Network("192.168.128.0/17"))
    assert a.service_address(1) == str(a.network.network_address + 2)
    assert a.guest(a.service_address(1)).gateway == str(a.network.network_address + 1)
    b = Addressing(cfg.group("b"), "seed", [])
    first = b.service_address(1)
    assert b.guest(first).ip_cidr.endswith("/30") and b.guest(first).gateway == str(ipaddress.IPv4Address(first) - 1)
    assert b.network.prefixlen == 22 and b.network.subnet_of(ipaddress.IPv4Network("169.254.0.0/16"))
    assert mac_for("192.168.1.2") == "02:5c:c0:a8:01:02"


def test_rulesets_load_in_nft():
    iso = IsolatedGroup("b-x", "169.254.4.0/22", allow=["198.51.100.0/24", "192.0.2.1/32:3128"], drop=["0.0.0.0/0"],
                        dns=["198.51.100.10"])
    script = ruleset("slicer_test", ["sbtestbr"], ["192.168.140.0/24"], [iso])
    subprocess.run(["nft", "-c", "-f", "-"], input=script, text=True, check=True)
    subprocess.run(["nft", "-c", "-f", "-"], input=guard("tap0", "02:5c:01:02:03:04", "169.254.4.2"), text=True,
                   check=True)


def test_build_network_rules_and_nameservers(tmp_path):
    """A Dockerfile build's table loads; its nameservers are the host's that a build can reach."""
    net = buildns.BuildNetwork("slicer-build-1-ab", "sbx1ab", "slicer_build_1ab",
                               ipaddress.IPv4Network("10.231.0.4/30"), ("eth0", "eth1"), ())
    script = buildns.ruleset(net)
    assert 'iifname "sbx1ab" drop' in script.split("chain input")[1].split("}")[0]  # nothing of the host's
    assert "169.254.0.0/16" in script and 'oifname { "eth0", "eth1" } accept' in script
    subprocess.run(["nft", "-c", "-f", "-"], input=script, text=True, check=True)
    no_uplink = buildns.ruleset(dataclasses.replace(net, uplinks=()))
    assert "accept\n    iifname" not in no_uplink.split("chain forward")[1]  # no egress at all
    subprocess.run(["nft", "-c", "-f", "-"], input=no_uplink, text=True, check=True)
    stub, upstream = tmp_path / "resolv.conf", tmp_path / "upstream.conf"
    stub.write_text("# systemd-resolved\nnameserver 127.0.0.53\noptions edns0\n")
    upstream.write_text("nameserver fe80::1\nnameserver 169.254.169.253\nnameserver 192.0.2.53\nnameserver ::1\n"
                        "nameserver 198.51.100.53\n")
    assert buildns.nameservers((stub, upstream)) == ("192.0.2.53", "198.51.100.53")
    assert buildns.nameservers((stub,)) == ()
    assert buildns.nameservers((tmp_path / "missing", upstream))[0] == "192.0.2.53"


def test_build_network_left_by_a_dead_builder_is_removed():
    dead = 0x3FFFFE
    assert not os.path.exists(f"/proc/{dead}")
    ns = f"slicer-build-{dead:x}-0abc"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        buildns.remove_stale()
        assert ns not in os.listdir("/run/netns")
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
