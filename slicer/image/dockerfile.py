"""``slicer image build -f Dockerfile -t NAME``: build a user's image with buildah, into the cache.

buildah runs with ``--isolation chroot`` (no container runtime or daemon needed) and its own
storage under ``images/buildah`` (the vfs driver: works on any filesystem, nested or not). The
project's Debian tree is offered as ``FROM slicer/base``; ``FROM`` may also name any registry's
image or one built here before. The result goes into the image cache under ``NAME``, so
``image: NAME`` (or ``disk_image``) boots it without a registry.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from slicer.image.build import GuestImage
from slicer.image.oci import ImageStore, OCIError, Progress, UserImage, run_tool, source_of

BASE_NAME = "slicer/base"


class Builder:
    def __init__(self, images_dir: Path, store: ImageStore, guest: GuestImage) -> None:
        self.root = images_dir / "buildah"
        self.store = store
        self.guest = guest

    def _buildah(self, *args: str) -> list[str]:
        return ["buildah", "--root", str(self.root / "storage"), "--runroot", str(self.root / "run"),
                "--storage-driver", "vfs", *args]

    def _base_key(self) -> str:
        return json.loads((self.guest.directory / "manifest.json").read_text())["base"]

    def ensure_base(self, progress: Progress) -> None:
        """``slicer/base``: the project's Debian tree (Python, aiohttp, bash, sshd …), made
        again when the project's image changes."""
        key = self._base_key()
        found = subprocess.run(self._buildah("inspect", "--type", "image", "--format",
                                             '{{index .ImageAnnotations "slicer.base"}}', BASE_NAME),
                               capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.strip() == key:
            return
        tar = self.guest.directory.parent / f"base-{key}.tar"
        if not tar.exists():
            raise OCIError(f"{BASE_NAME}: the project's base tree {tar.name} is missing; run `slicer image build`",
                           "image_error")
        progress(f"making {BASE_NAME} from the project's Debian tree ({key})")
        container = run_tool(self._buildah("from", "scratch"), f"cannot make {BASE_NAME}").strip().splitlines()[-1]
        try:
            mount = run_tool(self._buildah("mount", container), f"cannot make {BASE_NAME}").strip().splitlines()[-1]
            run_tool(["tar", "-xf", str(tar), "-C", mount], f"cannot make {BASE_NAME}")
            run_tool(self._buildah("config", "--cmd", "/bin/bash", "--arch", "amd64", "--os", "linux",
                                   "--annotation", f"slicer.base={key}", container), f"cannot make {BASE_NAME}")
            run_tool(self._buildah("commit", "-q", container, BASE_NAME), f"cannot make {BASE_NAME}")
        finally:
            subprocess.run(self._buildah("rm", container), capture_output=True)

    def build(self, dockerfile: Path, name: str, context: Path, insecure: bool = False,
              progress: Progress = print) -> UserImage:
        """Build ``dockerfile`` in ``context`` and cache the result as ``name``."""
        source_of(name)  # a name users can write in image:
        if not dockerfile.is_file():
            raise OCIError(f"no Dockerfile at {dockerfile}", "invalid_image")
        if not context.is_dir():
            raise OCIError(f"build context {context} is not a directory", "invalid_image")
        self.root.mkdir(parents=True, exist_ok=True)
        if BASE_NAME in dockerfile.read_text(errors="replace"):
            self.ensure_base(progress)
        tls = ["--tls-verify=false"] if insecure else []
        tag = f"localhost/{name}" if "/" not in name.split(":")[0] else name
        run_tool(self._buildah("bud", "--isolation", "chroot", "--layers=false", *tls, "-f", str(dockerfile),
                               "-t", tag, str(context)), f"cannot build {name} from {dockerfile}", progress)
        with tempfile.TemporaryDirectory(dir=self.store.root.parent, prefix=".build-oci-") as tmp:
            layout = f"oci:{tmp}/layout:image"
            run_tool(self._buildah("push", tag, layout), f"cannot export {name}")
            return self.store.pull(layout, progress=progress, name=name)
