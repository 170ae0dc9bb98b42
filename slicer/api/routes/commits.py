"""Tags, commits and forks (the Go SDK's shapes): ``/vm/{h}/tags``, ``/vm/{h}/commit``,
``/vm/commits`` and ``/vm/commits/{id}/fork``; included before ``/vm/{hostname}``."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from slicer.api.answers import answers
from slicer.api.deps import manager, require_auth
from slicer.api.models import NetworkPolicy, json_body, parse_body, parse_duration
from slicer.api.schema import CommitCreated, CommitDeleted, CommitFork, CommitInfo, LiveFork
from slicer.api.schema import Tags as TagsView
from slicer.core.commits import FIXUPS, check_commit_id
from slicer.core.errors import BadRequest
from slicer.core.manager import Manager

router = APIRouter(dependencies=[Depends(require_auth)])
Mgr = Annotated[Manager, Depends(manager)]
Tag = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f]+$")]
Tags = Annotated[list[Tag], Field(max_length=64)]


class TagUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    add: Tags = Field(default_factory=list)
    remove: Tags = Field(default_factory=list)
    replace: Tags | None = None
    name: str | None = None  # the Go SDK's friendly name: not supported here (refused below)


class CommitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    tags: Tags = Field(default_factory=list)
    labels: dict[Annotated[str, Field(min_length=1, max_length=128)], Annotated[str, Field(max_length=1024)]] = \
        Field(default_factory=dict, max_length=64)
    cache_key: str = Field(default="", max_length=256, pattern=r"^[^\x00-\x1f]*$")


class ForkCommitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    tags: Tags | None = None
    tag_mode: Literal["append", "replace"] = "append"
    secrets: list[Annotated[str, Field(max_length=253)]] | None = Field(default=None, max_length=256)
    persistent: bool = True  # the SDKs' default: a child survives shutdown (WithEphemeral says otherwise)
    hostname: str | None = Field(default=None, max_length=63)  # the TypeScript SDK's child name
    vcpu: int | None = Field(default=None, ge=1, le=1024)
    ram_bytes: int | None = Field(default=None, ge=0, le=1 << 50)
    network: NetworkPolicy | None = None
    fixups: list[Literal["hostname", "machine-id", "ssh-host-keys"]] | None = None


class ForkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    count: int = Field(default=1, ge=1, le=32)
    tags: Tags = Field(default_factory=list)
    persistent: Literal[False] = False  # copies are sandboxes: commit a stopped VM for persistent children


@router.post("/vm/{hostname}/fork", status_code=201, openapi_extra=json_body(ForkRequest), **answers(list[LiveFork]))
async def fork(m: Mgr, hostname: str, request: Request,
               wait: Annotated[Literal["agent", "none"], Query()] = "agent", timeout: str | None = None) -> list[dict]:
    """``count`` live copies of a running VM: its memory, processes and files; each its own identity."""
    body = await parse_body(request, ForkRequest)
    copies = await m.forks.fork(hostname, body.count, body.tags, None if wait == "none" else "agent",
                          parse_duration(timeout, "5m"))
    return [{"hostname": n.hostname, "hostgroup": n.record.hostgroup, "ip": n.record.ip,
             "source_hostname": hostname, "status": "forked", "child_status": n.status.lower(),
             "mode": "memory", "persistent": False, "created_at": n.record.created_at} for n in copies]


@router.get("/vm/commits", **answers(list[CommitInfo]))
async def list_commits(m: Mgr, tag: Annotated[list[str] | None, Query()] = None, cache_key: str | None = None,
                       source: str | None = None, mode: str | None = None) -> list[dict]:
    """Commits, filtered: every ``tag`` given, the ``cache_key``, the ``source`` VM, the ``mode``."""
    return m.commits.list(tags=tag, cache_key=cache_key, source=source, mode=mode)


@router.delete("/vm/commits/{commit_id}", **answers(CommitDeleted))
async def delete_commit(m: Mgr, commit_id: str) -> dict:
    """Refused (409) while a VM or a later commit reads through it."""
    return await m.commits.delete(check_commit_id(commit_id))


@router.post("/vm/commits/{commit_id}/fork", openapi_extra=json_body(ForkCommitRequest), **answers(CommitFork))
async def fork_commit(m: Mgr, commit_id: str, request: Request,
                      wait: Annotated[Literal["agent", "none"], Query()] = "agent",
                      timeout: str | None = None) -> dict:
    """A new VM in the commit's host group, booted from a copy-on-write child of its disk."""
    body = await parse_body(request, ForkCommitRequest)
    return await m.commits.fork(
        check_commit_id(commit_id), tags=body.tags, tag_mode=body.tag_mode, secrets_=body.secrets,
        persistent=body.persistent, cpus=body.vcpu, ram_bytes=body.ram_bytes, hostname=body.hostname,
        fixups=list(FIXUPS) if body.fixups is None else body.fixups,
        network=body.network.override() if body.network else None,
        wait=None if wait == "none" else "agent", timeout=parse_duration(timeout, "5m"),
    )


@router.post("/vm/{hostname}/commit", openapi_extra=json_body(CommitRequest), **answers(CommitCreated))
async def commit(m: Mgr, hostname: str, request: Request) -> dict:
    """Freeze a stopped persistent VM's disk into an immutable commit; the VM goes on on top of it."""
    body = await parse_body(request, CommitRequest)
    return await m.commits.commit(hostname, body.tags, body.labels, body.cache_key)


@router.get("/vm/{hostname}/tags", **answers(TagsView))
async def get_tags(m: Mgr, hostname: str) -> dict:
    return m.tags(hostname)


@router.patch("/vm/{hostname}/tags", openapi_extra=json_body(TagUpdate, required=True), **answers(TagsView))
async def update_tags(m: Mgr, hostname: str, request: Request) -> dict:
    """``{"add": [...], "remove": [...]}`` or ``{"replace": [...]}``, applied at once."""
    body = await parse_body(request, TagUpdate)
    if body.name is not None:
        raise BadRequest("VM names are not supported: use a tag", "unsupported")
    return m.update_tags(hostname, body.add, body.remove, body.replace)
