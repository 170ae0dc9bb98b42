"""Where the host's disk goes (templates, disks, saved states), and building templates."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from slicer.api.answers import answers
from slicer.api.deps import manager, require_auth
from slicer.api.schema import Storage, TemplateUsage
from slicer.core.manager import Manager

router = APIRouter(dependencies=[Depends(require_auth)])
Mgr = Annotated[Manager, Depends(manager)]


@router.get("/storage", **answers(Storage))
async def storage(m: Mgr) -> dict:
    return m.snapshots.storage()


@router.post("/hostgroup/{name}/template", **answers(TemplateUsage))
async def build_template(m: Mgr, name: str) -> dict:
    """Build the group's template now (if it has no current one); returns it."""
    return await m.snapshots.build_template(name)
