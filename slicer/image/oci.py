"""Users' images: OCI references pulled with skopeo, unpacked with umoci, made into ext4 disks.

The cache lives in ``images/oci``: one directory per manifest digest holding ``rootfs.ext4``
(read-only, the base of every VM of that image) and ``meta.json``; ``refs.json`` maps the
references users wrote to digests, so a reference pulled once is not pulled again (``slicer
image pull`` refreshes it). Work happens in ``.pull-*`` directories renamed into place when
complete, so an interrupted pull leaves nothing that looks like an image (start-up removes
the leftovers).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from slicer.image.bounds import BadLayer, Bound, TooLarge, run_bounded, scan_layers

Progress = Callable[[str], None]
ARCH = "amd64"
TRANSPORTS = ("docker://", "oci:", "oci-archive:", "docker-archive:")
REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+=-]{0,511}$")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")  # the only form that names a cache directory
LOCAL_TRANSPORTS = ("oci:", "oci-archive:", "docker-archive:")  # files on this host
ROOT_DIRS = ("dev", "proc", "sys", "run", "tmp", "etc", "root")  # mount points and what init writes


class OCIError(Exception):
    """An image could not be pulled, converted or found; the message names it and the cause."""

    def __init__(self, message: str, code: str = "image_error") -> None:
        super().__init__(message)
        self.message, self.code = message, code


@dataclass(frozen=True)
class UserImage:
    digest: str  # the manifest's, "sha256:…"
    directory: Path
    meta: dict

    @property
    def rootfs(self) -> Path:
        return self.directory / "rootfs.ext4"

    @property
    def short(self) -> str:
        return self.digest.removeprefix("sha256:")[:12]

    def view(self) -> dict:
        return {"digest": self.digest, "refs": self.meta.get("refs", []),
                "size_bytes": self.rootfs.stat().st_blocks * 512,  # allocated: the disk is sparse
                "content_bytes": self.meta.get("content_bytes", 0), "architecture": self.meta.get("architecture"),
                "pulled_at": self.meta.get("pulled_at"), "source": self.meta.get("source")}


def source_of(ref: str) -> str:
    """The skopeo source for ``ref``: given transports as they are, anything else a registry's."""
    if not REF_RE.fullmatch(ref) or ".." in ref.split("/"):
        raise OCIError(f"invalid image reference {ref!r}", "invalid_image")
    return ref if ref.startswith(TRANSPORTS) else "docker://" + ref


def names_registry(ref: str) -> bool:
    """Whether ``ref``'s first component is a registry host (``ghcr.io/…``, ``127.0.0.1:5000/…``,
    ``localhost/…``), as opposed to a short name."""
    first, sep, _ = ref.partition("/")
    return bool(sep) and ("." in first or ":" in first or first == "localhost")


def loopback_registry(ref: str) -> bool:
    """Whether ``ref`` names a registry on this host's loopback (``127.0.0.1:5000/…``,
    ``localhost:5000/…``, ``[::1]:5000/…``): spoken to in plain HTTP unless TLS works, as docker
    treats 127.0.0.0/8 (``--insecure`` is not needed for it)."""
    ref = ref.removeprefix("docker://")
    if not names_registry(ref):
        return False
    host = ref.partition("/")[0]
    host = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def write_json(path: Path, value: object) -> None:
    """Replace ``path`` whole (a crash leaves the old file or the new one, never half)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_tool(cmd: list[str], what: str, progress: Progress | None = None, bound: Bound | None = None,
             watch: Path | None = None) -> str:
    """Run a tool; its output lines go to ``progress`` as they come; errors name ``what``. With
    ``bound``: what it writes (the tree at ``watch``) is kept within it (``bounds.run_bounded``)."""
    if bound is not None and watch is not None:
        try:
            code, lines = run_bounded(cmd, watch, bound, progress)
        except FileNotFoundError:
            raise OCIError(f"{cmd[0]} is not installed (scripts/install.sh installs it)", "tool_missing") from None
        except TooLarge as e:
            raise OCIError(f"{what}: the image {e}", "image_too_large") from None
        if code:
            detail = "; ".join(x for x in lines[-4:] if x) or f"exit status {code}"
            raise OCIError(f"{what}: {detail}", "image_pull_failed")
        return "\n".join(lines)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except FileNotFoundError:
        raise OCIError(f"{cmd[0]} is not installed (scripts/install.sh installs it)", "tool_missing") from None
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip())
        del lines[:-40]
        if progress is not None and line.strip():
            progress(line.rstrip())
    if proc.wait():
        detail = "; ".join(x for x in lines[-4:] if x) or f"exit status {proc.returncode}"
        raise OCIError(f"{what}: {detail}", "image_pull_failed")
    return "\n".join(lines)


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def of(cls, data_dir: Path) -> ImageStore:
        """The cache of the daemon whose data directory is ``data_dir``."""
        from slicer.image.build import images_dir

        return cls(images_dir(data_dir) / "oci")

    # -- the cache --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def _refs(self) -> dict[str, str]:
        try:
            refs = json.loads((self.root / "refs.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return refs if isinstance(refs, dict) else {}

    def refs(self) -> dict[str, str]:
        """Names (references pulled, images built, ``kernel:`` references) → digests."""
        return self._refs()

    def set_ref(self, name: str, digest: str) -> None:
        with self._locked():
            refs = self._refs()
            refs[name] = digest
            self._write_refs(refs)

    def _write_refs(self, refs: dict[str, str]) -> None:
        write_json(self.root / "refs.json", refs)

    def _dir(self, digest: str) -> Path:
        if not DIGEST_RE.fullmatch(digest):
            raise OCIError(f"{digest!r} is not an image digest (sha256:<64 hex>)", "invalid_image")
        return self.root / digest.replace(":", "-")

    def get(self, digest: str) -> UserImage:
        directory = self._dir(digest)
        try:
            meta = json.loads((directory / "meta.json").read_text())
        except (FileNotFoundError, ValueError):
            raise OCIError(f"image {digest} is not in the cache (pull it again)", "image_not_found") from None
        return UserImage(digest, directory, meta)

    def lookup(self, ref: str) -> UserImage | None:
        """``ref`` from the cache (by the reference pulled, or by digest), None if not there."""
        digest = self._refs().get(ref) or (ref if DIGEST_RE.fullmatch(ref) else None)
        if digest is None:
            return None
        with contextlib.suppress(OCIError):
            return self.get(digest)
        return None

    def list(self) -> list[UserImage]:
        found = []
        for d in sorted(self.root.glob("sha256-*")):
            with contextlib.suppress(OCIError):
                found.append(self.get(d.name.replace("-", ":", 1)))
        return found

    def clean(self) -> None:
        """Remove what interrupted pulls left (not a pull still running: its lock is held)."""
        for d in self.root.glob(".pull-*"):
            try:
                with open(d / ".lock", "a") as f:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    shutil.rmtree(d, ignore_errors=True)
            except BlockingIOError:
                continue
            except OSError:
                shutil.rmtree(d, ignore_errors=True)

    def remove(self, ref: str, user: Callable[[str], str | None]) -> UserImage:
        """Remove ``ref`` (a reference or a digest) from the cache, unless ``user(digest)``
        names something that still boots from it."""
        with self._locked():
            image = self.lookup(ref)
            if image is None:
                raise OCIError(f"image {ref!r} is not in the cache", "image_not_found")
            if who := user(image.digest):
                raise OCIError(f"image {ref} ({image.short}) is in use by {who}", "image_in_use")
            refs = {r: d for r, d in self._refs().items() if d != image.digest}
            self._write_refs(refs)
            trash = Path(tempfile.mkdtemp(dir=self.root, prefix=".pull-rm-"))
            os.replace(image.directory, trash / "image")
            shutil.rmtree(trash, ignore_errors=True)
        return image

    # -- pulling ----------------------------------------------------------------------------------
    def ensure(self, ref: str, insecure: bool = False, progress: Progress = print,
               bound: Bound | None = None) -> UserImage:
        """``ref`` from the cache, pulled first if it is not there."""
        return self.lookup(ref) or self.pull(ref, insecure, progress, bound=bound)

    def pull(self, ref: str, insecure: bool = False, progress: Progress = print, name: str | None = None,
             bound: Bound | None = None) -> UserImage:
        """Pull ``ref`` and make its disk (unless its digest is cached already); record it under
        ``name`` (default: the reference itself). With ``bound``, neither the download nor the
        unpacked tree may take more of the disk than it allows (refused: ``image_too_large``,
        and nothing is left behind)."""
        name = name or ref
        with self.workdir() as work:
            layout, digest, config = self.fetch(ref, insecure, progress, work, bound)
            if self.lookup(digest) is None:
                self._convert(name, ref, work, layout, digest, config, progress, bound)
            with self._locked():
                refs = self._refs()
                refs[name] = digest
                self._write_refs(refs)
                image = self.get(digest)
                if name not in image.meta.get("refs", []):
                    image.meta.setdefault("refs", []).append(name)
                    write_json(image.directory / "meta.json", image.meta)
        progress(f"{name}: {digest} ready")
        return image

    @contextlib.contextmanager
    def workdir(self) -> Iterator[Path]:
        """A scratch directory in the cache (same filesystem: results are renamed into place)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".pull-") as tmp, open(Path(tmp) / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # held while in use: clean() leaves it alone
            yield Path(tmp)

    def fetch(self, ref: str, insecure: bool, progress: Progress, work: Path,
              bound: Bound | None = None) -> tuple[str, str, dict]:
        """Copy ``ref`` into an OCI layout in ``work``: its umoci name, manifest digest and config."""
        source = source_of(ref)
        if source == "docker://" + ref and not names_registry(ref):
            # Like podman's enforcing short names: "app:1" (built here, maybe removed since) must
            # never quietly become docker.io/library/app:1, which anyone can publish.
            raise OCIError(f"image {ref} is not in the cache and names no registry; build it again, or write "
                           f"docker.io/library/{ref} to pull it from Docker Hub", "image_not_found")
        layout = f"{work / 'layout'}:image"  # umoci's form; skopeo's is "oci:" + it
        tls = ["--src-tls-verify=false"] if insecure or loopback_registry(source) else []
        progress(f"pulling {ref}")
        run_tool(["skopeo", "--override-os", "linux", "--override-arch", ARCH, "copy", *tls, source,
                  "oci:" + layout], f"cannot pull {ref}", progress, bound, work)
        digest, config, layers = self._read_layout(work / "layout", ref)
        progress(f"{ref}: {len(layers)} layer(s), {sum(layers) / 1e6:.1f} MB")
        return layout, digest, config

    @staticmethod
    def unpack(ref: str, layout: str, bundle: Path, progress: Progress, bound: Bound | None = None,
               digest: str = "") -> Path:
        """The image's root filesystem, unpacked by umoci (whiteouts, links, ownership, xattrs;
        no path leaves the root); returns its directory. With ``bound`` (and the manifest's
        ``digest``): the layers' headers are read first and the unpack is watched while it runs
        (``slicer.image.bounds``)."""
        if bound is not None:
            try:
                scan_layers(Path(layout.rpartition(":")[0]), digest, bound)
            except TooLarge as e:
                raise OCIError(f"image {ref} {e}", "image_too_large") from None
            except (BadLayer, OSError, ValueError, KeyError, TypeError) as e:
                raise OCIError(f"image {ref}: {e}", "invalid_image") from None
        progress(f"unpacking {ref}")
        run_tool(["umoci", "unpack", "--image", layout, str(bundle)], f"cannot unpack {ref}", bound=bound,
                 watch=bundle)
        return bundle / "rootfs"

    @staticmethod
    def _read_layout(layout: Path, ref: str) -> tuple[str, dict, list[int]]:
        """The manifest digest, image config and layer sizes skopeo wrote; refuses another
        architecture."""
        try:
            index = json.loads((layout / "index.json").read_text())
            digest = index["manifests"][0]["digest"]
            manifest = json.loads((layout / "blobs" / digest.replace(":", "/")).read_text())
            config = json.loads((layout / "blobs" / manifest["config"]["digest"].replace(":", "/")).read_text())
            layers = [int(layer["size"]) for layer in manifest["layers"]]
        except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise OCIError(f"image {ref}: unreadable manifest or config ({e})", "invalid_image") from None
        arch, os_ = config.get("architecture"), config.get("os")
        if arch != ARCH or os_ not in (None, "linux"):
            raise OCIError(f"image {ref} is for {os_}/{arch}; this host runs linux/{ARCH} VMs", "wrong_architecture")
        return digest, config, layers

    def _convert(self, ref: str, source: str, work: Path, layout: str, digest: str, config: dict,
                 progress: Progress, bound: Bound | None = None) -> None:
        """Make the disk of the image pulled into ``layout``; ``ref``: its name here, ``source``:
        where it came from (the same, but for a build's temporary layout)."""
        root = self.unpack(ref, layout, work / "bundle", progress, bound, digest)
        for d in ROOT_DIRS:
            path = root / d
            if not path.is_symlink() and not path.exists():
                path.mkdir(mode=0o700 if d == "root" else 0o755)
        used = int(run_tool(["du", "-sb", str(root)], f"cannot size {ref}").split()[0])
        size_mb = used * 5 // 4 // (1 << 20) + 64  # grown to the VM's storage_size at its boot
        out = work / "disk"
        out.mkdir()
        progress(f"making a {size_mb} MiB ext4 disk of {ref} ({used >> 20} MiB of files)")
        run_tool(["mkfs.ext4", "-q", "-F", "-L", "slicer-root", "-d", str(root), str(out / "rootfs.ext4"),
                  f"{size_mb}M"], f"cannot make a disk of {ref}")
        (out / "rootfs.ext4").chmod(0o444)
        cfg = config.get("config") or {}
        meta = {"digest": digest, "refs": [], "source": source_of(source), "architecture": config.get("architecture"),
                "content_bytes": used, "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "config": {k: cfg.get(k) for k in ("Env", "Entrypoint", "Cmd", "WorkingDir", "User") if cfg.get(k)}}
        write_json(out / "meta.json", meta)
        with self._locked():
            if not self._dir(digest).exists():
                os.replace(out, self._dir(digest))
