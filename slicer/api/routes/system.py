"""Daemon-level routes: version and liveness."""

from __future__ import annotations

import asyncio
import dataclasses
import platform

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from slicer.api.answers import answers
from slicer.api.deps import require_auth
from slicer.api.schema import Info, Liveness

public = APIRouter()
router = APIRouter(dependencies=[Depends(require_auth)])


@public.get("/healthz", **answers(Liveness))
@public.head("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


@router.post("/daemon/shutdown", status_code=202, responses={202: {"model": Liveness}})
async def shutdown_daemon(request: Request) -> JSONResponse:
    """Stop the daemon as SIGTERM does (sandboxes deleted, services shut down gracefully);
    answers 202 at once, before the VMs are stopped (the Go SDK's ``ShutdownDaemon``)."""
    stop = getattr(request.app.state, "shutdown", None)
    if stop is None:
        return JSONResponse({"error": "this server cannot be stopped through the API", "code": "unsupported"}, 409)
    asyncio.get_running_loop().call_later(0.2, stop)  # after this answer is on its way
    return JSONResponse({"status": "shutting down"}, 202)


@router.get("/info", **answers(Info))
async def info(request: Request) -> dict:
    m = request.app.state.manager
    return {
        "version": request.app.version,
        "git_commit": request.app.state.git_commit,
        "platform": platform.system().lower(),
        "arch": GO_ARCH.get(platform.machine(), platform.machine()),  # Go's names, as Slicer's daemon says
        "hypervisor": m.driver.name,  # what runs the VMs
        "hypervisor_requested": m.config.hypervisor,  # what the config asked for
        "accelerator": m.driver.accelerator,
        "image": m.images.base.build_id,
        "kernel": m.images.kernel.label if m.images.kernel else "project",  # kernel_file / kernel_image
        # per host group, the OCI image its VMs boot (absent: the project's), or why it cannot
        "group_images": {**{g: c["ref"] for g, c in m.images.groups.items()},
                         **{g: {"error": e} for g, e in m.images.errors.items()}},
        "network": m.net.describe(),  # per host group: backend (bridge/isolated/passt) and addresses
        "confinement": m.driver.confinement(),  # VMMs' uids, seccomp filter, cgroups
        "warm_pools": {g: dataclasses.asdict(s) for g, s in m.pool.stats().items()},
    }
