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


GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


@router.get("/info")
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
        "image": m.image.build_id,
        "network": m.net.describe(),  # per host group: backend (bridge/isolated/passt) and addresses
        "confinement": m.driver.confinement(),  # VMMs' uids, seccomp filter, cgroups
    }
