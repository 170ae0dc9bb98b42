"""``/proxy/v1``: Slicer Proxy's clients, secrets and allow rules (slicer.proxy.store), and the
proxies' audit lines. The proxies themselves (``slicer proxy up``) read the same state file, so a
change here applies to their next connection."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from slicer.api.answers import answers
from slicer.api.deps import require_auth
from slicer.api.models import BOOLEAN, INTEGER, STRING, STRINGS, json_body, read_json_object
from slicer.api.schema import ProxyAllowRule, ProxyAuditEntry, ProxyClient, ProxyClientToken, ProxySecret
from slicer.core.error_codes import ErrorCode
from slicer.core.errors import BadRequest
from slicer.proxy.audit import read_audit
from slicer.proxy.store import ProxyStore

router = APIRouter(prefix="/proxy/v1", dependencies=[Depends(require_auth)])


async def store(request: Request) -> ProxyStore:  # async: not run in the thread pool
    return request.app.state.proxy


Store = Annotated[ProxyStore, Depends(store)]
NO_CONTENT = Response(status_code=204)
RULE = {"host": STRING, "secret": STRING, "methods": STRINGS, "paths": STRINGS,
        "ports": {"type": "array", "items": INTEGER}, "passthrough": BOOLEAN}


@router.get("/clients", **answers(list[ProxyClient]))
async def list_clients(s: Store) -> list[dict]:
    return s.list_clients()


@router.post("/clients", status_code=201, **answers(ProxyClientToken), openapi_extra=json_body(
    {"type": "object", "required": ["name"], "properties": {"name": STRING, "token": STRING}}, required=True))
async def create_client(s: Store, request: Request) -> dict:
    """A client of the proxy: the guest sends its token as the proxy password. Without ``token``
    one is made (``spt_…``); either way it is shown only in this answer."""
    return s.create_client(await read_json_object(request))


@router.get("/clients/{name}", **answers(list[ProxyAllowRule]))
async def client_rules(s: Store, name: str) -> list[dict]:
    """The client's allow rules, in the order they are tried."""
    return s.rules(name)


@router.delete("/clients/{name}", status_code=204)
async def delete_client(s: Store, name: str) -> Response:
    s.delete_client(name)
    return NO_CONTENT


@router.get("/secrets", **answers(list[ProxySecret]))
async def list_secrets(s: Store) -> list[dict]:
    return s.list_secrets()


@router.post("/secrets", status_code=201, **answers(ProxySecret), openapi_extra=json_body(
    {"type": "object", "required": ["name", "host", "value"], "properties": {
        "name": STRING, "host": STRING, "type": STRING, "value": STRING, "source_file": STRING, "force": BOOLEAN}},
    required=True))
async def create_secret(s: Store, request: Request) -> dict:
    """A credential the proxy injects (``bearer`` or ``basic``); its value is never returned."""
    return s.create_secret(await read_json_object(request))


@router.delete("/secrets/{name}", status_code=204)
async def delete_secret(s: Store, name: str) -> Response:
    s.delete_secret(name)
    return NO_CONTENT


@router.post("/allows", status_code=201, **answers(ProxyAllowRule), openapi_extra=json_body(
    {"type": "object", "required": ["client", "host"],
     "properties": {"client": STRING, **RULE, "ttl_seconds": INTEGER}}, required=True))
async def add_allow(s: Store, request: Request) -> dict:
    """Append a rule to a client's list (first match wins); ``ttl_seconds`` gives it an ``expires``."""
    return s.add_allow(await read_json_object(request))


@router.post("/allows/revoke", status_code=204, openapi_extra=json_body(
    {"type": "object", "required": ["client", "host"], "properties": {"client": STRING, **RULE}}, required=True))
async def revoke(s: Store, request: Request) -> Response:
    """Remove the one rule with this host, methods, paths, ports and passthrough."""
    s.revoke(await read_json_object(request))
    return NO_CONTENT


@router.delete("/allows/{client}/{host}", status_code=204)
async def remove_host(s: Store, client: str, host: str) -> Response:
    """Remove every rule of the client for the host (``*`` may arrive escaped as ``%2A``)."""
    s.remove_host(client, host)
    return NO_CONTENT


@router.get("/audit", **answers(list[ProxyAuditEntry]))
async def audit(request: Request, client: str | None = None, since: str | None = None,
                limit: int = Query(100, ge=1, le=10000)) -> list[dict]:
    """The proxies' decisions, oldest first: the newest ``limit``, of one ``client``, after ``since``
    (RFC 3339)."""
    when = None
    if since:
        try:
            when = datetime.fromisoformat(since.replace("Z", "+00:00")).timestamp()
        except ValueError:
            raise BadRequest("since must be an RFC 3339 time, like 2026-01-02T15:04:05Z",
                             ErrorCode.INVALID_REQUEST) from None
    return read_audit(request.app.state.manager.data_dir, client, when, limit)
