"""The template cache: a template one daemon built serves another daemon's clones."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import pytest

from slicer.core import template_cache
from slicer.core.errors import SlicerError
from slicer.core.images import BootImages
from slicer.core.manager import Manager
from slicer.core.template_cache import TemplateCache
from slicer.image.build import GuestImage
from slicer.image.oci import ImageStore
from slicer.net.dryrun import DryRunNetwork
from slicer.vmm import qemu
from slicer.vmm.base import VMSpec
from slicer.vmm.fake import FakeDriver
from tests.unit.conftest import Lab, create_args, parsed

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


async def other_daemon(lab: Lab, text: str, tmp_path: Path) -> Manager:
    """A daemon of another data directory on the same host and image."""
    data_dir = Path(tempfile.mkdtemp(prefix="data-", dir=tmp_path))
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
    second = await other_daemon(lab, config(cache, group="box", gateway="10.91.0.1/24"), tmp_path)
    node = await second.create("box", **create_args())
    assert template_boots(lab) == 1, "the second daemon booted no template of its own"
    assert node.boot == "template" and node.status == "Running"
    tpl = second.templates.current(second.group("box"))
    assert tpl is not None and tpl.group == "box" and tpl.key == entry.name
    assert tpl.path.parent == second.templates.root and not (tpl.state.samefile(entry / "state"))


async def test_a_cached_template_that_failed_here_is_built_anew_and_replaces_the_entry(lab: Lab, tmp_path: Path):
    cache = tmp_path / "cache"
    first = await lab.daemon(config(cache))
    await first.create("sbx", **create_args())
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    before = json.loads((entry / "meta.json").read_text())["created_at"]
    second = await other_daemon(lab, config(cache), tmp_path)
    await second.create("sbx", **create_args())
    assert template_boots(lab) == 1
    second.templates.retire(second.templates.current(second.group("sbx")), "its restore failed in this test")
    node = await second.create("sbx", **create_args())
    assert template_boots(lab) == 2, "a template that failed is not copied again: it is built"
    assert node.boot == "template"
    assert json.loads((entry / "meta.json").read_text())["created_at"] != before, "the new one replaced it"
    left = [p.name for p in cache.iterdir() if not p.name.startswith(".lock-")]  # empty files, one per key
    assert left == [entry.name], "nothing half-made is left"


async def test_a_daemon_without_the_cache_builds_its_own(lab: Lab, tmp_path: Path):
    cache = tmp_path / "cache"
    first = await lab.daemon(config(cache))
    await first.create("sbx", **create_args())
    second = await other_daemon(lab, config(cache).replace(f"  template_cache: {cache}\n", ""), tmp_path)
    await second.create("sbx", **create_args())
    assert template_boots(lab) == 2


@pytest.mark.parametrize("mode", [0o777, 0o770])
def test_a_cache_others_can_write_is_refused(lab: Lab, tmp_path: Path, mode: int):
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(mode)
    with pytest.raises(SlicerError, match="no one else"):
        lab.manager(config(cache))


def test_a_qemu_templates_key_leaves_out_what_each_vm_has_of_its_own(tmp_path: Path, monkeypatch):
    """Name and identity (which a clone's reset replaces) do not change the key; anything the
    saved state depends on does: the machine's size, a kernel argument of the boot, the files."""
    monkeypatch.setattr(qemu, "_cached_version", lambda binary: "QEMU emulator version 7.2.0")
    driver = qemu.QemuDriver("tcg", binary="true")
    for f in ("vmlinuz", "initrd.img", "rootfs.ext4"):
        (tmp_path / f).write_text(f)
    spec = VMSpec(name="tpl-sbx-1c256m", cpus=1, ram_bytes=256 << 20, kernel=tmp_path / "vmlinuz",
                  initrd=tmp_path / "initrd.img", base_disk=tmp_path / "rootfs.ext4", disk=tmp_path / "a/disk.qcow2",
                  disk_size=1 << 30, run_dir=tmp_path / "run-a", ip_cidr="10.0.0.2/24", gateway="10.0.0.1",
                  dns=["10.0.0.1"], mac="02:00:0a:00:00:02")
    key = driver.fingerprint(spec)
    other_group = dataclasses.replace(spec, name="tpl-box-1c256m", ip_cidr="10.9.0.2/24", gateway="10.9.0.1",
                                      mac="02:00:0a:09:00:02", disk=tmp_path / "b/disk.qcow2",
                                      run_dir=tmp_path / "run-b")
    assert driver.fingerprint(other_group) == key
    assert driver.fingerprint(dataclasses.replace(spec, ram_bytes=512 << 20)) != key
    assert driver.fingerprint(dataclasses.replace(spec, kernel_args=["slicer.init=image"])) != key
    assert driver.fingerprint(dataclasses.replace(spec, dns=[])) != key, "a group's DNS servers (none: kept)"
    (tmp_path / "initrd2.img").write_text("another initramfs")
    assert driver.fingerprint(dataclasses.replace(spec, initrd=tmp_path / "initrd2.img")) != key


async def test_an_unusable_entry_is_replaced_by_the_template_built_instead(lab: Lab, tmp_path: Path):
    cache = tmp_path / "cache"
    first = await lab.daemon(config(cache))
    await first.create("sbx", **create_args())
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    meta = json.loads((entry / "meta.json").read_text())
    (entry / "meta.json").write_text(json.dumps({**meta, "ram_bytes": 1 << 20}))  # another machine's
    second = await other_daemon(lab, config(cache), tmp_path)
    await second.create("sbx", **create_args())
    assert template_boots(lab) == 2, "the unusable entry was not copied"
    assert json.loads((entry / "meta.json").read_text())["ram_bytes"] == 512 << 20, "the new build replaced it"


async def test_an_entry_replaced_while_it_is_copied_is_not_used(tmp_path: Path, monkeypatch):
    cache = TemplateCache.open(tmp_path / "cache")
    built = tmp_path / "built"
    built.mkdir()
    for name, text in (("state", "state 1"), ("ram", "ram 1"), ("meta.json", json.dumps({"key": "k1"}))):
        (built / name).write_text(text)
    await cache.store("k1", built)
    real_copy = template_cache._copy_files

    async def copy_then_replace(src: Path, dst: Path) -> None:
        await real_copy(src, dst)
        monkeypatch.setattr(template_cache, "_copy_files", real_copy)
        (built / "state").write_text("state 2")
        await cache.store("k1", built, replace=True)  # another daemon's new build, meanwhile

    monkeypatch.setattr(template_cache, "_copy_files", copy_then_replace)
    into = tmp_path / "into"
    into.mkdir()
    with pytest.raises(OSError, match="replaced while it was copied"):
        await cache.fetch("k1", into)
    assert await cache.fetch("k1", into) == {"key": "k1"} and (into / "state").read_text() == "state 2"


async def test_two_daemons_needing_one_template_at_once_build_it_once(lab: Lab, tmp_path: Path):
    """The second waits for the first's build (the key's lock in the cache), then copies it."""
    import asyncio

    cache = tmp_path / "cache"
    first = await lab.daemon(config(cache))
    second = await other_daemon(lab, config(cache, group="box", gateway="10.91.0.1/24"), tmp_path)
    a, b = await asyncio.gather(first.create("sbx", **create_args()), second.create("box", **create_args()))
    assert template_boots(lab) == 1, "one template VM booted for both daemons"
    assert a.boot == b.boot == "template" and a.status == b.status == "Running"
    assert first.templates.current(first.group("sbx")).key == second.templates.current(second.group("box")).key


async def test_a_lock_that_cannot_be_made_does_not_stop_a_build(lab: Lab, tmp_path: Path):
    cache = tmp_path / "cache"
    m = await lab.daemon(config(cache))
    key = m.templates.key(m.group("sbx"))
    (cache / f".lock-{key}").mkdir()  # not a file: it cannot be opened for writing
    node = await m.create("sbx", **create_args())
    assert node.boot == "template" and template_boots(lab) == 1
