"""The FastAPI application: routes are thin; the manager does the work."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from slicer import __version__
from slicer.api import errors
from slicer.api.guard import HostRule, RequestGuard
from slicer.api.routes import (
    commits,
    console,
    execute,
    files,
    nodes,
    proxy,
    secrets,
    stats,
    storage,
    system,
    tunnels,
    vm,
)
from slicer.api.sessions import Sessions
from slicer.api.telemetry import MetricsMiddleware
from slicer.core.errors import SlicerError
from slicer.core.manager import Manager
from slicer.proxy.store import ProxyStore


def create_app(manager: Manager, token: str | None, git_commit: str = "unknown") -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await manager.start()
        except SlicerError as e:
            app.state.startup_error = e  # the daemon exits with this message, not a traceback
            raise
        try:
            yield
        finally:
            await manager.stop()

    # /docs is console.docs (Swagger UI from this package, not a CDN); ReDoc would need one
    app = FastAPI(title="Slicer API", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.manager = manager
    app.state.token = token
    app.state.git_commit = git_commit
    app.state.proxy = ProxyStore(manager.data_dir)
    app.state.sessions = Sessions()  # the web console's (slicer.api.sessions)
    errors.install(app)
    app.include_router(system.public)
    app.include_router(console.router)
    app.mount("/ui/static", StaticFiles(directory=console.STATIC, check_dir=False), name="console-static")
    app.include_router(system.router)
    app.include_router(commits.router)  # before nodes: /vm/commits is no VM's name
    app.include_router(nodes.router)
    app.include_router(vm.router)
    app.include_router(execute.router)
    app.include_router(tunnels.router)
    app.include_router(files.router)
    app.include_router(stats.router)
    app.include_router(secrets.router)
    app.include_router(storage.router)
    app.include_router(proxy.router)
    app.add_middleware(MetricsMiddleware)
    api = manager.config.api
    hosts = HostRule(api.bind_address, api.allowed_hosts, unix_socket=api.unix_socket is not None)
    app.add_middleware(RequestGuard, hosts=hosts)  # outermost: a refused request reaches nothing
    return app
