"""The hypervisor driver interface: what the lifecycle layer may ask of any VMM.

One driver per hypervisor (QEMU microvm today; Firecracker or Cloud Hypervisor on KVM hosts
later). Drivers speak plain values and files: no HTTP, no database. Each VM exposes a channel
socket that :class:`slicer.channel.host.Channel` connects to.

Actions and when they are allowed (anything else raises :class:`VMStateError`):

=============  ===========================  ==========================================
action         allowed in                   effect
=============  ===========================  ==========================================
``start``      (new VM)                     boots; state ``running``
``pause``      running                      vCPUs stop; state ``paused``
``resume``     paused                       vCPUs run; state ``running``
``powerdown``  running, paused              asks the guest to power off (ACPI button)
``reset``      running, paused              hard reset of the machine
``kill``       any but ``stopped``          ends the process at once
``save``       running, paused              writes memory and device state to a file,
                                            then ends the process (state ``stopped``)
``capture``    running, paused              writes memory and device state to a file and
                                            goes on as it was (a live fork's source)
=============  ===========================  ==========================================

``Driver.start(spec, restore_from=state)`` starts a VM from a state file written by ``save``
(same devices and sizes, any overlay whose backing chain holds the saved disk); it returns
with the VM ``paused`` where it was saved, to be resumed by the caller.
"""

from __future__ import annotations

import abc
import enum
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path


class VMState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"  # the process ended: cleanly (guest powered off) or not, see exit_code


class VMMError(Exception):
    """The hypervisor failed to do what was asked."""


class VMStateError(VMMError):
    """The action is not allowed in the VM's current state."""


class HostError(VMMError):
    """The host could not give the VMM what it runs in (its uid, cgroup, jail): neither the
    image's fault nor the template's, so nothing is retired for it."""


@dataclass
class NetDevice:
    """What a VM's NIC is connected to on the host, as the network layer hands it over.

    ``tap``: an open TAP descriptor (``fd``), passed to the VMM, which needs no privilege and no
    path; ``stream``: a connected stream socket (``fd``) to a user-space network (passt);
    ``user``: the VMM's own user-mode network (QEMU's slirp; only the benchmarks' baseline).
    """

    kind: str
    fd: int | None = None
    pid: int | None = None  # the user-space network's process, if any
    name: str | None = None  # the host's device (a TAP), if the network layer must remove it

    def close(self) -> None:
        """Drop the daemon's descriptor once the VMM has its own."""
        if self.fd is not None and self.fd >= 0:
            os.close(self.fd)
        self.fd = None


LAYOUT = 2  # the machine layout new VMs get (see VMSpec.layout)


@dataclass
class VMSpec:
    """Everything a driver needs to boot one VM. Paths are on the host."""

    name: str
    cpus: int
    ram_bytes: int
    kernel: Path
    initrd: Path
    base_disk: Path  # read-only base image (or a frozen template disk)
    disk: Path  # this VM's copy-on-write overlay (created by the driver if missing)
    disk_size: int  # bytes, virtual size of the overlay
    run_dir: Path  # sockets, pid file, serial log
    ip_cidr: str  # e.g. 192.168.137.2/24
    gateway: str  # e.g. 192.168.137.1
    dns: list[str] = field(default_factory=list)
    mac: str = ""  # the guest's, set by its init (a clone's by its identity reset)
    net: NetDevice | None = None  # None: no NIC
    kernel_args: list[str] = field(default_factory=list)
    base_format: str = "raw"  # of base_disk: "raw" for the image, "qcow2" for a template disk
    # Read-only second disk with the agent's own runtime (VMs of users' images); the kernel
    # command line tells the initramfs to mount it (``slicer.runtime``).
    runtime_disk: Path | None = None
    # Guest RAM in a file rather than anonymous memory. ``memory_shared``: writes go to the file
    # (a template's RAM, left out of its saved state); otherwise the file is mapped
    # copy-on-write (a clone restored from that template shares its pages until it writes).
    memory_file: Path | None = None
    memory_shared: bool = False
    # The state to restore holds the RAM (a live capture) though the spec has a RAM file: it is
    # loaded into the file; the next save leaves the RAM out as usual.
    memory_in_state: bool = False
    # False: a reset of the guest (its reboot, a panic) ends the VM, as on Firecracker, which has
    # no reboot; True: the machine starts over in place.
    reboot: bool = True
    # The machine's devices beyond the first ones: a saved state restores only into the layout
    # it was saved from. 0: the first; 1: a second virtio-serial port for copies' bytes
    # (slicer.channel.bulk); 2: a third, the bulk port's second lane (uploads are striped over
    # both). New VMs get LAYOUT.
    layout: int = 0

    @property
    def bulk(self) -> bool:
        return self.layout >= 1

    @property
    def bulk_lanes(self) -> int:
        """How many ports the bulk port's transfers may be striped over (0: no bulk port)."""
        return min(self.layout, 2)

    @property
    def bulk_sockets(self) -> list[Path]:
        return [self.run_dir / ("bulk.sock" if lane == 0 else f"bulk{lane}.sock") for lane in range(self.bulk_lanes)]

    @property
    def channel_socket(self) -> Path:
        return self.run_dir / "channel.sock"

    @property
    def serial_log(self) -> Path:
        return self.run_dir / "console.log"


class Laps:
    """Seconds between successive marks, by name: what each step of some work took."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.monotonic()

    def __call__(self, name: str) -> None:
        now = time.monotonic()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._last
        self._last = now

    def restart(self) -> None:
        """The next lap starts now (what came since the last mark was timed elsewhere)."""
        self._last = time.monotonic()


class VM(abc.ABC):
    """A running (or ended) VM of some driver."""

    spec: VMSpec
    on_reset: Callable[[], None] | None = None  # called when the guest reboots or is reset
    # Seconds of each step of its start, as the driver timed them (e.g. disks, jail, spawn, load).
    phases: dict[str, float] = {}

    @property
    @abc.abstractmethod
    def state(self) -> VMState: ...

    @property
    @abc.abstractmethod
    def pid(self) -> int | None: ...

    @property
    @abc.abstractmethod
    def exit_code(self) -> int | None:
        """The process exit code once ``stopped``; 0 when the guest powered itself off."""

    def confinement(self) -> dict:
        """How the VMM process is confined: uid, cgroup limits and usage (``confined``: false if not)."""
        return {"confined": False}

    @abc.abstractmethod
    async def pause(self) -> None: ...

    @abc.abstractmethod
    async def resume(self) -> None: ...

    @abc.abstractmethod
    async def powerdown(self) -> None: ...

    @abc.abstractmethod
    async def reset(self) -> None: ...

    @abc.abstractmethod
    async def kill(self) -> None: ...

    @abc.abstractmethod
    async def save(self, path: Path) -> None:
        """Stop the vCPUs, write the VM's memory and device state to ``path`` and end the
        process. The disk is left as it was at that instant, to be used with the state."""

    @abc.abstractmethod
    async def capture(self, path: Path, while_stopped: Callable[[], Awaitable[None]]) -> None:
        """Stop the vCPUs, write memory and device state to ``path`` (RAM included, wherever
        it lives), await ``while_stopped()`` while the disk is flushed and quiet (to copy it),
        then go on in the state the VM was in."""

    @abc.abstractmethod
    async def wait(self) -> int:
        """Wait for the process to end; returns its exit code."""


class Driver(abc.ABC):
    """Boots VMs of one hypervisor."""

    name: str
    accelerator: str

    @abc.abstractmethod
    async def start(self, spec: VMSpec, restore_from: Path | None = None) -> VM:
        """Boot a VM, or restore it from a state file written by :meth:`VM.save`; returns once
        the hypervisor runs it (booted: not when the guest is ready; restored: paused)."""

    def confinement(self) -> dict:
        """How this driver confines its VMM processes (``confined``: false if it does not)."""
        return {"confined": False}

    @abc.abstractmethod
    def fingerprint(self, spec: VMSpec) -> str:
        """A digest of everything a saved state depends on besides the disk: hypervisor
        version, accelerator, machine and device configuration, kernel and initrd."""

    @abc.abstractmethod
    def running(self, run_dir: Path) -> int | None:
        """The PID of a VMM an earlier daemon left running for ``run_dir``, verified to be the
        one it started there (not just a PID in a pidfile)."""

    @abc.abstractmethod
    async def adopt(self, spec: VMSpec, pid: int) -> VM:
        """Take over that VMM: the VM is returned as if :meth:`start` had booted it."""

    @abc.abstractmethod
    def kill_stale(self, run_dir: Path) -> bool:
        """End a process left behind in ``run_dir`` by an earlier daemon; True if one was."""

    def kill_strays(self, run_root: Path, keep: set[int]) -> list[int]:
        """End every VMM (or VMM still being started) of a run directory below ``run_root``
        whose PID is not in ``keep``: one an earlier daemon was starting when it died has no
        pidfile yet, or is not QEMU yet. The PIDs ended."""
        return []
