"""The agent's HTTP API (aiohttp), served on a root-only unix socket inside the guest."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time

from aiohttp import web

from slicer.agent import AGENT_VERSION, USERDATA_SENTINEL
from slicer.agent.execute import ExecError, ExecRequest, run_buffered, spawn, stream_frames

STREAM_CHUNK = 65536


def error(message: str, code: str, status: int) -> web.Response:
    return web.json_response({"error": message, "code": code}, status=status)


def _system_uptime() -> int:
    with open("/proc/uptime") as f:
        return int(float(f.read().split()[0]))


def make_app(started: float) -> web.Application:
    routes = web.RouteTableDef()

    @routes.get("/health")
    async def health(request: web.Request) -> web.Response:
        # aiohttp answers HEAD for GET routes with the same status and no body.
        return web.json_response(
            {
                "hostname": socket.gethostname(),
                "agent_uptime": int(time.monotonic() - started),
                "agent_version": AGENT_VERSION,
                "system_uptime": _system_uptime(),
                "userdata_ran": os.path.exists(USERDATA_SENTINEL),
            }
        )

    @routes.post("/power")
    async def power(request: web.Request) -> web.Response:
        action = request.query.get("action", "shutdown")
        if action not in ("shutdown", "reboot"):
            return error(f"unknown action {action!r}", "bad_request", 400)
        # PID 1 (slicer-init) does the orderly part: SIGUSR2 powers off, SIGTERM reboots.
        os.kill(1, signal.SIGUSR2 if action == "shutdown" else signal.SIGTERM)
        return web.json_response({"message": f"{action} started"})

    @routes.post("/exec")
    async def execute(request: web.Request) -> web.StreamResponse:
        try:
            req = ExecRequest.from_query(request.query)
            proc = await spawn(req)
        except ExecError as e:
            return error(str(e), e.code, e.status)
        stdin = request.content.iter_chunked(STREAM_CHUNK) if req.stdin else None
        if req.buffered:
            return web.json_response(await run_buffered(req, proc, stdin))
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        # aclosing: if the client goes away the handler is cancelled and the process killed
        async with contextlib.aclosing(stream_frames(req, proc, stdin)) as frames:
            async for line in frames:
                await resp.write(line)
        await resp.write_eof()
        return resp

    app = web.Application(client_max_size=1 << 20)
    app.add_routes(routes)
    return app


async def serve(path: str, started: float) -> web.AppRunner:
    runner = web.AppRunner(make_app(started), access_log=None)
    await runner.setup()
    if os.path.exists(path):
        os.unlink(path)
    old = os.umask(0o177)  # the socket is born 0600: only root in the guest can reach the agent
    try:
        await web.UnixSite(runner, path).start()
    finally:
        os.umask(old)
    return runner
