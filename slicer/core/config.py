"""The YAML config of ``slicer up`` (Slicer's schema; see docs/config.md)."""

from __future__ import annotations

import difflib
import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slicer.core.errors import BadRequest
from slicer.image.kernels import check_kernel_file
from slicer.image.oci import OCIError, source_of
from slicer.net.config import NetworkConfig, rule_entry  # noqa: F401  (rule_entry: re-exported for slicer.api)


def _image_ref(value: str | None) -> str | None:
    """An OCI reference (``registry/name:tag``, ``docker://…``, ``oci:DIR:tag``, …), checked at load."""
    if value is not None:
        try:
            source_of(value)
        except OCIError as e:
            raise ValueError(e.message) from None
    return value

GiB = 1 << 30
MiB = 1 << 20
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)?\s*$", re.IGNORECASE)
NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$"

DEFAULT_CONFIG = """\
config:
  host_groups:
  - name: vm
    count: 1
    vcpu: 2
    ram_gb: 1
    storage: image
    storage_size: 4G
    network:
      gateway: 192.168.137.1/24
  api:
    bind_address: 127.0.0.1
    port: 8080
"""


def parse_size(value: str | int) -> int:
    """``25G``, ``512M``, ``1Gi`` or a plain number of bytes."""
    if isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"not a size: {value!r} (try 25G or 512M)")
    number, unit = float(m.group(1)), m.group(2).upper()
    return int(number * {"": 1, "K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}[unit])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CAConfig(_Strict):
    """Certificates this group's guests trust besides the public ones (slicer.core.ca)."""
    # A CA of the group's own, made once under <data_dir>/ca/<group>/ (the egress proxy signs with it).
    generate: bool = False
    # PEM files of more CAs (several per file allowed); relative paths: from the config's directory.
    files: list[Annotated[str, Field(min_length=1, max_length=4096)]] = Field(default=[], max_length=64)


class HostGroup(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    count: int = Field(default=1, ge=0, le=200)
    vcpu: int = Field(default=2, ge=1, le=64)
    ram_gb: float | None = None
    ram_mb: int | None = None
    ram_bytes: int | None = None
    storage: Literal["image", "devmapper", "zfs"] = "image"
    storage_size: str = "4G"
    persistent: bool | None = None
    userdata: str | None = None
    userdata_file: str | None = None
    dns_servers: list[str] = ["8.8.8.8", "1.1.1.1"]
    gpu_count: int = 0
    # This group's OCI image (default: the top-level image, else the project's).
    image: str | None = Field(default=None, min_length=1, max_length=512)
    # "slicer": our init is PID 1 (fast); "image": the image's own /sbin/init (systemd), with
    # our agent as one of its services. Only for a group with an image.
    init: Literal["slicer", "image"] = "slicer"
    network: NetworkConfig = NetworkConfig()
    ca: CAConfig | None = None

    _image = field_validator("image")(_image_ref)
    # "snapshot": sandboxes restore from a template of the group and their size (a saved,
    # booted VM) in about a second; "cold": every VM boots its kernel.
    boot: Literal["snapshot", "cold"] = "snapshot"
    # A key of ours (Slicer has none): this many VMs kept restored from the template, paused,
    # for creates to take at once (see slicer.core.pool).
    warm_pool: int = Field(default=0, ge=0, le=64)

    @model_validator(mode="after")
    def _check(self) -> HostGroup:
        given = [x for x in (self.ram_gb, self.ram_mb, self.ram_bytes) if x is not None]
        if len(given) > 1:
            raise ValueError("give only one of ram_gb, ram_mb, ram_bytes")
        if self.storage != "image":
            raise ValueError(f"storage {self.storage!r} is not supported yet; use storage: image")
        if self.gpu_count:
            raise ValueError("gpu_count: GPUs need PCI passthrough under KVM, which this daemon does not do; "
                             "remove gpu_count")
        if self.warm_pool and self.boot == "cold":
            raise ValueError("warm_pool keeps VMs restored from the group's template; a group with boot: cold has "
                             "none (remove warm_pool, or boot: snapshot)")
        if self.userdata and self.userdata_file:
            raise ValueError("give only one of userdata, userdata_file")
        parse_size(self.storage_size)
        if self.ram < 64 * MiB:
            raise ValueError("a VM needs at least 64 MiB of RAM")
        if self.network.mode == "isolated" and self.network.range:
            blocks = ipaddress.IPv4Network(self.network.range, strict=False).num_addresses // 4
            if self.count > blocks:
                raise ValueError(f"count {self.count} is more than the {blocks} /30 blocks of network.range")
        elif self.network.gateway and self.count > len(self.network.pool()):
            raise ValueError(f"count {self.count} is more than the {len(self.network.pool())} addresses of "
                             "network (gateway/addresses/range)")
        return self

    @property
    def ram(self) -> int:
        if self.ram_bytes is not None:
            return self.ram_bytes
        if self.ram_mb is not None:
            return self.ram_mb * MiB
        return int((self.ram_gb if self.ram_gb is not None else 4) * GiB)

    @property
    def disk_size(self) -> int:
        return parse_size(self.storage_size)

    @property
    def service_persistent(self) -> bool:
        return True if self.persistent is None else self.persistent  # storage: image persists


class AuthConfig(_Strict):
    enabled: bool = True  # off only when the config says so (and then only on loopback or a unix socket)


class ApiConfig(_Strict):
    bind_address: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    auth: AuthConfig = AuthConfig()
    # Host names the API answers to besides its address and localhost (DNS rebinding; "*": any).
    allowed_hosts: list[Annotated[str, Field(min_length=1, max_length=253)]] = Field(default=[], max_length=64)

    @model_validator(mode="after")
    def _check(self) -> ApiConfig:
        if self.auth.enabled or self.unix_socket:
            return self
        host = self.bind_address.strip("[]")
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"bind_address {self.bind_address} with auth.enabled: false would let anyone who "
                             "reaches it run commands in every VM; enable auth or bind to 127.0.0.1")
        return self

    @property
    def unix_socket(self) -> str | None:
        """The socket's path when ``bind_address`` names one: absolute, ``./x.sock`` or ``../…``
        (relative to the config file, as Slicer's docs write it), or ``unix:`` and a path."""
        addr = self.bind_address.removeprefix("unix:")
        if addr.startswith(("/", "./", "../")) or self.bind_address.startswith("unix:"):
            return addr
        return None


class Config(_Strict):
    host_groups: list[HostGroup] = []
    api: ApiConfig = ApiConfig()
    github_user: str | None = None
    ssh_keys: list[str] = []
    # Where GitHub users' public keys are fetched from (<url>/<user>.keys); tests use loopback.
    github_keys_url: str = "https://github.com"
    image: str | None = Field(default=None, min_length=1, max_length=512)  # OCI reference (slicer.image.oci)
    insecure_registry: bool = False  # pull images over plain HTTP (and unverified TLS)
    _image = field_validator("image", "kernel_image")(_image_ref)
    kernel_image: str | None = Field(default=None, min_length=1, max_length=512)  # OCI image with /boot/vmlinuz*
    kernel_file: str | None = Field(default=None, min_length=1, max_length=4096)  # a bzImage on this host
    # Firecracker and Cloud Hypervisor need KVM; their groups run on QEMU microvm (logged, and
    # shown in /info) so that Slicer's configs load unchanged.
    hypervisor: Literal["qemu", "firecracker", "cloud-hypervisor"] = "qemu"
    graceful_shutdown: bool = True
    # On stop, save services' memory to disk instead of shutting them down; restore them at start.
    suspend_on_shutdown: bool = False
    warm: bool = False  # build the templates of snapshot groups at start, not at the first create
    # A directory of templates shared by the daemons of this host (slicer.core.template_cache).
    template_cache: str | None = Field(default=None, min_length=1, max_length=4096)
    # Each VM's QEMU under a uid of its own, QEMU's seccomp filter and a cgroup (slicer.vmm.jail).
    # Unset: when the daemon runs as root; true: required (the daemon refuses to start without).
    confine: bool | None = None

    @field_validator("template_cache")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"must be an absolute path, not {value[:100]!r}")
        return value

    @model_validator(mode="after")
    def _check(self) -> Config:
        names = [g.name for g in self.host_groups]
        if len(names) != len(set(names)):
            raise ValueError("host group names must be unique")
        for g in self.host_groups:
            if g.init == "image" and not (g.image or self.image):
                raise ValueError(f"host group {g.name}: init: image boots the image's own init, so it needs an "
                                 "image (the project's has none); set image, or remove init")
        if self.kernel_image and self.kernel_file:
            raise ValueError("give only one of kernel_image, kernel_file")
        if self.kernel_file:
            check_kernel_file(Path(self.kernel_file))
        bridges = [g.network.bridge for g in self.host_groups if g.network.bridge]
        if len(bridges) != len(set(bridges)):
            raise ValueError("two host groups name the same network.bridge")
        nets = [(g.name, g.network.interface.network) for g in self.host_groups if g.network.gateway]
        nets += [(g.name, ipaddress.IPv4Network(g.network.range, strict=False))
                 for g in self.host_groups if g.network.mode == "isolated" and g.network.range]
        for i, (a, na) in enumerate(nets):
            for b, nb in nets[i + 1:]:
                if na.overlaps(nb):
                    raise ValueError(f"the networks of host groups {a} ({na}) and {b} ({nb}) overlap")
        return self

    def group(self, name: str) -> HostGroup | None:
        return next((g for g in self.host_groups if g.name == name), None)


# Keys of Slicer's config (or its docs' examples) this daemon does not have, and what to do instead.
UNSUPPORTED_KEYS = {
    "pci": "PCI passthrough needs KVM, which this daemon does not do; remove it",
    "parent": "macvtap mode is not supported yet; use network.mode bridge or isolated",
}


def unknown_key(key: str) -> str:
    """Why ``key`` is refused, and what to use instead (never ignored silently)."""
    if key in UNSUPPORTED_KEYS:
        return f"not supported: {UNSUPPORTED_KEYS[key]}"
    known = set(Config.model_fields) | set(HostGroup.model_fields) | set(NetworkConfig.model_fields)
    known |= set(ApiConfig.model_fields) | set(CAConfig.model_fields)
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f"unknown key {key!r}" + (f"; did you mean {close[0]!r}?" if close else " (see docs/config.md)")


def load_config(text: str, base_dir: Path | None = None) -> Config:
    """Parse the YAML text of a config; errors name the offending field."""
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise BadRequest(f"config is not valid YAML: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("config", {}), dict):
        raise BadRequest("config must be a mapping with a top-level `config:` key")
    try:
        cfg = Config.model_validate(doc.get("config") or {})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            message = unknown_key(str(first["loc"][-1]))
        raise BadRequest(f"config: {where}: {message}") from e
    if (sock := cfg.api.unix_socket) is not None and not sock.startswith("/"):
        cfg.api.bind_address = str(((base_dir or Path.cwd()) / sock).resolve())
    for g in cfg.host_groups:
        if g.userdata_file:
            path = Path(g.userdata_file)
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            try:
                g.userdata, g.userdata_file = path.read_text(), None
            except OSError as e:
                raise BadRequest(f"config: {g.name}.userdata_file: {e}") from e
        if g.ca is not None:  # read at daemon start (slicer.core.ca.group_bundle), wherever it runs from
            g.ca.files = [str(Path(f) if Path(f).is_absolute() else ((base_dir or Path.cwd()) / f).resolve())
                          for f in g.ca.files]
    return cfg
