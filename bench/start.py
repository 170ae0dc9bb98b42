"""Start benchmark: sandbox create→ready by cold boot against restore from the group's template.

Prints JSON: for 1 and for 5 concurrent creates, the median seconds of ``POST
/hostgroup/NAME/nodes?wait=agent`` with ``{"boot": "cold"}`` and with the default (restore
from the template), and their ratio. Rounds are interleaved (cold, restore, cold, …) so both see
the same machine noise; the template is built once before timing (its build time is printed).
Also the mean of each phase of those creates (``slicer_vm_start_phase_seconds``: alloc, template,
attach, disks, jail, spawn, load, resume, ready, identity, setup), by how the VM came to be.
Usage: ``python3 bench/start.py [--runs 3] [--runs-concurrent 2]`` (as root, image built).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from boot import private_network, start_daemon  # noqa: E402

IMAGES = Path(os.environ.get("SLICER_TEST_IMAGE_DIR", "/var/lib/slicer"))
CONFIG = """
config:
  host_groups:
  - name: bench
    count: 0
    vcpu: {cpus}
    ram_mb: {ram_mb}
    storage_size: 2G
  api:
    bind_address: 127.0.0.1
    port: PORT
    auth: {{enabled: false}}  # loopback of the benchmark's own network namespace
"""


def create(client: httpx.Client, cold: bool) -> tuple[str, float]:
    t = time.monotonic()
    r = client.post("/hostgroup/bench/nodes", params={"wait": "agent", "timeout": "10m"},
                    json={"boot": "cold"} if cold else {})
    elapsed = time.monotonic() - t
    r.raise_for_status()
    return r.json()["hostname"], elapsed


def round_of(client: httpx.Client, n: int, cold: bool) -> list[float]:
    """``n`` concurrent creates; their times; then the VMs are deleted."""
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda _: create(client, cold), range(n)))
    for hostname, _ in results:
        client.delete(f"/hostgroup/bench/nodes/{hostname}").raise_for_status()
    return [t for _, t in results]


def phase_means(metrics: str) -> dict:
    """Mean milliseconds of each phase of the creates (slicer_vm_start_phase_seconds), by boot."""
    sums: dict[tuple[str, str], list[float]] = {}
    for family in text_string_to_metric_families(metrics):
        if family.name != "slicer_vm_start_phase_seconds":
            continue
        for s in family.samples:
            if s.name.endswith(("_sum", "_count")):
                key = (s.labels["boot"], s.labels["phase"])
                sums.setdefault(key, [0.0, 0.0])[s.name.endswith("_count")] += s.value
    out: dict = {}
    for (boot, phase), (total, count) in sorted(sums.items()):
        if count:
            out.setdefault(boot, {})[phase] = round(total / count * 1000, 1)
    return out


def summary(times: list[float]) -> dict:
    return {"median": round(statistics.median(times), 3), "all": [round(x, 3) for x in times]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="rounds of one create per mode")
    ap.add_argument("--runs-concurrent", type=int, default=2, help="rounds of 5 concurrent creates per mode")
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("--ram-mb", type=int, default=512)
    args = ap.parse_args()
    private_network()
    with tempfile.TemporaryDirectory(prefix="slb-", dir="/tmp") as tmp:
        work = Path(tmp)
        (work / "images").symlink_to(IMAGES / "images")
        results: dict = {"cpus": args.cpus, "ram_mb": args.ram_mb}
        daemon, client = start_daemon(work, CONFIG.format(cpus=args.cpus, ram_mb=args.ram_mb))
        try:
            t = time.monotonic()
            client.post("/hostgroup/bench/template").raise_for_status()
            results["template_build_s"] = round(time.monotonic() - t, 3)
            for n, runs in ((1, args.runs), (5, args.runs_concurrent)):
                cold: list[float] = []
                warm: list[float] = []
                for _ in range(runs):
                    cold += round_of(client, n, cold=True)
                    warm += round_of(client, n, cold=False)
                c, w = statistics.median(cold), statistics.median(warm)
                results[f"concurrent_{n}"] = {
                    "cold_boot_s": summary(cold), "restore_s": summary(warm),
                    "ratio_cold_over_restore": round(c / w, 2),
                }
            results["phases_mean_ms"] = phase_means(client.get("/metrics").text)
            storage = client.get("/storage").json()
            results["template_bytes"] = sum(t["state_bytes"] + t["disk_bytes"] for t in storage["templates"])
        finally:
            daemon.terminate()
            daemon.wait(120)
    results["goal"] = {"ratio_at_least": 5, "restore_single_under_s": 1.5}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
