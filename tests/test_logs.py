"""The logs of the processes a guest can make talk stay bounded: QEMU's (``qemu.log``, through
a FIFO the daemon reads, ``slicer.vmm.stderr_log``) and passt's (``passt.log``, bounded by
passt's own ``--log-size``)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from slicer.vmm import stderr_log
from slicer.vmm.stderr_log import LOG_MAX

# A stand-in for QEMU's stderr: SIGPIPE ignored, writes that fail are dropped; on each line of
# stdin ("N") it writes N bytes of log lines to stderr and answers "written failed".
WRITER = r"""
import os, signal, sys
signal.signal(signal.SIGPIPE, signal.SIG_IGN)
line = b"qemu-system-x86_64: warning: something the guest did, again and again\n"
for cmd in sys.stdin:
    n, ok, failed = int(cmd), 0, 0
    while ok + failed < n:
        try:
            ok += os.write(2, line)
        except OSError:
            failed += len(line)
    print(ok, failed, flush=True)
"""


def test_qemu_output_is_bounded_never_blocks_qemu_and_survives_the_daemon(tmp_path, monkeypatch):
    run_dir = tmp_path
    limit = 16 << 10  # below the pipe's 64 KiB: one burst surely rotates it
    monkeypatch.setattr(stderr_log, "LOG_MAX", limit)

    async def main() -> None:
        with stderr_log.qemu_output(run_dir) as fd:
            writer = await asyncio.create_subprocess_exec(sys.executable, "-c", WRITER, stdin=subprocess.PIPE,
                                                          stdout=subprocess.PIPE, stderr=fd)
        assert writer.stdin is not None and writer.stdout is not None

        async def burst(n: int) -> tuple[int, int]:
            writer.stdin.write(f"{n}\n".encode())
            await writer.stdin.drain()
            ok, failed = map(int, (await asyncio.wait_for(writer.stdout.readline(), 120)).split())
            await asyncio.sleep(0.5)  # the reader's turn
            stderr_log.flush(run_dir)
            return ok, failed

        ok, failed = await burst(32 << 20)  # 32 MiB, as fast as it can: what is not read is dropped
        assert ok + failed >= 32 << 20
        assert (run_dir / "qemu.log").stat().st_size <= limit
        assert (run_dir / "qemu.log.1").stat().st_size <= limit  # it rotated
        # the daemon goes away: QEMU's writes fail (EPIPE), it neither blocks nor dies
        stderr_log.close(run_dir)
        before = (run_dir / "qemu.log").stat().st_size
        ok, failed = await burst(8 << 20)
        assert failed >= 8 << 20 and ok == 0
        assert (run_dir / "qemu.log").stat().st_size == before
        # a new daemon adopts the VM and reads its FIFO again
        stderr_log.reattach(run_dir)
        await asyncio.sleep(1.2)  # it takes what the pipe still held (within the rate) first
        ok, failed = await burst(4096)
        assert ok > 0
        assert b"again and again" in (run_dir / "qemu.log").read_bytes()[-200:]
        assert (run_dir / "qemu.log").stat().st_size <= limit
        writer.stdin.close()
        assert await writer.wait() == 0
        await asyncio.sleep(0.3)  # QEMU gone: the reader sees the end and closes
        assert run_dir not in stderr_log._readers

    asyncio.run(main())


def sigpipe_ignored(pid: int) -> bool:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGPIPE - 1)))
    raise AssertionError("no SigIgn")


def size(path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # between a rotation's rename and the next write
        return 0


@pytest.mark.vm
def test_a_running_vms_qemu_log_stays_bounded(api, daemon):
    """The real thing: QEMU's stderr is the FIFO, QEMU ignores SIGPIPE (so a daemon that is
    gone costs it only messages), and 24 MiB written into its log path leave qemu.log within
    its bound while the VM goes on answering."""
    from tests.conftest import wait_agent

    wait_agent(api, "vm-1")
    run_dir = daemon.data_dir / "run" / "vm-1"
    pid = int((run_dir / "qemu.pid").read_text())
    assert sigpipe_ignored(pid)
    assert os.readlink(f"/proc/{pid}/fd/2") == os.readlink(f"/proc/{pid}/fd/1")
    assert os.stat(f"/proc/{pid}/fd/2").st_ino == os.stat(run_dir / "qemu.log.pipe").st_ino
    fd = os.open(run_dir / "qemu.log.pipe", os.O_WRONLY | os.O_NONBLOCK)
    written, chunk = 0, b"injected line of QEMU output\n" * 2000
    try:
        deadline = time.monotonic() + 60
        while written < 24 << 20 and time.monotonic() < deadline:
            try:
                written += os.write(fd, chunk)
            except BlockingIOError:
                time.sleep(0.01)
            assert size(run_dir / "qemu.log") <= LOG_MAX
    finally:
        os.close(fd)
    assert written >= 2 * LOG_MAX
    time.sleep(2)
    assert size(run_dir / "qemu.log") <= LOG_MAX
    assert size(run_dir / "qemu.log.1") <= LOG_MAX
    assert api.get("/vm/vm-1/health").status_code == 200


def _csum(b: bytes) -> int:
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def test_passt_log_is_bounded_by_passt(tmp_path, monkeypatch):
    """passt as the daemon starts it, made verbose (``--trace``) and sent TCP SYNs: its log
    rotates within ``--log-size`` (measured: 64 KiB + 44 bytes at most)."""
    from slicer.core.config import load_config
    from slicer.net import backends
    from slicer.net import host as net_host
    from slicer.net.addressing import Addressing

    size = 64 << 10
    monkeypatch.setattr(backends, "PASST_LOG_MAX", size)
    monkeypatch.setattr(backends, "PASST_VERBOSITY", ("--trace",))
    monkeypatch.setattr(net_host, "has_net_admin", lambda: False)
    cfg = load_config("config:\n  host_groups:\n  - name: p\n    network: {mode: passt}\n")
    host = net_host.HostNetwork(cfg.host_groups, tmp_path / "data")
    group = host.group("p")
    group.addressing = Addressing(group.group, "tp", [])
    ip = str(group.addressing.pool[0])
    gateway = group.addressing.guest(ip).gateway
    # passt picks its template interface by the default route: give this namespace one
    subprocess.run(["ip", "link", "add", "sltdummy0", "type", "veth", "peer", "name", "sltdummy1"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", "198.51.100.1/24", "dev", "sltdummy0"], check=True)
        for dev in ("sltdummy0", "sltdummy1"):
            subprocess.run(["ip", "link", "set", dev, "up"], check=True)
        subprocess.run(["ip", "route", "replace", "default", "via", "198.51.100.254"], check=True)

        async def main() -> tuple[int, int]:
            dev = await group._start(ip, gateway, tmp_path / "run")
            sock = socket.socket(fileno=dev.fd)
            log_path = tmp_path / "run" / "passt.log"
            biggest = 0
            try:
                await asyncio.sleep(1)
                for port in range(20000, 26000):
                    tcp = struct.pack("!HHIIBBHHH", port, 9, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
                    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0,
                                      socket.inet_aton(ip), socket.inet_aton("198.51.100.9"))
                    hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
                    frame = b"\x9a\x55\x9a\x55\x9a\x55\x52\x54\x00\x12\x34\x56\x08\x00" + hdr + tcp
                    try:
                        sock.sendall(struct.pack("!I", len(frame)) + frame)
                    except OSError:
                        break
                    if port % 100 == 0:
                        await asyncio.sleep(0.01)
                        if log_path.exists():
                            biggest = max(biggest, log_path.stat().st_size)
                await asyncio.sleep(0.5)
                return biggest, log_path.stat().st_size
            finally:
                sock.close()
                os.kill(dev.pid, signal.SIGTERM)
                await asyncio.gather(*(proc.wait() for proc in list(host.context.helpers.running)))

        biggest, final = asyncio.run(main())
    finally:
        subprocess.run(["ip", "link", "del", "sltdummy0"], check=False)
    assert biggest > size // 2, "passt did not write enough to test its bound"
    assert max(biggest, final) <= size + 4096  # passt rotates before it goes over, give or take its last line
