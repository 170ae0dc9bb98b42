"""Guest kernels other than the project's: ``kernel_file`` (a path) or ``kernel_image`` (an OCI
image holding ``/boot/vmlinuz*`` and its ``/lib/modules``).

Our initramfs loads the virtio modules the guest needs before switching to the root; so a
kernel from an image gets an initramfs built from *its* modules (those it has built in are
skipped), cached under ``images/oci/kernel-<digest>-<build>/`` (the build of the project's image:
the initramfs carries the agent, which must match the host). A ``kernel_file`` boots with the
project's initramfs: it needs the virtio drivers built in, or modules of the project's kernel
version; without them the guest stops at "cannot mount /dev/vda", shown in its console log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from slicer.image.build import GuestImage, ImageError, build_initramfs
from slicer.image.oci import ImageStore, OCIError, Progress
from slicer.image.runtime import relativize_links

BZIMAGE_MAGIC_OFFSET = 0x202  # "HdrS": the x86 boot protocol header of a bzImage


@dataclass(frozen=True)
class Kernel:
    kernel: Path
    initrd: Path
    label: str  # what /info shows


def check_kernel_file(path: Path) -> None:
    """Refuse what QEMU could not boot as an x86 kernel, with the reason."""
    try:
        with open(path, "rb") as f:
            f.seek(BZIMAGE_MAGIC_OFFSET)
            magic = f.read(4)
    except OSError as e:
        raise ValueError(f"kernel_file {path}: {e.strerror}") from None
    if magic != b"HdrS":
        raise ValueError(f"kernel_file {path} is not an x86 Linux kernel (bzImage)")


def kernel_file(path: Path, base: GuestImage) -> Kernel:
    check_kernel_file(path)
    return Kernel(path, base.initrd, str(path))


def kernel_image(store: ImageStore, ref: str, base: GuestImage, insecure: bool, progress: Progress) -> Kernel:
    """The kernel in OCI image ``ref`` with an initramfs of its modules (pulled and built once)."""
    refs_key = f"kernel:{ref}"
    digest = store.refs().get(refs_key)
    if digest and (cached := _cached(store, digest, base, ref)) is not None:
        return cached
    with store.workdir() as work:
        layout, digest, _ = store.fetch(ref, insecure, progress, work)
        if (cached := _cached(store, digest, base, ref)) is None:
            root = store.unpack(ref, layout, work / "bundle", progress)
            out = work / "kernel"
            out.mkdir()
            relativize_links(root)  # an absolute link (lib -> /usr/lib) must not reach the host's files
            # /boot/vmlinuz-V with lib/modules/V: the newest version that has both
            kernels = {p.name.removeprefix("vmlinuz-"): p for p in root.glob("boot/vmlinuz-*")
                       if p.is_file() and not p.is_symlink()}
            versions = sorted((v for v in kernels if (root / "lib/modules" / v).is_dir()), key=_version_key)
            if not versions:
                raise OCIError(f"kernel_image {ref} holds no /boot/vmlinuz-VERSION with /lib/modules/VERSION",
                               "invalid_image")
            shutil.copyfile(kernels[versions[-1]], out / "vmlinuz")
            try:
                check_kernel_file(out / "vmlinuz")
                progress(f"building an initramfs with the modules of {ref} ({versions[-1]})")
                build_initramfs(root, out / "initrd.img", work, version=versions[-1],
                                guest_code=base.directory / "guest-code")
            except (ValueError, ImageError) as e:
                raise OCIError(f"kernel_image {ref}: {e}", "invalid_image") from None
            (out / "meta.json").write_text(json.dumps({"ref": ref, "digest": digest, "build": base.build_id}))
            os.replace(out, _dir(store, digest, base))
            cached = _cached(store, digest, base, ref)
            assert cached is not None
    store.set_ref(refs_key, digest)
    return cached


def _version_key(version: str) -> list:
    """``6.1.0-10`` after ``6.1.0-9``: numbers compared as numbers."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"[.\-+~]", version)]


def _dir(store: ImageStore, digest: str, base: GuestImage) -> Path:
    return store.root / f"kernel-{digest.removeprefix('sha256:')}-{base.build_id}"


def _cached(store: ImageStore, digest: str, base: GuestImage, ref: str) -> Kernel | None:
    d = _dir(store, digest, base)
    if (d / "meta.json").exists():
        return Kernel(d / "vmlinuz", d / "initrd.img", f"{ref} ({digest.removeprefix('sha256:')[:12]})")
    return None
