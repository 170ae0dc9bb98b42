"""Files in the VM: ``cp`` (binary or tar, streamed both ways) and ``fs/*``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict

from slicer.api.answers import passes_on
from slicer.api.deps import manager, require_auth
from slicer.api.models import ABSOLUTE, BOOLEAN, INTEGER, STRING, STRINGS, json_body, parse_body, query_doc
from slicer.api.schema import Copied, FsChanged, FsEntry
from slicer.api.streaming import relay
from slicer.core.errors import BadRequest
from slicer.core.manager import Manager

router = APIRouter(prefix="/vm/{hostname}", dependencies=[Depends(require_auth)])
Mgr = Annotated[Manager, Depends(manager)]
TAR = "application/x-tar"
# What a download says about itself (cp-v1: the source's type and name), passed on from the agent.
PASSED_HEADERS = ("content-length", "x-slicer-file-mode", "x-slicer-source-type", "x-slicer-source-name",
                  "x-slicer-source-name-base64")
CP_MODES = ["binary", "tar", "cp-v1-binary", "cp-v1-tar", "cp-v1-recursive"]


def _mode(request: Request, header: str) -> str:
    """``mode`` if given; otherwise tar when the Content-Type/Accept header says tar."""
    mode = request.query_params.get("mode")
    if mode:
        return mode
    return "tar" if TAR in request.headers.get(header, "") else "binary"


def _params(request: Request, mode: str) -> list[tuple[str, str]]:
    return [(k, v) for k, v in request.query_params.multi_items() if k != "mode"] + [("mode", mode)]


CP_QUERY = query_doc(required=("path",), path=ABSOLUTE, mode={"enum": CP_MODES}, uid=INTEGER,
                     gid=INTEGER, permissions=STRING, copy_semantics={"enum": ["cp-v1"]}, source_name=STRING,
                     source_type={"enum": ["file", "directory"]}, copy_contents=BOOLEAN, exclude=STRINGS)


@router.post("/cp", openapi_extra={**CP_QUERY, "requestBody": {"required": False, "content": {
    "application/octet-stream": {"schema": {}}, TAR: {"schema": {}}}}}, **passes_on(Copied))
async def copy_to_vm(m: Mgr, hostname: str, request: Request) -> dict:
    """Body: the file (``application/octet-stream``) or a tar (``application/x-tar``).
    Query: path (required), mode=binary|tar, uid, gid, permissions (octal)."""
    params = _params(request, _mode(request, "content-type"))
    return await (await m.agent(hostname)).cp_in(params, request.stream())


@router.get("/cp", openapi_extra=CP_QUERY)
async def copy_from_vm(m: Mgr, hostname: str, request: Request) -> StreamingResponse:
    """Query: path (required), mode=binary|tar (or ``Accept: application/x-tar``)."""
    resp = await (await m.agent(hostname)).cp_out(_params(request, _mode(request, "accept")))
    headers = {k: v for k, v in resp.headers.items() if k.lower() in PASSED_HEADERS}
    return StreamingResponse(relay(resp, request), media_type=resp.headers.get("content-type"), headers=headers)


class MkdirRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    path: str
    recursive: bool = False
    mode: str | None = None
    uid: int | None = None


def _uid(uid: int | None) -> int | None:
    """``uid``: the guest user whose rights the agent works with (root's rule for paths without one)."""
    if uid is not None and not 0 <= uid < 2**32:
        raise BadRequest("uid out of range", "invalid_request")
    return uid


@router.get("/fs/readdir", **passes_on(list[FsEntry]))
async def readdir(m: Mgr, hostname: str, path: str, uid: int | None = None) -> list:
    return await (await m.agent(hostname)).readdir(path, _uid(uid))


@router.get("/fs/stat", **passes_on(FsEntry))
async def stat(m: Mgr, hostname: str, path: str, uid: int | None = None) -> dict:
    return await (await m.agent(hostname)).stat(path, _uid(uid))


@router.post("/fs/mkdir", openapi_extra=json_body(MkdirRequest, required=True), **passes_on(FsChanged))
async def mkdir(m: Mgr, hostname: str, request: Request) -> dict:
    body = await parse_body(request, MkdirRequest)
    return await (await m.agent(hostname)).mkdir(body.path, body.recursive, body.mode, body.uid)


@router.delete("/fs/remove", **passes_on(FsChanged))
async def remove(m: Mgr, hostname: str, path: str, recursive: bool = False, uid: int | None = None) -> dict:
    return await (await m.agent(hostname)).remove(path, recursive, _uid(uid))


@router.get("/fs/watch", openapi_extra=query_doc(
    paths=STRINGS, patterns=STRINGS, events=STRINGS, recursive=BOOLEAN, one_shot=BOOLEAN, debounce=STRING,
    timeout=STRING, max_events=INTEGER))
async def watch(m: Mgr, hostname: str, request: Request) -> StreamingResponse:
    """Server-Sent Events of filesystem changes. Query: paths (repeat), patterns, events
    (create, write, remove, rename, chmod, all), recursive, one_shot, debounce, timeout, max_events."""
    last_id = request.headers.get("last-event-id")
    if last_id is not None and not (last_id.isdigit() and int(last_id) < 2**64):
        raise BadRequest("Last-Event-ID must be an unsigned 64-bit integer", "invalid_request")
    resp = await (await m.agent(hostname)).watch(list(request.query_params.multi_items()))
    return StreamingResponse(relay(resp, request), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})
