"""Unit tests: no QEMU, no guest image, nothing made on the host's network.

``async def`` tests run on a fresh event loop each (with a deadline). The ``lab`` fixture makes
daemons (:class:`slicer.core.manager.Manager`) on a fake driver and a dry-run network, sharing one
:class:`FakeHost` so that a second daemon finds what the first left running.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import shutil
import tempfile
from pathlib import Path

import pytest

from slicer.core.config import Config, load_config
from slicer.core.images import BootImages
from slicer.core.manager import Manager
from slicer.core.records import NodeSpec
from slicer.image.build import GuestImage
from slicer.image.oci import ImageStore
from slicer.net.dryrun import DryRunNetwork
from slicer.vmm.fake import FakeDriver, FakeHost

TEST_DEADLINE = 30.0
SHM = Path("/dev/shm")

CONFIG = """\
config:
  host_groups:
  - name: svc
    count: 2
    vcpu: 1
    ram_mb: 256
    network: {gateway: 10.77.0.1/24}
  - name: sbx
    count: 0
    vcpu: 2
    ram_mb: 512
    network: {gateway: 10.78.0.1/24}
  - name: cold
    count: 0
    vcpu: 1
    ram_mb: 256
    boot: cold
    network: {gateway: 10.79.0.1/24}
  api: {bind_address: 127.0.0.1, port: 8080}
"""


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}

    async def run() -> None:
        try:
            await asyncio.wait_for(pyfuncitem.obj(**args), TEST_DEADLINE)
        finally:
            if isinstance(lab := args.get("lab"), Lab):
                await lab.aclose()

    asyncio.run(run())
    return True


@functools.cache
def parsed(config: str) -> Config:
    """A config parsed once per text (validating address pools takes a while)."""
    return load_config(config)


class Lab:
    """Daemons on one fake host and one data directory."""

    def __init__(self, tmp_path: Path) -> None:
        # On tmpfs where there is one: the state store's fsyncs cost nothing there.
        self.data_dir = Path(tempfile.mkdtemp(prefix="slicer-unit-", dir=SHM if SHM.is_dir() else tmp_path))
        self.image_dir = tmp_path / "image"
        self.image_dir.mkdir()
        for f in ("vmlinuz", "initrd.img", "rootfs.ext4"):
            (self.image_dir / f).write_text(f"fake {f}\n")
        self.host = FakeHost()
        self.managers: list[Manager] = []

    def manager(self, config: str = CONFIG) -> Manager:
        cfg = parsed(config)
        images = BootImages(GuestImage.at(self.image_dir), ImageStore.of(self.data_dir), cfg)
        net = DryRunNetwork(cfg.host_groups, self.data_dir)
        m = Manager(cfg, self.data_dir, FakeDriver(self.host), images, net=net)
        self.managers.append(m)
        return m

    async def daemon(self, config: str = CONFIG, settle: bool = True) -> Manager:
        """A started daemon; ``settle``: once its services are up and set up."""
        m = self.manager(config)
        await m.start()
        if settle:
            await self.settled(m)
        return m

    @staticmethod
    async def settled(m: Manager, timeout: float = 10.0) -> None:
        """Until every node with a running VM has been set up after its boot."""
        async with asyncio.timeout(timeout):
            while True:
                booting = [n for n in m.nodes.values()
                           if n.vm is not None and n.vm.state.value == "running" and not n.provisioned.is_set()]
                if not booting and all(s.done() for s in m.tasks._running if "boot_service" in repr(s)):
                    return
                await asyncio.sleep(0.01)

    async def crash(self, m: Manager) -> None:
        """The daemon dies: nothing it runs is stopped, its record stays as it was."""
        m.tasks.cancel_all()
        for node in m.nodes.values():
            if node.agent is not None:
                await node.agent.aclose()
        m.store.close()
        self.managers.remove(m)
        await asyncio.sleep(0)

    async def aclose(self) -> None:
        for m in list(self.managers):
            try:
                await m.stop()
            except Exception:  # a test that closed its store already
                pass
        for vm in list(self.host.processes.values()):
            vm.end(-9)
        await asyncio.gather(*self.host.tasks, return_exceptions=True)
        shutil.rmtree(self.data_dir, ignore_errors=True)


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return Lab(tmp_path)


def create_args(**kw: object) -> dict:
    """Manager.create's keyword arguments with the API's defaults."""
    args: dict = {"cpus": None, "ram_bytes": None, "persistent": False, "hostname": None, "ip": None,
                  "spec": {}, "wait": "agent", "timeout": 10.0}
    args.update(kw)
    args["spec"] = NodeSpec.from_dict(args["spec"])
    return args
