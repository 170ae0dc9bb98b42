"""Start benchmark: sandbox create→ready by cold boot against restore from the group's template.

Prints JSON: for 1 and for 5 concurrent creates, the median seconds of ``POST
/hostgroup/NAME/nodes?wait=agent`` with ``{"boot": "cold"}`` and with the default (restore
from the template), and their ratio. Rounds are interleaved (cold, restore, cold, …) so both see
the same machine noise; the template is built once before timing (its build time is printed).
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
            storage = client.get("/storage").json()
            results["template_bytes"] = sum(t["state_bytes"] + t["disk_bytes"] for t in storage["templates"])
        finally:
            daemon.terminate()
            daemon.wait(120)
    results["goal"] = {"ratio_at_least": 5, "restore_single_under_s": 1.5}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
