"""The network of one Dockerfile build: a namespace of its own, NAT egress, no path to the host.

Each build's ``RUN`` steps join a network namespace made for that build (``slicer-build-<id>``),
linked to the host by a veth pair with a /30 (host ``.1``, build ``.2``, default route via
``.1``), and an nftables table of its own (``inet slicer_build_<id>``):

- input: everything arriving from the build's veth is dropped. The host's own addresses, all
  of them (loopback, the veth's ``.1``, every interface's address), serve nothing to a build.
- forward: from the build, only out of the interfaces that carry the host's default routes
  (the uplinks), and never to 127.0.0.0/8, 0.0.0.0/8, 169.254.0.0/16 (link-local: cloud
  metadata, isolated VMs) or multicast; so not to the VMs' bridges, isolated VMs' veths,
  containers' bridges or other builds. Into the build: replies only.
- postrouting: masquerade of the /30 (the outside sees the host's address).

buildah itself runs in the namespace as well (:meth:`BuildNetwork.enter`), so that ``ADD <url>``
follows the same rules, with the build's nameservers as its resolv.conf.

Everything is removed when the build ends, also on failure; what a killed build left is
removed by the next one (the namespace's name carries the builder's PID).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from slicer.net.addressing import _pick
from slicer.net.system import NetworkError

BUILD_SPACE = ipaddress.IPv4Network("10.231.0.0/16")
NETNS_PREFIX = "slicer-build-"
TABLE_PREFIX = "slicer_build_"
VETH_PREFIX = "sbx"  # + PID (hex) + 4 hex: at most 13; "x" is no hex digit, so never a bridge "sb" + tag
NEVER = "0.0.0.0/8, 127.0.0.0/8, 169.254.0.0/16, 224.0.0.0/3"
RESOLV_DIR = Path("/run/slicer-build")  # the resolv.conf of buildah itself, per build
RESOLV_FILES = (Path("/etc/resolv.conf"), Path("/run/systemd/resolve/resolv.conf"))


@dataclass(frozen=True)
class BuildNetwork:
    netns: str
    veth: str
    table: str
    network: ipaddress.IPv4Network
    uplinks: tuple[str, ...]
    dns: tuple[str, ...]

    @property
    def path(self) -> str:
        return f"/run/netns/{self.netns}"

    @property
    def resolv(self) -> Path:
        return RESOLV_DIR / f"{self.netns}.conf"

    def enter(self) -> list[str]:
        """A command prefix that runs a program in this network namespace (and nothing else of
        the host's changed: not ``ip netns exec``, which remounts /sys and so hides the cgroup
        mounts runc needs), with this network's nameservers as its /etc/resolv.conf (in a
        private mount namespace)."""
        enter = ["nsenter", f"--net={self.path}", "--"]
        if not self.dns:
            return enter
        return [*enter, "unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(self.resolv)]

    @property
    def gateway(self) -> str:
        return str(self.network.network_address + 1)

    @property
    def address(self) -> str:
        return str(self.network.network_address + 2)


def _run(*argv: str, stdin: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if check and proc.returncode:
        raise NetworkError(f"{' '.join(argv[:5])} failed: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def ruleset(net: BuildNetwork) -> str:
    """The build's table, replacing any earlier one of the same name."""
    t, veth = net.table, f'"{net.veth}"'
    uplinks = ", ".join(f'"{u}"' for u in net.uplinks)
    egress = f"    iifname {veth} oifname {{ {uplinks} }} accept\n" if uplinks else ""
    return f"""\
add table inet {t}
delete table inet {t}
table inet {t} {{
  chain input {{
    type filter hook input priority -10; policy accept;
    iifname {veth} drop
  }}
  chain forward {{
    type filter hook forward priority -10; policy accept;
    oifname {veth} ct state established,related accept
    oifname {veth} drop
    iifname {veth} ip daddr {{ {NEVER} }} drop
{egress}    iifname {veth} drop
  }}
  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
    ip saddr {net.network} oifname != {veth} masquerade
  }}
}}
"""


def nameservers(files: tuple[Path, ...] = RESOLV_FILES) -> tuple[str, ...]:
    """The host's IPv4 nameservers a build can reach: not loopback (systemd-resolved's
    127.0.0.53 is the host's, so its upstream servers are read instead), not link-local."""
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        found = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                try:
                    addr = ipaddress.ip_address(parts[1])
                except ValueError:
                    continue
                if addr.version == 4 and not (addr.is_loopback or addr.is_link_local or addr.is_unspecified):
                    found.append(str(addr))
        if found:
            return tuple(found)
    return ()


def _uplinks() -> tuple[str, ...]:
    routes = json.loads(_run("ip", "-j", "-4", "route", "show", "default") or "[]")
    return tuple(sorted({r["dev"] for r in routes if r.get("dev")}))


def _local() -> list[ipaddress.IPv4Interface]:
    return [ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}")
            for i in json.loads(_run("ip", "-j", "-4", "addr", "show") or "[]") for a in i.get("addr_info", [])]


def _taken() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the host has an address in or a route to (but the default)."""
    taken = [a.network for a in _local()]
    for r in json.loads(_run("ip", "-j", "-4", "route", "show", "table", "all") or "[]"):
        with contextlib.suppress(ValueError):
            if r.get("dst") and r["dst"] != "default":
                taken.append(ipaddress.IPv4Network(r["dst"], strict=False))
    return taken


def _remove(netns: str, veth: str, table: str) -> None:
    _run("nft", "-f", "-", stdin=f"add table inet {table}\ndelete table inet {table}\n", check=False)
    with contextlib.suppress(FileNotFoundError):
        (RESOLV_DIR / f"{netns}.conf").unlink()
    if os.path.exists(f"/run/netns/{netns}"):
        _run("ip", "netns", "del", netns, check=False)  # the veth pair goes with it
    _run("ip", "link", "del", veth, check=False)


def remove_stale() -> None:
    """Remove what builds whose process is gone left behind (a build killed mid-way)."""
    try:
        names = os.listdir("/run/netns")
    except FileNotFoundError:
        return
    for ns in names:
        if not ns.startswith(NETNS_PREFIX):
            continue
        ident = ns[len(NETNS_PREFIX):]
        pid_hex = ident.split("-")[0]
        try:
            alive = Path(f"/proc/{int(pid_hex, 16)}").exists()
        except ValueError:
            continue
        if not alive:
            plain = ident.replace("-", "")
            _remove(ns, VETH_PREFIX + plain, TABLE_PREFIX + plain)


@contextlib.contextmanager
def build_network(dns: tuple[str, ...] | None = None,
                  progress: Callable[[str], None] = print) -> Iterator[BuildNetwork]:
    """A network namespace for one build, removed (with its veth and table) when it ends."""
    remove_stale()
    ident = f"{os.getpid():x}-{secrets.token_hex(2)}"
    try:
        block = _pick(BUILD_SPACE, 30, ident, _taken())
    except ValueError as e:
        raise NetworkError(f"no free /30 for the build's network: {e}") from e
    plain = ident.replace("-", "")
    net = BuildNetwork(NETNS_PREFIX + ident, VETH_PREFIX + plain, TABLE_PREFIX + plain, block, _uplinks(),
                       nameservers() if dns is None else tuple(dns))
    if not net.uplinks:
        progress("build network: the host has no default route; RUN steps have no egress")
    if not net.dns:
        progress("build network: no nameserver but loopback ones in /etc/resolv.conf; "
                 "pass --dns for RUN steps that resolve names")
    own = sorted({str(a.ip) for a in _local()} & set(net.dns))
    if own:
        progress(f"build network: nameserver {', '.join(own)} is this host's own address, which builds cannot "
                 "reach; pass --dns")
    try:
        _run("nft", "-f", "-", stdin=ruleset(net))  # the rules before the link: never a moment without
        _run("ip", "netns", "add", net.netns)
        _run("ip", "link", "add", net.veth, "type", "veth", "peer", "name", "eth0", "netns", net.netns)
        with contextlib.suppress(OSError):
            Path(f"/proc/sys/net/ipv6/conf/{net.veth}/disable_ipv6").write_text("1")
        _run("ip", "-batch", "-", stdin=f"addr add {net.gateway}/30 dev {net.veth}\nlink set {net.veth} up\n")
        _run("ip", "netns", "exec", net.netns, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
             "net.ipv6.conf.default.disable_ipv6=1")
        _run("ip", "-n", net.netns, "-batch", "-",
             stdin=f"link set lo up\naddr add {net.address}/30 dev eth0\nlink set eth0 up\n"
                   f"route add default via {net.gateway}\n")
        if net.dns:
            RESOLV_DIR.mkdir(mode=0o755, exist_ok=True)
            net.resolv.write_text("".join(f"nameserver {d}\n" for d in net.dns))
        if net.uplinks:
            Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
        yield net
    finally:
        _remove(net.netns, net.veth, net.table)
