"""Daemon-level routes: version and liveness."""

from __future__ import annotations

import platform

from fastapi import APIRouter, Depends, Request

from slicer.api.deps import require_auth

public = APIRouter()
router = APIRouter(dependencies=[Depends(require_auth)])


@public.get("/healthz")
@public.head("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/info")
async def info(request: Request) -> dict:
    m = request.app.state.manager
    return {
        "version": request.app.version,
        "git_commit": request.app.state.git_commit,
        "platform": platform.system().lower(),
        "arch": platform.machine(),
        "hypervisor": m.driver.name,
        "accelerator": m.driver.accelerator,
        "image": m.image.build_id,
        "network": m.net.describe(),  # per host group: backend (bridge/isolated/passt) and addresses
        "confinement": m.driver.confinement(),  # VMMs' uids, seccomp filter, cgroups
    }
