"""Actions on one VM: console logs, agent health, power, pause, suspend and restore."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import PlainTextResponse, Response

from slicer.api.answers import answers, passes_on
from slicer.api.deps import manager, require_auth
from slicer.api.models import parse_duration, read_json_object
from slicer.api.routes.nodes import DEFAULT_WAIT_TIMEOUT, WaitFor
from slicer.api.schema import ConsoleLog, Health
from slicer.core.errors import BadRequest, SlicerError
from slicer.core.manager import Manager

router = APIRouter(prefix="/vm/{hostname}", dependencies=[Depends(require_auth)])
Mgr = Annotated[Manager, Depends(manager)]


@router.get("/logs", **answers(ConsoleLog))
async def logs(m: Mgr, hostname: str, lines: Annotated[int, Query(ge=0, le=1_000_000)] = 20) -> dict:
    return {"hostname": hostname, "lines": lines, "content": m.logs(hostname, lines)}


@router.get("/health", response_model=None, **passes_on(Health))
@router.head("/health", response_model=None)
async def health(m: Mgr, request: Request, hostname: str) -> Response | dict:
    if request.method == "HEAD":
        try:
            await m.health(hostname)
        except SlicerError as e:
            return Response(status_code=e.status)
        return Response(status_code=200)
    return await m.health(hostname)


@router.post("/shutdown", response_class=PlainTextResponse)
async def shutdown(m: Mgr, hostname: str, request: Request, action: str | None = None) -> str:
    """``action`` from the query (the Go SDK, the OpenAPI file) or a JSON body ``{"action": ...}``
    (the TypeScript SDK); reboot when neither says."""
    if action is None:
        action = (await read_json_object(request, 4096)).get("action") or "reboot"
        if not isinstance(action, str):
            raise BadRequest("action must be shutdown or reboot", "invalid_action")
    await m.power.shutdown(hostname, action)
    return f"{'Reboot' if action == 'reboot' else 'Shutdown'} of {hostname} started\n"


@router.post("/pause", response_class=PlainTextResponse)
async def pause(m: Mgr, hostname: str) -> str:
    await m.power.pause(hostname)
    return f"{hostname} paused\n"


@router.post("/resume", response_class=PlainTextResponse)
async def resume(m: Mgr, hostname: str) -> str:
    await m.power.resume(hostname)
    return f"{hostname} resumed\n"


@router.post("/suspend", response_class=PlainTextResponse)
async def suspend(m: Mgr, hostname: str) -> str:
    await m.snapshots.suspend(hostname)
    return f"{hostname} suspended\n"


@router.post("/restore", response_class=PlainTextResponse)
async def restore(m: Mgr, hostname: str, wait: WaitFor = None, timeout: str | None = None) -> str:
    await m.snapshots.restore(hostname, wait, parse_duration(timeout, DEFAULT_WAIT_TIMEOUT))
    return f"{hostname} restored\n"
