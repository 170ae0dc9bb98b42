"""Several flooding guests against one normal VM: the normal VM's health latency (p50) idle,
while 4 VMs burn CPU in the guest (the TCG cost alone), and while those 4 flood the channel
with legal frames (bench/guest_ping_flood.py) — the daemon-wide frame budget's test. Prints
JSON with the ratios measured in the same run (goal: flood p50 within 2x of idle).

Usage: ``python3 bench/flood.py [--seconds 40] [--samples 40]`` (as root, image built).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from boot import IMAGES, private_network, start_daemon  # noqa: E402

CONFIG = """
config:
  host_groups:
  - name: f
    count: 5
    vcpu: 1
    ram_mb: 256
    storage_size: 1G
  api:
    bind_address: 127.0.0.1
    port: PORT
    auth:
      enabled: false
"""
NORMAL, FLOODERS = "f-1", ["f-2", "f-3", "f-4", "f-5"]
FLOODER = Path(__file__).with_name("guest_ping_flood.py")


def health_p50(api: httpx.Client, samples: int) -> tuple[float, float]:
    times = []
    for _ in range(samples):
        t = time.monotonic()
        r = api.get(f"/vm/{NORMAL}/health", timeout=60)
        times.append(time.monotonic() - t)
        assert r.status_code == 200, r.text
        time.sleep(0.1)
    return statistics.median(times), max(times)


def run(api: httpx.Client, vm: str, cmd: str) -> None:
    r = api.post(f"/vm/{vm}/exec", params={"cmd": "setsid", "buffered": "true",
                                           "args": ["-f", "sh", "-c", f"exec >/dev/null 2>&1 </dev/null; {cmd}"]})
    assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=40)
    ap.add_argument("--samples", type=int, default=40)
    args = ap.parse_args()
    private_network()
    with tempfile.TemporaryDirectory(prefix="slb-", dir="/tmp") as tmp:
        work = Path(tmp)
        (work / "images").symlink_to(IMAGES / "images")
        daemon, api = start_daemon(work, CONFIG, work / "daemon.log")
        try:
            deadline = time.monotonic() + 600
            for vm in [NORMAL, *FLOODERS]:
                while api.get(f"/vm/{vm}/health", timeout=60).status_code != 200:
                    assert time.monotonic() < deadline, f"{vm} never answered"
                    time.sleep(1)
            for vm in FLOODERS:
                r = api.post(f"/vm/{vm}/cp", params={"path": "/root/flood.py"}, content=FLOODER.read_bytes(),
                             headers={"content-type": "application/octet-stream"})
                assert r.status_code == 200, r.text
            time.sleep(2)
            idle = health_p50(api, args.samples)
            for vm in FLOODERS:  # the guests' CPU alone: a busy loop each, no channel traffic
                run(api, vm, f"timeout {args.seconds / 2} sh -c 'while :; do :; done'")
            time.sleep(2)
            burn = health_p50(api, args.samples)
            time.sleep(args.seconds / 2)
            for vm in FLOODERS:
                run(api, vm, f"sleep 1; python3 /root/flood.py {args.seconds}")
            stop = threading.Event()

            def poke(vm: str) -> None:  # the daemon (re)connects, the flooder answers its hello
                with httpx.Client(base_url=str(api.base_url), timeout=15) as c:
                    while not stop.is_set():
                        try:
                            c.get(f"/vm/{vm}/health")
                        except httpx.HTTPError:
                            pass
                        stop.wait(1)

            pokers = [threading.Thread(target=poke, args=(vm,), daemon=True) for vm in FLOODERS]
            for p in pokers:
                p.start()
            time.sleep(8)  # guests' python started, hellos answered, floods running
            cpu0 = sum(map(int, Path(f"/proc/{daemon.pid}/stat").read_text().split()[13:15]))
            t0 = time.monotonic()
            flood = health_p50(api, args.samples)
            cpu = (sum(map(int, Path(f"/proc/{daemon.pid}/stat").read_text().split()[13:15])) - cpu0) / 100
            cpu_share = cpu / (time.monotonic() - t0)
            stop.set()
            faults = {vm: api.get(f"/vm/{vm}").json().get("channel_fault") for vm in FLOODERS}
        finally:
            daemon.terminate()
            daemon.wait(120)
    print(json.dumps({
        "normal_vm_health_p50_s": {"idle": round(idle[0], 4), "guests_burning_cpu": round(burn[0], 4),
                                   "guests_flooding": round(flood[0], 4)},
        "max_s": {"idle": round(idle[1], 4), "burn": round(burn[1], 4), "flood": round(flood[1], 4)},
        "ratio_flood_to_idle": round(flood[0] / idle[0], 2), "ratio_burn_to_idle": round(burn[0] / idle[0], 2),
        "daemon_cpu_share_during_flood": round(cpu_share, 2), "flooders_channel_fault": faults,
        "flooders": len(FLOODERS), "goal": {"ratio_flood_to_idle_under": 2.0}}, indent=2))


if __name__ == "__main__":
    main()
