"""The descriptors the daemon opens for one VMM: it reaches its files and sockets through them only.

QEMU gets each one at exec and names it ``/proc/self/fd/N`` (files) or ``fd=N`` (sockets), so
it needs no path into the data directory. Disks are described layer by layer (``-blockdev``)
because a qcow2 overlay names its backing file by path, which QEMU could not open.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from slicer.vmm.base import VMMError, VMSpec
from slicer.vmm.jail import Jail, SealedFiles, readable

SOCKETS = ("serial", "qmp", "channel")


@dataclass
class Layer:
    path: Path
    format: str  # "qcow2" or "raw"
    fd: int = -1


@dataclass
class Handoff:
    """What one VMM is given; the daemon closes its copies once the VMM has started."""

    kernel: int = -1
    initrd: int = -1
    layers: list[Layer] = field(default_factory=list)  # the VM's disk first, then its backing chain
    memory: int = -1  # guest RAM file, if the spec asks for one
    runtime: int = -1  # the runtime disk, if the spec has one
    sockets: dict[str, socket.socket] = field(default_factory=dict)
    _owned: list[int] = field(default_factory=list)  # descriptors to close (not shared ones)

    def socket_fd(self, name: str) -> int:
        sock = self.sockets.get(name)
        return sock.fileno() if sock is not None else -1

    def fds(self) -> tuple[int, ...]:
        found = [self.kernel, self.initrd, self.memory, self.runtime, *(layer.fd for layer in self.layers)]
        found += [s.fileno() for s in self.sockets.values()]
        return tuple(fd for fd in found if fd >= 0)

    def close(self) -> None:
        for fd in self._owned:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._owned.clear()
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()

    def _open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        try:
            fd = os.open(path, flags | os.O_CLOEXEC, mode)
        except OSError as e:
            raise VMMError(f"cannot open {path}: {e.strerror}") from e
        self._owned.append(fd)
        return fd

    def _listen(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            os.chmod(path, 0o600)
            sock.listen(8)
        except OSError as e:
            sock.close()
            raise VMMError(f"cannot listen on {path}: {e.strerror}") from e
        self.sockets[path.stem] = sock


def placeholder(spec: VMSpec) -> Handoff:
    """A handoff with no descriptors: for command lines that are only compared (fingerprints)."""
    return Handoff(layers=[Layer(spec.disk, "qcow2"), Layer(spec.base_disk, spec.base_format)],
                   runtime=-1 if spec.runtime_disk is None else 0)  # 0: "has one", never opened


def open_handoff(spec: VMSpec, chain: list[Layer], jail: Jail | None, sealed: SealedFiles) -> Handoff:
    """Open everything the VM of ``spec`` needs; with a jail, its disk (and a RAM file it
    writes) become the jail's and every lower layer readable by it."""
    h = Handoff(layers=chain)
    try:
        h.kernel = h._open(spec.kernel, os.O_RDONLY)
        h.initrd = h._open(spec.initrd, os.O_RDONLY)
        for i, layer in enumerate(chain):
            if jail is not None:
                jail.own(layer.path) if i == 0 else readable(layer.path)
            layer.fd = h._open(layer.path, os.O_RDWR if i == 0 else os.O_RDONLY)
        if spec.runtime_disk is not None:
            if jail is not None:
                readable(spec.runtime_disk)
            h.runtime = h._open(spec.runtime_disk, os.O_RDONLY)
        if spec.memory_file is not None and spec.memory_shared:
            h.memory = h._open(spec.memory_file, os.O_RDWR | os.O_CREAT)
            if jail is not None:
                jail.own(spec.memory_file)
        elif spec.memory_file is not None:
            h.memory = sealed.get(spec.memory_file)
        for path in [spec.run_dir / f"{name}.sock" for name in SOCKETS] + spec.bulk_sockets:
            h._listen(path)
    except BaseException:
        h.close()
        raise
    return h
