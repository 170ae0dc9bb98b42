"""The YAML config of ``slicer up`` (Slicer's schema; see docs/config.md)."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slicer.core.errors import BadRequest

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


class NetworkConfig(_Strict):
    mode: Literal["user", "bridge", "isolated"] = "user"
    gateway: str = "192.168.137.1/24"
    bridge: str | None = None
    tap_prefix: str | None = Field(default=None, max_length=14)
    allow: list[str] = []
    drop: list[str] = []

    @field_validator("gateway")
    @classmethod
    def _gateway(cls, v: str) -> str:
        iface = ipaddress.ip_interface(v)
        if iface.version != 4 or iface.network.prefixlen > 29:
            raise ValueError("gateway must be an IPv4 CIDR of a /29 or larger network")
        return v

    @property
    def interface(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(self.gateway)


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
    network: NetworkConfig = NetworkConfig()
    # "snapshot": sandboxes restore from a template of the group and their size (a saved,
    # booted VM) in about a second; "cold": every VM boots its kernel.
    boot: Literal["snapshot", "cold"] = "snapshot"

    @model_validator(mode="after")
    def _check(self) -> HostGroup:
        given = [x for x in (self.ram_gb, self.ram_mb, self.ram_bytes) if x is not None]
        if len(given) > 1:
            raise ValueError("give only one of ram_gb, ram_mb, ram_bytes")
        if self.storage != "image":
            raise ValueError(f"storage {self.storage!r} is not supported yet; use storage: image")
        if self.userdata and self.userdata_file:
            raise ValueError("give only one of userdata, userdata_file")
        parse_size(self.storage_size)
        if self.ram < 64 * MiB:
            raise ValueError("a VM needs at least 64 MiB of RAM")
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
    enabled: bool = False


class ApiConfig(_Strict):
    bind_address: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    auth: AuthConfig = AuthConfig()

    @property
    def unix_socket(self) -> str | None:
        addr = self.bind_address.removeprefix("unix:")
        return addr if addr.startswith("/") else None


class Config(_Strict):
    host_groups: list[HostGroup] = []
    api: ApiConfig = ApiConfig()
    github_user: str | None = None
    ssh_keys: list[str] = []
    # Where GitHub users' public keys are fetched from (<url>/<user>.keys); tests use loopback.
    github_keys_url: str = "https://github.com"
    image: str | None = None
    kernel_image: str | None = None
    kernel_file: str | None = None
    hypervisor: Literal["qemu", "firecracker", "cloud-hypervisor"] = "qemu"
    graceful_shutdown: bool = True
    # On stop, save services' memory to disk instead of shutting them down; restore them at start.
    suspend_on_shutdown: bool = False
    warm: bool = False  # build the templates of snapshot groups at start, not at the first create

    @model_validator(mode="after")
    def _check(self) -> Config:
        names = [g.name for g in self.host_groups]
        if len(names) != len(set(names)):
            raise ValueError("host group names must be unique")
        if self.hypervisor != "qemu":
            raise ValueError(f"hypervisor {self.hypervisor!r} needs KVM; this build drives qemu")
        return self

    def group(self, name: str) -> HostGroup | None:
        return next((g for g in self.host_groups if g.name == name), None)


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
        raise BadRequest(f"config: {where}: {first['msg']}") from e
    for g in cfg.host_groups:
        if g.userdata_file:
            path = Path(g.userdata_file)
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            try:
                g.userdata, g.userdata_file = path.read_text(), None
            except OSError as e:
                raise BadRequest(f"config: {g.name}.userdata_file: {e}") from e
    return cfg
