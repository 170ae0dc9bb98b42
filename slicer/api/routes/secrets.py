"""Secrets: metadata out, base64 data in; every change is pushed to the VMs at once."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from slicer.api.answers import answers
from slicer.api.deps import manager, require_auth
from slicer.api.models import INTEGER, STRING, json_body, read_json_object
from slicer.api.schema import Secret
from slicer.core.manager import Manager
from slicer.core.secrets import check_name

router = APIRouter(prefix="/secrets", dependencies=[Depends(require_auth)])
Mgr = Annotated[Manager, Depends(manager)]


@router.get("", **answers(list[Secret]))
async def list_secrets(m: Mgr) -> list[dict]:
    """Name, size, permissions, uid, gid and mod_time of each secret; never the data."""
    return m.secrets.list()


SECRET = {"type": "object", "additionalProperties": False, "properties": {
    "name": STRING, "data": {"type": "string", "format": "byte"}, "permissions": STRING, "uid": INTEGER,
    "gid": INTEGER}}


@router.post("", status_code=201, openapi_extra=json_body({**SECRET, "required": ["name", "data"]}, required=True),
             **answers(Secret))
async def create_secret(m: Mgr, request: Request) -> dict:
    """Body: ``{"name", "data" (base64), "permissions" ("0600"), "uid", "gid"}``."""
    meta = m.secrets.create(await read_json_object(request))
    m.secrets_changed()
    return meta


@router.patch("/{name}", openapi_extra=json_body(SECRET, required=True), **answers(Secret))
async def update_secret(m: Mgr, name: str, request: Request) -> dict:
    meta = m.secrets.update(check_name(name), await read_json_object(request))
    m.secrets_changed()
    return meta


@router.delete("/{name}")
async def delete_secret(m: Mgr, name: str) -> Response:
    m.secrets.delete(check_name(name))
    m.secrets_changed()
    return Response(status_code=200)
