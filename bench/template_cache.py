"""Template cache benchmark: a group's template built (a cold boot and a save) against the same
template copied from another daemon's (``template_cache``).

Each round starts two daemons on one fresh cache, each with its own data directory and a host
group of its own name and subnet but the same machine: the first builds its template (``POST
/hostgroup/NAME/template``), the second gets its one from the cache; then a sandbox of each,
create→ready. Prints JSON: medians over the rounds, and their ratios measured in the same run.
Usage: ``python3 bench/template_cache.py [--rounds 3]`` (as root, image built).
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
  template_cache: {cache}
  host_groups:
  - name: {group}
    count: 0
    vcpu: 1
    ram_mb: 512
    storage_size: 2G
    network: {{gateway: {gateway}}}
  api:
    bind_address: 127.0.0.1
    port: PORT
    auth: {{enabled: false}}  # loopback of the benchmark's own network namespace
"""


def timed(call) -> tuple[httpx.Response, float]:
    t = time.monotonic()
    r = call()
    elapsed = time.monotonic() - t
    r.raise_for_status()
    return r, elapsed


def one_daemon(work: Path, cache: Path, group: str, gateway: str) -> dict:
    """Get ``group``'s template, then one sandbox of it: their seconds."""
    work.mkdir()
    (work / "images").symlink_to(IMAGES / "images")
    daemon, client = start_daemon(work, CONFIG.format(cache=cache, group=group, gateway=gateway))
    try:
        _, template = timed(lambda: client.post(f"/hostgroup/{group}/template"))
        r, create = timed(lambda: client.post(f"/hostgroup/{group}/nodes", params={"wait": "agent"}, json={}))
        client.delete(f"/hostgroup/{group}/nodes/{r.json()['hostname']}").raise_for_status()
        return {"template_s": template, "create_s": create}
    finally:
        daemon.terminate()
        daemon.wait(120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    private_network()
    built: list[dict] = []
    copied: list[dict] = []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="slb-", dir="/tmp") as tmp:
            work, cache = Path(tmp), Path(tmp) / "cache"
            built.append(one_daemon(work / "a", cache, "first", "10.201.0.1/24"))
            copied.append(one_daemon(work / "b", cache, "second", "10.202.0.1/24"))

    def median(rows: list[dict], key: str) -> float:
        return round(statistics.median(r[key] for r in rows), 3)

    build, copy = median(built, "template_s"), median(copied, "template_s")
    print(json.dumps({
        "rounds": args.rounds,
        "template_built_s": build, "template_from_cache_s": copy,
        "ratio_built_over_cached": round(build / copy, 1),
        "first_create_after_build_s": median(built, "create_s"),
        "first_create_after_copy_s": median(copied, "create_s"),
    }, indent=2))


if __name__ == "__main__":
    main()
