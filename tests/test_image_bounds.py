"""Bounds on what pulling an image may write (``slicer.image.bounds``): layers' headers read
before the unpack, and umoci (or skopeo) watched and stopped while it runs. No VM: real
layouts, real umoci, the real ``ImageStore``."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from slicer.image.bounds import Bound, TooLarge, disk_usage, run_bounded, scan_layers
from slicer.image.oci import ImageStore, OCIError
from tests.oci_images import sparse_image, zeros_image

MiB = 1 << 20


def manifest_digest(image: str) -> tuple[Path, str]:
    layout, _, tag = image.rpartition(":")
    index = json.loads((Path(layout) / "index.json").read_text())
    return Path(layout), next(m["digest"] for m in index["manifests"]
                              if m["annotations"]["org.opencontainers.image.ref.name"] == tag)


def tar_image(work: Path, tag: str, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> str:
    """An image whose one layer is the tar of ``members`` (compressed by umoci)."""
    tar = work / f"{tag}.tar"
    with tarfile.open(tar, "w") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    layout = work / "layout"
    if not layout.exists():
        subprocess.run(["umoci", "init", "--layout", str(layout)], check=True)
    image = f"{layout}:{tag}"
    subprocess.run(["umoci", "new", "--image", image], check=True)
    subprocess.run(["umoci", "config", "--image", image, "--architecture", "amd64"], check=True)
    subprocess.run(["umoci", "raw", "add-layer", "--image", image, str(tar)], check=True)
    tar.unlink()
    return image


def reg(name: str, size: int) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = size
    return info, bytes(size)


def link(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.LNKTYPE, target
    return info, None


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    work = tmp_path_factory.mktemp("bounds")
    return {"zeros": zeros_image(work, "zeros", 3 << 30), "sparse": sparse_image(work, "sparse", 3 << 30),
            "links": tar_image(work, "links", [reg("big", 8 * MiB)] + [link(f"l{i}", "big") for i in range(200)]),
            "empties": tar_image(work, "empties", [reg(f"e{i}", 0) for i in range(5000)]),
            "many": tar_image(work, "many", [reg(f"f{i}", 4 * MiB) for i in range(40)])}


@pytest.mark.parametrize("name", ["zeros", "sparse"])
def test_a_bomb_is_refused_from_its_headers(images, name):
    layout, digest = manifest_digest(images[name])
    assert (layout / "blobs").stat().st_size < 16 * MiB  # the layer is small
    with pytest.raises(TooLarge, match="storage_size 40M"):
        scan_layers(layout, digest, Bound(40 * MiB, "host group t's storage_size 40M"))
    assert scan_layers(layout, digest, Bound(4 << 30, "4G")) >= 3 << 30  # the holes count


def test_hard_links_count_once_and_empty_files_do_not_come_free(images):
    layout, digest = manifest_digest(images["links"])
    assert scan_layers(layout, digest, Bound(16 * MiB, "16M")) < 12 * MiB
    layout, digest = manifest_digest(images["empties"])
    with pytest.raises(TooLarge):
        scan_layers(layout, digest, Bound(16 * MiB, "16M"))  # 5000 inodes: at least a block each


@pytest.mark.parametrize("name", ["sparse", "many"])
def test_umoci_is_stopped_while_it_unpacks(images, tmp_path, name):
    """The second wall, without the first: umoci writing a sparse file's holes is stopped at the
    file-size cap, 40 files of 4 MiB (each under the cap) by the watcher (what it wrote is the
    caller's to remove: the store's work directory)."""
    bundle = tmp_path / "bundle"
    with pytest.raises(TooLarge, match="more than 16M"):
        run_bounded(["umoci", "unpack", "--image", images[name], str(bundle)], bundle, Bound(16 * MiB, "16M"))
    assert disk_usage(tmp_path) < 80 * MiB  # 16 + SLACK + one poll's writing, of the 3 GiB or 160 MiB


def test_the_watcher_stops_a_writer_of_many_files(tmp_path):
    writer = "i=0; while [ $i -lt 200 ]; do head -c 4194304 /dev/zero > f$i; i=$((i+1)); done"
    with pytest.raises(TooLarge, match="stopped at"):
        run_bounded(["sh", "-c", f"cd {tmp_path} && {writer}"], tmp_path, Bound(32 * MiB, "32M"))
    assert disk_usage(tmp_path) < 400 * MiB  # stopped long before the 800 MiB it would write


def test_store_refuses_with_image_too_large_and_leaves_nothing(images, tmp_path):
    store = ImageStore(tmp_path / "oci")
    for name in ("zeros", "sparse"):
        with pytest.raises(OCIError) as e:
            store.pull(f"oci:{images[name]}", progress=lambda _: None,
                       bound=Bound(40 * MiB, "host group tiny's storage_size 40M"))
        assert e.value.code == "image_too_large" and "storage_size 40M" in e.value.message
        assert not [p.name for p in store.root.iterdir() if p.name != ".lock"]  # no .pull-*, no image
    image = store.pull(f"oci:{images['links']}", progress=lambda _: None, bound=Bound(16 * MiB, "16M"))
    assert image.meta["content_bytes"] >= 8 * MiB
