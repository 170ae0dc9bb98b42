"""QEMU ``microvm`` driver: one ``qemu-system-x86_64`` process per VM, QMP via ``qemu.qmp``.

Per VM, in its run directory: ``serial.sock`` (the console; QEMU waits for us to connect so
no boot line is lost), ``qmp.sock``, ``channel.sock`` (the virtio-serial port of the agent),
``qemu.pid``, ``qemu.log`` (QEMU's own stderr) and ``console.log`` (bounded, rotated once).
The daemon binds the sockets and opens every file; QEMU gets descriptors (see
:mod:`slicer.vmm.handoff`), and with a :class:`~slicer.vmm.jail.Jailer` it runs confined.
Saved states go through descriptors too (``getfd`` + ``fd:`` migrations): a confined QEMU
may not spawn the ``exec:`` helpers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import ipaddress
import logging
import os
import re
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

from qemu.qmp import ConnectError, QMPClient

from slicer.channel import PORT_NAME
from slicer.channel.bulk import port_name as bulk_port_name
from slicer.vmm.accel import qemu_version, tsc_khz
from slicer.vmm.adopted import RUN_DIR_ENV, AdoptedProcess, kill_and_wait, running_vmm, vmm_processes
from slicer.vmm.base import VM, Driver, Laps, VMMError, VMSpec, VMState, VMStateError
from slicer.vmm.disks import create_overlay, verified_chain
from slicer.vmm.handoff import Handoff, Layer, open_handoff, placeholder
from slicer.vmm.jail import SANDBOX, Jail, Jailer, SealedFiles, guest_memory_charge, release
from slicer.vmm.stderr_log import flush, qemu_output, reattach

log = logging.getLogger(__name__)

QEMU_BINARY = "qemu-system-x86_64"
SERIAL_LOG_MAX = 1024 * 1024  # per file; one rotated file is kept beside it
SOCKET_WAIT = 15.0
MIGRATE_SECONDS_PER_GIB = 60.0  # generous for a slow disk; at least a minute
# QEMU rate-limits migration to 128 MiB/s by default; a state file on local disk needs no limit.
MIGRATE_BANDWIDTH = 64 << 30
FINAL_MIGRATION_STATES = ("completed", "failed", "cancelled")


# The guest's clock: under TCG the kernel's watchdog finds the TSC "unstable" (its vCPU is a host
# thread that waits its turn) and falls back to jiffies, which lose ticks whenever the host is busy:
# a guest's clock then drifts behind by seconds a minute. QEMU's TSC follows the host's clock, so
# it is kept.
GUEST_CLOCK = "tsc=reliable"
# Kernel arguments of one VM's own (its identity, which a restored guest's reset replaces) or
# of the moment (the host's TSC frequency): not part of what a saved state fits. Not the DNS
# servers: a host group's setting, which the reset leaves alone where a group has none.
PER_VM_KERNEL_ARGS = ("slicer.hostname=", "slicer.ip=", "slicer.gw=", "slicer.mac=", "tsc_early_khz=")
# The guest's CPU under TCG: every feature TCG has ("max", so images built for x86-64-v3 run),
# less the "fast string" hints ERMS and FSRM. With them the guest kernel and glibc copy memory
# with `rep movsb`, which TCG runs a byte at a time: measured here, a 32 MiB copy into a guest
# took 0.63 s with them and 0.43 s without. They are hints only: no program needs them.
TCG_CPU = "max,erms=off,fsrm=off"


class SerialLog:
    """Appends console output to a file, rotating it so it never exceeds twice the limit."""

    def __init__(self, path: Path, limit: int = SERIAL_LOG_MAX) -> None:
        self.path = path
        self.limit = limit
        self._f = open(path, "ab")
        self._size = self._f.tell()

    def write(self, data: bytes) -> None:
        if self._size + len(data) > self.limit:
            self._f.close()
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            self._f = open(self.path, "ab")
            self._size = 0
        self._f.write(data)
        self._f.flush()
        self._size += len(data)

    def close(self) -> None:
        self._f.close()


async def _connect(proc: asyncio.subprocess.Process, what: str, connect):
    """Call ``connect()`` until QEMU answers on its socket (bound by us, accepted by QEMU once
    it is up), it exits, or SOCKET_WAIT passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SOCKET_WAIT
    while True:
        if proc.returncode is not None:
            raise VMMError(f"QEMU exited (status {proc.returncode}) before its {what} socket was ready")
        try:
            return await asyncio.wait_for(connect(), max(0.01, deadline - loop.time()))
        except (ConnectionError, FileNotFoundError, ConnectError, EOFError):
            pass
        except TimeoutError:
            raise VMMError(f"QEMU did not answer on its {what} socket within {SOCKET_WAIT:g}s") from None
        if loop.time() > deadline:
            raise VMMError(f"QEMU did not answer on its {what} socket within {SOCKET_WAIT:g}s")
        await asyncio.sleep(0.01)


def _qemu_failure(run_dir: Path) -> str:
    flush(run_dir)
    try:
        text = (run_dir / "qemu.log").read_text(errors="replace").strip()
    except OSError:
        text = ""
    return text.splitlines()[-1] if text else "no output"


_cached_version = functools.cache(qemu_version)


class QemuVM(VM):
    def __init__(self, spec: VMSpec, proc: asyncio.subprocess.Process | AdoptedProcess,
                 on_exit: Callable[[], None], jail: Jail | None = None) -> None:
        self.spec = spec
        self.jail = jail
        self._proc = proc
        self._on_exit: Callable[[], None] | None = on_exit  # releases the jail; runs once
        self._state = VMState.STARTING
        self._qmp = QMPClient(spec.name)
        self._tasks: list[asyncio.Task] = []
        self._serial: SerialLog | None = None

    @property
    def state(self) -> VMState:
        return self._state

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @property
    def exit_code(self) -> int | None:
        return self._proc.returncode

    def confinement(self) -> dict:
        if self.jail is None:
            return {"confined": False}
        return {"confined": True, "uid": self.jail.uid, **self.jail.cgroup.read()}

    async def _attach(self) -> None:
        run = self.spec.run_dir
        serial = run / "serial.sock"
        reader, writer = await _connect(self._proc, "serial", lambda: asyncio.open_unix_connection(str(serial)))
        self._serial = SerialLog(self.spec.serial_log)
        self._tasks.append(asyncio.create_task(self._pump_serial(reader, writer)))
        qmp = run / "qmp.sock"
        await _connect(self._proc, "QMP", lambda: self._qmp.connect(str(qmp)))
        self._tasks.append(asyncio.create_task(self._watch_events()))
        self._tasks.append(asyncio.create_task(self._watch_process()))
        status = await self._qmp.execute("query-status")
        self._state = VMState.RUNNING if status.get("running") else VMState.PAUSED

    async def _pump_serial(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The writer is held here: a collected StreamWriter closes the connection.
        assert self._serial is not None
        try:
            while data := await reader.read(65536):
                self._serial.write(data)
        finally:
            writer.close()

    async def _watch_events(self) -> None:
        async for event in self._qmp.events:
            name = event["event"]
            if name == "STOP" and self._state == VMState.RUNNING:
                self._state = VMState.PAUSED
            elif name == "RESUME" and self._state == VMState.PAUSED:
                self._state = VMState.RUNNING
            elif name == "RESET" and self.on_reset is not None:
                self.on_reset()
            elif name == "SHUTDOWN" and isinstance(self._proc, AdoptedProcess):
                # Not our child: its exit status is not ours to read, so the reason is kept.
                reason = event.get("data", {}).get("reason", "")
                self._proc.clean_exit = reason in ("guest-shutdown", "host-qmp-quit", "guest-reset",
                                                   "host-qmp-system-reset", "guest-panic")

    def _exited(self) -> None:
        if self._on_exit is not None:
            on_exit, self._on_exit = self._on_exit, None
            on_exit()

    async def _watch_process(self) -> None:
        code = await self._proc.wait()
        self._state = VMState.STOPPED
        self._exited()
        log.info("%s: QEMU exited with %s", self.spec.name, code)
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        with contextlib.suppress(Exception):
            await self._qmp.disconnect()
        if self._serial is not None:
            self._serial.close()

    async def _execute(self, command: str, allowed: tuple[VMState, ...]) -> None:
        if self._state not in allowed:
            raise VMStateError(f"cannot {command} a VM that is {self._state}")
        try:
            await self._qmp.execute(command)
        except Exception as e:
            raise VMMError(f"QMP {command} failed: {e}") from e

    async def pause(self) -> None:
        await self._execute("stop", (VMState.RUNNING,))
        self._state = VMState.PAUSED

    async def resume(self) -> None:
        await self._execute("cont", (VMState.PAUSED,))
        self._state = VMState.RUNNING

    async def powerdown(self) -> None:
        if self._state == VMState.PAUSED:
            await self.resume()  # a paused guest cannot hear the power button
        await self._execute("system_powerdown", (VMState.RUNNING,))

    async def reset(self) -> None:
        await self._execute("system_reset", (VMState.RUNNING, VMState.PAUSED))

    async def _ignore_shared_memory(self, loading: bool = False) -> None:
        # RAM in a shared file (a template's) is left out of a saved state; a clone maps that
        # file instead, so its state file holds device state only. Both ends must agree: a
        # captured state (RAM included) loads with the capability off.
        if self.spec.memory_file is not None:
            on = not (loading and self.spec.memory_in_state)
            await self._qmp.execute("migrate-set-capabilities", {
                "capabilities": [{"capability": "x-ignore-shared", "state": on}]})

    async def _poll(self, command: str, done, what: str) -> dict:
        """Ask ``command`` until ``done(answer)``; a migration may take a while, not forever."""
        loop = asyncio.get_running_loop()
        limit = MIGRATE_SECONDS_PER_GIB * max(1.0, self.spec.ram_bytes / (1 << 30))
        deadline = loop.time() + limit
        while not done(answer := await self._qmp.execute(command)):
            if loop.time() > deadline:
                raise VMMError(f"{what} did not finish within {limit:g}s")
            await asyncio.sleep(0.01)
        return answer

    async def _give_fd(self, path: Path, flags: int, name: str) -> None:
        """Open ``path`` and hand the descriptor to QEMU as ``name`` (for an ``fd:`` migration)."""
        fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        try:
            self._qmp.send_fd_scm(fd)
            await self._qmp.execute("getfd", {"fdname": name})
        finally:
            os.close(fd)

    async def load(self, path: Path) -> None:
        """Restore the state saved in ``path`` (QEMU started with ``-incoming defer``) and wait
        until it has loaded; the VM is then paused."""
        try:
            await self._ignore_shared_memory(loading=True)
            await self._give_fd(path, os.O_RDONLY, "slicer-load")
            await self._qmp.execute("migrate-incoming", {"uri": "fd:slicer-load"})
            status = await self._poll("query-status", lambda s: s["status"] != "inmigrate", "restore")
        except VMMError:
            raise
        except Exception as e:  # QEMU exits when it cannot load the state; start() adds its last words
            raise VMMError(f"restore failed: {e}") from e
        self._state = VMState.RUNNING if status.get("running") else VMState.PAUSED

    async def _roll_back_save(self) -> None:
        """A save its daemon did not see through (it died) left the vCPUs stopped after the
        migration: run them again (the state file was removed as unfinished). A restore it did
        not see through left a QEMU with no guest in it: refused (VMMError), to be stopped."""
        status = (await self._qmp.execute("query-status"))["status"]
        if status == "inmigrate":  # started to restore a state its daemon never handed over
            raise VMMError("its restore never finished (the guest was never loaded)")
        if status in ("finish-migrate", "postmigrate"):
            with contextlib.suppress(Exception):
                await self._qmp.execute("migrate_cancel")
            await self._qmp.execute("cont")
            self._state = VMState.RUNNING
            log.warning("%s: resumed: its daemon died while saving it", self.spec.name)

    async def _migrate_to(self, path: Path, what: str, doing: str, ignore_shared: bool) -> None:
        """Write the paused VM's memory and device state to ``path`` (QEMU's migration to a
        descriptor); ``ignore_shared``: leave out RAM that lives in a shared file."""
        await self._qmp.execute("migrate-set-parameters", {"max-bandwidth": MIGRATE_BANDWIDTH})
        if ignore_shared:
            await self._ignore_shared_memory()
        else:  # every page goes into the file, also those of a template's file this VM maps
            await self._qmp.execute("migrate-set-capabilities", {
                "capabilities": [{"capability": "x-ignore-shared", "state": False}]})
        await self._give_fd(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, f"slicer-{what}")
        await self._qmp.execute("migrate", {"uri": f"fd:slicer-{what}"})
        try:
            info = await self._poll("query-migrate", lambda i: i.get("status") in FINAL_MIGRATION_STATES,
                                    f"{doing} the state")
        except VMMError:
            await self._qmp.execute("migrate_cancel")
            raise
        if info["status"] != "completed":
            raise VMMError(f"{doing} the state failed: {info.get('error-desc', info['status'])}")

    def _check_saveable(self, action: str) -> bool:
        """Whether the VM runs (else it is paused); refuses any other state."""
        if self._state not in (VMState.RUNNING, VMState.PAUSED):
            raise VMStateError(f"cannot {action} a VM that is {self._state}")
        return self._state == VMState.RUNNING

    async def save(self, path: Path) -> None:
        was_running = self._check_saveable("save")
        if was_running:
            await self.pause()
        tmp = path.with_name(path.name + ".part")
        try:
            await self._migrate_to(tmp, "save", "saving", ignore_shared=True)
        except BaseException:
            tmp.unlink(missing_ok=True)
            if was_running and self._proc.returncode is None:
                with contextlib.suppress(Exception):
                    await self.resume()
            raise
        os.replace(tmp, path)
        await self.kill()

    async def capture(self, path: Path, while_stopped: Callable[[], Awaitable[None]]) -> None:
        was_running = self._check_saveable("capture")
        if was_running:
            await self.pause()
        try:
            await self._migrate_to(path, "capture", "capturing", ignore_shared=False)
            await while_stopped()  # the migration's end flushed the disk and set it inactive
        finally:
            if self._proc.returncode is None:
                # "cont" takes the disk back (and runs the vCPUs); a paused VM is paused again.
                await self._qmp.execute("cont")
                self._state = VMState.RUNNING
                if not was_running:
                    await self.pause()

    async def kill(self) -> None:
        if self._proc.returncode is not None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._qmp.execute("quit"), 2)
        try:
            await asyncio.wait_for(self._proc.wait(), 3)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            await self._proc.wait()
        self._exited()  # at once: a relaunch right after may need the same jail's cgroup name
        await asyncio.sleep(0)  # let _watch_process record the end

    async def wait(self) -> int:
        code = await self._proc.wait()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        return code


def _nic(spec: VMSpec) -> list[str]:
    """The NIC's arguments. Every clone of a template gets the template's NIC *kind*; the
    descriptor or socket behind it is its own (left out of fingerprints)."""
    dev = spec.net
    if dev is None:
        return []
    if dev.kind == "tap":
        netdev = f"tap,id=net0,fd={dev.fd}"
    elif dev.kind == "stream":  # one end of a socket pair whose other end is passt's
        netdev = f"stream,id=net0,server=off,addr.type=fd,addr.str={dev.fd}"
    elif dev.kind == "user":  # slirp: guests reach the host's loopback through it; baseline only
        net = ipaddress.IPv4Interface(spec.ip_cidr).network
        netdev = f"user,id=net0,net={net},host={spec.gateway},ipv6=off"
    else:
        raise VMMError(f"unknown NIC kind {dev.kind!r}")
    return ["-netdev", netdev, "-device", "virtio-net-device,netdev=net0"]


def _disks(layers: list[Layer]) -> list[str]:
    """``-blockdev`` nodes for a disk and its backing chain, bottom first (``disk0`` is the VM's)."""
    args: list[str] = []
    for i in reversed(range(len(layers))):
        layer = layers[i]
        ro = "off" if i == 0 else "on"
        args += ["-blockdev", f"driver=file,node-name=disk{i}-file,filename=/proc/self/fd/{layer.fd},"
                              f"read-only={ro},discard=unmap"]
        backing = f",backing=disk{i + 1}" if i + 1 < len(layers) else ""
        args += ["-blockdev", f"driver={layer.format},node-name=disk{i},file=disk{i}-file,read-only={ro},"
                              f"discard=unmap{backing}"]
    return args


def _runtime_disk(h: Handoff) -> list[str]:
    """The agent's runtime, read-only, after the root disk (so the guest names it vdb)."""
    if h.runtime < 0:
        return []
    return ["-blockdev", f"driver=file,node-name=rt-file,filename=/proc/self/fd/{h.runtime},read-only=on",
            "-blockdev", "driver=raw,node-name=rt,file=rt-file,read-only=on",
            "-device", "virtio-blk-device,drive=rt"]


def _bulk_ports(spec: VMSpec, h: Handoff) -> list[str]:
    """The bulk port's lanes: one virtio-serial port each, on the channel's device."""
    args = []
    for lane, path in enumerate(spec.bulk_sockets):
        args += ["-chardev", _chardev(f"bulk{lane}", h.socket_fd(path.stem)),
                 "-device", f"virtserialport,chardev=bulk{lane},name={bulk_port_name(lane)}"]
    return args


def _chardev(name: str, fd: int, wait: bool = False) -> str:
    return f"socket,id={name},fd={fd},server=on,wait={'on' if wait else 'off'}"


class QemuDriver(Driver):
    name = "qemu"

    def __init__(self, accelerator: str, binary: str = QEMU_BINARY, jailer: Jailer | None = None,
                 legacy_roots: tuple[Path, ...] = ()) -> None:
        if shutil.which(binary) is None:
            raise VMMError(f"{binary} not found: install Debian's qemu-system-x86")
        self.binary = binary
        # Where a disk made before the daemon kept backing records may have its backing file.
        self.legacy_roots = legacy_roots
        self.accelerator = accelerator
        self.jailer = jailer
        self.sealed = SealedFiles()
        self._chains: dict[tuple[Path, int], list[tuple[Path, str]]] = {}

    @property
    def _devices(self) -> tuple[str, ...]:
        """Host devices a confined QEMU opens by path (everything else is a descriptor)."""
        return ("/dev/kvm",) if self.accelerator == "kvm" else ()

    def confinement(self) -> dict:
        return {"confined": True, **self.jailer.describe()} if self.jailer is not None else {"confined": False}

    def command(self, spec: VMSpec, incoming: bool = False, handoff: Handoff | None = None) -> list[str]:
        """The full QEMU command line for ``spec`` with the descriptors of ``handoff`` (none:
        for comparing command lines); ``incoming``: to restore a saved state (see :meth:`QemuVM.load`)."""
        h = handoff or placeholder(spec)
        args = [
            "console=ttyS0", "root=/dev/vda", "rw", "reboot=t", "panic=-1",
            f"slicer.hostname={spec.name}", f"slicer.ip={spec.ip_cidr}", f"slicer.gw={spec.gateway}",
        ]
        if spec.dns:
            args.append("slicer.dns=" + ",".join(spec.dns))
        if spec.mac:
            args.append(f"slicer.mac={spec.mac}")
        if self.accelerator == "tcg" and (khz := tsc_khz()):
            args.append(f"tsc_early_khz={khz}")  # without it, 2 boots in 3 hang calibrating
        args.append(GUEST_CLOCK)
        if spec.runtime_disk is not None:
            args.append("slicer.runtime=vdb")
        args += spec.kernel_args
        accel = ["-accel", "tcg,thread=multi,tb-size=64", "-cpu", TCG_CPU]
        if self.accelerator == "kvm":
            accel = ["-accel", "kvm", "-cpu", "host"]
        machine = "microvm,acpi=on,pit=off,pic=off,rtc=on"
        memory = []
        if spec.memory_file is not None:
            # The id "-m" gives the RAM of a VM without a file: a state saved from either kind
            # loads into the other (a live fork's source may have booted cold).
            machine += ",memory-backend=microvm.ram"
            share = "on" if spec.memory_shared else "off"
            memory = [
                "-object", f"memory-backend-file,id=microvm.ram,size={spec.ram_bytes // (1 << 20)}M,"
                           f"mem-path=/proc/self/fd/{h.memory},share={share}",
            ]
        return [
            self.binary,
            "-name", spec.name,
            "-M", machine,
            *memory,
            *accel,
            "-smp", str(spec.cpus),
            "-m", f"{spec.ram_bytes // (1 << 20)}M",
            "-nodefaults", "-no-user-config", "-display", "none",
            *([] if spec.reboot else ["-no-reboot"]),
            *(["-sandbox", SANDBOX] if self.jailer is not None else []),
            "-chardev", _chardev("serial0", h.socket_fd("serial"), wait=True),
            "-serial", "chardev:serial0",
            "-kernel", f"/proc/self/fd/{h.kernel}", "-initrd", f"/proc/self/fd/{h.initrd}",
            "-append", " ".join(args),
            *_disks(h.layers),
            "-device", "virtio-blk-device,drive=disk0",
            *_runtime_disk(h),
            *_nic(spec),
            "-device", "virtio-rng-device",
            "-device", "virtio-serial-device",
            "-chardev", _chardev("channel0", h.socket_fd("channel")),
            "-device", f"virtserialport,chardev=channel0,name={PORT_NAME}",
            *_bulk_ports(spec, h),
            "-chardev", _chardev("qmp", h.socket_fd("qmp")),
            "-mon", "chardev=qmp,mode=control",
            *(["-incoming", "defer"] if incoming else []),
        ]

    def fingerprint(self, spec: VMSpec) -> str:
        h = hashlib.sha256(_cached_version(self.binary).encode())
        h.update(self.accelerator.encode())
        command = self.command(spec)
        # Left out: the VM's name, and what of the kernel command line a restored guest is given
        # anew (its identity) or that varies from call to call (the host's TSC frequency). So
        # host groups alike share a key, and a daemon can use another's template (template_cache).
        command[command.index("-name") + 1] = "VM"
        at = command.index("-append") + 1
        command[at] = " ".join(w for w in command[at].split() if not w.startswith(PER_VM_KERNEL_ARGS))
        h.update(GUEST_CLOCK.encode())  # states saved before it (on jiffies, whose clocks drift) are rebuilt
        for arg in command:
            arg = re.sub(r"\b(fd|addr\.str)=-?\d+", r"\1=FD", arg)
            h.update(re.sub(r"/proc/self/fd/-?\d+", "FD", arg).encode() + b"\0")
        for path in (spec.kernel, spec.initrd, spec.base_disk, *filter(None, [spec.runtime_disk])):
            st = path.stat()
            h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    async def create_disk(self, spec: VMSpec, verified: bool = False) -> None:
        spec.disk.parent.mkdir(parents=True, exist_ok=True)
        await create_overlay(spec.disk, spec.base_disk, spec.base_format, spec.disk_size, self.legacy_roots,
                             verified=verified)

    async def _lower(self, path: Path, fmt: str) -> list[Layer]:
        """The chain below a new overlay: a base image or a frozen template or commit disk
        (immutable: verified once per file)."""
        if fmt == "raw":
            return [Layer(path, fmt)]
        key = (path, path.stat().st_mtime_ns)
        if key not in self._chains:
            chain = await verified_chain(path, self.legacy_roots, fmt)
            self._chains[key] = [(layer.path, layer.format) for layer in chain]
        return [Layer(p, f) for p, f in self._chains[key]]

    async def _chain(self, spec: VMSpec) -> list[Layer]:
        """The VM's disk and the layers below it, as the daemon made them: an existing disk's
        header is checked against the daemon's record (its VMM could write it)."""
        if not spec.disk.exists():
            lower = await self._lower(spec.base_disk, spec.base_format)  # verified before qemu-img sees it
            await self.create_disk(spec, verified=True)
            return [Layer(spec.disk, "qcow2"), *lower]
        return await verified_chain(spec.disk, self.legacy_roots)

    async def start(self, spec: VMSpec, restore_from: Path | None = None) -> QemuVM:
        lap = Laps()
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        chain = await self._chain(spec)
        lap("disks")
        jail = None
        if self.jailer is not None:
            private = spec.memory_file is not None and not spec.memory_shared
            jail = self.jailer.enter(spec.name, spec.cpus, guest_memory_charge(spec.ram_bytes, private))
        lap("jail")
        try:
            handoff = open_handoff(spec, chain, jail, self.sealed)
        except BaseException:
            self._release(spec, chain, jail)
            raise
        net_fds = (spec.net.fd,) if spec.net is not None and spec.net.fd is not None else ()
        try:
            with qemu_output(spec.run_dir) as qlog:  # bounded, outlives the daemon (stderr_log)
                argv = self.command(spec, incoming=restore_from is not None, handoff=handoff)
                proc = await asyncio.create_subprocess_exec(
                    *(jail.wrap(argv, self._devices) if jail is not None else argv),
                    stdin=asyncio.subprocess.DEVNULL, stdout=qlog, stderr=qlog,
                    pass_fds=handoff.fds() + net_fds,
                    env={"PATH": os.defpath, RUN_DIR_ENV: str(spec.run_dir)},  # none of the daemon's
                    start_new_session=True,  # Ctrl-C on the daemon must not kill guests uncleanly
                )
        except BaseException:
            self._release(spec, chain, jail)
            raise
        finally:
            handoff.close()
        (spec.run_dir / "qemu.pid").write_text(f"{proc.pid}\n")
        vm = QemuVM(spec, proc, functools.partial(self._release, spec, chain, jail), jail)
        try:
            await vm._attach()
            lap("spawn")
            if restore_from is not None:
                await vm.load(restore_from)
                lap("load")
        except BaseException as e:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            vm._exited()
            if isinstance(e, VMMError):
                raise VMMError(f"{e}: {_qemu_failure(spec.run_dir)}") from e
            raise
        vm.phases = lap.laps
        return vm

    def _release(self, spec: VMSpec, chain: list[Layer], jail: Jail | None) -> None:
        """After the VMM: files it wrote go back to root, its uid and cgroup are freed."""
        if jail is None or self.jailer is None:
            return
        release(chain[0].path)
        if spec.memory_file is not None and spec.memory_shared:
            release(spec.memory_file)
        self.jailer.leave(jail)

    def running(self, run_dir: Path) -> int | None:
        return running_vmm(run_dir)

    async def adopt(self, spec: VMSpec, pid: int) -> QemuVM:
        """Take over the QEMU an earlier daemon started for ``spec`` (see :meth:`running`):
        its console, QMP and confinement; its guest goes on as it was."""
        proc = AdoptedProcess(pid)
        jail = self.jailer.adopt(pid) if self.jailer is not None else None
        chain = [Layer(spec.disk, "qcow2")]  # what _release gives back when it ends
        vm = QemuVM(spec, proc, functools.partial(self._release, spec, chain, jail), jail)
        reattach(spec.run_dir)
        try:
            await vm._attach()
            await vm._roll_back_save()
        except BaseException:
            vm._exited()
            raise
        return vm

    def kill_strays(self, run_root: Path, keep: set[int]) -> list[int]:
        return kill_and_wait([pid for pid in vmm_processes(run_root) if pid not in keep and pid != os.getpid()])

    def kill_stale(self, run_dir: Path) -> bool:
        pid = running_vmm(run_dir)
        if pid is None:
            return False
        kill_and_wait([pid])
        (run_dir / "qemu.pid").unlink(missing_ok=True)
        return True
