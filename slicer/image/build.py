"""Build the guest image: Debian cloud kernel, a busybox initramfs, and an ext4 root filesystem.

Two cached layers, each keyed by the hash of what goes into it:

* ``base-<hash>.tar`` — the Debian root filesystem from ``mmdebstrap`` (slow: tens of seconds);
* ``<hash>/`` — kernel, initramfs and ``rootfs.ext4`` with this repository's agent and init copied
  in (fast: seconds), so editing the agent does not re-run ``mmdebstrap``.

``images/current`` points at the newest complete build. Every output is written to a temporary
name and renamed, so an interrupted build never leaves a half image behind.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from slicer.agent.runtime import ROOT as RUNTIME_ROOT
from slicer.image import runtime

SUITE = "bookworm"
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
GUEST_PACKAGES = [
    "python3",
    "python3-aiohttp",
    "bash",
    "coreutils",
    "iproute2",
    "procps",
    "e2fsprogs",
    "openssh-server",
    "sudo",
    "less",
    "inotify-tools",
    "iperf3",  # bench/net.py
    "ca-certificates",  # the system trust store the host group's CAs join (slicer.agent.catrust)
    "curl",  # HTTPS in the guest through the egress proxy (tests, users)
]
# Loaded in this order by the initramfs; dependencies found in each module are loaded first.
GUEST_MODULES = [
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio-rng",
    "button",
    "evdev",
]
DEFAULT_USER = "ubuntu"

_PKG_DIR = Path(__file__).resolve().parent.parent  # the ``slicer`` package
# Files of this repository copied into the guest, relative to the package's parent.
GUEST_FILES = [
    "slicer/__init__.py",
    "slicer/channel/__init__.py",
    "slicer/channel/yamux.py",
    "slicer/channel/bulk.py",  # the bulk port's framing, shared by both ends
    *sorted(str(p.relative_to(_PKG_DIR.parent)) for p in (_PKG_DIR / "agent").glob("*.py")),
]

Progress = Callable[[str], None]


@dataclass(frozen=True)
class GuestImage:
    """A built image: the three files QEMU boots."""

    directory: Path
    kernel: Path
    initrd: Path
    rootfs: Path
    build_id: str
    # The agent's own runtime, a second read-only disk for VMs of users' images
    # (:mod:`slicer.image.runtime`); None: the agent runs on the root filesystem's Python.
    runtime: Path | None = None

    @classmethod
    def at(cls, directory: Path) -> GuestImage:
        return cls(
            directory=directory,
            kernel=directory / "vmlinuz",
            initrd=directory / "initrd.img",
            rootfs=directory / "rootfs.ext4",
            build_id=directory.name,
        )

    def with_root(self, rootfs: Path, build_id: str) -> GuestImage:
        """The same kernel and initramfs booting a user's root filesystem, with our runtime."""
        if not (self.directory / "runtime.ext4").exists():
            raise ImageError(f"image {self.build_id} has no runtime.ext4: run `slicer image build`")
        return replace(self, rootfs=rootfs, build_id=build_id, runtime=self.directory / "runtime.ext4")


class ImageError(Exception):
    """The image could not be built or is missing."""


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)
    except FileNotFoundError as e:
        raise ImageError(f"{cmd[0]} is not installed (see .ci/run for the packages needed)") from e
    except subprocess.CalledProcessError as e:
        raise ImageError(f"{' '.join(cmd[:3])} failed: {(e.stderr or e.stdout or '')[-2000:]}") from e


def _hash(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "big"))
        h.update(p)
    return h.hexdigest()[:16]


def _kernel_package() -> str:
    """The versioned kernel package the meta package currently points at."""
    out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE]).stdout
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split()[-1]
    raise ImageError(f"cannot resolve {KERNEL_META_PACKAGE}; run apt-get update")


def _guest_sources() -> bytes:
    """What an image is made of besides its base: the guest code and how it is put together."""
    here = Path(__file__).parent
    return b"".join((_PKG_DIR.parent / f).read_bytes() for f in GUEST_FILES) + b"".join(
        (here / f).read_bytes() for f in ("initramfs-init.sh", "runtime.py", "build.py")
    )


def base_key(kernel_pkg: str) -> str:
    recipe = json.dumps({"suite": SUITE, "packages": GUEST_PACKAGES, "user": DEFAULT_USER, "v": 1})
    return _hash(recipe.encode(), kernel_pkg.encode())


def images_dir(data_dir: Path) -> Path:
    return data_dir / "images"


def current_image(data_dir: Path) -> GuestImage:
    link = images_dir(data_dir) / "current"
    if not link.exists():
        raise ImageError(f"no guest image in {images_dir(data_dir)}: run `slicer image build` first")
    return GuestImage.at(link.resolve())


def _build_base(tar_path: Path, progress: Progress) -> None:
    progress(f"mmdebstrap {SUITE} ({', '.join(GUEST_PACKAGES)}); this takes a minute")
    tmp = tar_path.with_suffix(".tmp.tar")
    hooks = [
        f'--customize-hook=chroot "$1" useradd -m -s /bin/bash -G sudo {DEFAULT_USER}',
        f"--customize-hook=echo '{DEFAULT_USER} ALL=(ALL) NOPASSWD:ALL' > \"$1/etc/sudoers.d/{DEFAULT_USER}\"",
        # No service in the image may reach out on its own; ssh host keys are made per VM at boot.
        '--customize-hook=rm -f "$1"/etc/ssh/ssh_host_*',
        '--customize-hook=rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*',
    ]
    _run(
        [
            "mmdebstrap",
            "--variant=minbase",
            "--include=" + ",".join(GUEST_PACKAGES),
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            *hooks,
            SUITE,
            str(tmp),
        ]
    )
    tmp.rename(tar_path)


def _fetch_kernel(kernel_pkg: str, cache: Path, dest: Path, progress: Progress) -> Path:
    """Unpack the kernel .deb, downloaded once into ``cache`` (an image rebuilt for a change of
    the agent needs no mirror, like the cached base); returns the unpacked tree."""
    deb = cache / f"{kernel_pkg}.deb"
    if deb.exists():
        progress(f"kernel package {kernel_pkg} cached")
    else:
        progress(f"downloading {kernel_pkg}")
        _run(["apt-get", "download", kernel_pkg], cwd=dest)
        os.replace(next(dest.glob("*.deb")), deb)  # dest is below cache: one file system
    tree = dest / "kernel"
    _run(["dpkg-deb", "-x", str(deb), str(tree)])
    return tree


def _module_depends(ko: Path) -> list[str]:
    data = ko.read_bytes()
    i = data.find(b"\0depends=")
    if i < 0:
        return []
    value = data[i + 9 : data.index(b"\0", i + 9)].decode()
    return [d for d in value.split(",") if d]


def _builtin_modules(kernel_tree: Path, version: str = "*") -> set[str]:
    """Modules compiled into the kernel (``modules.builtin``), with ``-`` as ``_``."""
    names: set[str] = set()
    for listing in kernel_tree.glob(f"lib/modules/{version}/modules.builtin"):
        if not listing.is_file() or not listing.resolve().is_relative_to(kernel_tree.resolve()):
            continue
        names |= {Path(line.strip()).stem.replace("-", "_") for line in listing.read_text().splitlines()}
    return names


def build_initramfs(kernel_tree: Path, out: Path, work: Path, version: str = "*",
                    guest_code: Path | None = None) -> None:
    """The initramfs for the kernel whose ``lib/modules/<version>`` is in ``kernel_tree``:
    busybox, the modules of :data:`GUEST_MODULES` it does not have built in, our init and the
    agent (``guest_code``: an image's compiled copy, see :func:`_build_rootfs`; else the
    sources). Only regular files inside the tree are read (it may come from a user's image)."""
    top = kernel_tree.resolve()
    mods = {p.stem: p for p in kernel_tree.glob(f"lib/modules/{version}/kernel/**/*.ko")
            if p.is_file() and p.resolve().is_relative_to(top)}
    builtin = _builtin_modules(kernel_tree, version)
    order: list[str] = []

    def add(name: str) -> None:
        key = name if name in mods else name.replace("_", "-")
        if key not in mods:
            if name.replace("-", "_") in builtin:
                return
            raise ImageError(f"kernel module {name} is neither built into the kernel nor in its lib/modules "
                             "(the guest needs it to reach its disks and the host)")
        for dep in _module_depends(mods[key]):
            add(dep)
        if key not in order:
            order.append(key)

    for m in GUEST_MODULES:
        add(m)
    root = work / "initramfs"
    for d in ("bin", "dev", "proc", "sys", "newroot", "lib/modules"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    os.symlink("busybox", root / "bin/sh")
    for m in order:
        shutil.copy2(mods[m], root / "lib/modules" / f"{m}.ko")
    (root / "modules.order").write_text("\n".join(f"{m}.ko" for m in order) + "\n")
    init = root / "init"
    shutil.copy2(Path(__file__).parent / "initramfs-init.sh", init)
    init.chmod(0o755)
    if guest_code is not None and guest_code.is_dir():
        shutil.copytree(guest_code, root / "slicer", symlinks=True)
    else:
        _install_guest_files(root / "slicer")
    files = subprocess.run(
        ["find", ".", "-mindepth", "1"], cwd=root, check=True, capture_output=True
    ).stdout
    with open(out, "wb") as f:
        cpio = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"],
            cwd=root, input=files, stdout=subprocess.PIPE, check=True,
        )
        f.write(gzip.compress(cpio.stdout, compresslevel=6))


def _copy_guest_files(dest: Path) -> None:
    """This repository's guest code (the ``slicer`` package's guest part) under ``dest``."""
    for rel in GUEST_FILES:
        dst = dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(_PKG_DIR.parent / rel, dst)


def _install_guest_files(dest: Path) -> None:
    """This repository's guest code under ``dest/opt/slicer`` and the init at ``dest/slicer-init``."""
    _copy_guest_files(dest / "opt/slicer")
    init = dest / "slicer-init"
    init.write_text("#!/bin/sh\nexport PYTHONPATH=/opt/slicer\nexec /usr/bin/python3 -m slicer.agent.init\n")
    init.chmod(0o755)
    helper = dest / "slicer-agent"
    helper.write_text(runtime.helper_script("/usr/bin/python3", "/opt/slicer"))
    helper.chmod(0o755)


def _compile_guest_code(tree: Path, code: Path, shown_as: str) -> None:
    """Byte-compile the guest code at ``code`` with the Python of the Debian tree ``tree`` it
    is in (the guest's own: the host's may be another version), naming its files ``shown_as``
    in tracebacks. The initramfs reinstalls the code at every boot and the runtime disk is
    read-only, so without this every agent start compiled every module again (seconds under
    TCG). ``checked-hash``: a source that differs from its .pyc is compiled again."""
    inner = "/" + str(code.relative_to(tree))
    # -I and a bare environment: no PYTHONPYCACHEPREFIX or PYTHONHOME of ours reaches it
    _run(["chroot", str(tree), "/usr/bin/python3", "-I", "-m", "compileall", "-q", "--invalidation-mode",
          "checked-hash", "-s", inner, "-p", shown_as, inner],
         env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"})
    missing = [p for p in code.rglob("*.py") if not list(p.parent.glob(f"__pycache__/{p.stem}.*.pyc"))]
    if missing:
        raise ImageError(f"the guest code did not compile: {missing[0]} has no .pyc")


def _build_rootfs(base_tar: Path, out: Path, work: Path) -> tuple[Path, Path]:
    """The root filesystem at ``out``, and two compiled copies of the guest code in ``work``:
    the initramfs's (``slicer-init``, ``slicer-agent`` and ``opt/slicer``) and the runtime
    disk's ``opt/slicer``."""
    root = work / "rootfs"
    root.mkdir()
    with tarfile.open(base_tar) as tf:
        tf.extractall(root, filter="fully_trusted")  # our own mmdebstrap output
    _install_guest_files(root / "slicer")  # the initramfs installs them again at every boot
    shutil.copytree(root / "slicer/opt/slicer", root / "slicer-rt")
    _compile_guest_code(root, root / "slicer/opt/slicer", "/opt/slicer")
    _compile_guest_code(root, root / "slicer-rt", RUNTIME_ROOT + "/opt/slicer")
    guest_code, runtime_code = work / "guest-code", work / "runtime-code"
    shutil.copytree(root / "slicer", guest_code, symlinks=True)
    shutil.move(root / "slicer-rt", runtime_code)
    shutil.copytree(root / "slicer/opt/slicer", root / "opt/slicer")
    shutil.copy2(root / "slicer/slicer-init", root / "sbin/slicer-init")
    (root / "usr/local/bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(root / "slicer/slicer-agent", root / "usr/local/bin/slicer-agent")
    shutil.rmtree(root / "slicer")
    for d in ("run/slicer", "etc/slicer"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/fstab").write_text("/dev/vda / ext4 rw,relatime 0 1\n")
    used = int(_run(["du", "-sb", str(root)]).stdout.split()[0])
    size_mb = used * 3 // 2 // (1 << 20) + 256
    _run(["mkfs.ext4", "-q", "-F", "-L", "slicer-root", "-d", str(root), str(out), f"{size_mb}M"])
    return guest_code, runtime_code


def _build_runtime(base_tar: Path, out: Path, work: Path, code: Path, progress: Progress) -> None:
    root = work / "runtime"
    root.mkdir()
    with tarfile.open(base_tar) as tf:
        tf.extractall(root, filter="fully_trusted")  # our own mmdebstrap output
    runtime.populate(root, lambda dest: shutil.copytree(code, dest, symlinks=True, dirs_exist_ok=True), progress)
    used = int(_run(["du", "-sb", str(root)]).stdout.split()[0])
    size_mb = used * 6 // 5 // (1 << 20) + 32  # read-only in the guest: little room needed
    _run(["mkfs.ext4", "-q", "-F", "-L", "slicer-runtime", "-d", str(root), str(out), f"{size_mb}M"])
    shutil.rmtree(root)


def build_image(data_dir: Path, progress: Progress = print, force: bool = False) -> GuestImage:
    """Build (or find in the cache) the guest image and point ``images/current`` at it."""
    idir = images_dir(data_dir)
    idir.mkdir(parents=True, exist_ok=True)
    kernel_pkg = _kernel_package()
    bkey = base_key(kernel_pkg)
    key = _hash(bkey.encode(), _guest_sources())
    final = idir / key
    if final.is_dir() and not force:
        progress(f"image {key} is up to date")
        _point_current(idir, key)
        return GuestImage.at(final)
    base_tar = idir / f"base-{bkey}.tar"
    with tempfile.TemporaryDirectory(dir=idir, prefix=".build-") as tmp:
        work = Path(tmp)
        if not base_tar.exists() or force:
            _build_base(base_tar, progress)
        else:
            progress(f"base root filesystem {bkey} cached")
        kernel_tree = _fetch_kernel(kernel_pkg, idir, work, progress)
        staging = work / "image"
        staging.mkdir()
        shutil.copy2(next(kernel_tree.glob("boot/vmlinuz-*")), staging / "vmlinuz")
        progress("building rootfs.ext4")
        guest_code, runtime_code = _build_rootfs(base_tar, staging / "rootfs.ext4", work)
        (staging / "rootfs.ext4").chmod(0o444)
        shutil.copytree(guest_code, staging / "guest-code", symlinks=True)  # for kernels from images
        progress("building initramfs")
        build_initramfs(kernel_tree, staging / "initrd.img", work, guest_code=guest_code)
        progress("building runtime.ext4 (the agent for users' images)")
        _build_runtime(base_tar, staging / "runtime.ext4", work, runtime_code, progress)
        (staging / "runtime.ext4").chmod(0o444)
        manifest = {"build_id": key, "base": bkey, "kernel_package": kernel_pkg, "suite": SUITE}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    _point_current(idir, key)
    progress(f"image {key} ready in {final}")
    return GuestImage.at(final)


def _point_current(idir: Path, key: str) -> None:
    tmp = idir / f".current.{os.getpid()}.tmp"  # its own per process: test workers point it at once
    tmp.unlink(missing_ok=True)
    os.symlink(key, tmp)
    os.replace(tmp, idir / "current")
