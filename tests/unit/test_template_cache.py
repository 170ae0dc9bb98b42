"""The template cache: a template one daemon built serves another daemon's clones."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from slicer.core.errors import SlicerError
from slicer.core.images import BootImages
from slicer.core.manager import Manager
from slicer.image.build import GuestImage
from slicer.image.oci import ImageStore
from slicer.net.dryrun import DryRunNetwork
from slicer.vmm.fake import FakeDriver
from tests.unit.conftest import SHM, Lab, create_args, parsed

CONFIG = """\
config:
  template_cache: CACHE
  host_groups:
  - name: GROUP
    count: 0
    vcpu: 2
    ram_mb: 512
    network: {gateway: GATEWAY}
  api: {bind_address: 127.0.0.1, port: 8080}
"""


def config(cache: Path, group: str = "sbx", gateway: str = "10.78.0.1/24") -> str:
    return CONFIG.replace("CACHE", str(cache)).replace("GROUP", group).replace("GATEWAY", gateway)


async def other_daemon(lab: Lab, text: str) -> Manager:
    """A daemon of another data directory on the same host and image."""
    data_dir = Path(tempfile.mkdtemp(prefix="slicer-unit-", dir=SHM if SHM.is_dir() else None))
    cfg = parsed(text)
    images = BootImages(GuestImage.at(lab.image_dir), ImageStore.of(data_dir), cfg)
    m = Manager(cfg, data_dir, FakeDriver(lab.host), images, net=DryRunNetwork(cfg.host_groups, data_dir))
    lab.managers.append(m)
    await m.start()
    return m


def template_boots(lab: Lab) -> int:
    return len([vm for vm in lab.host.started if vm.spec.name.startswith("tpl-")])


async def test_another_daemon_copies_the_template_instead_of_booting_one(lab: Lab, tmp_path: Path):
    cache = tmp_path / "cache"
    first = await lab.daemon(config(cache))
    await first.create("sbx", **create_args())
    assert template_boots(lab) == 1
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert (entry / "meta.json").exists() and (entry / "state").exists()

    # Another data directory, and a group of another name and subnet but the same machine.
    second = await other_daemon(lab, config(cache, group="box", gateway="10.91.0.1/24"))
    try:
        node = await second.create("box", **create_args())
        assert template_boots(lab) == 1, "the second daemon booted no template of its own"
        assert node.boot == "template" and node.status == "Running"
        tpl = second.templates.current(second.group("box"))
        assert tpl is not None and tpl.group == "box" and tpl.key == entry.name
        assert tpl.path.parent == second.templates.root and not (tpl.state.samefile(entry / "state"))
    finally:
        shutil.rmtree(second.data_dir, ignore_errors=True)


async def test_a_cached_template_that_failed_here_is_built_anew_and_replaces_the_entry(lab: Lab, tmp_path: Path):
    cache = tmp_path / "cache"
    first = await lab.daemon(config(cache))
    await first.create("sbx", **create_args())
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    before = json.loads((entry / "meta.json").read_text())["created_at"]
    second = await other_daemon(lab, config(cache))
    try:
        await second.create("sbx", **create_args())
        assert template_boots(lab) == 1
        second.templates.retire(second.templates.current(second.group("sbx")), "its restore failed in this test")
        node = await second.create("sbx", **create_args())
        assert template_boots(lab) == 2, "a template that failed is not copied again: it is built"
        assert node.boot == "template"
        assert json.loads((entry / "meta.json").read_text())["created_at"] != before, "the new one replaced it"
        assert [p.name for p in cache.iterdir()] == [entry.name], "nothing half-made is left"
    finally:
        shutil.rmtree(second.data_dir, ignore_errors=True)


async def test_a_daemon_without_the_cache_builds_its_own(lab: Lab, tmp_path: Path):
    cache = tmp_path / "cache"
    first = await lab.daemon(config(cache))
    await first.create("sbx", **create_args())
    second = await other_daemon(lab, config(cache).replace(f"  template_cache: {cache}\n", ""))
    try:
        await second.create("sbx", **create_args())
        assert template_boots(lab) == 2
    finally:
        shutil.rmtree(second.data_dir, ignore_errors=True)


@pytest.mark.parametrize("mode", [0o777, 0o770])
def test_a_cache_others_can_write_is_refused(lab: Lab, tmp_path: Path, mode: int):
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(mode)
    with pytest.raises(SlicerError, match="no one else"):
        lab.manager(config(cache))
