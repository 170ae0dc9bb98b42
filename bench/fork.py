"""Fork benchmark: N live copies of a running VM against N restores from the group's template
and N cold boots, in one run.

For N = 1, 3, 10 (``--sizes``): time from the request to every VM answering (``wait=agent``)
for (a) ``POST /vm/{src}/fork`` with ``count=N``, (b) N concurrent creates restored from the
template, (c) N concurrent cold boots. The source holds 64 MiB of data in ``/dev/shm``; its
pause (vCPUs stopped while its state is written and its disk copied) and the fork's phases
come from the daemon's log. Host memory: the copies' QEMUs' summed PSS (shared pages counted once) against N times
one cold-booted VM's RSS. Prints JSON with the ratios. Goals: fork of 10 no slower than 10
template restores; memory of 10 copies well under 10 x one VM's.
Usage: ``python3 bench/fork.py [--sizes 1,3,10]`` (as root, image built).
"""

from __future__ import annotations

import argparse
import json
import re
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
  api:
    bind_address: 127.0.0.1
    port: PORT
    auth: {enabled: false}  # loopback of the benchmark's own network namespace
"""
PHASES = {
    "source_paused_s": re.compile(r"paused ([\d.]+)s to be forked"),
    "capture_s": re.compile(r"captured in ([\d.]+)s"),
    "made_shareable_s": re.compile(r"made shareable in ([\d.]+)s"),
}


def exec_(client: httpx.Client, h: str, cmd: str, background: bool = False) -> str:
    r = client.post(f"/vm/{h}/exec", params={"cmd": cmd, ("background" if background else "buffered"): "true"})
    r.raise_for_status()
    return "" if background else r.json()["stdout"]


def memory_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def create_many(client: httpx.Client, n: int, **body) -> tuple[float, list[str]]:
    t = time.monotonic()
    with ThreadPoolExecutor(n) as pool:
        made = list(pool.map(lambda _: client.post("/hostgroup/bench/nodes", params={"wait": "agent"}, json=body),
                             range(n)))
    elapsed = time.monotonic() - t
    return elapsed, [r.raise_for_status().json()["hostname"] for r in made]


def delete(client: httpx.Client, hostnames: list[str]) -> None:
    for h in hostnames:
        client.delete(f"/hostgroup/bench/nodes/{h}")


def one_size(client: httpx.Client, src: str, n: int, log: Path) -> dict:
    start = log.stat().st_size
    t = time.monotonic()
    r = client.post(f"/vm/{src}/fork", params={"wait": "agent"}, json={"count": n})
    fork_s = time.monotonic() - t
    copies = [c["hostname"] for c in r.raise_for_status().json()]
    with open(log, errors="replace") as f:
        f.seek(start)
        text = f.read()
    phases = {k: float(m.group(1)) if (m := rx.search(text)) else None for k, rx in PHASES.items()}
    pss = sum(memory_kib(client.get(f"/vm/{h}").json()["vmm"]["pid"], "Pss") for h in copies)
    for h in copies:  # every copy really is the source, memory included
        assert exec_(client, h, "cat /dev/shm/blob | md5sum") == exec_(client, src, "cat /dev/shm/blob | md5sum")
    delete(client, copies)
    restore_s, clones = create_many(client, n)
    delete(client, clones)
    cold_s, cold = create_many(client, n, boot="cold")
    one_rss = memory_kib(client.get(f"/vm/{cold[0]}").json()["vmm"]["pid"], "Rss")
    delete(client, cold)
    return {
        "copies": n, "fork_to_all_ready_s": round(fork_s, 3), **phases,
        "template_restores_s": round(restore_s, 3), "cold_boots_s": round(cold_s, 3),
        "ratio_restores_over_fork": round(restore_s / fork_s, 2), "ratio_cold_over_fork": round(cold_s / fork_s, 2),
        "copies_pss_mib": pss >> 10, "one_vm_rss_mib": one_rss >> 10,
        "ratio_copies_memory_over_n_vms": round(pss / (n * one_rss), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,3,10", help="comma-separated copy counts")
    args = ap.parse_args()
    private_network()
    results = []
    with tempfile.TemporaryDirectory(prefix="slb-", dir="/tmp") as tmp:
        work = Path(tmp)
        (work / "images").symlink_to(IMAGES / "images")
        log = work / "daemon.log"
        daemon, client = start_daemon(work, CONFIG, log)
        try:
            client.post("/hostgroup/bench/template").raise_for_status()
            _, (src,) = create_many(client, 1)
            exec_(client, src, "head -c 64M /dev/urandom > /dev/shm/blob")
            for n in (int(x) for x in args.sizes.split(",")):
                results.append(one_size(client, src, n, log))
        finally:
            daemon.terminate()
            try:
                daemon.wait(300)
            except subprocess.TimeoutExpired:
                daemon.kill()
            client.close()
    print(json.dumps({"results": results, "goal": {"ratio_restores_over_fork_at_10_at_least": 1.0,
                                                   "ratio_copies_memory_over_n_vms_well_under": 1.0}}, indent=2))


if __name__ == "__main__":
    main()
