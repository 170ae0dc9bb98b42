"""Per-group templates: one VM booted to a ready agent, saved, and restored for every new VM.

A template is a directory under ``<data>/templates`` named ``<group>-<key>-<serial>``:
``ram`` (the guest's memory: clones map it copy-on-write, so a restore reads only what the
guest touches, and clean pages are shared), ``state`` (device state), ``disk.qcow2`` (the disk
at that instant, frozen: every sandbox's overlay is backed by it, a service or persistent VM
starts as a copy of it) and ``meta.json`` (written last: a template without it is incomplete).
The key digests everything the saved state depends on (hypervisor version, accelerator,
devices, sizes, kernel, initrd, image), so a change to any of them makes a new template. A
template whose restore failed is retired (marker file); templates neither current nor used by
a node (its disk, or the RAM it maps) are removed. With a ``template_cache``
(:mod:`slicer.core.template_cache`), a template another daemon built is copied from there
rather than built, and every template built here is stored there.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from pathlib import Path

from slicer.core.config import HostGroup
from slicer.core.errors import SlicerError
from slicer.core.images import BootImages
from slicer.core.node import Node
from slicer.core.records import NodeKind
from slicer.core.specs import vm_spec
from slicer.core.state import NodeRecord, now_rfc3339
from slicer.core.template_cache import TemplateCache
from slicer.net import NetworkError
from slicer.net.surface import Network
from slicer.vmm.base import LAYOUT, Driver, VMMError, VMSpec, VMState

log = logging.getLogger(__name__)

BUILD_TIMEOUT = 300.0
RETRY_AFTER = 60.0  # after a failed build, creates boot cold for this long before trying again
MAX_SIZES = 4  # per host group: templates of further sizes are not made (their VMs boot cold)
Size = tuple[int, int]  # (vCPUs, RAM bytes)


@dataclasses.dataclass
class Template:
    path: Path
    group: str
    key: str
    cpus: int
    ram_bytes: int
    disk_size: int
    created_at: str
    base: str = ""  # a live fork's snapshot: the template its disk sits on, if any (kept while it is)
    layout: int = 0  # its machine's (slicer.vmm.base.VMSpec.layout; 0 for one an older daemon built)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def state(self) -> Path:
        return self.path / "state"

    @property
    def disk(self) -> Path:
        return self.path / "disk.qcow2"

    @property
    def ram(self) -> Path:
        return self.path / "ram"

    def describe(self, clones: int = 0) -> dict:
        """What a user sees: sizes, and the bytes its files take on the host."""
        return {"name": self.name, "hostgroup": self.group, "cpus": self.cpus, "ram_bytes": self.ram_bytes,
                "created_at": self.created_at, "retired": self.retired, "clones": clones,
                "state_bytes": allocated_bytes(self.state) + allocated_bytes(self.ram),
                "disk_bytes": allocated_bytes(self.disk)}

    def start_console_log(self, path: Path, hostname: str) -> None:
        """Begin a clone's console log with the template's boot messages and a marker."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as out:
            with contextlib.suppress(OSError), open(self.path / "console.log", "rb") as boot:
                shutil.copyfileobj(boot, out)
            out.write(f"\r\n[slicer] restored from template {self.name} as {hostname}\r\n".encode())

    @property
    def retired(self) -> bool:
        return (self.path / "retired").exists()

    def fits(self, cpus: int, ram_bytes: int) -> bool:
        return (cpus, ram_bytes) == (self.cpus, self.ram_bytes)

    @classmethod
    def load(cls, path: Path) -> Template | None:
        try:
            meta = json.loads((path / "meta.json").read_text())
            return cls(path=path, **meta)
        except (OSError, ValueError, TypeError):
            return None


def allocated_bytes(path: Path) -> int:
    """Bytes a file takes on disk (sparse files and qcow2 overlays are mostly holes)."""
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0


class Templates:
    """The templates of every host group, one per VM size (cpus, RAM) asked for, at most
    ``MAX_SIZES`` sizes per group (further sizes boot cold)."""

    def __init__(self, root: Path, run_root: Path, driver: Driver, images: BootImages, net: Network,
                 cache: TemplateCache | None = None) -> None:
        self.root = root
        self.cache = cache
        # Keys whose cached template failed here (its restore, or it is unusable): built anew, and
        # the build replaces the cache's entry.
        self._spoiled: set[str] = set()
        self.net = net
        self.run_root = run_root
        self.driver = driver
        self.images = images
        self._locks: dict[tuple[str, Size], asyncio.Lock] = {}
        self._failed_at: dict[tuple[str, Size], float] = {}
        # What a key digests is fixed for the daemon's life (the image is chosen at start).
        self._keys: dict[tuple[str, Size], str] = {}
        self.pinned: set[str] = set()  # kept though no node uses them yet (a fork making its copies)

    def spec(self, group: HostGroup, size: Size | None = None) -> VMSpec:
        """The template VM of ``group`` at ``size`` (default: the group's): a neutral name and address."""
        cpus, ram = size or (group.vcpu, group.ram)
        name = f"tpl-{group.name}-{cpus}c{ram >> 20}m"
        gnet = self.net.group(group.name)
        ip = str(gnet.addressing.pool[0])  # its NIC is connected to nothing: no clash with a VM's
        building = self.root / f".building-{name}"
        boot = self.images.boot(self.images.group_choice(group.name))
        # The image's real paths, not a link to them: its key and its disk's backing file then name
        # nothing of this data directory, and a copy serves another daemon (template_cache).
        boot = dataclasses.replace(boot, kernel=boot.kernel.resolve(), initrd=boot.initrd.resolve(),
                                   rootfs=boot.rootfs.resolve(), runtime=boot.runtime and boot.runtime.resolve())
        spec = vm_spec(boot, group, gnet, name=name, cpus=cpus, ram_bytes=ram, ip=ip,
                       disk=building / "disk.qcow2", run_dir=self.run_root / f".{name}")  # no VM's name
        spec.memory_file, spec.memory_shared = building / "ram", True
        spec.layout = LAYOUT  # its clones' (and part of its fingerprint: older templates are rebuilt)
        return spec

    def key(self, group: HostGroup, size: Size | None = None) -> str:
        size = size or (group.vcpu, group.ram)
        if (group.name, size) not in self._keys:
            digest = hashlib.sha256(self.driver.fingerprint(self.spec(group, size)).encode())
            digest.update(f"{group.disk_size}".encode())
            self._keys[(group.name, size)] = digest.hexdigest()[:16]
        return self._keys[(group.name, size)]

    def base_of(self, name: str) -> str:
        """The template a fork's snapshot called ``name`` sits on ("" for none)."""
        if "-fork-" not in name:
            return ""
        tpl = Template.load(self.root / name)
        return tpl.base if tpl is not None else ""

    def memory_file(self, name: str) -> Path:
        """The RAM file of the template called ``name`` (what its clones map)."""
        return self.root / name / "ram"

    def _all(self) -> list[Template]:
        if not self.root.is_dir():
            return []
        found = (Template.load(p) for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        return sorted((t for t in found if t is not None), key=lambda t: t.created_at)

    def current(self, group: HostGroup, size: Size | None = None) -> Template | None:
        size = size or (group.vcpu, group.ram)
        key = self.key(group, size)
        usable = [t for t in self._all()
                  if t.group == group.name and t.key == key and t.fits(*size) and not t.retired]
        return usable[-1] if usable else None

    def _current_all(self, groups: list[HostGroup]) -> dict[str, Template]:
        """The current template of every (group, size) that has one on disk, by name."""
        by_name = {g.name: g for g in groups}
        sizes = {(t.group, (t.cpus, t.ram_bytes)) for t in self._all() if t.group in by_name}
        found = (self.current(by_name[g], size) for g, size in sizes)
        return {t.name: t for t in found if t is not None}

    async def ensure(self, group: HostGroup, size: Size | None = None, retry: bool = False) -> Template | None:
        """The current template of ``group`` at ``size``, built first if needed (one build at a
        time per group and size: concurrent creates wait for it). None if it cannot be had right
        now: a failed build is retried after RETRY_AFTER (at once with ``retry``), and a group
        has templates of at most MAX_SIZES sizes."""
        size = size or (group.vcpu, group.ram)
        lock = self._locks.setdefault((group.name, size), asyncio.Lock())
        async with lock:
            if (tpl := self.current(group, size)) is not None:
                return tpl
            failed = self._failed_at.get((group.name, size))
            if not retry and failed is not None and time.monotonic() - failed < RETRY_AFTER:
                return None
            sizes = {(t.cpus, t.ram_bytes) for t in self._current_all([group]).values()}
            if len(sizes) >= MAX_SIZES:
                log.info("host group %s has templates of %d sizes already; %s boots cold", group.name,
                         len(sizes), f"{size[0]} vCPU / {size[1] >> 20} MiB")
                return None
            try:
                async with self._shared_build(group, size):  # a daemon building the same machine: wait, copy
                    if (tpl := await self._from_cache(group, size)) is not None:
                        return tpl
                    tpl = await self._build(group, size)
                    await self._share(tpl)
                    return tpl
            except (SlicerError, VMMError, NetworkError, OSError, TimeoutError) as e:
                self._failed_at[(group.name, size)] = time.monotonic()
                log.error("template for host group %s could not be built: %s", group.name, e)
                return None

    def kill_stale_builds(self) -> list[str]:
        """End template VMs an earlier daemon left building, and remove what those builds
        left: their run dirs, ``.building-*`` dirs and template dirs without ``meta.json``
        (written last, so a template without it never finished). Returns the VMs ended."""
        killed = []
        if self.run_root.is_dir():
            for run_dir in self.run_root.glob(".tpl-*"):
                if self.driver.kill_stale(run_dir):
                    killed.append(run_dir.name)
                shutil.rmtree(run_dir, ignore_errors=True)
        if self.root.is_dir():
            for path in self.root.iterdir():
                if path.name.startswith(".building-") or (path.is_dir() and Template.load(path) is None):
                    log.warning("removing %s, left by a template build that did not finish", path.name)
                    shutil.rmtree(path, ignore_errors=True)
        return killed

    async def _build(self, group: HostGroup, size: Size) -> Template:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        spec = self.spec(group, size)
        building = spec.disk.parent
        shutil.rmtree(building, ignore_errors=True)
        shutil.rmtree(spec.run_dir, ignore_errors=True)
        building.mkdir(parents=True)
        log.info("host group %s: building its template for %d vCPU / %d MiB (a cold boot, then a save)",
                 group.name, spec.cpus, spec.ram_bytes >> 20)
        gnet = self.net.group(group.name)
        spec.net = await gnet.template_device(spec.name, spec.run_dir)
        try:
            vm = await self.driver.start(spec)
        except BaseException:
            await gnet.release(spec.net)
            raise
        spec.net.close()
        node = Node(NodeRecord(spec.name, group.name, NodeKind.SANDBOX, spec.ip_cidr.split("/")[0], spec.cpus,
                               spec.ram_bytes, False, now_rfc3339(), str(spec.disk)), spec.run_dir)
        node.attach(vm)
        try:
            await node.wait_ready(BUILD_TIMEOUT)
            assert node.agent is not None
            settled = await node.agent.settle(timeout=BUILD_TIMEOUT)
            if not (isinstance(settled, dict) and settled.get("settled") is True):
                log.warning("host group %s: its template VM did not settle (boot chores or sshd still "
                            "pending); saving it as it is", group.name)
            await node.agent.aclose()
            t1 = loop.time()
            await vm.save(building / "state")
            # Its boot messages are every clone's too: they start their console logs with them.
            shutil.copyfile(spec.serial_log, building / "console.log")
        finally:
            if vm.state != VMState.STOPPED:
                await vm.kill()
            await gnet.release(spec.net)
            if node.agent is not None:
                with contextlib.suppress(Exception):
                    await node.agent.aclose()
            shutil.rmtree(spec.run_dir, ignore_errors=True)
        tpl = self._finish(building, group, spec.cpus, spec.ram_bytes, spec.disk_size, spec.layout)
        log.info("host group %s: template %s built: boot %.1fs, save %.1fs, memory %d MiB",
                 group.name, tpl.name, t1 - t0, loop.time() - t1, allocated_bytes(tpl.ram) >> 20)
        return tpl

    def _finish(self, building: Path, group: HostGroup, cpus: int, ram_bytes: int, disk_size: int,
                layout: int) -> Template:
        """The template in ``building`` (its files complete) put in place as ``group``'s."""
        key = self.key(group, (cpus, ram_bytes))
        meta = {"group": group.name, "key": key, "cpus": cpus, "ram_bytes": ram_bytes,
                "disk_size": disk_size, "created_at": now_rfc3339(), "layout": layout}
        (building / "meta.json").write_text(json.dumps(meta))  # last: a template without it is unfinished
        final = self.root / f"{group.name}-{key}-{time.time_ns() // 1_000_000}"
        building.rename(final)
        return Template(path=final, **meta)

    async def _from_cache(self, group: HostGroup, size: Size) -> Template | None:
        """A copy of the cache's template of this key, if it has one (and none failed here)."""
        key = self.key(group, size)
        if self.cache is None or key in self._spoiled or not self.cache.has(key):
            return None
        t0 = asyncio.get_running_loop().time()
        building = self.spec(group, size).disk.parent
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir(parents=True)
        try:
            meta = await self.cache.fetch(key, building)
            if meta is None or (meta.get("cpus"), meta.get("ram_bytes")) != size:
                self._spoiled.add(key)  # the template built instead replaces the entry
                shutil.rmtree(building, ignore_errors=True)
                return None
            tpl = self._finish(building, group, *size, int(meta["disk_size"]), int(meta.get("layout", 0)))
        except (OSError, KeyError, TypeError, ValueError) as e:
            log.warning("host group %s: the cached template %s could not be copied (%s); building one", group.name,
                        key, e)
            if not isinstance(e, OSError):
                self._spoiled.add(key)  # unusable as it is: the template built instead replaces it
            shutil.rmtree(building, ignore_errors=True)
            return None
        log.info("host group %s: template %s copied from the template cache in %.2fs", group.name, tpl.name,
                 asyncio.get_running_loop().time() - t0)
        return tpl

    def _shared_build(self, group: HostGroup, size: Size) -> contextlib.AbstractAsyncContextManager:
        if self.cache is None:
            return contextlib.nullcontext()
        return self.cache.building(self.key(group, size))

    async def _share(self, tpl: Template) -> None:
        """Store a template built here in the cache (replacing one that failed here)."""
        if self.cache is None:
            return
        try:
            await self.cache.store(tpl.key, tpl.path, replace=tpl.key in self._spoiled)
        except OSError as e:
            log.warning("template %s could not be stored in the template cache: %s", tpl.name, e)
        self._spoiled.discard(tpl.key)

    async def from_capture(self, group: HostGroup, name: str, cpus: int, ram_bytes: int, base: str,
                           image: dict | None, capture: Callable[[Path, Path], Awaitable[None]],
                           layout: int = 0) -> Template:
        """A template called ``name`` from a running VM (a live fork): ``capture(state, disk)``
        writes the VM's whole state and a copy of its disk. One VM restores that state with its
        RAM in a shared file and saves it again without the RAM, so the copies map the file
        copy-on-write like any template's clones. ``image``: the source's (its record's choice);
        ``layout``: the source machine's (the state fits that layout only)."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        building = self.root / f".building-{name}"
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir(parents=True)
        self.pinned.add(name)
        try:
            full = building / "full.state"
            await capture(full, building / "disk.qcow2")
            t1 = loop.time()
            gnet = self.net.group(group.name)
            spec = vm_spec(self.images.boot(image), group, gnet, name=name, cpus=cpus, ram_bytes=ram_bytes,
                           ip=str(gnet.addressing.pool[0]), disk=building / "scratch.qcow2",
                           run_dir=self.run_root / f".tpl-{name}")
            spec.base_disk, spec.base_format = building / "disk.qcow2", "qcow2"
            spec.memory_file, spec.memory_shared, spec.memory_in_state = building / "ram", True, True
            spec.layout = layout
            spec.net = await gnet.template_device(spec.name, spec.run_dir)
            try:
                vm = await self.driver.start(spec, restore_from=full)
            except BaseException:
                await gnet.release(spec.net)
                raise
            spec.net.close()
            try:
                await vm.save(building / "state")  # device state only: the RAM stays in the file
            finally:
                if vm.state != VMState.STOPPED:
                    await vm.kill()
                await gnet.release(spec.net)
                shutil.rmtree(spec.run_dir, ignore_errors=True)
            full.unlink()
            spec.disk.unlink(missing_ok=True)
            meta = {"group": group.name, "key": f"fork-{name}", "cpus": cpus, "ram_bytes": ram_bytes,
                    "disk_size": spec.disk_size, "created_at": now_rfc3339(), "base": base, "layout": layout}
            (building / "meta.json").write_text(json.dumps(meta))
            final = self.root / name
            building.rename(final)
        except BaseException:
            self.pinned.discard(name)
            shutil.rmtree(building, ignore_errors=True)
            raise
        log.info("fork snapshot %s: captured in %.2fs, made shareable in %.2fs (%d MiB of RAM)",
                 name, t1 - t0, loop.time() - t1, allocated_bytes(final / "ram") >> 20)
        return Template(path=final, **meta)

    def retire(self, tpl: Template, why: str) -> None:
        """Stop using ``tpl`` (its disk stays while clones use it); the next create rebuilds."""
        log.warning("template %s retired: %s", tpl.name, why)
        self._spoiled.add(tpl.key)  # and the cache's copy of it, for this daemon: the next one is built
        with contextlib.suppress(OSError):
            (tpl.path / "retired").write_text(why + "\n")

    def collect(self, groups: list[HostGroup], in_use: Collection[str]) -> list[str]:
        """Remove templates that are retired, stale or superseded and back no node's disk."""
        keep = self._current_all(groups)
        removed = []
        for tpl in self._all():
            if tpl.name in in_use or tpl.name in keep or tpl.name in self.pinned:
                continue
            shutil.rmtree(tpl.path, ignore_errors=True)
            removed.append(tpl.name)
        if removed:
            log.info("removed unused templates: %s", ", ".join(removed))
        return removed

    def usage(self, in_use: Mapping[str, int]) -> list[dict]:
        """Every template with the bytes its files take and how many nodes' disks use it."""
        return [t.describe(in_use.get(t.name, 0)) for t in self._all()]
