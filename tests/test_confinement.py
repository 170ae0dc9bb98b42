"""Confined VMMs: each QEMU under a uid of its own, QEMU's seccomp filter and a cgroup with
limits; it reaches its files only through the descriptors the daemon passed."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from slicer.vmm.jail import MEMORY_OVERHEAD, PIDS_MAX
from tests.conftest import qemu_pids, wait_agent

pytestmark = pytest.mark.vm
MiB = 1 << 20


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def cgroup_dir(pid: int, controller: str) -> Path:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            return Path("/sys/fs/cgroup", controller, path.lstrip("/"))
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():  # v2
        path = Path(f"/proc/{pid}/cgroup").read_text().split("::", 1)[1].strip()
        return Path("/sys/fs/cgroup", path.lstrip("/"))
    raise AssertionError(f"no {controller} cgroup for {pid}")


def pid_of(daemon, hostname: str) -> int:
    (pid,) = qemu_pids(str(daemon.data_dir / "run" / hostname))
    return pid


def as_uid(uid: int, gid: int, action) -> int:
    """Run ``action()`` in a child with ``uid``/``gid`` only; returns the errno it raised (0: none)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.setgroups([gid])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            action()
        except OSError as e:
            code = e.errno or 255
        except BaseException:
            code = 254
        os._exit(code)
    _, st = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(st)


def open_fd_of(pid: int, target: Path, flags: int):
    """An action that opens, through ``/proc/<pid>/fd``, the descriptor of ``pid`` that is ``target``."""
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            if Path(os.readlink(fd)) == target:
                return lambda: os.close(os.open(fd, flags))
        except OSError:
            continue
    raise AssertionError(f"{pid} holds no descriptor of {target}")


@pytest.fixture(scope="module")
def two_vms(api, daemon):
    """The service vm-1 and a sandbox, each restored from its group's template."""
    r = api.post("/hostgroup/sbx/nodes", json={}, params={"wait": "agent", "timeout": "4m"})
    assert r.status_code == 201, r.text
    sandbox = r.json()["hostname"]
    wait_agent(api, "vm-1")  # a service of the session's daemon: it may still be coming up
    yield {"vm-1": pid_of(daemon, "vm-1"), sandbox: pid_of(daemon, sandbox)}
    api.delete(f"/hostgroup/sbx/nodes/{sandbox}")


def test_every_qemu_runs_as_its_own_uid_under_seccomp(api, two_vms):
    seen = {}
    for name, pid in two_vms.items():
        st = status(pid)
        uid = int(st["Uid"].split()[0])
        assert uid != 0 and set(st["Uid"].split()) == {str(uid)}, (name, st["Uid"])
        assert st["Seccomp"] == "2", (name, st["Seccomp"])  # a filter is installed
        assert st["NoNewPrivs"] == "1"
        assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0, (name, st["CapEff"])
        seen[name] = uid
    assert len(set(seen.values())) == len(seen), f"two VMs share a uid: {seen}"
    info = api.get("/info").json()["confinement"]
    assert info["confined"] is True and "seccomp" in info


def test_every_qemu_has_a_cgroup_with_limits(api, two_vms):
    # Whether a VM maps a template's RAM is the record's (/storage), not its boot's word: vm-1, the
    # session's service, restores from its template and may have been suspended and restored
    # since ("suspend"), still mapping it.
    mapping = {n["hostname"]: n["template"] for n in api.get("/storage").json()["nodes"]}
    for name, pid in two_vms.items():
        node = api.get(f"/vm/{name}").json()
        ram = node["ram_bytes"] if "ram_bytes" in node else node["ram_gb"] * (1 << 30)
        if (mem := cgroup_dir(pid, "memory")).joinpath("memory.limit_in_bytes").exists():
            limit = int((mem / "memory.limit_in_bytes").read_text())
            quota = int((cgroup_dir(pid, "cpu") / "cpu.cfs_quota_us").read_text())
            pids = (cgroup_dir(pid, "pids") / "pids.max").read_text().strip()
        else:
            limit = int((mem / "memory.max").read_text())
            quota = int((mem / "cpu.max").read_text().split()[0])
            pids = (mem / "pids.max").read_text().strip()
        clone = mapping[name] is not None  # maps its template's RAM: charged up to twice
        if node.get("boot") in ("template", "boot"):  # restored from a template, or cold: it says which
            assert clone == (node["boot"] == "template"), (name, node["boot"], mapping[name])
        assert limit == (2 if clone else 1) * ram + MEMORY_OVERHEAD, (name, limit, ram, node.get("boot"))
        assert quota == node["cpus"] * 100_000, (name, quota)
        assert pids == str(PIDS_MAX)


def own_disk(pid: int, hostname: str) -> Path:
    """The VM's own disk among its QEMU's descriptors: ``run/<host>/disk.qcow2`` or
    ``disks/<host>.qcow2`` (not a template's, whose name may start with the same letters)."""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        path = Path(os.readlink(fd))
        if path.suffix == ".qcow2" and hostname in (path.parent.name, path.stem):
            return path.resolve()
    raise AssertionError(f"no disk of {hostname} open in QEMU {pid}")


def test_a_qemu_user_cannot_reach_another_vms_disk(daemon, two_vms):
    (a, pid_a), (b, pid_b) = sorted(two_vms.items())
    uid_a = int(status(pid_a)["Uid"].split()[0])
    gid_a = int(status(pid_a)["Gid"].split()[0])
    disk_b = own_disk(pid_b, b)
    # Not by path (the data directory is root's alone) ...
    assert as_uid(uid_a, gid_a, lambda: os.close(os.open(disk_b, os.O_RDONLY))) == errno.EACCES
    assert as_uid(uid_a, gid_a, lambda: os.listdir(daemon.data_dir)) == errno.EACCES
    # ... nor through the other QEMU's descriptors.
    assert as_uid(uid_a, gid_a, open_fd_of(pid_b, disk_b, os.O_RDONLY)) == errno.EACCES
    # Its own disk, through its own descriptor, it can open: the check above is not vacuous.
    disk_a = own_disk(pid_a, a)
    assert as_uid(uid_a, gid_a, open_fd_of(pid_a, disk_a, os.O_RDWR)) == 0


def test_a_clone_cannot_write_the_template_memory_it_maps(daemon, two_vms):
    name = next(n for n in two_vms if n != "vm-1")
    pid = two_vms[name]
    st = status(pid)
    uid, gid = int(st["Uid"].split()[0]), int(st["Gid"].split()[0])
    # The one the daemon passed, and QEMU's own reopening of it (what it maps).
    memfds = [p for p in Path(f"/proc/{pid}/fd").iterdir() if os.readlink(p).startswith("/memfd:slicer:")]
    assert memfds, f"{name} maps no sealed copy of its template's RAM"
    memfd = memfds[-1]

    def write_through_it() -> None:
        fd = os.open(memfd, os.O_RDWR)  # QEMU opens it so too, to map it copy-on-write
        try:
            os.pwrite(fd, b"tampered", 0)
        finally:
            os.close(fd)

    assert as_uid(uid, gid, write_through_it) == errno.EPERM, f"{name} could write its template's RAM"
