"""The agent's status endpoints: ``health`` and ``stats``."""

from __future__ import annotations

import asyncio
import socket
import time

from aiohttp import web

from slicer.agent import AGENT_VERSION, meter, provision
from slicer.agent.http_util import Context, Handlers


def _system_uptime() -> int:
    with open("/proc/uptime") as f:
        return int(float(f.read().split()[0]))


def handlers(ctx: Context) -> Handlers:
    async def health(request: web.Request) -> web.Response:
        # aiohttp answers HEAD for GET routes with the same status and no body.
        ran, code = provision.userdata_status()
        return web.json_response({
            "hostname": socket.gethostname(),
            "agent_uptime": int(time.monotonic() - ctx.started),
            "agent_version": AGENT_VERSION,
            "system_uptime": _system_uptime(),
            "userdata_ran": ran,
            "userdata_exit_code": code,
            "bulk": ctx.bulk is not None,
        })

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(meter.snapshot))

    return {"health": health, "stats": stats}
