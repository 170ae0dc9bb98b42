"""Confinement benchmark: what running each QEMU confined (own uid, seccomp, cgroup, then
namespaces and a root of its own) costs.

Three daemons in one run, same group and image: ``jailed`` (``confine: true``, the default:
namespaces and root included), ``confined`` (``confine: true`` with ``SLICER_VMM_NAMESPACES=off``:
the jail as it was before its namespaces) and ``unconfined`` (``confine: false``); creates
alternate between them so all see the same machine noise. Prints JSON: the median seconds of
``POST /hostgroup/NAME/nodes?wait=agent`` restored from the group's template and booted cold, for
each daemon, and the ratios jailed/confined (the namespaces' cost) and confined/unconfined (goal
for both: at most 1.05). For confined VMs it also reports the VMM cgroup's
memory peak against guest RAM after the guest has touched most of its memory, for a restored
clone and a cold boot (a clone's limit is twice its RAM plus overhead: see slicer.vmm.jail).
Usage: ``python3 bench/confine.py [--runs 5]`` (as root, image built).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from boot import IMAGES, private_network, start_daemon  # noqa: E402
from start import create  # noqa: E402

RAM_MB = 512
MODES = ("jailed", "confined", "unconfined")
CONFIG = """
config:
  confine: {confine}
  host_groups:
  - name: bench
    count: 0
    vcpu: 1
    ram_mb: {ram_mb}
    storage_size: 2G
  api:
    bind_address: 127.0.0.1
    port: PORT
    auth: {{enabled: false}}  # loopback of the benchmark's own network namespace
"""


def memory_of(client: httpx.Client, hostname: str) -> dict:
    """Make the guest touch most of its RAM, then read its VMM's cgroup."""
    mb = RAM_MB * 5 // 8  # what a 512 MiB guest can allocate without its own OOM killer
    client.post(f"/vm/{hostname}/exec", params={"cmd": "python3", "args": ["-c", f"b = bytearray({mb} << 20)"],
                                                "buffered": "true"}).raise_for_status()
    vmm = client.get(f"/vm/{hostname}").json()["vmm"]
    return {"guest_ram_mb": RAM_MB, "touched_mb": mb, "cgroup_limit_mb": vmm["memory_limit"] >> 20,
            "cgroup_peak_mb": vmm["memory_peak"] >> 20,
            "peak_over_guest_ram": round(vmm["memory_peak"] / (RAM_MB << 20), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="creates per daemon and boot mode")
    args = ap.parse_args()
    private_network()
    results: dict = {"ram_mb": RAM_MB, "runs": args.runs}
    with tempfile.TemporaryDirectory(prefix="slb-", dir="/tmp") as tmp:
        daemons = {}
        try:
            for mode in MODES:
                work = Path(tmp) / mode
                work.mkdir()
                (work / "images").symlink_to(IMAGES / "images")
                config = CONFIG.format(confine="false" if mode == "unconfined" else "true", ram_mb=RAM_MB)
                env = {"SLICER_VMM_NAMESPACES": "off"} if mode == "confined" else {}
                daemons[mode] = start_daemon(work, config, env=env)
                daemons[mode][1].post("/hostgroup/bench/template").raise_for_status()
            for boot in ("restore", "cold"):
                times: dict[str, list[float]] = {mode: [] for mode in MODES}
                for _ in range(args.runs):
                    for mode, (_, client) in daemons.items():
                        hostname, elapsed = create(client, cold=boot == "cold")
                        times[mode].append(elapsed)
                        if mode == "jailed" and f"memory_{boot}" not in results:
                            results[f"memory_{boot}"] = memory_of(client, hostname)
                        client.delete(f"/hostgroup/bench/nodes/{hostname}").raise_for_status()
                med = {mode: statistics.median(t) for mode, t in times.items()}
                results[boot] = {
                    **{f"{mode}_s": {"median": round(m, 3), "all": [round(x, 3) for x in times[mode]]}
                       for mode, m in med.items()},
                    "ratio_jailed_over_confined": round(med["jailed"] / med["confined"], 3),
                    "ratio_confined_over_unconfined": round(med["confined"] / med["unconfined"], 3),
                }
        finally:
            for daemon, client in daemons.values():
                client.close()
                daemon.terminate()
                daemon.wait(120)
    results["goal"] = {"ratio_at_most": 1.05}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
