"""Consumption: the guest meter's snapshots per node, and Prometheus metrics."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from slicer.api.answers import answers
from slicer.api.deps import manager, require_auth
from slicer.api.schema import NodeStats
from slicer.api.telemetry import render_metrics
from slicer.core.manager import Manager

router = APIRouter(dependencies=[Depends(require_auth)])
Mgr = Annotated[Manager, Depends(manager)]


@router.get("/nodes/stats", **answers(list[NodeStats]))
async def all_stats(m: Mgr) -> list[dict]:
    """Every node with its ``snapshot`` (or an ``error`` when its agent does not answer)."""
    return await m.all_stats()


@router.get("/node/{hostname}/stats", **answers(NodeStats))
async def node_stats(m: Mgr, hostname: str) -> dict:
    return await m.node_stats(m.get(hostname))


@router.get("/metrics")
async def metrics(m: Mgr) -> Response:
    """Prometheus text exposition: API requests, VMs, boots, crashes and per-VM meters."""
    await m.all_stats(timeout=3.0)  # refresh the per-VM gauges
    body, content_type = render_metrics(m)
    return Response(body, media_type=content_type)
