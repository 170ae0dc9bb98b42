"""The proxy process: ``python -m slicer.proxy.server`` in the proxy's virtualenv (``slicer proxy
up`` starts it; see slicer.proxy.launch). mitmproxy listens on ``<bind>:3128`` and ``<bind>:3129``
(the latter for clients that speak TLS to the proxy, ``HTTPS_PROXY=https://…``; mitmproxy takes
either on both), mints leaves from the host group's CA, and verifies upstreams against the host's
trust store (``SSL_CERT_FILE`` if set)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from mitmproxy import options
from mitmproxy.tools.dump import DumpMaster

from slicer.proxy.addon import SlicerProxy
from slicer.proxy.audit import AuditLog
from slicer.proxy.policy import Policy
from slicer.proxy.state import proxy_dir, state_path

log = logging.getLogger("slicer.proxy")
SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
DUMMY_PREFIX = "slpx"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="slicer proxy up")
    p.add_argument("--hostgroup", required=True)
    p.add_argument("--bind", required=True)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--mode", choices=("strict", "audit"), default="strict")
    p.add_argument("--deny-cidr", action="append", default=[])
    p.add_argument("--http-port", type=int, default=3128)
    p.add_argument("--tls-port", type=int, default=3129)
    p.add_argument("--ca-cert", type=Path, required=True)
    p.add_argument("--ca-key", type=Path, required=True)
    return p.parse_args(argv)


def mitm_confdir(data_dir: Path, group: str, cert: Path, key: Path) -> Path:
    """mitmproxy reads its CA from ``<confdir>/mitmproxy-ca.pem`` (key, then certificate)."""
    confdir = proxy_dir(data_dir) / f"mitm-{group}"
    confdir.mkdir(parents=True, exist_ok=True)
    os.chmod(confdir, 0o700)
    pem = key.read_text() + cert.read_text()
    target = confdir / "mitmproxy-ca.pem"
    if not target.exists() or target.read_text() != pem:
        for old in confdir.glob("mitmproxy-ca*"):  # what mitmproxy derived from a previous CA
            old.unlink()
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(pem)
    return confdir


def local_addresses() -> tuple[str, ...]:
    """The host's own addresses (as /32 or /128): never an upstream, whatever DNS says (its
    services listen there: the API on a bridge gateway, the proxy itself)."""
    shown = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, check=True).stdout
    found = []
    for link in json.loads(shown or "[]"):
        for info in link.get("addr_info", []):
            if "local" in info:
                found.append(str(ipaddress.ip_network(info["local"].split("%", 1)[0])))
    return tuple(found)


def ensure_address(bind: str) -> list[str] | None:
    """Slicer's proxy on Linux: a dummy adapter carries the bind address if no interface has it
    (the loopback, where the kernel has no dummy driver). Returns how to undo it, if anything was made."""
    address = ipaddress.ip_interface(bind if "/" in bind else f"{bind}/32")
    if address.ip.is_unspecified:
        return None
    shown = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    if f" {address.ip}/" in shown:
        return None
    link = DUMMY_PREFIX + address.ip.packed.hex()  # one per address: proxies on two come and go apart
    made = address.version == 4 and subprocess.run(["ip", "link", "add", link, "type", "dummy"],
                                                   capture_output=True).returncode == 0
    if made:
        subprocess.run(["ip", "addr", "add", str(address), "dev", link], check=True)
        subprocess.run(["ip", "link", "set", link, "up"], check=True)
        return ["ip", "link", "del", link]
    host = f"{address.ip}/{address.max_prefixlen}"
    subprocess.run(["ip", "addr", "add", host, "dev", "lo"], check=True)
    return ["ip", "addr", "del", host, "dev", "lo"]


async def run(args: argparse.Namespace) -> None:
    host = str(ipaddress.ip_interface(args.bind if "/" in args.bind else f"{args.bind}/32").ip)
    confdir = mitm_confdir(args.data_dir, args.hostgroup, args.ca_cert, args.ca_key)
    opts = options.Options(
        mode=[f"regular@{host}:{args.http_port}", f"regular@{host}:{args.tls_port}"],
        confdir=str(confdir),
        ssl_verify_upstream_trusted_ca=os.environ.get("SSL_CERT_FILE") or SYSTEM_BUNDLE,
    )
    master = DumpMaster(opts, with_termlog=False, with_dumper=False)
    # Guests are the clients; their addresses may be anything the config gives (the token decides).
    # Bodies over 1 MiB stream through instead of being held whole.
    # rawtcp off: what is neither TLS nor HTTP is not relayed (the addon also forces HTTP parsing).
    master.options.update(block_global=False, stream_large_bodies="1m", rawtcp=False)
    audit = AuditLog(args.data_dir, host)
    denied = (*local_addresses(), *args.deny_cidr)
    master.addons.add(SlicerProxy(Policy(state_path(args.data_dir)), audit, args.mode, denied))

    async def counters() -> None:
        while True:
            await asyncio.sleep(1)
            with contextlib.suppress(OSError):
                audit.flush_counters()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, master.shutdown)
    flusher = asyncio.create_task(counters())
    print(f"slicer proxy: host group {args.hostgroup}, {host}:{args.http_port} and :{args.tls_port} (TLS), "
          f"mode {args.mode}", flush=True)
    try:
        await master.run()
    finally:
        flusher.cancel()
        audit.flush_counters()


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    undo = ensure_address(args.bind)
    try:
        asyncio.run(run(args))
    finally:
        if undo:
            subprocess.run(undo, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
