"""Network benchmark: TCP throughput of each networking mode, against QEMU's user-mode
networking (slirp, the daemon's former default) measured in the same run.

Runs in a network namespace of its own (nothing leaves it). The "host" has a veth interface
with 198.51.100.1; a sink and a source listen there. A daemon runs groups in bridge (two VMs),
isolated and passt mode; a VM booted here with slirp is the baseline. iperf3 (in the guest
image) runs as the client in each guest against an iperf3 server on the host (``-R`` for
host→VM); VM→VM is bridge only (isolated and passt VMs cannot reach each other by design).
Rounds are interleaved; medians are printed as JSON (Mbit/s) with ratios to the baseline.

Usage: ``python3 bench/net.py [--rounds 3]`` (as root, image built).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slicer.channel.host import Channel, ChannelTransport  # noqa: E402
from slicer.channel.yamux import AGENT_PORT  # noqa: E402
from slicer.image.build import current_image  # noqa: E402
from slicer.vmm.accel import choose_accelerator  # noqa: E402
from slicer.vmm.base import NetDevice, VMSpec  # noqa: E402
from slicer.vmm.qemu import QEMU_BINARY, QemuDriver  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agent import IMAGES  # noqa: E402
from boot import free_port, private_network  # noqa: E402

HOST = "198.51.100.1"
IPERF_PORT = 5201
SECONDS = 4


def private_netns() -> None:
    private_network()
    for cmd in ("link add sltb0 type veth peer name sltb1", f"addr add {HOST}/24 dev sltb0", "link set sltb1 up",
                "link set sltb0 up",
                "route add default dev sltb0"):
        subprocess.run(["ip", *cmd.split()], check=True)


def iperf(target: str, reverse: bool) -> str:
    return f"iperf3 -c {target} -p {IPERF_PORT} -t {SECONDS} -J {'-R' if reverse else ''}"


def mbits(report: str) -> float:
    try:
        data = json.loads(report)
        return round(data["end"]["sum_received"]["bits_per_second"] / 1e6, 1)
    except (ValueError, KeyError):
        raise RuntimeError(f"iperf3 failed: {report[-500:]}") from None


async def run_in(client: httpx.AsyncClient, path: str, script: str) -> str:
    r = await client.post(path, params={"cmd": "bash", "args": ["-c", script], "buffered": "true"})
    r.raise_for_status()
    return r.json()["stdout"].strip()


async def main(rounds: int) -> dict:
    private_netns()
    server = subprocess.Popen(["iperf3", "-s", "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    work = Path(tempfile.mkdtemp(prefix="sbn", dir="/tmp"))  # short: unix socket paths live under it
    (work / "images").symlink_to(IMAGES / "images")
    port = free_port()
    groups = "".join(f"""
  - name: {name}
    count: {count}
    vcpu: 1
    ram_mb: 512
    storage_size: 2G
    network: {{{net}}}""" for name, count, net in (("br", 2, "mode: bridge"), ("iso", 1, "mode: isolated"),
                                                   ("pst", 1, "mode: passt")))
    (work / "config.yaml").write_text(f"config:\n  host_groups:{groups}\n  api:\n    port: {port}\n"
                                      "    auth: {enabled: false}\n")  # loopback of our own namespace
    log = open(work / "daemon.log", "wb")
    daemon = subprocess.Popen([sys.executable, "-m", "slicer", "up", str(work / "config.yaml"), "--data-dir",
                               str(work), "--no-build"], stdout=log, stderr=subprocess.STDOUT)
    image = current_image(IMAGES)
    accel = choose_accelerator(QEMU_BINARY, image.kernel, image.initrd, image.directory.parent / "accel.json")
    run = work / "raw"
    spec = VMSpec(name="slirp-1", cpus=1, ram_bytes=512 << 20, kernel=image.kernel, initrd=image.initrd,
                  base_disk=image.rootfs, disk=run / "disk.qcow2", disk_size=2 << 30, run_dir=run,
                  ip_cidr="10.0.2.15/24", gateway="10.0.2.2", net=NetDevice("user"))
    vm = await QemuDriver(accel).start(spec)
    channel = Channel(str(spec.channel_socket))
    try:
        api = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600)
        raw = httpx.AsyncClient(transport=ChannelTransport(channel, AGENT_PORT), base_url="http://agent", timeout=600)
        await channel.session(timeout=600)
        vms = {"br-1": None, "br-2": None, "iso-1": None, "pst-1": None}
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and not all(vms.values()):
            if daemon.poll() is not None:
                sys.exit(f"daemon exited: {(work / 'daemon.log').read_text()[-2000:]}")
            for h in vms:
                try:
                    vms[h] = vms[h] or (await api.get(f"/vm/{h}/health")).status_code == 200
                except httpx.HTTPError:
                    pass
            await asyncio.sleep(1)
        ips = {n["hostname"]: n["ip"] for n in (await api.get("/nodes")).json()}
        for h in ("br-1", "br-2", "iso-1"):  # the host can open connections to these (not to passt/slirp VMs)
            await run_in(api, f"/vm/{h}/exec", f"iperf3 -s -D -p {IPERF_PORT}")
        await asyncio.sleep(2)
        # mode → (exec path, client, whom the guest's iperf3 client targets, or None: the host's client
        # targets the guest; an isolated guest may not open connections to the host)
        modes = {"user": ("/exec", raw, "10.0.2.2"), "bridge": ("/vm/br-1/exec", api, None),
                 "isolated": ("/vm/iso-1/exec", api, None), "passt": ("/vm/pst-1/exec", api, HOST)}
        vm_of = {"bridge": "br-1", "isolated": "iso-1"}
        results: dict[str, dict[str, list[float]]] = {m: {"vm_to_host": [], "host_to_vm": []} for m in modes}
        results["bridge"]["vm_to_vm"] = []
        errors: list[str] = []
        for _ in range(rounds):
            for mode, (path, client, host) in modes.items():
                for key, reverse in (("vm_to_host", False), ("host_to_vm", True)):
                    for attempt in range(3):  # an iperf3 server refuses for a moment between tests
                        if host is None:  # the host's client: -R makes the guest send
                            cmd = iperf(ips[vm_of[mode]], not reverse).split()
                            run = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True)
                            report = run.stdout
                        else:
                            report = await run_in(client, path, iperf(host, reverse))
                        try:
                            results[mode][key].append(mbits(report))
                            break
                        except RuntimeError as e:
                            if attempt == 2:
                                errors.append(f"{mode} {key}: {e}")
                            await asyncio.sleep(1)
            try:
                report = await run_in(api, "/vm/br-1/exec", iperf(ips["br-2"], False))
                results["bridge"]["vm_to_vm"].append(mbits(report))
            except RuntimeError as e:
                errors.append(f"bridge vm_to_vm: {e}")
        medians = {m: {k: round(statistics.median(v), 1) for k, v in r.items() if v} for m, r in results.items()}
        base = medians["user"]
        ratios = {m: {k: round(v / base[k], 2) for k, v in r.items() if base.get(k)}
                  for m, r in medians.items() if m != "user"}
        return {"seconds_per_run": SECONDS, "rounds": rounds, "unit": "Mbit/s (iperf3)", "median": medians,
                "ratio_to_user_mode": ratios, "accelerator": accel, "errors": errors}
    finally:
        await vm.kill()
        daemon.terminate()
        daemon.wait(120)
        server.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    print(json.dumps(asyncio.run(main(a.rounds)), indent=2))
