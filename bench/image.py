"""Image benchmark: pulling a user's OCI image, and booting VMs of it against the project's image.

Prints JSON: the seconds of ``slicer image pull`` (skopeo copy + umoci unpack + mkfs.ext4) for
an image of ~200 MB (the project's Debian tree with Python removed, pushed to a local
``docker-registry`` on loopback), the seconds of a second pull of the same digest (cache: the
disk is not made again), and create→agent-ready of a cold-booted VM from that image against one
from the project's image, rounds interleaved so both see the same machine noise, with their ratio
(goal ≤ 1.2: the runtime disk costs little once cached).
Usage: ``python3 bench/image.py [--runs 3]`` (as root, image built, docker-registry installed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from boot import private_network, start_daemon  # noqa: E402

from tests.oci_images import Registry, debian_root, pack  # noqa: E402

IMAGES = Path(os.environ.get("SLICER_TEST_IMAGE_DIR", "/var/lib/slicer"))
CONFIG = """
config:
  insecure_registry: true
  host_groups:
  - name: user
    count: 0
    vcpu: 1
    ram_mb: 512
    storage_size: 2G
    boot: cold
    image: REF
  - name: own
    count: 0
    vcpu: 1
    ram_mb: 512
    storage_size: 2G
    boot: cold
  api:
    bind_address: 127.0.0.1
    port: PORT
    auth: {enabled: false}  # loopback of the benchmark's own network namespace
"""


def create(client, group: str) -> float:
    t = time.monotonic()
    r = client.post(f"/hostgroup/{group}/nodes", params={"wait": "agent", "timeout": "10m"}, json={})
    elapsed = time.monotonic() - t
    r.raise_for_status()
    client.delete(f"/hostgroup/{group}/nodes/{r.json()['hostname']}").raise_for_status()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="create rounds per image")
    args = ap.parse_args()
    private_network()
    results: dict = {}
    registry = Registry()
    with tempfile.TemporaryDirectory(prefix="slb-", dir="/tmp") as tmp:
        work = Path(tmp)
        try:
            current = (IMAGES / "images/current").resolve()
            layout = pack(debian_root(work / "root", current), work, "deb", cmd="/bin/bash")
            shutil.rmtree(work / "root")
            ref = registry.push(layout, "bench/debian:1")
            (work / "images").mkdir()
            (work / "images/current").symlink_to(current)
            env = {**os.environ, "SLICER_DATA_DIR": str(work)}
            pull = [sys.executable, "-m", "slicer", "image", "pull", "--insecure", ref]
            t = time.monotonic()
            subprocess.run(pull, env=env, check=True, capture_output=True)
            results["pull_and_convert_s"] = round(time.monotonic() - t, 2)
            t = time.monotonic()
            subprocess.run(pull, env=env, check=True, capture_output=True)
            results["pull_again_cached_digest_s"] = round(time.monotonic() - t, 2)
            listed = json.loads(subprocess.run([sys.executable, "-m", "slicer", "image", "list", "--json"], env=env,
                                               check=True, capture_output=True, text=True).stdout)
            results["image_files_mb"] = round(listed[0]["content_bytes"] / 1e6, 1)
            results["image_disk_mb"] = round(listed[0]["size_bytes"] / 1e6, 1)
            daemon, client = start_daemon(work, CONFIG.replace("REF", ref))
            try:
                user: list[float] = []
                own: list[float] = []
                for _ in range(args.runs):
                    user.append(create(client, "user"))
                    own.append(create(client, "own"))
            finally:
                daemon.terminate()
                daemon.wait(120)
        finally:
            registry.close()
    u, o = statistics.median(user), statistics.median(own)
    results["create_to_ready_cold_s"] = {
        "user_image": {"median": round(u, 2), "all": [round(x, 2) for x in user]},
        "project_image": {"median": round(o, 2), "all": [round(x, 2) for x in own]},
        "ratio_user_over_project": round(u / o, 2),
    }
    results["goal"] = {"ratio_at_most": 1.2}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
