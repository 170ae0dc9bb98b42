"""Request bodies and query values of the API, validated before anything is created."""

from __future__ import annotations

import json
import re
from typing import Literal, TypeVar

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from slicer.core.config import rule_entry
from slicer.core.errors import BadRequest, UnsupportedMediaType
from slicer.core.records import NodeSpec

MAX_USERDATA = 1 << 20
_GITHUB_USER = r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})$"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


class NetworkPolicy(BaseModel):
    """A VM's own ``allow``/``drop`` (isolated host groups): an omitted list is the group's, an
    empty one clears it (the Go SDK's ``SlicerCreateNodeNetworkPolicy``/``SlicerForkVMNetworkPolicy``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    allow: list[str] | None = Field(default=None, max_length=256)
    drop: list[str] | None = Field(default=None, max_length=256)

    @model_validator(mode="after")
    def _check(self) -> NetworkPolicy:
        for what in ("allow", "drop"):
            if (values := getattr(self, what)) is not None:
                setattr(self, what, [rule_entry(value, what) for value in values])
        return self

    def override(self) -> dict[str, list[str]]:
        """The lists given (what the node record keeps)."""
        return {k: list(v) for k, v in (("allow", self.allow), ("drop", self.drop)) if v is not None}


class CreateNodeRequest(BaseModel):
    """Body of ``POST /hostgroup/{name}/nodes`` (Slicer's SlicerCreateNodeRequest)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    hostname: str | None = Field(default=None, max_length=63)
    ip: str | None = Field(default=None, max_length=15)
    ram_bytes: int | None = Field(default=None, ge=0)
    cpus: int | None = Field(default=None, ge=0)
    gpu_count: int = Field(default=0, ge=0)
    persistent: bool = False
    protected: bool = False
    disk_image: str | None = Field(default=None, min_length=1, max_length=512)  # an OCI reference
    import_user: str | None = Field(default=None, pattern=_GITHUB_USER)
    github_user: str | None = Field(default=None, pattern=_GITHUB_USER)
    ssh_keys: list[str] = Field(default_factory=list, max_length=100)
    userdata: str | None = Field(default=None, max_length=MAX_USERDATA)
    tags: list[str] = Field(default_factory=list, max_length=64)
    # None (omitted): every secret, as in Slicer; []: none; a list: exactly those
    secrets: list[str] | None = Field(default=None, max_length=256)
    pci_devices: list[str] = Field(default_factory=list)
    # "cold" boots the kernel even when the group restores sandboxes from its template.
    boot: Literal["snapshot", "cold"] | None = None
    network: NetworkPolicy | None = None

    @model_validator(mode="after")
    def _check(self) -> CreateNodeRequest:
        if self.gpu_count:
            raise ValueError("gpu_count: GPUs are not supported by the qemu driver")
        if self.pci_devices:
            raise ValueError("pci_devices: PCI passthrough is not supported by the qemu driver")
        if self.import_user and self.github_user and self.import_user != self.github_user:
            raise ValueError("github_user and import_user name the same thing; give one")
        for tag in self.tags:
            if not tag or len(tag) > 128:
                raise ValueError("tags: each tag must be 1-128 characters")
        for key in self.ssh_keys:
            if len(key) > 16384 or not key.strip():
                raise ValueError("ssh_keys: each key must be a non-empty line of at most 16 KiB")
        return self

    def spec(self) -> NodeSpec:
        """What later stages act on (userdata, keys, secrets, tags), stored with the node."""
        return NodeSpec(
            userdata=self.userdata, import_user=self.import_user or self.github_user,
            ssh_keys=list(self.ssh_keys or []), tags=list(self.tags or []), secrets=self.secrets,
            protected=bool(self.protected), boot=self.boot or None,
            disk_image=self.disk_image or None,  # resolved by the manager
            network=(self.network.override() or None) if self.network else None,
        )


M = TypeVar("M", bound=BaseModel)


async def parse_body(request: Request, model: type[M], limit: int = 4 * MAX_USERDATA) -> M:
    """The JSON body as ``model``; an empty body is ``{}``."""
    data = await read_json_object(request, limit)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise BadRequest(describe_validation(e.errors()), "invalid_request") from None


async def read_json_object(request: Request, limit: int = 4 * MAX_USERDATA) -> dict:
    """The body as a JSON object, read with a size limit; an empty body is ``{}``. A body needs
    a JSON Content-Type: a web page can send ``text/plain`` or a form anywhere without asking."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    json_type = media == "application/json" or (media.startswith("application/") and media.endswith("+json"))
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:  # checked while reading: a huge body is never held whole
            raise BadRequest(f"request body over {limit} bytes", "too_large")
    if raw.strip() and not json_type:
        raise UnsupportedMediaType(f"the body must be JSON with Content-Type: application/json, not {media or 'none'!r}"
                                   " (curl: --json '{...}')")
    try:
        data = json.loads(raw) if raw.strip() else {}
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
        raise BadRequest("request body is not valid JSON", "invalid_request") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object", "invalid_request")
    return data


def describe_validation(errors: list) -> str:
    """One readable line for the first pydantic/FastAPI validation error."""
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
    if err.get("type") == "json_invalid":
        return "request body is not valid JSON"
    if err.get("type") == "extra_forbidden":
        return f"unknown field {'.'.join(loc)!r}"
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    return f"{'.'.join(loc)}: {msg}" if loc else msg


def parse_duration(value: str | None, default: str) -> float:
    """Go duration (``30s``, ``2m``, ``1m30s``, ``500ms``) or plain seconds, in seconds; ``default``
    when it is missing or zero (the TypeScript SDK sends ``0s`` for "no timeout of mine")."""
    seconds = _seconds(value) if value and value.strip() else 0.0
    if seconds == 0:
        seconds = _seconds(default)
    if not 0 < seconds <= 3600:
        raise BadRequest("timeout must be between 0 and 1h", "invalid_timeout")
    return seconds


def _seconds(value: str) -> float:
    v = value.strip()
    try:
        return float(v)
    except ValueError:
        pass
    pos, seconds = 0, 0.0
    for m in _DURATION.finditer(v):
        if m.start() != pos:
            break
        seconds += float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]
        pos = m.end()
    if pos != len(v) or not v:
        raise BadRequest(f"timeout {value!r} is not a duration (try 30s or 2m)", "invalid_timeout")
    return seconds


def json_body(schema: type[BaseModel] | dict, required: bool = False) -> dict:
    """``openapi_extra`` for a route that reads its JSON body itself (bounded in size, typed
    strictly, see :func:`parse_body`): the served schema still shows clients and fuzzers its shape."""
    if isinstance(schema, type):
        schema = schema.model_json_schema()
        defs = schema.pop("$defs", {})
        schema = _inline(schema, defs)
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": schema}}}}


def _inline(node, defs: dict):
    """``node`` with each ``#/$defs/X`` reference replaced by X (our bodies nest, never recurse)."""
    if isinstance(node, dict):
        ref = node.get("$ref", "")
        if ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def query_doc(required: tuple[str, ...] = (), **params: dict) -> dict:
    """``openapi_extra`` documenting query parameters a route reads from the raw query (to
    pass them on as they are, repeated ones included); each value is a JSON schema."""
    return {"parameters": [{"name": name, "in": "query", "required": name in required, "schema": schema}
                           for name, schema in params.items()]}


STRING, INTEGER, BOOLEAN = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
NONEMPTY = {"type": "string", "minLength": 1}
ABSOLUTE = {"type": "string", "pattern": "^/"}
ENV = {"type": "array", "items": {"type": "string", "pattern": "^[^=]+="}}
STRINGS = {"type": "array", "items": STRING}
