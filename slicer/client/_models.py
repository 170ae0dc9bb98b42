"""Typed views of the API's JSON (pydantic). Unknown fields are kept, so a newer daemon
does not break an older SDK.

Most are the API's own answer models (:mod:`slicer.api.schema`, which needs pydantic only, not
FastAPI). Declared here are the views that read *either* of two answers: :class:`Commit` (a
commit's creation and the list of commits) and :class:`Fork` (a cold and a live fork), and
:class:`Storage`, whose ``commits`` the SDK has always given as plain dicts.
"""

from __future__ import annotations

from typing import Any

from slicer.api import schema
from slicer.api.schema import (
    BackgroundExec,
    CreatedNode,
    ExecFrame,
    ExecResult,
    Health,
    HostGroup,
    Info,
    KeptDisk,
    Node,
    NodeStats,
    NodeUsage,
    ProxyAllowRule,
    ProxyAuditEntry,
    ProxyClient,
    ProxyClientToken,
    ProxySecret,
    Secret,
    Tags,
    TemplateUsage,
)

__all__ = [
    "BackgroundExec", "Commit", "CreatedNode", "ExecFrame", "ExecResult", "Fork", "Health", "HostGroup", "Info",
    "KeptDisk", "Node", "NodeStats", "NodeUsage", "ProxyAllowRule", "ProxyAuditEntry", "ProxyClient",
    "ProxyClientToken", "ProxySecret", "Secret", "Storage", "Tags", "TemplateUsage",
]


class Storage(schema.Storage):
    commits: list[dict[str, Any]] = []  # commit_id, source_hostname, disk_bytes


class Commit(schema.Answer):
    """A VM's disk frozen as an immutable parent that VMs fork from."""

    commit_id: str
    source_hostname: str = ""
    source_host_group: str = ""
    created_at: str = ""
    mode: str = "disk"
    tags: list[str] = []
    labels: dict[str, str] = {}
    cache_key: str = ""
    # in the answer to a commit
    hostname: str = ""
    status: str = ""
    parent_status: str = ""


class Fork(schema.Answer):
    """A VM made from a commit (cold fork) or from a running VM (live fork)."""

    hostname: str
    source_hostname: str = ""
    commit_id: str = ""
    status: str = ""
    parent_status: str = ""
    child_status: str = ""
    mode: str = ""
    persistent: bool = False
    ip: str = ""
