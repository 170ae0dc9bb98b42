"""Confinement of VMM processes, after Firecracker's jailer.

Under TCG, QEMU is not a security boundary by QEMU's own policy; what surrounds it is. Each
VMM process:

- runs as a **uid of its own** (no name in ``/etc/passwd``; a block of uids per data
  directory, skipping any uid a process already runs as) with one group, ``VMM_GID``, that
  lets it read the shared read-only layers (template disks);
- joins a **cgroup of its own** before QEMU executes (memory: guest RAM plus overhead; pids; a
  CPU quota of its vCPUs), see :mod:`slicer.vmm.cgroup`;
- runs QEMU's **seccomp filter** (``-sandbox``): no new privileges, no ``fork``/``exec``, no
  scheduler or resource changes;
- reaches **nothing by path** in the data directory (it stays 0700 root): the daemon opens
  every file and socket and passes the descriptors; QEMU names them ``/proc/self/fd/N``, which
  works with the descriptor only. Its own disk overlay is chowned to its uid while it runs;
- sees **nothing of the host** (Firecracker's jailer): namespaces of its own for mounts, network
  (empty: its TAP or passt socket is a descriptor), IPC and UTS, and a root of its own
  (:class:`JailRoot`): ``/usr`` read-only, ``/proc`` showing its own processes only, its own
  ``/tmp`` (also ``/dev/shm``) that goes with it, no ``/etc``, ``/home`` or ``/var``.

Files many VMs map privately (a template's RAM) are handed over as write-sealed in-memory
copies (:class:`SealedFiles`): QEMU 7.2 opens a RAM file read-write even to map it
copy-on-write, and a seal is what stops one VM from changing what the others map.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from slicer.vmm.base import HostError
from slicer.vmm.cgroup import Cgroup, CgroupError, CgroupManager, Limits

log = logging.getLogger(__name__)

UID_BASE = 1_900_000_000  # above systemd's container range (524288-1879048191)
UID_BLOCKS = 1024  # a data directory's block is chosen by its digest
UID_BLOCK_SIZE = 4096
VMM_GID = UID_BASE  # every confined VMM's group: read-only layers shared by VMs
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# Besides guest RAM: TCG's translation cache (tb-size=64), the kernel and initrd QEMU keeps,
# QEMU itself and the page cache of disk reads (reclaimed first when the limit is near).
MEMORY_OVERHEAD = 320 << 20
PIDS_MAX = 256  # vCPU threads, the block layer's worker pool (up to 64), RCU, main loop
JOIN_CGROUPS = 'while [ "$1" != -- ]; do echo 0 > "$1" || exit 126; shift; done; shift; exec "$@"'
# Run by /bin/sh in the VMM's new namespaces, as root, before the privileges go:
# slicer-jail ROOT DIR... -- DEVICE... -- CGROUP_PROCS... -- ARGV (see Jail.wrap).
JAIL_SETUP = r"""set -e
PATH=/usr/sbin:/usr/bin:/sbin:/bin
root=$1; shift
while [ "$1" != -- ]; do mount --bind -o ro "/$1" "$root/$1"; shift; done; shift
while [ "$1" != -- ]; do mount --bind "$1" "$root$1"; shift; done; shift
while [ "$1" != -- ]; do echo 0 > "$1" || exit 126; shift; done; shift
mount -t proc -o hidepid=invisible,subset=pid,nosuid,nodev,noexec slicer-proc "$root/proc" 2>/dev/null \
  || mount -t proc -o nosuid,nodev,noexec slicer-proc "$root/proc"  # Linux < 5.8: no per-mount hidepid
mount -t tmpfs -o size=16m,mode=1777,nosuid,nodev,noexec slicer-tmp "$root/tmp"
exec chroot "$root" "$@"
"""
NAMESPACES = ["unshare", "--mount", "--net", "--ipc", "--uts", "--propagation", "private", "--"]
# Left behind by a uid, on a host without a jail root or by an older daemon: swept before it is reused.
SHARED_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/dev/mqueue", "/run/lock")


def _first_uid(tag: str) -> int:
    return UID_BASE + 1 + (int(tag, 16) % UID_BLOCKS) * UID_BLOCK_SIZE


def helper_uid(tag: str) -> int:
    """The block's last uid, never a VMM's: the network helpers (passt) of that data directory
    run as it, so the firewall can tell their connections from the host's own."""
    return _first_uid(tag) + UID_BLOCK_SIZE - 1


class JailError(HostError):
    """Confinement could not be set up (see :class:`slicer.vmm.base.HostError`)."""


class JailRoot:
    """The root directory every VMM of a data directory is given: empty directories to mount
    on (``/usr`` and, on hosts without merged ``/usr``, ``/lib*``, ``/bin``, ``/sbin``), the
    links of a merged ``/usr``, ``/dev/shm`` pointing at ``/tmp``, the dynamic loader's cache.
    Root-owned and read-only to VMMs. Made once and only added to, never removed: VMMs a new
    daemon adopts run in it, and removing a directory detaches what is mounted on it in every
    namespace."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.binds = ["usr"]
        path.mkdir(mode=0o755, parents=True, exist_ok=True)
        for d in ("usr", "proc", "tmp", "dev", "etc"):
            (path / d).mkdir(mode=0o755, exist_ok=True)
        for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            host, mine = Path("/") / top, path / top
            if host.is_symlink():
                if not mine.is_symlink():
                    mine.symlink_to(os.readlink(host))
            elif host.is_dir():
                mine.mkdir(mode=0o755, exist_ok=True)
                self.binds.append(top)
        if not (path / "dev" / "shm").is_symlink():
            (path / "dev" / "shm").symlink_to("../tmp")
        with contextlib.suppress(FileNotFoundError):  # the loader's cache may have changed: replaced whole
            tmp = path / "etc" / ".ld.so.cache"
            shutil.copyfile("/etc/ld.so.cache", tmp)
            tmp.chmod(0o644)
            os.replace(tmp, path / "etc" / "ld.so.cache")
        path.chmod(0o755)

    def device(self, node: str) -> None:
        """A mount point for the host's device ``node`` (``/dev/kvm``)."""
        (self.path / node.lstrip("/")).touch(mode=0o600, exist_ok=True)


@dataclass
class Jail:
    """One VMM's confinement: its uid, groups, cgroup and (on a root of its own) namespaces."""

    uid: int
    gid: int
    groups: list[int]
    cgroup: Cgroup
    root: JailRoot | None = None

    def wrap(self, argv: list[str], devices: tuple[str, ...] = ()) -> list[str]:
        """``argv`` run inside the jail: ``unshare`` makes its namespaces, a shell joins the
        cgroups (writing ``0`` to ``cgroup.procs`` moves the writer), mounts its root's
        ``/usr``, ``/proc``, ``/tmp`` and ``devices`` and changes root to it, then ``setpriv``
        drops to the jail's uid for good (no capabilities, none inheritable, no new privileges)
        and executes ``argv``; one pid throughout. Exec helpers rather than code between fork
        and exec let the daemon spawn with vfork: a fork of the daemon costs ~5-15 ms, the
        helpers (mounts included) ~10 ms. (Joining a v1 cgroup can wait ~10 ms for an RCU grace
        period; v2 with ``favordynmods`` does not.)"""
        groups = ",".join(str(g) for g in self.groups)
        drop = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", f"--groups={groups}",
                "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--", *argv]
        if self.root is None:
            return ["/bin/sh", "-c", JOIN_CGROUPS, "slicer-jail", *self.cgroup.procs_files, "--", *drop]
        for node in devices:
            self.root.device(node)
        return [*NAMESPACES, "/bin/sh", "-c", JAIL_SETUP, "slicer-jail", str(self.root.path), *self.root.binds,
                "--", *devices, "--", *self.cgroup.procs_files, "--", *drop]

    def own(self, path: Path) -> None:
        """Make ``path`` the jail's while its VMM runs (a disk it writes)."""
        os.chown(path, self.uid, self.gid)
        os.chmod(path, 0o600)


def guest_memory_charge(ram_bytes: int, private_file: bool) -> int:
    """The most a VM's guest memory can be charged to its cgroup. A clone maps its template's
    RAM copy-on-write: the first VM to touch a page the template never touched is charged for
    the template's page (it stays, shared by later clones) and for its own copy."""
    return 2 * ram_bytes if private_file else ram_bytes


def release(path: Path) -> None:
    """Give a file a VMM wrote back to root; VMMs may still read it (a template's disk)."""
    with contextlib.suppress(FileNotFoundError):
        os.chown(path, 0, VMM_GID)
        os.chmod(path, 0o640)


def readable(path: Path) -> None:
    """Let VMMs read ``path`` by their group if they cannot by its mode."""
    st = path.stat()
    if st.st_mode & 0o004 or (st.st_gid == VMM_GID and st.st_mode & 0o040):
        return
    os.chown(path, st.st_uid, VMM_GID)
    os.chmod(path, (st.st_mode & 0o7777) | 0o040)


def sweep_uid(uid: int) -> list[str]:
    """Remove what ``uid`` left where every uid may write (a setuid copy of a shell in ``/tmp``
    must not be there when the uid is given to the next VM); the names removed."""
    removed = []
    for top in SHARED_WRITABLE:
        with contextlib.suppress(OSError), os.scandir(top) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_uid != uid:
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path)
                    else:
                        os.unlink(entry.path)
                    removed.append(entry.path)
    return removed


def _uids_in_use() -> set[int]:
    used = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                used.add(entry.stat().st_uid)
    return used


class Jailer:
    """Hands out jails: uids from the data directory's block, cgroups under ``slicer-<tag>``."""

    def __init__(self, tag: str, root: Path | None = None) -> None:
        """``root``: where to make the VMMs' root (:class:`JailRoot`); None: no namespaces."""
        if os.geteuid() != 0:
            raise JailError("confining VMMs needs root (setuid, cgroups); set confine: false to run them "
                            "as the daemon's user")
        try:
            self.cgroups = CgroupManager(tag)
        except CgroupError as e:
            raise JailError(str(e)) from e
        self.first_uid = _first_uid(tag)
        self._uids: set[int] = set()
        self.root = JailRoot(root) if root is not None else None
        self.groups = [VMM_GID]
        with contextlib.suppress(KeyError):
            self.groups.append(grp.getgrnam("kvm").gr_gid)  # /dev/kvm is root:kvm 0660

    def enter(self, name: str, cpus: int, ram_bytes: int) -> Jail:
        """A jail for the VMM of VM ``name`` (released with :meth:`leave`); ``ram_bytes``: what
        its guest memory may be charged (see :func:`guest_memory_charge`)."""
        taken = self._uids | _uids_in_use()
        uid = next((u for u in range(self.first_uid, self.first_uid + UID_BLOCK_SIZE - 1) if u not in taken), None)
        if uid is None:
            raise JailError(f"all {UID_BLOCK_SIZE} VMM uids of this data directory are in use")
        for path in sweep_uid(uid):
            log.warning("removed %s, left by VMM uid %d", path, uid)
        try:
            # Named by uid too: the cgroup of a VM's previous VMM may not be gone yet.
            cgroup = self.cgroups.create(f"{name}.{uid}", Limits(ram_bytes + MEMORY_OVERHEAD, PIDS_MAX, cpus))
        except CgroupError as e:
            raise JailError(str(e)) from e
        self._uids.add(uid)
        return Jail(uid, VMM_GID, self.groups, cgroup, self.root)

    def adopt(self, pid: int) -> Jail | None:
        """The jail an earlier daemon put the running VMM ``pid`` in (None: it runs as root)."""
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":" in line)
        uid, gid = int(status["Uid"].split()[0]), int(status["Gid"].split()[0])
        if uid == 0:
            return None
        self._uids.add(uid)
        return Jail(uid, gid, self.groups, self.cgroups.of_process(pid))

    def leave(self, jail: Jail) -> None:
        jail.cgroup.remove()
        self._uids.discard(jail.uid)

    def describe(self) -> dict:
        return {"uids": f"{self.first_uid}-{self.first_uid + UID_BLOCK_SIZE - 2}", "gid": VMM_GID,
                "cgroup": self.cgroups.describe(), "seccomp": SANDBOX,
                "namespaces": ["mount", "network", "ipc", "uts"] if self.root is not None else []}

    def close(self) -> None:
        self.cgroups.cleanup()


class SealedFiles:
    """Write-sealed in-memory copies of files many VMMs map copy-on-write (a template's RAM).

    A copy is made once per file (only its data extents: RAM files are sparse) and kept while
    the file exists unchanged; every VMM gets the same descriptor, so unchanged pages stay
    shared between them, and no VMM can write to it (``F_SEAL_WRITE``) or resize it.
    """

    SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL

    def __init__(self) -> None:
        self._copies: dict[Path, tuple[int, int]] = {}  # path -> (mtime_ns, fd)

    def get(self, path: Path) -> int:
        """The sealed copy's descriptor (the caller must not close it)."""
        self.prune()
        st = path.stat()
        cached = self._copies.get(path)
        if cached is not None and cached[0] == st.st_mtime_ns:
            return cached[1]
        fd = os.memfd_create(f"slicer:{path.parent.name}/{path.name}", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, st.st_size)
            src = os.open(path, os.O_RDONLY)
            try:
                _copy_extents(src, fd, st.st_size)
            finally:
                os.close(src)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, self.SEALS)
        except BaseException:
            os.close(fd)
            raise
        self._copies[path] = (st.st_mtime_ns, fd)
        return fd

    def prune(self) -> None:
        """Drop copies of files that are gone or changed (a removed template)."""
        for path, (mtime, fd) in list(self._copies.items()):
            try:
                gone = path.stat().st_mtime_ns != mtime
            except FileNotFoundError:
                gone = True
            if gone:
                os.close(fd)
                del self._copies[path]


def _copy_extents(src: int, dst: int, size: int) -> None:
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            return
        end = os.lseek(src, start, os.SEEK_HOLE)
        os.lseek(dst, start, os.SEEK_SET)
        while start < end:
            sent = os.sendfile(dst, src, start, end - start)
            if sent == 0:
                return
            start += sent
        offset = end
