"""Services benchmark: a daemon's ``count: N`` services booted cold against restored from their
group's template (on a copy of its disk), from ``slicer up`` to every service's agent answering.

Each round starts three daemons, one after another, each with a fresh data directory and one
host group of N services: ``boot: cold`` (every service boots its kernel, as all services did
before they were restored from templates); ``boot: snapshot`` with no template (one is built,
a cold boot and a save, then every service restores from it); and ``boot: snapshot`` with a
``template_cache`` the second daemon filled (the template is copied in). Prints JSON: medians
over the rounds, and their ratios measured in the same run.
Usage: ``python3 bench/services.py [--services 3] [--rounds 2]`` (as root, image built).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from boot import private_network, start_daemon  # noqa: E402

IMAGES = Path(os.environ.get("SLICER_TEST_IMAGE_DIR", "/var/lib/slicer"))
CONFIG = """
config:
  {cache}
  host_groups:
  - name: svc
    count: {count}
    vcpu: 1
    ram_mb: 512
    storage_size: 2G
    boot: {boot}
  api:
    bind_address: 127.0.0.1
    port: PORT
    auth: {{enabled: false}}  # loopback of the benchmark's own network namespace
"""


def all_ready(client: httpx.Client, count: int, timeout: float = 600) -> None:
    """Until each of the ``count`` services answers an exec through its agent."""
    deadline = time.monotonic() + timeout
    waiting = {f"svc-{i}" for i in range(1, count + 1)}
    while waiting:
        if time.monotonic() > deadline:
            raise SystemExit(f"services {sorted(waiting)} not ready within {timeout:g}s")
        for h in sorted(waiting):
            try:
                r = client.post(f"/vm/{h}/exec", params={"cmd": "true", "buffered": "true"}, timeout=5)
            except httpx.HTTPError:
                continue
            if r.status_code == 200:
                waiting.discard(h)
        time.sleep(0.1)


def one_daemon(work: Path, count: int, boot: str, cache: Path | None) -> tuple[float, list[str]]:
    """Seconds from ``slicer up`` to every service ready, and how each service started."""
    work.mkdir()
    (work / "images").symlink_to(IMAGES / "images")
    config = CONFIG.format(count=count, boot=boot, cache=f"template_cache: {cache}" if cache else "")
    t0 = time.monotonic()
    daemon, client = start_daemon(work, config)
    try:
        all_ready(client, count)
        elapsed = time.monotonic() - t0
        return elapsed, sorted(n["boot"] for n in client.get("/nodes").json())
    finally:
        daemon.terminate()
        daemon.wait(120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    private_network()
    rows: dict[str, list[float]] = {"cold": [], "template_built": [], "template_from_cache": []}
    boots: dict[str, list[str]] = {}
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="slb-", dir="/tmp") as tmp:
            cache = Path(tmp) / "cache"
            cache.mkdir(mode=0o700)
            for name, boot, cached in (("cold", "cold", None), ("template_built", "snapshot", cache),
                                       ("template_from_cache", "snapshot", cache)):
                seconds, boots[name] = one_daemon(Path(tmp) / name, args.services, boot, cached)
                rows[name].append(seconds)
    med = {k: round(statistics.median(v), 2) for k, v in rows.items()}
    print(json.dumps({
        "services": args.services, "rounds": args.rounds,
        **{f"{k}_s": v for k, v in med.items()},
        "ratio_template_built_over_cold": round(med["template_built"] / med["cold"], 2),
        "ratio_template_from_cache_over_cold": round(med["template_from_cache"] / med["cold"], 2),
        "boot_kinds": boots,
    }, indent=2))


if __name__ == "__main__":
    main()
