"""The nftables scripts as text (tests/test_net_rules.py has ``nft -c`` load them): what each
rule says, for the choices a config makes."""

from __future__ import annotations

import pytest

from slicer.net.config import rule_entry
from slicer.net.firewall import (
    IsolatedGroup,
    _policy_rules,
    guard,
    isolated_elements,
    port_elements,
    ruleset,
    vm_policy_elements,
)


def chain(script: str, name: str) -> str:
    return script.split(f"chain {name} {{", 1)[1].split("\n  }", 1)[0]


def test_a_bridge_only_ruleset_names_its_bridges_and_gateways_and_nothing_isolated():
    script = ruleset("slicer_t", ["sbt0", "sbt1"], ["10.0.0.0/24"], [], "", [("sbt0", "10.0.0.1")])
    assert 'set bridges { type ifname; elements = { "sbt0", "sbt1" }; }' in script
    assert "set bridge_nets { type ipv4_addr; flags interval; elements = { 10.0.0.0/24 }; }" in script
    assert 'elements = { "sbt0" . 10.0.0.1 };' in script
    assert "set isolated_nets { type ipv4_addr; flags interval; }" in script
    assert "iso_" not in script and '"*"' not in script and "chain output" not in script
    assert script.startswith("add table bridge slicer_t\ndelete table bridge slicer_t\n")  # replaces, never adds


def test_isolated_groups_get_a_set_a_jump_and_a_chain_each():
    groups = [IsolatedGroup("web-a", "169.254.4.0/22"), IsolatedGroup("db", "169.254.8.0/22", drop=["10.0.0.0/8"])]
    script = ruleset("slicer_t", [], [], groups, "st-")
    assert "  set iso_web_a { type ifname; }\n  set iso_db { type ifname; }\n" in script
    forward = chain(script, "forward")
    assert "iifname @iso_web_a jump iso_web_a" in forward and "iifname @iso_db jump iso_db" in forward
    assert 'iifname "st-*" iifname != @isolated drop' in forward  # a veth not (yet) in the sets
    assert 'iifname "st-*" drop' in chain(script, "input")
    assert "elements = { 169.254.4.0/22, 169.254.8.0/22 }" in script
    assert "ip daddr 10.0.0.0/8 drop" in chain(script, "iso_db")


def test_an_isolated_group_reaches_the_host_only_at_an_allowed_ip_and_port():
    """Slicer's proxy lock-down: ``allow: [IP:3128]`` opens that port of the host (the proxy's bind
    address), before the drop of everything else; wider entries or ones without a port open nothing."""
    group = IsolatedGroup("px", "169.254.4.0/22", allow=["192.168.222.1/32:3128", "10.0.0.0/8:80", "10.9.9.9/32"],
                          drop=["0.0.0.0/0"])
    inp = chain(ruleset("slicer_t", [], [], [group], "st-"), "input")
    opened = "iifname @iso_px ip daddr 192.168.222.1 tcp dport 3128 accept"
    assert opened in inp and inp.index(opened) < inp.index("iifname @isolated drop")
    assert inp.count("iifname @iso_px") == 1  # 10.0.0.0/8:80 and a portless /32 reach no host port
    assert "@iso_" not in chain(ruleset("slicer_t", [], [], [IsolatedGroup("x", "169.254.8.0/22")], "st-"), "input")


def test_passts_uid_may_reach_neither_the_host_nor_link_local():
    output = chain(ruleset("slicer_t", [], [], [], helper_uid=1900000123), "output")
    assert 'meta skuid 1900000123 oifname "lo" drop' in output
    assert "meta skuid 1900000123 ip daddr 169.254.0.0/16 drop" in output


def rules_of(allow: list[str], drop: list[str]) -> list[str]:
    return [line.strip() for line in _policy_rules(IsolatedGroup("g", "169.254.4.0/22", allow=allow, drop=drop))
            .splitlines()]


LL_DROP = "ip daddr 169.254.0.0/16 drop"


@pytest.mark.parametrize(("allow", "drop", "expected"), [
    ([], [], [LL_DROP]),
    ([], ["10.0.0.0/8"], [LL_DROP, "ip daddr 10.0.0.0/8 drop"]),
    (["198.51.100.0/24"], [], ["ip daddr 198.51.100.0/24 accept", LL_DROP, "drop"]),
    (["0.0.0.0/0"], [], [LL_DROP, "ip daddr 0.0.0.0/0 accept", "drop"]),  # wide allow: metadata still closed
    (["169.254.169.254/32"], [], ["ip daddr 169.254.169.254/32 accept", LL_DROP, "drop"]),
    (["169.254.0.0/16"], [], ["ip daddr 169.254.0.0/16 accept", LL_DROP, "drop"]),  # naming it opens it
    # Slicer's proxy lock-down: the port of one address, nothing else
    (["192.0.2.1:3128", "192.0.2.1:3129"], ["0.0.0.0/0"],
     ["ip daddr 192.0.2.1/32 meta l4proto { tcp, udp } th dport 3128 accept",
      "ip daddr 192.0.2.1/32 meta l4proto { tcp, udp } th dport 3129 accept", LL_DROP, "ip daddr 0.0.0.0/0 drop",
      "drop"]),
    # the most specific wins, drop over allow on a tie
    (["10.0.0.0/8", "10.9.0.0/16"], ["10.1.0.0/16", "10.9.0.0/16"],
     ["ip daddr 10.1.0.0/16 drop", "ip daddr 10.9.0.0/16 drop", "ip daddr 10.9.0.0/16 accept", LL_DROP,
      "ip daddr 10.0.0.0/8 accept", "drop"]),
])
def test_egress_policy(allow, drop, expected):
    assert rules_of(allow, drop) == expected


def test_dns_to_the_groups_servers_comes_first():
    group = IsolatedGroup("g", "r", allow=["198.51.100.0/24"], dns=["192.0.2.1", "192.0.2.2"])
    rules = _policy_rules(group).splitlines()
    assert rules[:2] == ["    ip daddr { 192.0.2.1, 192.0.2.2 } udp dport 53 accept",
                         "    ip daddr { 192.0.2.1, 192.0.2.2 } tcp dport 53 accept"]


@pytest.mark.parametrize(("given", "normal"), [("192.0.2.1:3128", "192.0.2.1/32:3128"),
                                               ("10.0.0.0/255.0.0.0", "10.0.0.0/8"),
                                               ("10.1.2.3/8:443", "10.0.0.0/8:443")])
def test_allow_and_drop_entries_are_normalised(given, normal):
    assert rule_entry(given, "allow") == normal


@pytest.mark.parametrize(("given", "words"), [("192.0.2.1:0", "port must be"), ("192.0.2.1:http", "port must be"),
                                              ("nope:80", "not an IPv4"), ("2001:db8::/32", "not IPv4"),
                                              ("192.0.2.1:99999", "port must be")])
def test_bad_entries_are_refused_with_a_reason(given, words):
    with pytest.raises(ValueError, match=words):
        rule_entry(given, "allow")


@pytest.mark.parametrize("verb", ["add", "delete"])
def test_a_bridge_ports_elements(verb):
    lines = port_elements("slicer_t", "st0", "02:5c:0a:00:00:02", "10.0.0.2", verb).splitlines()
    assert lines == [f'{verb} element bridge slicer_t ports {{ "st0" }}',
                     f'{verb} element bridge slicer_t macs {{ "st0" . 02:5c:0a:00:00:02 }}',
                     f'{verb} element bridge slicer_t ips {{ "st0" . 02:5c:0a:00:00:02 . 10.0.0.2 }}']


def test_an_isolated_vm_joins_both_sets():
    script = isolated_elements("slicer_t", "sab-x", IsolatedGroup("my-g", "r"), "delete")
    assert script == ('delete element inet slicer_t isolated { "sab-x" }\n'
                      'delete element inet slicer_t iso_my_g { "sab-x" }\n')


def test_a_vms_own_policy_replaces_whatever_it_had():
    removed = vm_policy_elements("slicer_t", "sab-x", None)
    assert removed.splitlines() == ["add chain inet slicer_t vm_sab_x",
                                    'add element inet slicer_t vm_policy { "sab-x" : goto vm_sab_x }',
                                    'delete element inet slicer_t vm_policy { "sab-x" : goto vm_sab_x }',
                                    "delete chain inet slicer_t vm_sab_x"]
    given = vm_policy_elements("slicer_t", "sab-x", IsolatedGroup("g", "r", allow=["203.0.113.0/24"]))
    assert given.startswith(removed)  # the old chain goes first, in the same transaction
    added = given[len(removed):].splitlines()
    assert added[0] == "add chain inet slicer_t vm_sab_x"
    assert "add rule inet slicer_t vm_sab_x ip daddr 203.0.113.0/24 accept" in added
    assert "add rule inet slicer_t vm_sab_x drop" in added
    assert added[-1] == 'add element inet slicer_t vm_policy { "sab-x" : goto vm_sab_x }'


def test_the_namespace_guard_holds_the_tap_to_its_mac_and_ip():
    script = guard("tap0", "02:5c:a9:fe:04:02", "169.254.4.2")
    assert 'iifname "tap0" ether saddr != 02:5c:a9:fe:04:02 drop' in script
    assert 'iifname "tap0" meta nfproto ipv4 ip saddr != 169.254.4.2 drop' in script
    assert 'iifname "tap0" arp saddr ip != 169.254.4.2 drop' in script
    assert 'iifname "tap0" meta nfproto ipv6 drop' in script
