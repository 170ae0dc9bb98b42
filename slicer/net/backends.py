"""One network backend per host group: what a VM's NIC is attached to on the host."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import os
import signal
import socket
from pathlib import Path

from slicer.net.addressing import Addressing
from slicer.net.config import NetGroup
from slicer.net.context import NetContext
from slicer.net.firewall import IsolatedGroup, guard, isolated_elements, port_elements, vm_policy_elements
from slicer.net.system import NetworkError, ifname, ip_batch, link_exists, netns_sysctls, nft, run, sysctl
from slicer.net.tap import delete_tap, open_tap
from slicer.vmm.base import NetDevice

MAX_TAPS = 10000
PASST_LOG_MAX = 1 << 20  # passt.log's bound, kept by passt itself (--log-size: it drops the oldest part)
PASST_VERBOSITY = ("--quiet",)
Policy = dict[str, list[str]]  # a VM's own {"allow": [...], "drop": [...]}; an omitted key is its group's


def held_tap(pid: int) -> str | None:
    """The name of the TAP whose descriptor process ``pid`` holds (``iff:`` in its fdinfo)."""
    fds = Path(f"/proc/{pid}/fd")
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd) == "/dev/net/tun":
                for line in Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().splitlines():
                    if line.startswith("iff:"):
                        return line.split(":", 1)[1].strip()
    return None


class GroupNetwork(abc.ABC):
    mode: str
    device_kind: str = "tap"

    def __init__(self, group: NetGroup, context: NetContext) -> None:
        self.group = group
        self.context = context
        self.names = context.names
        self._addressing: Addressing | None = None

    @property
    def name(self) -> str:
        return self.group.name

    @property
    def addressing(self) -> Addressing:
        if self._addressing is None:
            raise NetworkError(f"host group {self.group.name}: network not set up yet")
        return self._addressing

    @addressing.setter
    def addressing(self, value: Addressing) -> None:
        self._addressing = value

    @property
    def planned(self) -> bool:
        """Whether its addresses have been chosen (at daemon start)."""
        return self._addressing is not None

    async def setup(self) -> None:
        """Make what the group shares (a bridge); called once at daemon start."""
        return None

    async def teardown(self) -> None:
        """Remove what :meth:`setup` made; idempotent."""
        return None

    @abc.abstractmethod
    async def attach(self, name: str, ip: str, run_dir: Path, policy: Policy | None = None) -> NetDevice:
        """Make VM ``name``'s link to the network; the caller closes the device's descriptor once
        the VMM holds it. Replaces whatever an earlier attach of the same VM left. ``policy``:
        the VM's own ``allow``/``drop`` (each omitted one is its group's)."""

    @abc.abstractmethod
    async def detach(self, name: str, ip: str, run_dir: Path) -> None:
        """Remove what :meth:`attach` made; idempotent."""

    async def adopt(self, name: str, ip: str, vmm_pid: int, policy: Policy | None = None) -> None:
        """Take back the link of a VM an earlier daemon attached and left running (its VMM
        ``vmm_pid`` still holds it): what lives in the host's firewall tables is added again."""
        self.check_policy(policy)

    def check_policy(self, policy: Policy | None) -> None:
        """Refuse a per-VM policy where there is nothing to apply it to (never ignore it)."""
        if policy:
            raise NetworkError(f"host group {self.group.name} ({self.mode}): a VM's own allow/drop apply to "
                               "isolated host groups only")

    def placeholder(self) -> NetDevice:
        """A device of the kind this group hands out, for command lines that are only digested."""
        return NetDevice(self.device_kind, fd=-1)

    async def template_device(self, name: str, run_dir: Path) -> NetDevice:
        """A NIC connected to nothing, for a template VM: its clones get their own links.
        :meth:`release` it once that VM has ended."""
        tap = ifname(self.names.template_tap_prefix, name)
        try:
            fd = open_tap(tap)
        except OSError as e:
            raise NetworkError(f"cannot create TAP {tap}: {e}") from e
        return NetDevice("tap", fd=fd, name=tap)

    async def release(self, dev: NetDevice) -> None:
        """After the VM of a :meth:`template_device`: its TAP goes, whatever its VMM made of it."""
        dev.close()
        if dev.kind == "tap" and dev.name:
            await delete_tap(dev.name)

    def describe(self) -> dict:
        return {"mode": self.mode, **self.addressing.describe()}


class BridgeNetwork(GroupNetwork):
    """A Linux bridge with the gateway address; each VM's TAP is a port of it."""

    mode = "bridge"

    def __init__(self, group: NetGroup, context: NetContext) -> None:
        super().__init__(group, context)
        self.bridge = group.network.bridge or self.names.bridge(group.name)
        self.tap_prefix = group.network.tap_prefix or self.names.default_tap_prefix
        self.taps: dict[str, str] = {}  # VM name → its TAP's name

    async def setup(self) -> None:
        if not await link_exists(self.bridge):
            await run("ip", "link", "add", self.bridge, "type", "bridge")
            self.context.ledger.made(self.bridge)
        gw = self.addressing.gateway
        await ip_batch([f"addr flush dev {self.bridge}", f"addr add {gw} dev {self.bridge}",
                        f"link set {self.bridge} up"])
        with contextlib.suppress(OSError):  # keep the host's IPv6 off the VMs' segment
            sysctl(f"net.ipv6.conf.{self.bridge}.disable_ipv6", "1")

    async def teardown(self) -> None:
        if self.context.ledger.owns(self.bridge):
            await run("ip", "link", "del", self.bridge, check=False)
            self.context.ledger.forget(self.bridge)
        else:
            await run("ip", "addr", "del", str(self.addressing.gateway), "dev", self.bridge, check=False)

    def _open(self, name: str) -> tuple[str, int]:
        in_use = set(self.taps.values())
        for i in range(MAX_TAPS):
            tap = f"{self.tap_prefix}{i}"
            if tap in in_use:
                continue
            try:
                return tap, open_tap(tap)
            except OSError as e:
                if e.errno != errno.EBUSY:  # busy: still held by a VM on its way out
                    raise NetworkError(f"cannot create TAP {tap}: {e}") from e
        raise NetworkError(f"no free TAP name with prefix {self.tap_prefix}")

    async def attach(self, name: str, ip: str, run_dir: Path, policy: Policy | None = None) -> NetDevice:
        self.check_policy(policy)
        await self.detach(name, ip, run_dir)
        tap, fd = self._open(name)
        self.taps[name] = tap
        try:
            mac = self.addressing.guest(ip).mac
            await nft(port_elements(self.names.table, tap, mac, ip))
            await ip_batch([f"link set {tap} master {self.bridge}", f"link set {tap} up"])
        except BaseException:
            os.close(fd)
            self.taps.pop(name, None)
            raise
        return NetDevice("tap", fd=fd)

    async def adopt(self, name: str, ip: str, vmm_pid: int, policy: Policy | None = None) -> None:
        self.check_policy(policy)
        tap = held_tap(vmm_pid)
        if tap is None:
            raise NetworkError(f"{name}: its QEMU holds no TAP")
        self.taps[name] = tap
        await nft(port_elements(self.names.table, tap, self.addressing.guest(ip).mac, ip))

    async def detach(self, name: str, ip: str, run_dir: Path) -> None:
        tap = self.taps.get(name)
        if tap is None:
            return
        try:
            # Deleted, not left to go with QEMU's descriptor: QEMU may have made it persistent.
            await delete_tap(tap)
            mac = self.addressing.guest(ip).mac
            table = self.names.table
            await nft(port_elements(table, tap, mac, ip) + port_elements(table, tap, mac, ip, "delete"))
        finally:
            # The name is free only now: another VM's attach given it meanwhile (its QEMU gone, the
            # device no longer busy) would have lost its TAP and its port to this removal.
            if self.taps.get(name) == tap:
                del self.taps[name]

    def describe(self) -> dict:
        return {**super().describe(), "bridge": self.bridge, "tap_prefix": self.tap_prefix}


class IsolatedNetwork(GroupNetwork):
    """Each VM's TAP in a network namespace of its own, routed to the host over a veth pair;
    the host's rules keep it from other VMs and from the host, and apply allow/drop."""

    mode = "isolated"

    @property
    def firewall(self) -> IsolatedGroup:
        net = self.group.network
        return IsolatedGroup(self.group.name, str(self.addressing.range), list(net.allow), list(net.drop),
                             list(self.group.dns_servers))

    def policy_of(self, policy: Policy | None) -> IsolatedGroup | None:
        """The group's firewall with a VM's own allow/drop in place of the group's, if it has any."""
        if not policy:
            return None
        fw = self.firewall
        fw.allow = list(policy.get("allow", fw.allow))
        fw.drop = list(policy.get("drop", fw.drop))
        return fw

    def check_policy(self, policy: Policy | None) -> None:
        return None

    def netns(self, name: str) -> str:
        return self.names.netns(name)

    def veth(self, name: str) -> str:
        return ifname(self.names.veth_prefix, name)

    async def attach(self, name: str, ip: str, run_dir: Path, policy: Policy | None = None) -> NetDevice:
        await self.detach(name, ip, run_dir)
        ns, veth, guest = self.netns(name), self.veth(name), self.addressing.guest(ip)
        staging = ifname(self.names.staging_tap_prefix, name)  # the TAP's name until it is in its namespace
        await run("ip", "netns", "add", ns)
        fd = -1
        try:
            fd = open_tap(staging)
            await ip_batch([f"link add {veth} type veth peer name veth0 netns {ns}",
                            f"link set {staging} netns {ns}", f"link set {veth} up",
                            f"route replace {ip}/32 dev {veth}"])
            sysctl(f"net.ipv4.conf.{veth}.proxy_arp", "1")  # answers the namespace for the world
            sysctl(f"net.ipv6.conf.{veth}.disable_ipv6", "1")
            await netns_sysctls(ns, {"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv4.ip_forward": "1",
                                     "net.ipv4.conf.veth0.proxy_arp": "1"})
            await ip_batch(["link set lo up", f"link set {staging} name tap0", f"addr add {guest.gateway}/30 dev tap0",
                            "link set tap0 up", "link set veth0 up", "route add default dev veth0"], netns=ns)
            await nft(guard("tap0", guest.mac, ip), netns=ns)
            # its own chain before it joins the group's set: never a moment under the group's rules
            await nft(vm_policy_elements(self.names.table, veth, self.policy_of(policy))
                      + isolated_elements(self.names.table, veth, self.firewall))
        except BaseException:
            if fd >= 0:
                os.close(fd)
            await self.detach(name, ip, run_dir)
            raise
        return NetDevice("tap", fd=fd)

    async def adopt(self, name: str, ip: str, vmm_pid: int, policy: Policy | None = None) -> None:
        if not os.path.exists(f"/run/netns/{self.netns(name)}"):
            raise NetworkError(f"{name}: its network namespace is gone")
        veth = self.veth(name)
        await nft(vm_policy_elements(self.names.table, veth, self.policy_of(policy))
                  + isolated_elements(self.names.table, veth, self.firewall))

    async def detach(self, name: str, ip: str, run_dir: Path) -> None:
        veth, table, fw = self.veth(name), self.names.table, self.firewall
        if os.path.exists(f"/run/netns/{self.netns(name)}"):
            await run("ip", "netns", "del", self.netns(name), check=False)  # the veth pair goes with it
        # whether or not the namespace was there: a cleanup that failed once is done again here
        await nft(isolated_elements(table, veth, fw) + isolated_elements(table, veth, fw, "delete")
                  + vm_policy_elements(table, veth, None), check=False)


class PasstNetwork(GroupNetwork):
    """A passt process per VM (no privileges needed): the guest's traffic leaves through the
    host's sockets. ``--no-map-gw``: the gateway address does not lead to the host's loopback.
    It talks to QEMU over a socket pair and ends when QEMU does."""

    mode = "passt"
    device_kind = "stream"

    def __init__(self, group: NetGroup, context: NetContext) -> None:
        super().__init__(group, context)
        self._passt: dict[str, int | None] = {}  # VM name → its passt's PID

    async def _start(self, ip: str, gateway: str, run_dir: Path) -> NetDevice:
        """passt on one end of a socket pair, QEMU on the other: no path, and passt ends by
        itself when QEMU's end closes (the VM's process is gone)."""
        run_dir.mkdir(parents=True, exist_ok=True)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        dns = [a for d in self.group.dns_servers for a in ("--dns", d)] or ["--dns", ""]
        argv = ["passt", "--foreground", "--ipv4-only", *PASST_VERBOSITY, "--no-map-gw",
                "--log-file", str(run_dir / "passt.log"), "--log-size", str(PASST_LOG_MAX),
                "--tcp-ports", "none", "--udp-ports", "none", "--no-dhcp", "--no-ndp", "--no-dhcpv6", "--no-ra",
                *(["--runas", f"{uid}:{uid}"] if (uid := self.context.helper_uid) else []),
                "--fd", str(theirs.fileno()), "--address", ip,
                "--netmask", str(self.addressing.network.prefixlen), "--gateway", gateway, *dns]
        try:
            with open(run_dir / "passt.err", "wb") as log:  # what passt says before its log file is open
                proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, stdout=log,
                                                            stderr=log, start_new_session=True,
                                                            pass_fds=(theirs.fileno(),))
        except OSError as e:
            ours.close()
            raise NetworkError(f"passt did not start: {e}") from e
        finally:
            theirs.close()
        self.context.helpers.track(proc)
        return NetDevice("stream", fd=ours.detach(), pid=proc.pid)

    async def attach(self, name: str, ip: str, run_dir: Path, policy: Policy | None = None) -> NetDevice:
        self.check_policy(policy)
        await self.detach(name, ip, run_dir)
        dev = await self._start(ip, self.addressing.guest(ip).gateway, run_dir)
        self._passt[name] = dev.pid
        return dev

    async def template_device(self, name: str, run_dir: Path) -> NetDevice:
        first = str(self.addressing.pool[0])
        return await self._start(first, self.addressing.guest(first).gateway, run_dir)

    async def detach(self, name: str, ip: str, run_dir: Path) -> None:
        pid = self._passt.pop(name, None)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)  # our child until reaped: the PID cannot be reused
