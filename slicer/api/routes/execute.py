"""``POST /vm/{hostname}/exec``: run a command in the VM, output streamed as NDJSON."""

from __future__ import annotations

import contextlib
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from slicer.api.answers import passes_on
from slicer.api.deps import manager, require_auth
from slicer.api.models import (
    ABSOLUTE,
    BOOLEAN,
    ENV,
    INTEGER,
    NONEMPTY,
    STRING,
    STRINGS,
    json_body,
    parse_body,
    query_doc,
)
from slicer.api.schema import BackgroundExec, BackgroundExit, BackgroundKilled, BackgroundReaped, ExecFrame, ExecResult
from slicer.api.streaming import (
    BodyThenDisconnect,
    ClientGone,
    DuplexStreamingResponse,
    relay,
    unless_client_leaves,
)
from slicer.core.errors import TooLarge
from slicer.core.manager import Manager

BUFFERED_MAX = 16 << 20  # a buffered answer is held whole: a guest may not make it unbounded
router = APIRouter(dependencies=[Depends(require_auth)])
Mgr = Annotated[Manager, Depends(manager)]
TRUE = ("1", "true", "yes", "on")
STDIO = {"type": "string", "enum": ["text", "base64"]}
# Streamed frames (NDJSON), the whole output (buffered=true), or a background exec (201).
EXEC_ANSWERS: dict = {
    200: {"content": {"application/x-ndjson": {"schema": ExecFrame.model_json_schema()}},
          "model": ExecResult, "description": "NDJSON frames as they come, or with buffered=true the whole output"},
    201: {"model": BackgroundExec, "description": "with background=true: the exec started"},
}


class KillRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    signal: str = Field(default="TERM", pattern=r"^(SIG)?(TERM|KILL|INT|HUP|QUIT|USR1|USR2)$")
    grace_ms: int = Field(default=5000, ge=0, le=600_000)


@router.post("/vm/{hostname}/exec", openapi_extra={
    **query_doc(required=("cmd",), cmd=NONEMPTY, args=STRINGS, env=ENV, uid=INTEGER, gid=INTEGER, cwd=ABSOLUTE,
                shell=STRING, stdin=BOOLEAN, stdout=BOOLEAN, stderr=BOOLEAN, stdio=STDIO,
                buffered=BOOLEAN, background=BOOLEAN, ring_bytes=INTEGER),
    "requestBody": {"required": False, "content": {"application/octet-stream": {"schema": {}}}}},
    responses=EXEC_ANSWERS)
async def execute(m: Mgr, hostname: str, request: Request) -> Response:
    """Query: cmd, args (repeated), env (repeated KEY=VALUE), uid, gid, cwd, shell, stdin,
    stdout, stderr, stdio=text|base64, buffered. With stdin=true the body is the process's stdin."""
    params = list(request.query_params.multi_items())
    query = request.query_params
    body = BodyThenDisconnect(request) if query.get("stdin", "").lower() in TRUE else None
    stdin = body.chunks() if body is not None else None
    opening = m.open_exec(hostname, params, stdin)
    try:  # a buffered answer's headers come only at the end: a client that leaves first cancels it
        resp = await (opening if stdin else unless_client_leaves(request, opening))
    except ClientGone:
        return Response(status_code=499)
    if query.get("buffered", "").lower() in TRUE or query.get("background", "").lower() in TRUE:
        # Read through relay(): a client that leaves cancels the command like a streamed one.
        body = bytearray()
        async with contextlib.aclosing(relay(resp, None if stdin else request)) as chunks:
            async for chunk in chunks:
                body += chunk
                if len(body) > BUFFERED_MAX:  # closing the agent's stream ends the process
                    raise TooLarge(f"buffered output over {BUFFERED_MAX >> 20} MiB; stream it (buffered=false)")
        background = query.get("background", "").lower() in TRUE
        # The status is ours, not the guest's (a guest's 204 with a body would break the answer).
        return Response(bytes(body), status_code=201 if background else 200, media_type="application/json")
    # Passed through as the agent writes it: one JSON object per line, flushed as it comes.
    # Closing the agent's response (also when our client goes away) kills the process.
    if body is not None:
        return DuplexStreamingResponse(relay(resp, None), body, media_type="application/x-ndjson")
    return StreamingResponse(relay(resp, request), media_type="application/x-ndjson")


ExecId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


@router.get("/vm/{hostname}/exec", **passes_on(list[BackgroundExec]))
async def list_background(m: Mgr, hostname: str) -> list:
    """Background execs the agent tracks (running and exited, until reaped)."""
    return await (await m.agent(hostname)).list_execs()


@router.get("/vm/{hostname}/exec/{exec_id}", **passes_on(BackgroundExec))
async def background_info(m: Mgr, hostname: str, exec_id: ExecId) -> dict:
    return await (await m.agent(hostname)).exec_status(exec_id)


@router.delete("/vm/{hostname}/exec/{exec_id}", **passes_on(BackgroundReaped))
async def background_reap(m: Mgr, hostname: str, exec_id: ExecId) -> dict:
    """Free the ring and forget the exec (later calls: 410). Does not kill it."""
    return await (await m.agent(hostname)).reap_exec(exec_id)


@router.get("/vm/{hostname}/exec/{exec_id}/logs",
            openapi_extra=query_doc(follow=BOOLEAN, from_id=INTEGER, stdio=STDIO))
async def background_logs(m: Mgr, hostname: str, exec_id: ExecId, request: Request) -> StreamingResponse:
    """Replay the ring (``from_id``), and with ``follow=true`` stream until the process exits."""
    params = [(k, v) for k, v in request.query_params.multi_items() if k in ("follow", "from_id", "stdio")]
    resp = await (await m.agent(hostname)).exec_logs(exec_id, params)
    return StreamingResponse(relay(resp, request), media_type="application/x-ndjson")


@router.post("/vm/{hostname}/exec/{exec_id}/kill", openapi_extra=json_body(KillRequest), **passes_on(BackgroundKilled))
async def background_kill(m: Mgr, hostname: str, exec_id: ExecId, request: Request) -> dict:
    """Body (optional): ``{"signal": "TERM", "grace_ms": 5000}``; TERM escalates to KILL."""
    body = await parse_body(request, KillRequest)
    return await (await m.agent(hostname)).kill_exec(exec_id, body.signal, body.grace_ms)


@router.get("/vm/{hostname}/exec/{exec_id}/wait-exit", **passes_on(BackgroundExit))
async def background_wait(m: Mgr, hostname: str, exec_id: ExecId,
                          timeout: Annotated[int, Query(ge=0, le=600)] = 30) -> dict:
    return await (await m.agent(hostname)).wait_exit(exec_id, timeout)
