"""A VMM process an earlier daemon started and left running (a crash, an upgrade).

It is not our child, so it is watched through a pidfd: readable once the process has ended,
and a signal sent through it cannot reach a process that reused the PID. Its exit status is
not ours to collect; the QMP ``SHUTDOWN`` event tells a guest power-off from a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import time
from pathlib import Path

from slicer.vmm.base import VMMError

RUN_DIR_ENV = "SLICER_RUN_DIR"  # in each QEMU's environment: which VM of which daemon it is


def running_vmm(run_dir: Path) -> int | None:
    """The PID of the QEMU that ``run_dir``'s pidfile names, if that process is still the QEMU
    started for this run directory (its environment says so: the PID may have been reused)."""
    try:
        pid = int((run_dir / "qemu.pid").read_text().strip())
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read().split(b"\0")
        comm = Path(f"/proc/{pid}/comm").read_text()
    except (OSError, ValueError):
        return None
    if not comm.startswith("qemu-system") or f"{RUN_DIR_ENV}={run_dir}".encode() not in environ:
        return None
    return pid


def vmm_processes(run_root: Path) -> dict[int, Path]:
    """Every process whose environment names a run directory below ``run_root``: QEMUs, and the
    helpers a confined one is started through (``unshare``, ``sh``, ``mount``, ``setpriv``),
    which carry the same environment."""
    prefix = f"{RUN_DIR_ENV}={run_root}/".encode()
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        for var in environ:
            if var.startswith(prefix):
                found[int(entry.name)] = Path(var.split(b"=", 1)[1].decode(errors="replace"))
    return found


def kill_and_wait(pids: list[int], timeout: float = 5.0) -> list[int]:
    """SIGKILL each of ``pids`` through a pidfd (never a process that reused the number), then
    wait up to ``timeout`` s for them to end: until then the kernel keeps their cgroups busy, and
    a VM started again under the same name finds its cgroup taken. Returns the PIDs signalled."""
    fds: dict[int, int] = {}
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # gone already (ProcessLookupError) or not ours to signal
            continue
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            fds[pid] = fd
        except OSError:  # gone already (ProcessLookupError) or not ours to signal
            os.close(fd)
    poller = select.poll()
    for fd in fds.values():
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    pending = set(fds.values())
    while pending and (left := deadline - time.monotonic()) > 0:
        for fd, _ in poller.poll(left * 1000):
            poller.unregister(fd)
            pending.discard(fd)
    for fd in fds.values():
        os.close(fd)
    return list(fds)


class AdoptedProcess:
    """The part of ``asyncio.subprocess.Process`` a VM uses: ``pid``, ``returncode``,
    ``wait()`` and ``kill()``. ``clean_exit`` is set by whoever saw the guest power off."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self._pidfd = os.pidfd_open(pid)
        except OSError as e:
            raise VMMError(f"cannot watch process {pid}: {e.strerror}") from e
        self.returncode: int | None = None
        self.clean_exit = False
        self._ended = asyncio.Event()
        asyncio.get_running_loop().add_reader(self._pidfd, self._on_end)

    def _on_end(self) -> None:
        asyncio.get_running_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        self.returncode = 0 if self.clean_exit else -signal.SIGKILL
        self._ended.set()

    async def wait(self) -> int:
        await self._ended.wait()
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        if self._pidfd < 0:
            raise ProcessLookupError(self.pid)
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
