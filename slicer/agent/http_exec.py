"""The agent's exec endpoints: run a command (streamed, buffered or in the background) and
the background execs' status, logs, kill, wait and reap (slicer.agent.background)."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

from aiohttp import web

from slicer.agent import background
from slicer.agent.execute import (
    ExecError,
    ExecRequest,
    kill_group,
    run_buffered,
    spawn,
    stream_frames,
    wants_base64,
)
from slicer.agent.http_util import Context, Handler, Handlers, error, flag, once, stream, until_disconnect

STREAM_CHUNK = 65536
NDJSON = {"Content-Type": "application/x-ndjson"}

EntryHandler = Callable[[web.Request, background.Entry], Awaitable[web.StreamResponse]]


async def _execute(registry: background.Registry, request: web.Request) -> web.StreamResponse:
    """Run one command: streamed (NDJSON frames), buffered (one JSON answer) or in the background."""
    try:
        req = ExecRequest.from_query(request.query)
        ring = registry.check_budget(req.ring_bytes) if req.background else 0
        proc = await spawn(req)
    except ExecError as e:
        return error(str(e), e.code, e.status)
    if req.background:
        entry = registry.start(req, proc, ring)
        return web.json_response({"exec_id": entry.exec_id, "pid": proc.pid, "started_at": entry.started_at,
                                  "ring_bytes": ring}, status=201)
    stdin = request.content.iter_chunked(STREAM_CHUNK) if req.stdin else None
    if req.buffered:
        # Nothing is written until the end, so the client's leaving shows only on the transport.
        async with contextlib.aclosing(until_disconnect(request, once(run_buffered(req, proc, stdin)))) as done:
            async for result in done:
                return web.json_response(result)
        kill_group(proc)  # the client left first
        return web.Response(status=499)
    # Leaving early (client gone) closes the frames, which kills the process group.
    return await stream(request, stream_frames(req, proc, stdin), NDJSON)


def handlers(ctx: Context) -> Handlers:
    registry = ctx.registry

    def of_entry(fn: EntryHandler) -> Handler:
        """``fn`` called with the background exec the path names; its errors as JSON."""
        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                return await fn(request, registry.get(request.match_info["exec_id"]))
            except ExecError as e:
                return error(str(e), e.code, e.status)
            except ValueError as e:
                return error(f"bad request: {e}", "invalid_request", 400)
        return handler

    async def execute(request: web.Request) -> web.StreamResponse:
        return await _execute(registry, request)

    async def list_execs(request: web.Request) -> web.Response:
        return web.json_response([e.info() for e in registry.entries.values()])

    async def status(request: web.Request, entry: background.Entry) -> web.Response:
        return web.json_response(entry.info())

    async def reap(request: web.Request, entry: background.Entry) -> web.Response:
        return web.json_response(registry.reap(entry))

    async def logs(request: web.Request, entry: background.Entry) -> web.StreamResponse:
        from_id = int(request.query.get("from_id") or 0)
        frames = registry.frames(entry, from_id, flag(request, "follow"), wants_base64(request.query))
        return await stream(request, frames, NDJSON)

    async def kill(request: web.Request, entry: background.Entry) -> web.Response:
        body = await request.json() if request.can_read_body else {}
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        return web.json_response(await registry.kill(entry, str(body.get("signal") or "TERM"),
                                                     int(body.get("grace_ms") or 5000)))

    async def wait_exit(request: web.Request, entry: background.Entry) -> web.Response:
        timeout = min(max(float(request.query.get("timeout") or 30), 0), 600)
        return web.json_response(await registry.wait_exit(entry, timeout))

    return {
        "exec": execute, "list_execs": list_execs, "exec_status": of_entry(status), "reap_exec": of_entry(reap),
        "exec_logs": of_entry(logs), "kill_exec": of_entry(kill), "wait_exit": of_entry(wait_exit),
    }
