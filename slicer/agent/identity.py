"""What makes a guest itself, and resetting it after a restore from a saved state.

A VM restored from a group's template starts as an exact copy of the template: same clock
(stale), same kernel CRNG state, hostname, address, machine-id and SSH host keys. The host
hands each clone its own values and fresh randomness before it reports the VM ready.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import signal
import struct
import subprocess
import time

from slicer.agent.init import SSHD_STARTED, set_hostname, write_resolv_conf
from slicer.agent.provision import atomic_write

RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)
SSHD_PID = "/run/sshd.pid"
SSH_DIR = "/etc/ssh"
MACHINE_ID = "/etc/machine-id"
BOOT_CHORES = ("resize2fs", "ssh-keygen")


def reseed(seed: bytes) -> None:
    """Mix host randomness into the input pool, credited, and force every CRNG to reseed: a
    cloned CRNG state would otherwise hand two clones the same random stream."""
    info = struct.pack("ii", len(seed) * 8, len(seed)) + seed
    with open("/dev/urandom", "wb") as f:
        fcntl.ioctl(f, RNDADDENTROPY, info)
        fcntl.ioctl(f, RNDRESEEDCRNG)


def install_host_keys(keys: dict[str, dict[str, str]]) -> None:
    """Replace the SSH host keys ({type: {private, public}}) and make sshd load them."""
    for old in os.listdir(SSH_DIR):
        if old.startswith("ssh_host_") and old.split("_")[2] not in keys:
            os.unlink(os.path.join(SSH_DIR, old))
    for kind, pair in keys.items():
        base = os.path.join(SSH_DIR, f"ssh_host_{kind}_key")
        atomic_write(base, pair["private"].encode(), 0o600)
        atomic_write(base + ".pub", pair["public"].encode(), 0o644)
    with contextlib.suppress(OSError, ValueError):
        with open(SSHD_PID) as f:
            os.kill(int(f.read().strip()), signal.SIGHUP)  # sshd re-executes itself and rereads its keys


def readdress(ip_cidr: str, gateway: str | None, mac: str | None = None) -> subprocess.Popen:
    """Start moving eth0 to its new address (and MAC): one ``ip`` process (each costs ~0.1 s
    under TCG), left running while the rest of the reset goes on; the caller waits for it."""
    commands = ["addr flush dev eth0"]
    if mac:
        commands += ["link set eth0 down", f"link set eth0 address {mac}"]
    commands += [f"addr add {ip_cidr} dev eth0", "link set eth0 up"]
    if gateway:
        commands.append(f"route replace default via {gateway}")
    proc = subprocess.Popen(["ip", "-batch", "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write("\n".join(commands).encode() + b"\n")
    proc.stdin.close()
    return proc


def reset(body: dict) -> dict:
    """Apply the identity the host gives a restored VM; every field but ``seed`` is optional."""
    reseed(base64.b64decode(body["seed"]))
    if "time_ns" in body:
        time.clock_settime_ns(time.CLOCK_REALTIME, int(body["time_ns"]))
    done = ["seed", "clock"] if "time_ns" in body else ["seed"]
    network = readdress(body["ip"], body.get("gateway"), body.get("mac")) if body.get("ip") else None
    if hostname := body.get("hostname"):
        set_hostname(hostname)
        done.append("hostname")
    if machine_id := body.get("machine_id"):
        atomic_write(MACHINE_ID, machine_id.encode() + b"\n", 0o444)
        done.append("machine_id")
    if (keys := body.get("ssh_host_keys")) and os.path.isdir(SSH_DIR):  # an image without SSH has none
        install_host_keys(keys)
        done.append("ssh_host_keys")
    if dns := body.get("dns"):
        write_resolv_conf(dns)
    if network is not None:
        assert network.stderr is not None
        err = network.stderr.read()
        if network.wait():
            raise subprocess.CalledProcessError(network.returncode, "ip -batch", stderr=err)
        done.append("ip")
    return {"reset": done}


def _chores_running() -> bool:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as f:
            if f.read().strip() in BOOT_CHORES:
                return True
    return False


def settle(timeout: float = 120.0) -> dict:
    """Before the host saves this VM as a template: wait for the boot's background chores
    (filesystem resize, SSH host keys, and sshd where the init starts one) and write
    everything to disk."""
    deadline = time.monotonic() + timeout
    sshd = os.path.exists(SSHD_STARTED)
    while ((sshd and not os.path.exists(SSHD_PID)) or _chores_running()) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.sync()
    return {"settled": not (sshd and not os.path.exists(SSHD_PID)) and not _chores_running()}
