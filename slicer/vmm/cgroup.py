"""One cgroup per VMM process: a memory limit, a pids limit and a CPU quota.

Both layouts hosts have are supported. **v2** (unified, ``/sys/fs/cgroup/cgroup.controllers``):
``/sys/fs/cgroup/slicer-<tag>/<vm>`` with ``memory.max``, ``pids.max`` and ``cpu.max``; the
controllers are enabled on the way down. **v1** (one hierarchy per controller, as on hosts
with cgroup v1 or hybrid mounts): ``<controller>/<the daemon's own cgroup>/slicer-<tag>/<vm>``
for ``memory``, ``pids`` and ``cpu``, so VMs also count against whatever limits the daemon runs
under. The VMM joins its cgroups before it executes (see :mod:`slicer.vmm.jail`), so every page
and thread it makes is counted.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000


class CgroupError(Exception):
    """No usable cgroup layout, or a limit could not be set."""


@dataclass(frozen=True)
class Limits:
    memory_bytes: int
    pids: int
    cpus: int  # CPU quota in whole host CPUs


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as e:
        raise CgroupError(f"cannot write {value!r} to {path}: {e.strerror}") from e


def _own_path(controller: str) -> str:
    """The daemon's cgroup in a v1 hierarchy, from /proc/self/cgroup."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            if controller in names.split(","):
                return path
    return "/"


@dataclass
class Cgroup:
    """The cgroup directories of one VM (one per v1 hierarchy, one in v2)."""

    dirs: list[Path]
    version: int

    @property
    def procs_files(self) -> list[str]:
        """Where a process writes ``0`` to join (see :meth:`slicer.vmm.jail.Jail.wrap`)."""
        return [str(d / "cgroup.procs") for d in self.dirs]

    def _file(self, v1_controller: str, v1_name: str, v2_name: str) -> Path:
        if self.version == 2:
            return self.dirs[0] / v2_name
        return next(d for d in self.dirs if d.parts[len(ROOT.parts)] == v1_controller) / v1_name

    def set_limits(self, limits: Limits) -> None:
        if self.version == 2:
            _write(self._file("", "", "memory.max"), str(limits.memory_bytes))
            _write(self._file("", "", "pids.max"), str(limits.pids))
            _write(self._file("", "", "cpu.max"), f"{limits.cpus * CPU_PERIOD_US} {CPU_PERIOD_US}")
            return
        _write(self._file("memory", "memory.limit_in_bytes", ""), str(limits.memory_bytes))
        _write(self._file("pids", "pids.max", ""), str(limits.pids))
        _write(self._file("cpu", "cpu.cfs_period_us", ""), str(CPU_PERIOD_US))
        _write(self._file("cpu", "cpu.cfs_quota_us", ""), str(limits.cpus * CPU_PERIOD_US))

    def read(self) -> dict[str, int]:
        """Limits and usage as the kernel reports them (``memory_peak`` where it keeps one)."""
        names = {
            "memory_limit": ("memory", "memory.limit_in_bytes", "memory.max"),
            "memory_current": ("memory", "memory.usage_in_bytes", "memory.current"),
            "memory_peak": ("memory", "memory.max_usage_in_bytes", "memory.peak"),
            "pids_max": ("pids", "pids.max", "pids.max"),
        }
        out: dict[str, int] = {}
        for key, where in names.items():
            with contextlib.suppress(OSError, ValueError):
                out[key] = int(self._file(*where).read_text().strip())
        with contextlib.suppress(OSError, ValueError):
            if self.version == 2:
                quota = self._file("", "", "cpu.max").read_text().split()[0]
            else:
                quota = self._file("cpu", "cpu.cfs_quota_us", "").read_text().strip()
            out["cpu_quota_us"] = int(quota)
        return out

    def remove(self, wait: float = 2.0) -> None:
        """Remove the directories once their process is gone (the kernel refuses while it exits)."""
        deadline = time.monotonic() + wait
        for d in self.dirs:
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.02)


class CgroupManager:
    """Makes the per-VM cgroups below ``slicer-<tag>`` in the layout the host has."""

    def __init__(self, tag: str) -> None:
        self.tag = f"slicer-{tag}"
        if (ROOT / "cgroup.controllers").exists():
            self.version = 2
            self.parents = [ROOT / self.tag]
        elif all((ROOT / c / "cgroup.procs").exists() for c in V1_CONTROLLERS):
            self.version = 1
            self.parents = [ROOT / c / _own_path(c).lstrip("/") / self.tag for c in V1_CONTROLLERS]
        else:
            raise CgroupError(f"no cgroup v2 at {ROOT} and no v1 hierarchies for {', '.join(V1_CONTROLLERS)}")
        try:
            for parent in self.parents:
                parent.mkdir(exist_ok=True)
            if self.version == 2:
                for d in (ROOT, self.parents[0]):
                    _write(d / "cgroup.subtree_control", "+memory +pids +cpu")
        except OSError as e:
            raise CgroupError(f"cannot make {self.parents[0]}: {e.strerror}; run the daemon as root on a host "
                              "whose cgroup file system is writable, or set confine: false") from e
        for parent in self.parents:  # VMs of an earlier daemon that are gone (rmdir keeps busy ones)
            for child in parent.iterdir():
                if child.is_dir():
                    with contextlib.suppress(OSError):
                        child.rmdir()

    def create(self, name: str, limits: Limits) -> Cgroup:
        dirs = [parent / name for parent in self.parents]
        cg = Cgroup(dirs, self.version)
        try:
            for d in dirs:
                try:
                    d.mkdir()
                except FileExistsError:  # an earlier VM's of this name and uid: its process is gone by now
                    Cgroup([d], self.version).remove(wait=1.0)
                    d.mkdir()
        except OSError as e:
            cg.remove(wait=0)
            raise CgroupError(f"cannot make {dirs[0]}: {e.strerror}") from e
        try:
            cg.set_limits(limits)
        except CgroupError:
            cg.remove(wait=0)
            raise
        return cg

    def of_process(self, pid: int) -> Cgroup:
        """The cgroup a running process is in (a VMM an earlier daemon started)."""
        paths: dict[str, str] = {}
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                _, names, path = line.rstrip("\n").split(":", 2)
                for name in names.split(",") if names else [""]:
                    paths[name] = path.lstrip("/")
        if self.version == 2:
            return Cgroup([ROOT / paths[""]], 2)
        return Cgroup([ROOT / c / paths[c] for c in V1_CONTROLLERS], 1)

    def describe(self) -> str:
        return f"cgroup v{self.version} at {self.parents[0]}"

    def cleanup(self) -> None:
        """Remove the daemon's parent directories if no VM is left in them."""
        for parent in self.parents:
            with contextlib.suppress(OSError):
                parent.rmdir()

