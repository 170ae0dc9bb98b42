"""``POST /vm/{hostname}/exec``: run a command in the VM, output streamed as NDJSON."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from slicer.api.deps import manager, require_auth
from slicer.core.manager import Manager

router = APIRouter(dependencies=[Depends(require_auth)])
Mgr = Annotated[Manager, Depends(manager)]
TRUE = ("1", "true", "yes", "on")


@router.post("/vm/{hostname}/exec")
async def execute(m: Mgr, hostname: str, request: Request) -> Response:
    """Query: cmd, args (repeated), env (repeated KEY=VALUE), uid, gid, cwd, shell, stdin,
    stdout, stderr, stdio=text|base64, buffered. With stdin=true the body is the process's stdin."""
    params = list(request.query_params.multi_items())
    query = request.query_params
    stdin = request.stream() if query.get("stdin", "").lower() in TRUE else None
    resp = await m.open_exec(hostname, params, stdin)
    if query.get("buffered", "").lower() in TRUE:
        body = await resp.aread()
        await resp.aclose()
        return Response(body, media_type="application/json")

    async def relay():
        # Passed through as the agent writes it: one JSON object per line, flushed as it comes.
        # Closing the agent's response (also when our client goes away) kills the process.
        try:
            async for chunk in resp.aiter_raw():
                yield chunk
        finally:
            await resp.aclose()

    return StreamingResponse(relay(), media_type="application/x-ndjson")
