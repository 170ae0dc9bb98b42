"""Boot benchmark: API create (``wait=agent``) against a bare QEMU boot of the same image.

Prints JSON: the median seconds from ``POST /hostgroup/NAME/nodes?wait=agent`` to its response,
the median seconds from starting the same ``qemu-system-x86_64`` command by hand to the agent's
first byte on the channel, and their ratio. Runs are interleaved (bare, API, bare, …) so both
see the same machine noise. Usage: ``python3 bench/boot.py [--runs 5]`` (as root, image built).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slicer.image.build import current_image  # noqa: E402
from slicer.vmm.accel import choose_accelerator  # noqa: E402
from slicer.vmm.base import VMSpec  # noqa: E402
from slicer.vmm.handoff import Layer, open_handoff  # noqa: E402
from slicer.vmm.jail import SealedFiles  # noqa: E402
from slicer.vmm.qemu import QEMU_BINARY, QemuDriver  # noqa: E402

IMAGES = Path(os.environ.get("SLICER_TEST_IMAGE_DIR", "/var/lib/slicer"))
CPUS, RAM_MB = 2, 512
CONFIG = f"""
config:
  host_groups:
  - name: bench
    count: 0
    vcpu: {CPUS}
    ram_mb: {RAM_MB}
    storage_size: 2G
    boot: cold  # this benchmark measures the cold path; bench/start.py compares it with restores
  api:
    bind_address: 127.0.0.1
    port: PORT
    auth: {{enabled: false}}  # loopback of the benchmark's own network namespace
"""


def private_network() -> None:
    """Enter a network namespace of our own: the daemons these benchmarks start make bridges,
    TAPs and nftables tables, which must not touch the host's (they vanish with the process)."""
    if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:  # CLONE_NEWNET
        sys.exit("unshare(CLONE_NEWNET) failed: run as root")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(work: Path, config: str, log: Path | None = None,
                 env: dict[str, str] | None = None) -> tuple[subprocess.Popen, httpx.Client]:
    """``slicer up`` on ``config`` (``PORT`` replaced) in ``work``, its output to ``log`` if
    given; returns once it answers."""
    port = free_port()
    (work / "config.yaml").write_text(config.replace("PORT", str(port)))
    daemon = subprocess.Popen(
        [sys.executable, "-m", "slicer", "up", str(work / "config.yaml"), "--data-dir", str(work), "--no-build"],
        stdout=open(log, "ab") if log else subprocess.DEVNULL, stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=900)
    for _ in range(600):
        try:
            if client.get("/healthz").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    return daemon, client


def bare_boot(driver: QemuDriver, image, work: Path, n: int) -> float:
    """Seconds from exec of QEMU to the guest agent's first byte on the channel."""
    run = work / f"bare-{n}"
    run.mkdir()
    disk = run / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.rootfs), "-F", "raw",
                    str(disk), "2G"], check=True)
    spec = VMSpec(name=f"bare-{n}", cpus=CPUS, ram_bytes=RAM_MB << 20, kernel=image.kernel, initrd=image.initrd,
                  base_disk=image.rootfs, disk=disk, disk_size=2 << 30, run_dir=run,
                  ip_cidr="192.168.137.2/24", gateway="192.168.137.1")
    handoff = open_handoff(spec, [Layer(disk, "qcow2"), Layer(image.rootfs, "raw")], None, SealedFiles())
    cmd = driver.command(spec, handoff=handoff)
    # Same machine, but the console goes to a file: nothing waits for a serial client.
    i = cmd.index("-serial")
    cmd[i - 1] = f"file,id=serial0,path={run / 'console.log'}"
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=handoff.fds())
    handoff.close()
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(spec.channel_socket))  # bound by the handoff: QEMU accepts it once up
        s.sendall(b"SLICER-HELLO bench\n")
        s.recv(1)  # the first byte the agent writes
        elapsed = time.monotonic() - start
        s.close()
        return elapsed
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    private_network()
    image = current_image(IMAGES)
    accel = choose_accelerator(QEMU_BINARY, image.kernel, image.initrd, image.directory.parent / "accel.json")
    driver = QemuDriver(accel)
    with tempfile.TemporaryDirectory(prefix="slb-", dir="/tmp") as tmp:
        work = Path(tmp)
        (work / "images").symlink_to(IMAGES / "images")
        api_times: list[float] = []
        bare_times: list[float] = []
        daemon, client = start_daemon(work, CONFIG)
        try:
            for n in range(args.runs):
                bare_times.append(bare_boot(driver, image, work, n))
                t = time.monotonic()
                r = client.post("/hostgroup/bench/nodes", params={"wait": "agent", "timeout": "5m"}, json={})
                api_times.append(time.monotonic() - t)
                r.raise_for_status()
                client.delete(f"/hostgroup/bench/nodes/{r.json()['hostname']}").raise_for_status()
        finally:
            daemon.terminate()
            daemon.wait(120)
    api_med, bare_med = statistics.median(api_times), statistics.median(bare_times)
    print(json.dumps({
        "accelerator": accel,
        "runs": args.runs,
        "api_create_wait_agent_s": {"median": round(api_med, 3), "all": [round(x, 3) for x in api_times]},
        "bare_qemu_to_agent_first_byte_s": {"median": round(bare_med, 3), "all": [round(x, 3) for x in bare_times]},
        "ratio_api_over_bare": round(api_med / bare_med, 3),
        "goal_ratio": 1.05,
    }, indent=2))


if __name__ == "__main__":
    main()
