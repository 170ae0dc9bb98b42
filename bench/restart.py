"""Restart benchmark: a daemon killed outright, and the next one adopting every running VM.

For N = 1, 5, 20 VMs (``--sizes``): N sandboxes are booted cold at once (their time to all
answering health is the baseline), the daemon is killed with SIGKILL, a new one is started on
the same data directory, and the time from its start to every VM answering health again is
measured. Prints JSON: both times per N, their ratio, and the adoption time per VM; the QEMU
pids before and after must match (the guests never stopped). Goal: adoption well under a second
per VM. Usage: ``python3 bench/restart.py [--sizes 1,5,20]`` (as root, image built).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from boot import IMAGES, private_network, start_daemon  # noqa: E402

CONFIG = """
config:
  host_groups:
  - name: bench
    count: 0
    vcpu: 1
    ram_mb: 256
    storage_size: 2G
    boot: cold
  api:
    bind_address: 127.0.0.1
    port: PORT
    auth: {enabled: false}  # loopback of the benchmark's own network namespace
"""


def all_healthy(client: httpx.Client, hostnames: list[str], timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    pending = set(hostnames)
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"not healthy: {sorted(pending)}")
        for h in list(pending):
            try:
                if client.get(f"/vm/{h}/health", timeout=30).status_code == 200:
                    pending.discard(h)
            except httpx.HTTPError:
                pass
        if pending:
            time.sleep(0.05)


def pids(client: httpx.Client, hostnames: list[str]) -> dict[str, int]:
    return {h: client.get(f"/vm/{h}").json()["vmm"]["pid"] for h in hostnames}


def one_size(work: Path, n: int) -> dict:
    daemon, client = start_daemon(work, CONFIG)
    try:
        t = time.monotonic()
        with ThreadPoolExecutor(n) as pool:
            made = list(pool.map(lambda _: client.post("/hostgroup/bench/nodes", json={}), range(n)))
        hostnames = [r.raise_for_status().json()["hostname"] for r in made]
        all_healthy(client, hostnames)
        cold = time.monotonic() - t
        before = pids(client, hostnames)
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        client.close()
        t = time.monotonic()
        daemon, client = start_daemon(work, CONFIG)
        all_healthy(client, hostnames)
        adopted = time.monotonic() - t
        after = pids(client, hostnames)
        assert after == before, f"QEMUs changed across the restart: {before} → {after}"
        return {"vms": n, "cold_boot_all_s": round(cold, 3), "restart_to_all_healthy_s": round(adopted, 3),
                "adoption_per_vm_s": round(adopted / n, 3), "ratio_cold_over_restart": round(cold / adopted, 2)}
    finally:
        daemon.terminate()  # a graceful stop: the sandboxes go
        try:
            daemon.wait(300)
        except subprocess.TimeoutExpired:
            daemon.kill()
        client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,5,20", help="comma-separated VM counts")
    args = ap.parse_args()
    private_network()
    results = []
    with tempfile.TemporaryDirectory(prefix="slb-", dir="/tmp") as tmp:
        for n in (int(x) for x in args.sizes.split(",")):
            work = Path(tmp) / f"n{n}"
            work.mkdir()
            (work / "images").symlink_to(IMAGES / "images")
            results.append(one_size(work, n))
    print(json.dumps({"results": results, "goal": {"adoption_per_vm_s_under": 1.0}}, indent=2))


if __name__ == "__main__":
    main()
