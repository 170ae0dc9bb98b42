"""The agent's HTTP API (aiohttp), served on a root-only unix socket inside the guest."""

from __future__ import annotations

import os
import signal
import socket
import time

from aiohttp import web

from slicer.agent import AGENT_VERSION, USERDATA_SENTINEL


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
            return web.json_response({"error": f"unknown action {action!r}", "code": "bad_request"}, status=400)
        # PID 1 (slicer-init) does the orderly part: SIGUSR2 powers off, SIGTERM reboots.
        os.kill(1, signal.SIGUSR2 if action == "shutdown" else signal.SIGTERM)
        return web.json_response({"message": f"{action} started"})

    app = web.Application()
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
