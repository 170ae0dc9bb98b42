"""The typed parts of a node's record: what kind of node it is, how its VM came to be, why it is
suspended, and :class:`NodeSpec` (what its create asked for that later stages act on).

The spec is stored as JSON in the state database. Unknown keys (a newer daemon's) are kept
as they were, so a downgrade followed by an upgrade loses nothing.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any


class NodeKind(enum.StrEnum):
    SERVICE = "service"  # one of a group's YAML ``count``
    SANDBOX = "sandbox"  # created through the API
    POOL = "pool"  # a warm pool's VM: never shown; a create takes it and makes it a sandbox


class BootKind(enum.StrEnum):
    """How the running VM came to be; all but BOOT and ADOPTED need the guest's identity reset."""

    BOOT = "boot"  # its kernel booted
    TEMPLATE = "template"  # restored from its group's template (or a live fork's snapshot)
    SUSPEND = "suspend"  # restored from its own saved state
    FORK = "fork"  # the first boot of a commit's child
    ADOPTED = "adopted"  # left running by an earlier daemon

    @property
    def needs_identity(self) -> bool:
        return self in (BootKind.TEMPLATE, BootKind.SUSPEND, BootKind.FORK)


class Suspended(enum.StrEnum):
    NO = ""
    API = "api"  # on request: it stays so until restored
    SHUTDOWN = "shutdown"  # with the daemon (suspend_on_shutdown): restored at the next start

    @classmethod
    def _missing_(cls, value: object) -> Suspended:
        # A reason a newer daemon wrote: suspended all the same, and left so until restored.
        return cls.API


OMITTED_WHEN_EMPTY = ("tags", "ssh_keys", "protected")
Policy = dict[str, list[str]]  # {"allow": [...], "drop": [...]}: a VM's own network lists


@dataclass
class NodeSpec:
    tags: list[str] = field(default_factory=list)
    userdata: str | None = None
    ssh_keys: list[str] = field(default_factory=list)
    import_user: str | None = None  # a GitHub user whose public keys are added
    secrets: list[str] | None = None  # the secrets it gets: None all, [] none
    protected: bool = False  # refuse DELETE
    boot: str | None = None  # "cold": never from a template
    disk_image: str | None = None  # an image reference asked for; resolved at create into ``image``
    image: dict[str, str] | None = None  # {"ref", "digest"} of a user's image; None: the project's
    network: Policy | None = None  # its own allow/drop (isolated groups)
    parent_commit: str | None = None  # the commit its disk sits on
    commit_id: str | None = None  # the commit it was frozen into last
    fixups: list[str] | None = None  # what a commit's child renews at first boot
    forked_from: str | None = None  # the VM a live fork copied
    # Its machine's layout (slicer.vmm.base.VMSpec.layout): set at each boot that is not a
    # restore of its own saved state; None for a VM an older daemon booted (layout 0).
    layout: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys this daemon does not know

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> NodeSpec:
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: data.pop(k) for k in list(data) if k in known}
        for key in ("tags", "ssh_keys"):  # stored as null by older daemons
            values[key] = list(values.get(key) or [])
        values["protected"] = bool(values.get("protected"))
        return cls(**values, extra=data)

    def to_dict(self) -> dict[str, Any]:
        """What is stored: the fields that are set, and the unknown keys as they came."""
        out = {}
        for k, v in dataclasses.asdict(self).items():
            # None is "not set"; empty tags and keys, and protected false, are the defaults. An
            # empty ``secrets`` or ``fixups`` is not: it means none.
            if k == "extra" or v is None or (k in OMITTED_WHEN_EMPTY and not v):
                continue
            out[k] = v
        return {**self.extra, **out}

    def copy(self, **changes: Any) -> NodeSpec:
        """A deep enough copy for a new node (lists and dicts not shared), with ``changes``."""
        return NodeSpec.from_dict({**self.to_dict(), **changes})
