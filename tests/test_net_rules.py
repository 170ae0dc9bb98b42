"""Network planning and rules without VMs: backend choice, addressing, and the nftables
ruleset checked by the real ``nft`` (in the session's own network namespace)."""

from __future__ import annotations

import ipaddress
import subprocess

import pytest

from slicer.core.config import load_config
from slicer.net import Addressing, HostNetwork, NetworkError, mac_for
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
    iso = IsolatedGroup("b-x", "169.254.4.0/22", allow=["198.51.100.0/24"], dns=["198.51.100.10"])
    script = ruleset("slicer_test", ["sbtestbr"], ["192.168.140.0/24"], [iso])
    subprocess.run(["nft", "-c", "-f", "-"], input=script, text=True, check=True)
    subprocess.run(["nft", "-c", "-f", "-"], input=guard("tap0", "02:5c:01:02:03:04", "169.254.4.2"), text=True,
                   check=True)
