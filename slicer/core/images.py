"""Which image each VM boots: the project's, or a user's OCI image with the agent's runtime.

A node's choice is made when its record is written (its group's ``image``, or the create
request's ``disk_image``) and kept in the record (``spec["image"]``: reference and digest), so
a VM keeps booting the image it was made from whatever the config says later, and a commit's
or fork's children inherit it with the rest of the spec.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import replace
from pathlib import Path

from slicer.core.config import Config, HostGroup
from slicer.core.error_codes import ErrorCode
from slicer.core.errors import BadGateway, BadRequest, NotFound, SlicerError, Unavailable
from slicer.core.state import StateStore
from slicer.image.bounds import Bound
from slicer.image.build import GuestImage, ImageError
from slicer.image.kernels import Kernel, kernel_file, kernel_image
from slicer.image.oci import LOCAL_TRANSPORTS, ImageStore, OCIError, UserImage
from slicer.vmm.base import VMMError
from slicer.vmm.disks import recorded_chain

log = logging.getLogger("slicer.images")
KINDS: dict[str, type[SlicerError]] = {"invalid_image": BadRequest, "wrong_architecture": BadRequest,
                                      "image_too_large": BadRequest, "image_not_found": NotFound,
                                      "tool_missing": SlicerError}


def bound_of(group: HostGroup) -> Bound:
    """How much of the data disk pulling an image for ``group`` may take: its VMs' disk size."""
    return Bound(group.disk_size, f"host group {group.name}'s storage_size {group.storage_size}")


def image_error(e: OCIError) -> SlicerError:
    """An image failure as the API reports it: bad references 400, registries' failures 502."""
    return KINDS.get(e.code, BadGateway)(e.message, e.code)


class BootImages:
    def __init__(self, base: GuestImage, store: ImageStore, config: Config) -> None:
        self.base = base
        self.store = store
        self.config = config
        self.groups: dict[str, dict] = {}  # group -> {"ref", "digest"} of its image
        self.errors: dict[str, str] = {}  # group -> why its image is unavailable
        self._pulls: dict[str, asyncio.Lock] = {}
        self.kernel: Kernel | None = None  # kernel_file / kernel_image (None: the project's)
        self.kernel_error: str | None = None  # why the configured kernel cannot be used

    def resolve_groups(self) -> None:
        """Find (pulling if needed) the kernel and every group's image; a group whose image
        fails is marked unavailable, the others go on (a kernel that fails: every group)."""
        self.store.clean()
        try:
            self.kernel = self._kernel()
        except Exception as e:  # whatever it is, the daemon runs on and says why (/info, 503s)
            self.kernel_error = f"kernel: {getattr(e, 'message', e)}"
            log.error("%s; no VM can boot", self.kernel_error)
            self.errors.update({g.name: self.kernel_error for g in self.config.host_groups})
            return
        for group in self.config.host_groups:
            ref = group.image or self.config.image
            if not ref:
                continue
            try:
                image = self.store.ensure(ref, self.config.insecure_registry,
                                          lambda m, g=group.name: log.info("%s: %s", g, m), bound_of(group))
            except Exception as e:  # one group's image never stops the others (nor the daemon)
                self.errors[group.name] = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
                log.error("host group %s: image %s unavailable: %s", group.name, ref, self.errors[group.name])
                continue
            if too_big := self._too_big(image, group):
                self.errors[group.name] = too_big
                log.error("host group %s: %s", group.name, too_big)
                continue
            self.groups[group.name] = {"ref": ref, "digest": image.digest}
            log.info("host group %s boots image %s (%s)", group.name, ref, image.digest)

    def _kernel(self) -> Kernel | None:
        if self.config.kernel_file:
            return kernel_file(Path(self.config.kernel_file), self.base)
        if self.config.kernel_image:
            found = kernel_image(self.store, self.config.kernel_image, self.base, self.config.insecure_registry,
                                 lambda m: log.info("kernel: %s", m))
            log.info("VMs boot the kernel of %s", found.label)
            return found
        return None

    def group_choice(self, group: str) -> dict | None:
        """The image record of ``group``'s VMs (None: the project's image)."""
        if group in self.errors:
            raise Unavailable(f"host group {group}'s image is unavailable: {self.errors[group]}",
                              ErrorCode.IMAGE_UNAVAILABLE)
        return self.groups.get(group)

    @staticmethod
    def _too_big(image: UserImage, group: HostGroup) -> str | None:
        """Why ``image`` cannot be the root of ``group``'s VMs (a VM's disk is never smaller
        than the image's), or None."""
        need = image.rootfs.stat().st_size
        if need <= group.disk_size:
            return None
        return (f"image {(image.meta.get('refs') or [image.digest])[0]} needs a {need >> 20} MiB disk, more than host "
                f"group {group.name}'s storage_size {group.storage_size}")

    async def request_choice(self, ref: str, group: HostGroup) -> dict:
        """The image record for a create request's ``disk_image`` (pulled in a thread if new):
        a registry's reference or a name in the cache, never a file on the host (the config
        and the CLI may name those; an API client may not)."""
        if ref.startswith(LOCAL_TRANSPORTS):
            raise BadRequest(f"disk_image {ref}: files on the host are not taken from the API; pull it with "
                             "`slicer image pull` and name it by its reference or digest", ErrorCode.INVALID_IMAGE)
        choice = await self.request_image(ref, bound=bound_of(group))
        try:
            too_big = self._too_big(self.store.get(choice["digest"]), group)
        except OCIError as e:  # removed meanwhile
            raise image_error(e) from None
        if too_big:
            raise BadRequest(too_big, ErrorCode.IMAGE_TOO_LARGE)
        return choice

    async def request_image(self, ref: str, refresh: bool = False, bound: Bound | None = None) -> dict:
        lock = self._pulls.setdefault(ref, asyncio.Lock())
        async with lock:
            pull = self.store.pull if refresh else self.store.ensure
            try:
                image = await asyncio.to_thread(pull, ref, self.config.insecure_registry, lambda m: log.info("%s", m),
                                                bound=bound)
            except OCIError as e:
                raise image_error(e) from None
        return {"ref": ref, "digest": image.digest}

    async def present(self, choice: dict) -> dict:
        """``choice`` with its image in the cache: pulled again if it was removed (``slicer
        image prune``) since; the digest is the reference's current one."""
        digest = str(choice.get("digest", ""))
        if self.store.lookup(digest) is not None:
            return choice
        log.info("image %s (%s) is no longer cached: pulling it again", choice.get("ref"), digest)
        fresh = await self.request_image(str(choice.get("ref", "")), refresh=True)
        for group, c in list(self.groups.items()):
            if c["ref"] == fresh["ref"]:
                self.groups[group] = dict(fresh)
        return fresh

    def boot(self, choice: dict | None) -> GuestImage:
        """What QEMU boots for a node whose record holds ``choice``."""
        if self.kernel_error:  # never the project's kernel in its place, silently
            raise Unavailable(self.kernel_error, ErrorCode.KERNEL_UNAVAILABLE)
        base = self.base if self.kernel is None else replace(self.base, kernel=self.kernel.kernel,
                                                               initrd=self.kernel.initrd)
        if not choice:
            return base
        try:
            image = self.store.get(str(choice.get("digest", "")))
            return base.with_root(image.rootfs, image.short)
        except OCIError as e:
            raise image_error(e) from None
        except ImageError as e:
            raise SlicerError(str(e), ErrorCode.IMAGE_ERROR) from None

    def label(self, choice: dict | None) -> str:
        return str(choice["ref"]) if choice else self.base.build_id


def users_of_images(data_dir: Path, store: ImageStore) -> dict[str, str]:
    """Digest → what boots from it (a VM, a commit, a template), read from the data directory:
    what ``slicer image rm`` must not remove."""
    users: dict[str, str] = {}
    db = data_dir / "state.db"
    if db.exists():
        state = StateStore(db)
        try:
            for rec in state.all():
                if isinstance(image := rec.spec.image, dict):
                    users.setdefault(str(image.get("digest")), f"VM {rec.hostname}")
            for commit in state.commits():
                if isinstance(image := commit.spec.image, dict):
                    users.setdefault(str(image.get("digest")), f"commit {commit.commit_id}")
        finally:
            state.close()
    by_root = {str(i.rootfs.resolve()): i.digest for i in store.list()}
    for disk in sorted((data_dir / "templates").glob("*/disk.qcow2")):
        # the daemon's records of the chain, never the header a template's VMM wrote
        with contextlib.suppress(VMMError):
            for layer in recorded_chain(disk):
                if (digest := by_root.get(str(layer.path.resolve()))) is not None:
                    users.setdefault(digest, f"template {disk.parent.name}")
    return users
