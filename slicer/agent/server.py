"""The agent's HTTP API (aiohttp), served on a root-only unix socket inside the guest.

The routes are the endpoints of ``slicer.agent.protocol``; each area's module (``http_*``) gives
the handlers of its endpoints by name. A name without a handler, or a handler without an
endpoint, stops the agent at startup: the two ends never disagree silently.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

from aiohttp import web

from slicer.agent import (
    AGENT_SOCKET,
    http_exec,
    http_files,
    http_fs,
    http_provision,
    http_shell,
    http_status,
    protocol,
)
from slicer.agent.bulk import BulkPort
from slicer.agent.http_util import Context, Handlers

AREAS: tuple[Callable[[Context], Handlers], ...] = (
    http_status.handlers, http_exec.handlers, http_files.handlers, http_fs.handlers, http_shell.handlers,
    http_provision.handlers,
)


class ProtocolMismatch(RuntimeError):
    """The handlers do not match the protocol's endpoints one to one."""


def collect(ctx: Context, areas=AREAS) -> Handlers:
    """Every area's handlers by endpoint name; a name given twice is an error."""
    handlers: Handlers = {}
    for area in areas:
        for name, handler in area(ctx).items():
            if name in handlers:
                raise ProtocolMismatch(f"two handlers for the endpoint {name!r}")
            handlers[name] = handler
    return handlers


def check(handlers: Handlers, endpoints: dict[str, protocol.Endpoint] = protocol.ENDPOINTS) -> None:
    missing, unknown = set(endpoints) - set(handlers), set(handlers) - set(endpoints)
    if missing or unknown:
        raise ProtocolMismatch(f"endpoints without a handler: {sorted(missing)}; "
                               f"handlers without an endpoint: {sorted(unknown)}")


def make_app(started: float, areas=AREAS, bulk: BulkPort | None = None) -> web.Application:
    handlers = collect(Context(started, bulk=bulk), areas)
    check(handlers)
    app = web.Application(client_max_size=1 << 20)
    for name, endpoint in protocol.ENDPOINTS.items():
        if endpoint.method == "GET":  # with HEAD, answered like GET without a body
            app.router.add_get(endpoint.path, handlers[name])
        else:
            app.router.add_route(endpoint.method, endpoint.path, handlers[name])
    return app


async def serve(path: str, started: float) -> web.AppRunner:
    # The copies' port, where the VM has one (a VM of an older layout has not: copies then go
    # through the channel).
    runner = web.AppRunner(make_app(started, bulk=BulkPort.open()), access_log=None)
    await runner.setup()
    if os.path.exists(path):
        os.unlink(path)
    old = os.umask(0o177)  # the socket is born 0600: only root in the guest can reach the agent
    try:
        await web.UnixSite(runner, path).start()
    finally:
        os.umask(old)
    return runner


async def main() -> None:
    started = float(os.environ.get("SLICER_AGENT_STARTED") or time.monotonic())
    await serve(AGENT_SOCKET, started)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
