"""Hand-out benchmark: how fast a sandbox is handed out from a warm pool, against a restore from
the group's template and a cold boot, one at a time and 20 at once; and the host memory each
idle sandbox and each pooled VM holds.

Prints JSON from one run (one daemon, two groups of the same size: ``pool`` with ``warm_pool:
N`` and ``tpl`` without): create→ready (``POST /hostgroup/G/nodes?wait=agent``) p50/p99 for a
pool hit (the pool refilled before each), for a template restore and for a cold boot; the wall
time of 20 concurrent creates with and without the pool; and host used memory (MemTotal -
MemAvailable) over the full pool and over 20 idle sandboxes, per VM. Ratios are of figures
measured in this same run. Usage: ``python3 bench/handout.py [--rounds 15] [--pool 20]``
(as root, image built).
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
from start import phase_means  # noqa: E402

IMAGES = Path(os.environ.get("SLICER_TEST_IMAGE_DIR", "/var/lib/slicer"))
CONFIG = """
config:
  host_groups:
  - {{name: pool, count: 0, vcpu: 1, ram_mb: 384, storage_size: 2G, warm_pool: {pool}}}
  - {{name: tpl, count: 0, vcpu: 1, ram_mb: 384, storage_size: 2G}}
  api:
    bind_address: 127.0.0.1
    port: PORT
    auth: {{enabled: false}}  # loopback of the benchmark's own network namespace
"""


def used_memory() -> int:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return (int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])) * 1024


def create(client: httpx.Client, group: str, cold: bool = False) -> tuple[str, float]:
    t = time.monotonic()
    r = client.post(f"/hostgroup/{group}/nodes", params={"wait": "agent", "timeout": "10m"},
                    json={"boot": "cold"} if cold else {})
    elapsed = time.monotonic() - t
    r.raise_for_status()
    return r.json()["hostname"], elapsed


def delete(client: httpx.Client, group: str, names: list[str]) -> None:
    for name in names:
        client.delete(f"/hostgroup/{group}/nodes/{name}").raise_for_status()


def pool_ready(client: httpx.Client, n: int, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = client.get("/info").json()["warm_pools"]["pool"]
        if stats["ready"] >= n and not stats["filling"]:
            return stats
        time.sleep(0.2)
    raise TimeoutError("the pool did not fill")


def concurrent(client: httpx.Client, group: str, n: int) -> tuple[float, list[str]]:
    t = time.monotonic()
    with ThreadPoolExecutor(n) as ex:
        made = list(ex.map(lambda _: create(client, group), range(n)))
    return time.monotonic() - t, [h for h, _ in made]


def percentiles(times: list[float]) -> dict:
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50": round(statistics.median(times), 3), "p99": round(p99, 3), "n": len(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="single creates per mode (cold: a third of them)")
    ap.add_argument("--pool", type=int, default=20, help="the pool's size, and how many creates run at once")
    args = ap.parse_args()
    private_network()
    results: dict = {"vm": "1 vCPU / 384 MiB", "pool_size": args.pool}
    with tempfile.TemporaryDirectory(prefix="slb-", dir="/tmp") as tmp:
        work = Path(tmp)
        (work / "images").symlink_to(IMAGES / "images")
        base = used_memory()
        daemon, client = start_daemon(work, CONFIG.format(pool=args.pool))
        try:
            client.post("/hostgroup/tpl/template").raise_for_status()
            pool_ready(client, args.pool)
            time.sleep(5)  # the last fills' transient memory settles
            with_pool = used_memory()
            results["memory_per_pooled_vm_mib"] = round((with_pool - base) / args.pool / 2**20, 1)

            wall, names = concurrent(client, "tpl", args.pool)
            results[f"concurrent_{args.pool}_without_pool_s"] = round(wall, 3)
            time.sleep(10)  # idle: their boot work is over
            results["memory_per_idle_sandbox_mib"] = round((used_memory() - with_pool) / args.pool / 2**20, 1)
            delete(client, "tpl", names)

            wall, names = concurrent(client, "pool", args.pool)
            results[f"concurrent_{args.pool}_with_pool_s"] = round(wall, 3)
            delete(client, "pool", names)

            hits, restores, colds = [], [], []
            for i in range(args.rounds):  # interleaved, so all three see the same noise
                pool_ready(client, args.pool)
                name, t = create(client, "pool")
                hits.append(t)
                delete(client, "pool", [name])
                name, t = create(client, "tpl")
                restores.append(t)
                delete(client, "tpl", [name])
                if i % 3 == 0:
                    name, t = create(client, "tpl", cold=True)
                    colds.append(t)
                    delete(client, "tpl", [name])
            stats = client.get("/info").json()["warm_pools"]["pool"]
            results["phases_mean_ms"] = phase_means(client.get("/metrics").text)
        finally:
            daemon.terminate()
            daemon.wait(120)
    results["pool_hit_s"] = percentiles(hits)
    results["template_restore_s"] = percentiles(restores)
    results["cold_boot_s"] = percentiles(colds)
    results["ratio_hit_over_restore_p50"] = round(results["pool_hit_s"]["p50"] / results["template_restore_s"]["p50"],
                                                  3)
    results["pool_counters"] = {"hits": stats["hits"], "misses": stats["misses"]}
    results["goal"] = {"pool_hit_p50_s": 0.15, "pool_hit_p99_s": 0.3, "ratio_hit_over_restore_at_most": 0.35,
                       f"concurrent_{args.pool}_with_pool_s_at_most": 3, "memory_per_idle_vm_mib_at_most": 60}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
