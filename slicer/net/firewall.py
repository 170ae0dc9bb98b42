"""The nftables rules of one daemon: two tables named ``slicer_<tag>`` (families ``bridge`` and
``inet``), written whole and replaced in one transaction; VMs come and go as set elements.

Why the ``nft`` command rather than libnftables' Python binding: a script is one atomic
transaction, readable in logs and docs as it is, and the daemon does not depend on the system
Python's ``python3-nftables`` matching the interpreter it runs on.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

# Link-local: a cloud's instance metadata (169.254.169.254: the instance's credentials), ECS task
# metadata, Azure's wire server. Closed to guests by default in every mode; ``allow`` opens it.
LINK_LOCAL = ipaddress.IPv4Network("169.254.0.0/16")


@dataclass
class IsolatedGroup:
    name: str
    range: str
    allow: list[str] = field(default_factory=list)
    drop: list[str] = field(default_factory=list)
    dns: list[str] = field(default_factory=list)

    @property
    def set_name(self) -> str:
        return "iso_" + self.name.replace("-", "_")


def _elements(values: list[str], quote: bool = False) -> str:
    if not values:
        return ""
    items = ", ".join(f'"{v}"' if quote else v for v in values)
    return f" elements = {{ {items} }};"


def ruleset(table: str, bridges: list[str], bridge_nets: list[str], isolated: list[IsolatedGroup],
            veth_prefix: str = "", gateways: list[tuple[str, str]] = (), helper_uid: int | None = None) -> str:
    """The daemon's whole ruleset, replacing any earlier one of the same name. ``veth_prefix``
    names every isolated VM's veth: one not (yet) in the sets, such as a running VM's just after a
    restart until it is adopted again, gets nothing through. ``gateways``: (bridge, address) a
    bridge group's VMs may reach the host at (no other address of the host's); ``helper_uid``:
    the uid passt runs as, whose connections may not reach the host or link-local addresses."""
    gw = ", ".join(f'"{b}" . {a}' for b, a in gateways)
    passt = _passt_chain(helper_uid) if helper_uid is not None else ""
    unknown_in, unknown_fwd = _unknown_veths(veth_prefix)
    iso_nets = [g.range for g in isolated]
    group_sets = "".join(f"  set {g.set_name} {{ type ifname; }}\n" for g in isolated)
    jumps = "".join(f"    iifname @{g.set_name} jump {g.set_name}\n" for g in isolated)
    chains = "".join(_group_chain(g) for g in isolated)
    host_ports = "".join(_host_port_rules(g) for g in isolated)
    return f"""\
add table bridge {table}
delete table bridge {table}
add table inet {table}
delete table inet {table}
{_bridge_table(table)}table inet {table} {{
  set bridges {{ type ifname;{_elements(bridges, quote=True)} }}
  set bridge_nets {{ type ipv4_addr; flags interval;{_elements(bridge_nets)} }}
  set bridge_gateways {{ type ifname . ipv4_addr;{f" elements = {{ {gw} }};" if gw else ""} }}
  set isolated {{ type ifname; }}
  set isolated_nets {{ type ipv4_addr; flags interval;{_elements(iso_nets)} }}
{group_sets}  # A VM with a policy of its own (create/fork ``network``) goes to its chain instead of its group's.
  map vm_policy {{ type ifname : verdict; }}
  chain input {{
    type filter hook input priority -10; policy accept;
    # An isolated VM reaches nothing on the host (replies to the host's own connections pass) but a
    # port its group allows as IP:PORT there (the proxy lock-down).
    iifname @isolated ct state established,related accept
{host_ports}    iifname @isolated drop
{unknown_in}    # Never the host's loopback, whatever route_localnet says.
    iifname @bridges ip daddr 127.0.0.0/8 drop
    # A bridge VM reaches the host at its gateway only: not at the host's other addresses, nor by
    # broadcast or multicast (services bound to 0.0.0.0 would answer those).
    iifname @bridges ct state established,related accept
    iifname . ip daddr @bridge_gateways accept
    iifname @bridges drop
  }}
  chain forward {{
    type filter hook forward priority -10; policy accept;
    ct state established,related accept
{unknown_fwd}    iifname @isolated oifname @isolated drop
    iifname @isolated oifname @bridges drop
    iifname @bridges oifname @isolated drop
    iifname @bridges ip daddr {LINK_LOCAL} drop
    iifname vmap @vm_policy
{jumps}  }}
{chains}{passt}  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
    ip saddr @bridge_nets ip daddr != @bridge_nets oifname != @bridges masquerade
    ip saddr @isolated_nets ip daddr != @isolated_nets oifname != @isolated masquerade
  }}
}}
"""


def _bridge_table(table: str) -> str:
    # Anti-spoofing: a frame from a VM's port must carry that VM's MAC, and its IPv4 or ARP
    # sender address must be the VM's; nothing else (IPv6, VLANs, other protocols) gets in.
    return f"""\
table bridge {table} {{
  set ports {{ type ifname; }}
  set macs {{ type ifname . ether_addr; }}
  set ips {{ type ifname . ether_addr . ipv4_addr; }}
  chain prerouting {{
    type filter hook prerouting priority -200; policy accept;
    iifname != @ports accept
    iifname . ether saddr != @macs drop
    ether type arp iifname . arp saddr ether . arp saddr ip != @ips drop
    ether type ip iifname . ether saddr . ip saddr != @ips drop
    ether type != {{ ip, arp }} drop
  }}
}}
"""


def _unknown_veths(veth_prefix: str) -> tuple[str, str]:
    """The input and forward rules that stop a veth of ours not (yet) in the sets."""
    if not veth_prefix:
        return "", ""
    unknown = f'"{veth_prefix}*"'
    return (f"    iifname {unknown} drop\n", f"    iifname {unknown} iifname != @isolated drop\n"
                                           f"    oifname {unknown} oifname != @isolated drop\n")


def _passt_chain(helper_uid: int) -> str:
    return (f"  chain output {{\n    type filter hook output priority -10; policy accept;\n"
            f"    # passt connects for its guests: never to the host itself (every local address is on lo)\n"
            f'    meta skuid {helper_uid} oifname "lo" drop\n'
            f"    meta skuid {helper_uid} ip daddr {LINK_LOCAL} drop\n  }}\n")


def _host_port_rules(g: IsolatedGroup) -> str:
    """Slicer's proxy lock-down reaches the proxy on the host itself: an ``allow`` of one address
    and port (``IP:PORT``, a /32) also admits that TCP port when the address is one of the host's
    (the proxy's ``--bind``). Nothing else of the host is reachable from an isolated VM."""
    lines = []
    for entry in g.allow:
        net, port = _parse(entry)
        if port is not None and net.prefixlen == 32:
            lines.append(f"    iifname @{g.set_name} ip daddr {net.network_address} tcp dport {port} accept\n")
    return "".join(lines)


def _group_chain(g: IsolatedGroup) -> str:
    return f"  chain {g.set_name} {{\n{_policy_rules(g)}  }}\n"


def _policy_rules(g: IsolatedGroup) -> str:
    """Slicer's egress rules for an isolated group: only ``drop`` → all else allowed; only
    ``allow`` → all else blocked; neither → everything. DNS to the group's servers always passes.

    Where entries overlap, the most specific decides: the longer prefix, then an entry with a
    port over one without, then drop over allow. So Slicer's proxy lock-down, ``drop: [0.0.0.0/0]``
    with ``allow: ["IP:3128"]``, reaches that port only, and ``allow: [10.0.0.0/8]`` with ``drop:
    [10.1.0.0/16]`` keeps 10.1 out. Link-local space (cloud metadata) is dropped as if by a /16
    entry of its own that only an allow naming it, or a part of it, overrides."""
    lines = []
    if g.dns:
        servers = ", ".join(g.dns)
        lines += [f"ip daddr {{ {servers} }} udp dport 53 accept", f"ip daddr {{ {servers} }} tcp dport 53 accept"]
    entries = [(*_parse(e), "accept", 1) for e in g.allow] + [(*_parse(e), "drop", 2) for e in g.drop]
    entries.append((LINK_LOCAL, None, "drop", 0))  # below an allow of the same size: naming it opens it
    entries.sort(key=lambda e: (e[0].prefixlen, e[1] is not None, e[3]), reverse=True)
    for net, port, verdict, _ in entries:
        ports = f" meta l4proto {{ tcp, udp }} th dport {port}" if port is not None else ""
        lines.append(f"ip daddr {net}{ports} {verdict}")
    if g.allow:
        lines.append("drop")  # what no allow named
    return "".join(f"    {line}\n" for line in lines)


def _parse(entry: str) -> tuple[ipaddress.IPv4Network, int | None]:
    """``CIDR`` or ``CIDR:PORT`` (normalised by slicer.net.config.rule_entry)."""
    net, _, port = entry.partition(":")
    return ipaddress.IPv4Network(net, strict=False), int(port) if port else None


def port_elements(table: str, tap: str, mac: str, ip: str, verb: str = "add") -> str:
    return (f'{verb} element bridge {table} ports {{ "{tap}" }}\n'
            f'{verb} element bridge {table} macs {{ "{tap}" . {mac} }}\n'
            f'{verb} element bridge {table} ips {{ "{tap}" . {mac} . {ip} }}\n')


def isolated_elements(table: str, veth: str, group: IsolatedGroup, verb: str = "add") -> str:
    return (f'{verb} element inet {table} isolated {{ "{veth}" }}\n'
            f'{verb} element inet {table} {group.set_name} {{ "{veth}" }}\n')


def vm_policy_elements(table: str, veth: str, policy: IsolatedGroup | None) -> str:
    """Give the VM behind ``veth`` a chain of its own with ``policy`` (its group's rules with the
    VM's allow/drop), or with None remove it; either way whatever it had before goes first."""
    chain = "vm_" + veth.replace("-", "_")
    element = f'{{ "{veth}" : goto {chain} }}'
    script = (f"add chain inet {table} {chain}\nadd element inet {table} vm_policy {element}\n"
              f"delete element inet {table} vm_policy {element}\ndelete chain inet {table} {chain}\n")
    if policy is not None:
        rules = "".join(f"add rule inet {table} {chain} {line.strip()}\n"
                        for line in _policy_rules(policy).splitlines())
        script += (f"add chain inet {table} {chain}\n{rules}"
                   f"add element inet {table} vm_policy {element}\n")
    return script


def guard(tap: str, mac: str, ip: str) -> str:
    """Anti-spoofing inside an isolated VM's namespace (its TAP is routed, not bridged)."""
    return f"""\
table inet guard {{
  chain prerouting {{
    type filter hook prerouting priority -300; policy accept;
    iifname "{tap}" ether saddr != {mac} drop
    iifname "{tap}" meta nfproto ipv4 ip saddr != {ip} drop
    iifname "{tap}" meta nfproto ipv6 drop
  }}
}}
table arp guard {{
  chain input {{
    type filter hook input priority 0; policy accept;
    iifname "{tap}" arp saddr ether != {mac} drop
    iifname "{tap}" arp saddr ip != {ip} drop
  }}
}}
"""
