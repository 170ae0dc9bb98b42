"""Slicer Proxy benchmark: an HTTPS request through the proxy against the same request straight to
the upstream, in one run. Prints JSON:

* latency: p50/p99 of a small GET on a new connection each time (as a guest's curl does), direct and
  through the proxy (CONNECT, the proxy's TLS, the upstream's TLS, the rule check, the injected secret);
* throughput: one large download, direct and through the proxy, in MB/s;
* the ratios proxied / direct.

Everything runs in network and mount namespaces of the script's own: the upstream (the tests' echo
server, its own CA) on one address, the proxy (``slicer proxy up``) on another, names in a private
/etc/hosts. No VM is needed: this measures the proxy, not TCG.

Usage: ``python3 bench/proxy.py [--requests 60] [--size-mb 128]`` (as root, scripts/install.sh run).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from slicer.core.ca import ensure_group_ca, issue_leaf  # noqa: E402
from slicer.proxy.store import ProxyStore  # noqa: E402

UPSTREAM, HOST_SIDE, PROXY = "10.77.0.10", "10.77.0.1", "10.77.1.1"
NAME, TOKEN = "api.bench.test", "bench-token-1"
UP_NS = f"slbench-up-{os.getpid()}"


def namespaces(hosts: Path) -> None:
    """This process in network and mount namespaces of its own (names from ``hosts``); the upstream
    in one more, behind a veth (the proxy refuses the host's own addresses as upstreams)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x40000000 | 0x00020000) != 0:  # CLONE_NEWNET | CLONE_NEWNS
        sys.exit("unshare failed: run as root")
    run = functools.partial(subprocess.run, check=True)
    run(["mount", "--make-rprivate", "/"])
    run(["mount", "--bind", str(hosts), "/etc/hosts"])
    run(["ip", "link", "set", "lo", "up"])
    run(["ip", "netns", "add", UP_NS])
    run(["ip", "link", "add", "bench0", "type", "veth", "peer", "name", "eth0", "netns", UP_NS])
    run(["ip", "addr", "add", f"{HOST_SIDE}/24", "dev", "bench0"])
    run(["ip", "link", "set", "bench0", "up"])
    for cmd in (f"addr add {UPSTREAM}/24 dev eth0", "link set eth0 up", "link set lo up"):
        run(["ip", "-n", UP_NS, *cmd.split()])


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def latency(n: int, proxy: str | None, ctx: ssl.SSLContext) -> dict:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        with httpx.Client(proxy=proxy, verify=ctx, timeout=30) as c:  # a new connection each time
            r = c.get(f"https://{NAME}/v1/ping")
        assert r.status_code == 200, r.text
        times.append(time.perf_counter() - t0)
    return {"p50_ms": round(percentile(times, 0.5) * 1000, 2), "p99_ms": round(percentile(times, 0.99) * 1000, 2)}


def throughput(size: int, proxy: str | None, ctx: ssl.SSLContext) -> float:
    with httpx.Client(proxy=proxy, verify=ctx, timeout=300) as c:
        t0, got = time.perf_counter(), 0
        with c.stream("GET", f"https://{NAME}/v1/blob", headers={"X-Size": str(size)}) as r:
            assert r.status_code == 200
            for chunk in r.iter_bytes(1 << 20):
                got += len(chunk)
        elapsed = time.perf_counter() - t0
    assert got == size, got
    return round(size / elapsed / 1e6, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--size-mb", type=int, default=128)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="slicer-bench-proxy-"))
    hosts = work / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{UPSTREAM} {NAME}\n")
    namespaces(hosts)
    ensure_group_ca(work / "up", "upstream")
    ensure_group_ca(work, "bench")  # the proxy would make it too, but the client must trust it first
    cert, key = issue_leaf(work / "up", "upstream", [NAME], work / "upstream")
    up_ca = work / "up" / "ca" / "upstream" / "ca.crt"
    store = ProxyStore(work)
    store.create_client({"name": "bench", "token": TOKEN})
    store.create_secret({"name": "key", "host": NAME, "value": "sk-bench"})
    store.add_allow({"client": "bench", "host": NAME, "secret": "key", "paths": ["/v1/*"]})
    procs = [subprocess.Popen(["ip", "netns", "exec", UP_NS, sys.executable, "-m", "tests.proxy_upstream", str(cert),
                               str(key), UPSTREAM, "443"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)]
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "slicer", "proxy", "up", "--hostgroup", "bench", "--bind", PROXY, "--data-dir",
         str(work)], cwd=ROOT, env={**os.environ, "SSL_CERT_FILE": str(up_ca)}, stdout=subprocess.DEVNULL))
    try:
        assert procs[0].stdout is not None and procs[0].stdout.readline().strip() == "ready"
        ctx = ssl.create_default_context(cafile=str(up_ca))
        ctx.load_verify_locations(str(work / "ca" / "bench" / "ca.crt"))
        proxy = f"http://x:{TOKEN}@{PROXY}:3128"
        for _ in range(300):  # the proxy is up when it answers
            try:
                latency(1, proxy, ctx)
                break
            except (httpx.HTTPError, AssertionError):
                time.sleep(0.1)
        latency(5, None, ctx)  # warm both paths
        latency(5, proxy, ctx)
        direct, proxied = latency(args.requests, None, ctx), latency(args.requests, proxy, ctx)
        size = args.size_mb << 20
        d_mbs, p_mbs = throughput(size, None, ctx), throughput(size, proxy, ctx)
        print(json.dumps({
            "requests": args.requests, "size_mb": args.size_mb,
            "latency_direct": direct, "latency_proxied": proxied,
            "latency_p50_ratio": round(proxied["p50_ms"] / direct["p50_ms"], 2),
            "latency_p50_added_ms": round(proxied["p50_ms"] - direct["p50_ms"], 2),
            "throughput_direct_mb_s": d_mbs, "throughput_proxied_mb_s": p_mbs,
            "throughput_ratio": round(p_mbs / d_mbs, 2),
        }, indent=2))
    finally:
        for p in procs:
            p.terminate()
            p.wait(20)
        subprocess.run(["ip", "netns", "del", UP_NS], check=False)


if __name__ == "__main__":
    main()
