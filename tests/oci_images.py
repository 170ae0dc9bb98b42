"""Test images and a real registry for them: Debian's ``docker-registry`` on loopback, and
images the tests make themselves (umoci), pushed with skopeo. Shared by tests and benchmarks.

``python3 -m tests.oci_images prepare`` (run by ``.ci/run`` before the tests, which have no
network) makes the one tree that needs Debian's mirrors: a minbase with systemd.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """``docker-registry serve`` on 127.0.0.1 with a temporary storage directory."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="slt-registry-"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        config = self.dir / "config.yml"
        config.write_text(
            "version: 0.1\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.dir / 'storage'}\n"
            f"http:\n  addr: {self.address}\n"
        )
        self.log = open(self.dir / "registry.log", "ab")
        self.proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://{self.address}/v2/", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.close()
        raise RuntimeError("docker-registry did not come up")

    def push(self, layout: str, name: str) -> str:
        """Push the OCI layout image ``layout`` (``dir:tag``) as ``name``; returns its reference."""
        ref = f"{self.address}/{name}"
        subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}", f"docker://{ref}"],
                       check=True, capture_output=True)
        return ref

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def pack(rootfs: Path, work: Path, tag: str, arch: str = "amd64", cmd: str = "/bin/sh") -> str:
    """An OCI layout image (``dir:tag``) whose one layer is the tree at ``rootfs``."""
    layout = work / "layout"
    if not layout.exists():
        subprocess.run(["umoci", "init", "--layout", str(layout)], check=True)
    image = f"{layout}:{tag}"
    bundle = work / f"bundle-{tag}"
    subprocess.run(["umoci", "new", "--image", image], check=True)
    subprocess.run(["umoci", "unpack", "--image", image, str(bundle)], check=True, capture_output=True)
    subprocess.run(["cp", "-a", f"{rootfs}/.", str(bundle / "rootfs")], check=True)
    subprocess.run(["umoci", "repack", "--image", image, str(bundle)], check=True)
    subprocess.run(["umoci", "config", "--image", image, "--architecture", arch, "--config.cmd", cmd], check=True)
    shutil.rmtree(bundle)
    return image


def busybox_root(root: Path) -> Path:
    """A root filesystem of busybox only: no libc, no Python, no bash."""
    (root / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\napp:x:1000:\n")
    (root / "home/app").mkdir(parents=True)
    (root / "etc/motd").write_text("busybox test image\n")
    return root


def debian_root(root: Path, image_dir: Path) -> Path:
    """Debian (bash, coreutils, apt) with Python removed: what a distribution image holds. Made
    offline from the project image's cached mmdebstrap output (tests run without a network)."""
    import json

    base = json.loads((image_dir / "manifest.json").read_text())["base"]
    root.mkdir()
    subprocess.run(["tar", "-xf", str(image_dir.parent / f"base-{base}.tar"), "-C", str(root)], check=True)
    for pattern in ("usr/bin/python3*", "usr/lib/python3*", "usr/lib/python3.*", "usr/local/lib/python3*"):
        for path in root.glob(pattern):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return root


def kernel_root(root: Path, image_dir: Path, leave_out: str = "") -> Path:
    """A kernel image's tree (``/boot/vmlinuz-V``, ``/lib/modules/V/kernel/…``) made from the
    project's kernel and the modules its initramfs carries; ``leave_out`` drops one module."""
    import gzip
    import json

    version = json.loads((image_dir / "manifest.json").read_text())["kernel_package"].removeprefix("linux-image-")
    (root / "boot").mkdir(parents=True)
    shutil.copy2(image_dir / "vmlinuz", root / "boot" / f"vmlinuz-{version}")
    unpacked = root.parent / f"{root.name}-initrd"
    unpacked.mkdir()
    initrd = gzip.decompress((image_dir / "initrd.img").read_bytes())
    subprocess.run(["cpio", "-id", "--quiet"], cwd=unpacked, input=initrd, check=True)
    drivers = root / "lib/modules" / version / "kernel/drivers"
    drivers.mkdir(parents=True)
    for ko in (unpacked / "lib/modules").glob("*.ko"):
        if ko.stem != leave_out:
            shutil.copy2(ko, drivers / ko.name)
    shutil.rmtree(unpacked)
    return root


def zeros_image(work: Path, tag: str, size: int) -> str:
    """An OCI layout image (``dir:tag``) whose one gzip layer holds ``/zeros``: ``size`` bytes
    of zeros in a plain (not sparse) tar member, compressed to ~1/1000 of that. Made directly
    (gzip members of 1 MiB of zeros, concatenated) so that a 3 GiB file costs seconds, not
    minutes."""
    import gzip
    import hashlib
    import json
    import tarfile

    assert size % (1 << 20) == 0
    blobs = work / f"layout-{tag}" / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return "sha256:" + digest

    info = tarfile.TarInfo("zeros")
    info.size, info.mode = size, 0o644
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    mib = bytes(1 << 20)
    zipped_mib = gzip.compress(mib, 9, mtime=0)
    trailer = bytes(1024)  # size is a multiple of 512: no padding, then two zero blocks
    diff, comp = hashlib.sha256(header), hashlib.sha256()
    layer = blobs / "layer.tmp"
    with open(layer, "wb") as f:
        head = gzip.compress(header, 9, mtime=0)
        f.write(head)
        comp.update(head)
        for _ in range(size >> 20):
            diff.update(mib)
            f.write(zipped_mib)
            comp.update(zipped_mib)
        diff.update(trailer)
        tail = gzip.compress(trailer, 9, mtime=0)
        f.write(tail)
        comp.update(tail)
    layer_digest = "sha256:" + comp.hexdigest()
    layer.rename(blobs / comp.hexdigest())
    config = put(json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
                             "rootfs": {"type": "layers", "diff_ids": ["sha256:" + diff.hexdigest()]}}).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config,
                           "size": (blobs / config.removeprefix("sha256:")).stat().st_size},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest,
                            "size": (blobs / layer_digest.removeprefix("sha256:")).stat().st_size}]}
    manifest_bytes = json.dumps(manifest).encode()
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": manifest["mediaType"], "digest": put(manifest_bytes), "size": len(manifest_bytes),
         "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    (blobs.parent.parent / "index.json").write_text(json.dumps(index))
    (blobs.parent.parent / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return f"{blobs.parent.parent}:{tag}"


def sparse_image(work: Path, tag: str, size: int) -> str:
    """An OCI layout image (``dir:tag``) of busybox plus a layer holding a sparse file of
    ``size`` bytes (GNU tar's sparse format: the layer is a few KiB; umoci writes the holes)."""
    root = work / f"sparse-{tag}"
    root.mkdir()
    subprocess.run(["truncate", "-s", str(size), str(root / "sparse")], check=True)
    tar = work / f"sparse-{tag}.tar"
    subprocess.run(["tar", "--sparse", "--format=posix", "-cf", str(tar), "-C", str(root), "sparse"], check=True)
    image = f"{work / 'layout'}:{tag}"
    if not (work / "layout").exists():
        subprocess.run(["umoci", "init", "--layout", str(work / "layout")], check=True)
    subprocess.run(["umoci", "new", "--image", image], check=True)
    subprocess.run(["umoci", "config", "--image", image, "--architecture", "amd64", "--config.cmd", "/bin/sh"],
                   check=True)
    subprocess.run(["umoci", "raw", "add-layer", "--image", image, str(tar)], check=True)
    shutil.rmtree(root)
    tar.unlink()
    return image


SYSTEMD_TAR = Path(os.environ.get("SLICER_TEST_IMAGE_DIR", "/var/lib/slicer")) / "test-cache/systemd-bookworm.tar"


def systemd_root(root: Path) -> Path:
    """Debian minbase with systemd as /sbin/init (from ``prepare``)."""
    if not SYSTEMD_TAR.exists():
        raise RuntimeError(f"{SYSTEMD_TAR} is missing: run `python3 -m tests.oci_images prepare` (needs the network)")
    root.mkdir()
    subprocess.run(["tar", "-xf", str(SYSTEMD_TAR), "-C", str(root)], check=True)
    return root


def prepare() -> None:
    if SYSTEMD_TAR.exists():
        return
    SYSTEMD_TAR.parent.mkdir(parents=True, exist_ok=True)
    tmp = SYSTEMD_TAR.with_suffix(".tmp.tar")
    subprocess.run(["mmdebstrap", "--variant=minbase", "--include=systemd,systemd-sysv", "--quiet",
                    "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
                    "--dpkgopt=path-exclude=/usr/share/locale/*", "bookworm", str(tmp)], check=True)
    tmp.rename(SYSTEMD_TAR)


if __name__ == "__main__" and sys.argv[1:] == ["prepare"]:
    prepare()
