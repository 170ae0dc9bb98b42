"""Agent benchmark: exec round trips and copy throughput through the API, against the raw
channel measured in the same run.

Two VMs of the same size: one behind a daemon (the API path), one booted by this script with
the QEMU driver so it can hold the VM's channel itself (the raw path). Prints JSON:

* exec of ``true`` (buffered): p50/p99 through the API and straight over the channel (agent
  HTTP on a channel stream, no daemon);
* exec of ``/usr/bin/true`` through the API on a plain line (the agent execs it) and quoted (bash
  starts first, then execs it), and their ratio;
* bytes into and out of a VM: ``POST/GET /vm/{h}/cp`` through the API, and a bare yamux stream
  to a guest TCP sink/source (the channel's own ceiling), with ratios.

Both VMs boot cold unless ``--boot snapshot`` (the daemon's then restores from its group's
template, and the difference holds whatever else differs between the two VMs: with it, 8-14 ms
against 3.4 ms cold, in runs of 2026-12-05, not yet explained). Usage: ``python3
bench/agent.py [--size-mb 64] [--execs 50] [--boot cold]`` (as root, image built).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
from slicer.vmm.base import VMSpec  # noqa: E402
from slicer.vmm.qemu import QEMU_BINARY, QemuDriver  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from boot import free_port, private_network  # noqa: E402

IMAGES = Path(os.environ.get("SLICER_TEST_IMAGE_DIR", "/var/lib/slicer"))
CPUS, RAM_MB = 2, 512
CHUNK = 256 * 1024
SINK, SOURCE = 7001, 7002
# Guest-side TCP sink (reads and discards) and source (writes N zero bytes), for the raw path.
GUEST_PEERS = r"""
import socket, sys, threading
def serve(port, fn):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port)); s.listen(8)
    while True:
        c, _ = s.accept(); threading.Thread(target=fn, args=(c,), daemon=True).start()
def sink(c):
    buf = bytearray(262144)
    while c.recv_into(buf): pass
    c.sendall(b"done"); c.close()
def source(c):
    n = int(c.recv(64)); zero = bytes(262144)
    while n > 0:
        c.sendall(zero[:min(n, len(zero))]); n -= min(n, len(zero))
    c.close()
threading.Thread(target=serve, args=(SINK_PORT, sink), daemon=True).start()
serve(SOURCE_PORT, source)
""".replace("SINK_PORT", str(SINK)).replace("SOURCE_PORT", str(SOURCE))


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def ms(values: list[float]) -> dict:
    return {"p50_ms": round(pct(values, 0.5) * 1000, 2), "p99_ms": round(pct(values, 0.99) * 1000, 2)}


async def boot_raw_vm(work: Path):
    image = current_image(IMAGES)
    accel = choose_accelerator(QEMU_BINARY, image.kernel, image.initrd, image.directory.parent / "accel.json")
    run = work / "raw"
    spec = VMSpec(name="raw-1", cpus=CPUS, ram_bytes=RAM_MB << 20, kernel=image.kernel, initrd=image.initrd,
                  base_disk=image.rootfs, disk=run / "disk.qcow2", disk_size=2 << 30, run_dir=run,
                  ip_cidr="192.168.137.2/24", gateway="192.168.137.1")
    vm = await QemuDriver(accel).start(spec)
    channel = Channel(str(spec.channel_socket))
    return vm, channel


def start_daemon(work: Path, boot: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    (work / "config.yaml").write_text(f"""
config:
  host_groups:
  - name: bench
    count: 1
    vcpu: {CPUS}
    ram_mb: {RAM_MB}
    storage_size: 2G
    boot: {boot}  # cold: booted as the raw VM is, so the two differ only in the path to them
  api:
    bind_address: 127.0.0.1
    port: {port}
    auth: {{enabled: false}}  # loopback of the benchmark's own network namespace
""")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "slicer", "up", str(work / "config.yaml"), "--data-dir", str(work), "--no-build"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return daemon, port


async def timed(coro) -> float:
    t = time.monotonic()
    await coro
    return time.monotonic() - t


async def measure(work: Path, size: int, execs: int, boot: str) -> dict:
    daemon, port = start_daemon(work, boot)
    vm, channel = await boot_raw_vm(work)
    try:
        api = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600)
        agent = httpx.AsyncClient(transport=ChannelTransport(channel, AGENT_PORT), base_url="http://agent",
                                  timeout=120)
        await channel.session(timeout=300)
        for _ in range(3000):
            try:
                if (await api.get("/vm/bench-1/health")).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
        exec_params = {"cmd": "true", "buffered": "true"}
        api_exec, raw_exec = [], []
        for i in range(execs + 3):  # interleaved, so both see the same machine; 3 warm-ups
            a = await timed(api.post("/vm/bench-1/exec", params=exec_params))
            b = await timed(agent.post("/exec", params=exec_params))
            if i >= 3:
                api_exec.append(a)
                raw_exec.append(b)
        # A program on a plain line is execed by the agent itself; quoted, bash starts first and
        # execs it (slicer.agent.direct): the same program, both through the API, interleaved.
        plain_exec, via_bash = [], []
        for i in range(execs + 3):
            a = await timed(api.post("/vm/bench-1/exec", params={"cmd": "/usr/bin/true", "buffered": "true"}))
            b = await timed(api.post("/vm/bench-1/exec", params={"cmd": '"/usr/bin/true"', "buffered": "true"}))
            if i >= 3:
                plain_exec.append(a)
                via_bash.append(b)
        await agent.post("/exec", params={"cmd": f"nohup python3 -c '{GUEST_PEERS}' >/dev/null 2>&1 &",
                                          "buffered": "true"})
        for _ in range(200):
            try:
                (await channel.open(SINK, timeout=5)).reset()
                break
            except ConnectionError:
                await asyncio.sleep(0.2)
        block = bytes(CHUNK)

        async def body():
            for _ in range(size // CHUNK):
                yield block

        async def api_into() -> None:
            r = await api.post("/vm/bench-1/cp", params={"path": "/root/bench.bin"}, content=body(),
                               headers={"content-type": "application/octet-stream"})
            assert r.status_code == 200 and r.json()["size"] == size, r.text

        async def api_out() -> None:
            got = 0
            async with api.stream("GET", "/vm/bench-1/cp", params={"path": "/root/bench.bin"}) as r:
                async for chunk in r.aiter_raw():
                    got += len(chunk)
            assert got == size

        async def raw_into() -> None:
            stream = await channel.open(SINK)
            async for b in body():
                await stream.write(b)
            await stream.close()
            assert await stream.read() == b"done"  # the guest read everything

        async def raw_out() -> None:
            stream = await channel.open(SOURCE)
            await stream.write(str(size).encode())
            got = 0
            while chunk := await stream.read(CHUNK):
                got += len(chunk)
            assert got == size

        rounds = {"api_into": [], "raw_into": [], "api_out": [], "raw_out": []}
        for _ in range(2):
            for name, fn in (("api_into", api_into), ("raw_into", raw_into), ("api_out", api_out),
                             ("raw_out", raw_out)):
                rounds[name].append(size / await timed(fn()) / 1e6)
        await agent.aclose()
        await api.aclose()
        return {"api_exec": api_exec, "raw_exec": raw_exec, "plain_exec": plain_exec, "via_bash": via_bash,
                **{k: max(v) for k, v in rounds.items()}}
    finally:
        await vm.kill()
        daemon.terminate()
        daemon.wait(120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=64)
    ap.add_argument("--execs", type=int, default=50)
    ap.add_argument("--boot", choices=("cold", "snapshot"), default="cold",
                    help="how the daemon's VM boots (the raw VM boots cold)")
    args = ap.parse_args()
    private_network()
    size = args.size_mb * 1024 * 1024
    with tempfile.TemporaryDirectory(prefix="slb-", dir="/tmp") as tmp:
        work = Path(tmp)
        (work / "images").symlink_to(IMAGES / "images")
        m = asyncio.run(measure(work, size, args.execs, args.boot))
    api_exec, raw_exec = ms(m["api_exec"]), ms(m["raw_exec"])
    print(json.dumps({
        "size_mb": args.size_mb,
        "boot": args.boot,
        "exec_true": {"api": api_exec, "channel": raw_exec,
                      "api_minus_channel_p50_ms": round(api_exec["p50_ms"] - raw_exec["p50_ms"], 2),
                      # each API exec less the raw one run right after it: steadier than p50 less p50
                      "pairwise_difference_p50_ms": round(pct([a - b for a, b in zip(m["api_exec"], m["raw_exec"],
                                                                                        strict=True)], 0.5) * 1000, 2),
                      "goal_p50_overhead_ms": 5},
        "exec_program": {"plain_line": ms(m["plain_exec"]), "through_bash": ms(m["via_bash"]),
                         "ratio_p50": round(pct(m["plain_exec"], 0.5) / pct(m["via_bash"], 0.5), 3)},
        "copy_into_vm": {"api_MBps": round(m["api_into"], 1), "raw_channel_MBps": round(m["raw_into"], 1),
                         "ratio": round(m["api_into"] / m["raw_into"], 3)},
        "copy_out_of_vm": {"api_MBps": round(m["api_out"], 1), "raw_channel_MBps": round(m["raw_out"], 1),
                           "ratio": round(m["api_out"] / m["raw_out"], 3)},
        "goal_ratio": 0.7,
    }, indent=2))


if __name__ == "__main__":
    main()
