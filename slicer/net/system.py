"""The host's network tools: ``ip``, ``nft`` and sysctls, run as subprocesses (asynchronously)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

IFNAMSIZ = 15
CAP_NET_ADMIN = 12


class NetworkError(Exception):
    """Setting up the host's side of guest networking failed, or cannot be done here."""


def has_net_admin() -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    return False


def ifname(prefix: str, suffix: str) -> str:
    """``prefix + suffix``, or ``prefix`` + a digest of ``suffix`` where that is too long for Linux."""
    name = prefix + suffix
    if len(name) <= IFNAMSIZ:
        return name
    return prefix + hashlib.sha256(suffix.encode()).hexdigest()[: IFNAMSIZ - len(prefix)]


async def run(*argv: str, stdin: str | None = None, check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    if check and proc.returncode:
        what = " ".join(argv[:4])
        raise NetworkError(f"{what} failed: {err.decode(errors='replace').strip() or proc.returncode}")
    return out.decode()


async def ip_batch(commands: list[str], netns: str | None = None, check: bool = True) -> None:
    """Several ``ip`` commands in one process (``-force`` goes on past a failure when not checking)."""
    argv = ["ip", *(["-n", netns] if netns else []), *([] if check else ["-force"]), "-batch", "-"]
    await run(*argv, stdin="\n".join(commands) + "\n", check=check)


async def nft(script: str, netns: str | None = None, check: bool = True) -> None:
    """Load an nftables script: one transaction, applied whole or not at all."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    await run(*prefix, "nft", "-f", "-", stdin=script, check=check)


def sysctl(key: str, value: str) -> None:
    """Set a sysctl of the daemon's own network namespace."""
    Path("/proc/sys", *key.split(".")).write_text(value)


async def netns_sysctls(netns: str, settings: dict[str, str]) -> None:
    await run("ip", "netns", "exec", netns, "sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items()))


async def host_networks() -> list[tuple[str, str]]:
    """(interface, CIDR) of every IPv4 address on the host's interfaces."""
    data = json.loads(await run("ip", "-j", "-4", "addr", "show") or "[]")
    return [(i["ifname"], f"{a['local']}/{a['prefixlen']}") for i in data for a in i.get("addr_info", [])]


async def link_exists(name: str) -> bool:
    # Not /sys/class/net: sysfs shows the namespace it was mounted in, not the daemon's.
    proc = await asyncio.create_subprocess_exec("ip", "link", "show", "dev", name, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)
    return await proc.wait() == 0


def netns_names() -> list[str]:
    try:
        return sorted(os.listdir("/run/netns"))
    except FileNotFoundError:
        return []
