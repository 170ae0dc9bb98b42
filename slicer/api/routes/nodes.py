"""Host groups and nodes: list, create, inspect, delete."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request

from slicer.api.answers import answers
from slicer.api.deps import manager, require_auth
from slicer.api.models import CreateNodeRequest, json_body, parse_body, parse_duration
from slicer.api.schema import CreatedNode, HostGroup, NodeDeleted, NodeDetail
from slicer.api.schema import Node as NodeView
from slicer.core.manager import Manager
from slicer.core.node import Node

router = APIRouter(dependencies=[Depends(require_auth)])
Mgr = Annotated[Manager, Depends(manager)]
DEFAULT_WAIT_TIMEOUT = "5m"
WaitFor = Annotated[Literal["agent", "userdata"] | None, Query()]


@router.get("/hostgroup", **answers(list[HostGroup]))
async def list_host_groups(m: Mgr) -> list[dict]:
    return m.host_groups()


@router.get("/hostgroup/{name}/nodes", **answers(list[NodeView]))
async def list_group_nodes(m: Mgr, name: str, tag: str | None = None, tag_prefix: str | None = None) -> list[dict]:
    return [n.view() for n in m.list(group=name, tag=tag, tag_prefix=tag_prefix)]


@router.post("/hostgroup/{name}/nodes", status_code=201, openapi_extra=json_body(CreateNodeRequest),
             **answers(CreatedNode))
async def create_node(
    m: Mgr,
    name: str,
    request: Request,
    wait: WaitFor = None,
    timeout: str | None = None,
) -> dict:
    body = await parse_body(request, CreateNodeRequest)
    seconds = parse_duration(timeout, DEFAULT_WAIT_TIMEOUT)
    node = await m.create(
        name, cpus=body.cpus, ram_bytes=body.ram_bytes, persistent=body.persistent,
        hostname=body.hostname, ip=body.ip, spec=body.spec(), wait=wait, timeout=seconds,
    )
    return created(node)


def created(node: Node) -> dict:
    """Slicer's SlicerCreateNodeResponse."""
    r = node.record
    return {"hostname": r.hostname, "hostgroup": r.hostgroup, "ip": r.ip, "created_at": r.created_at, "arch": "x86_64"}


@router.post("/vm/{hostname}/relaunch", **answers(CreatedNode))
async def relaunch(m: Mgr, hostname: str, wait: WaitFor = None, timeout: str | None = None) -> dict:
    """Boot a shut-down (or crashed, or suspended: its memory is discarded) VM from its disk."""
    return created(await m.snapshots.relaunch(hostname, wait, parse_duration(timeout, DEFAULT_WAIT_TIMEOUT)))


@router.delete("/hostgroup/{name}/nodes/{hostname}", **answers(NodeDeleted))
async def delete_node(m: Mgr, name: str, hostname: str) -> dict:
    removed = await m.power.delete(name, hostname)
    return {"message": "Node deleted", "disk_removed": "true" if removed else "false"}


@router.get("/nodes", **answers(list[NodeView]))
async def list_nodes(m: Mgr, tag: str | None = None, tag_prefix: str | None = None) -> list[dict]:
    return [n.view() for n in m.list(tag=tag, tag_prefix=tag_prefix)]


@router.get("/vm/{hostname}", **answers(NodeDetail))
async def get_node(m: Mgr, hostname: str) -> dict:
    return await m.describe(hostname)
