"""``slicer image build -f Dockerfile -t NAME``: build a user's image with buildah, into the cache.

A Dockerfile is someone else's code, so every ``RUN`` step is a container, isolated as
``docker build`` isolates it: buildah's ``--isolation oci`` with Debian's runc (crun where runc
is missing), its own PID, IPC, UTS, mount and cgroup namespaces, only the container engines'
default capabilities (:data:`CAPABILITIES`, named explicitly: a host's containers.conf cannot
widen them), buildah's default seccomp profile, and a network namespace made for the build
(:mod:`slicer.net.buildns`: NAT egress, nothing of the host's). buildah itself runs in that
namespace too, so what it fetches while building (``ADD <url>``) obeys the same rules; the
images ``FROM`` names are pulled before, on the host's network (a registry on loopback serves).

Storage is buildah's own under ``images/buildah`` (the vfs driver: works on any filesystem,
nested or not). The project's Debian tree is offered as ``FROM slicer/base``; ``FROM`` may also
name any registry's image or one built here before. The result goes into the image cache under
``NAME``, so ``image: NAME`` (or ``disk_image``) boots it without a registry.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from slicer.image.build import GuestImage
from slicer.image.oci import ImageStore, OCIError, Progress, UserImage, loopback_registry, run_tool, source_of
from slicer.net.buildns import BuildNetwork, build_network
from slicer.net.system import NetworkError

BASE_NAME = "slicer/base"
# The default set of Podman and buildah (containers.conf), a subset of Docker's: no
# CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_NET_RAW, CAP_SYS_PTRACE, CAP_MKNOD, CAP_AUDIT_WRITE …
CAPABILITIES = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_NET_BIND_SERVICE",
                "CAP_SETFCAP", "CAP_SETGID", "CAP_SETPCAP", "CAP_SETUID", "CAP_SYS_CHROOT")


def runtime() -> str:
    """runc first: Debian's crun refuses hosts with cgroups in hybrid mode (v1 and v2 mounted)."""
    found = shutil.which("runc") or shutil.which("crun")
    if found is None:
        raise OCIError("Dockerfile builds need an OCI runtime: install Debian's runc (scripts/install.sh does)",
                       "tool_missing")
    return found


def base_images(dockerfile: str) -> list[str]:
    """The images a Dockerfile names in ``FROM`` and ``COPY --from`` (not its own stages, not
    ``scratch``, not those made of build arguments): pulled before the build, on the host's
    network, so that a registry on the host's loopback still serves ``FROM``."""
    text = dockerfile.replace("\\\n", " ")
    stages: set[str] = set()
    images: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        op = words[0].upper()
        if op == "FROM":
            args = [w for w in words[1:] if not w.startswith("--")]
            if len(args) >= 3 and args[1].upper() == "AS":
                stages.add(args[2].lower())
            candidates = args[:1]
        elif op in ("COPY", "ADD"):
            candidates = [w.split("=", 1)[1] for w in words[1:] if w.startswith("--from=")]
        else:
            continue
        for image in candidates:
            if image.lower() in stages or image == "scratch" or "$" in image or image.isdigit():
                continue
            if image not in images:
                images.append(image)
    return images


def _logical_lines(dockerfile: str) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined (``# escape=`` honoured)."""
    escape = "\\"
    for line in dockerfile.splitlines():
        directive = line.strip().lower().replace(" ", "")
        if not directive.startswith("#") or "=" not in directive:
            break  # parser directives come first
        if directive.startswith("#escape="):
            escape = directive.split("=", 1)[1][:1] or escape
    return dockerfile.replace(escape + "\n", " ").replace(escape + "\r\n", " ").splitlines()


def refuse_unsafe(dockerfile: str) -> None:
    """``RUN`` flags are refused: Debian's buildah 1.28 lets ``RUN --mount`` reach the host's
    files (CVE-2024-1753, CVE-2024-9675) and ``bind-propagation`` pass mount options through
    (CVE-2024-9407), and a ``RUN`` step's root is the host's root."""
    for line in _logical_lines(dockerfile):
        words = line.split()
        while words and words[0].upper() == "ONBUILD":
            words = words[1:]
        if len(words) >= 2 and words[0].upper() == "RUN" and words[1].startswith("--"):
            raise OCIError(f"RUN {words[1].split('=', 1)[0]} is refused: RUN flags (--mount, --network, --security) "
                           "let a build reach the host with this buildah; write the step without them",
                           "invalid_dockerfile")


def isolation(network: BuildNetwork) -> list[str]:
    """buildah's options for the containers that run the ``RUN`` steps."""
    caps = [f"--cap-add={c}" for c in CAPABILITIES]
    dns = [f"--dns={d}" for d in network.dns]
    return ["--isolation", "oci", "--runtime", runtime(), "--cap-drop=all", *caps, "--pid", "private",
            "--ipc", "container", "--uts", "container", "--cgroupns", "private", "--userns", "host",
            "--network", f"ns:{network.path}", *dns]


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
              progress: Progress = print, dns: tuple[str, ...] | None = None) -> UserImage:
        """Build ``dockerfile`` in ``context`` and cache the result as ``name``. ``dns``: the
        nameservers of ``RUN`` steps (default: the host's that are not loopback)."""
        source_of(name)  # a name users can write in image:
        if not dockerfile.is_file():
            raise OCIError(f"no Dockerfile at {dockerfile}", "invalid_image")
        if not context.is_dir():
            raise OCIError(f"build context {context} is not a directory", "invalid_image")
        self.root.mkdir(parents=True, exist_ok=True)
        text = dockerfile.read_text(errors="replace")
        refuse_unsafe(text)
        if BASE_NAME in text:
            self.ensure_base(progress)
        tls = ["--tls-verify=false"] if insecure else []
        for image in base_images(text):
            present = subprocess.run(self._buildah("inspect", "--type", "image", image), capture_output=True)
            if present.returncode:
                progress(f"pulling {image}")
                plain = ["--tls-verify=false"] if insecure or loopback_registry(image) else []
                run_tool(self._buildah("pull", *plain, image), f"cannot build {name}: cannot pull {image}", progress)
        tag = f"localhost/{name}" if "/" not in name.split(":")[0] else name
        what = f"cannot build {name} from {dockerfile}"
        try:
            with build_network(dns, progress) as network:
                # buildah itself runs in the build's namespace too: what it fetches for the build
                # (ADD <url>, an image named by a build argument) obeys the build's rules
                bud = self._buildah("bud", *isolation(network), "--layers=false", *tls, "-f", str(dockerfile),
                                    "-t", tag, str(context))
                run_tool([*network.enter(), *bud], what, progress)
        except NetworkError as e:
            raise OCIError(f"{what}: {e}", "image_error") from e
        with tempfile.TemporaryDirectory(dir=self.store.root.parent, prefix=".build-oci-") as tmp:
            layout = f"oci:{tmp}/layout:image"
            run_tool(self._buildah("push", tag, layout), f"cannot export {name}")
            return self.store.pull(layout, progress=progress, name=name)
