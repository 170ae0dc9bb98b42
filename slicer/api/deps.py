"""Dependencies shared by the routes: the manager and the bearer-token check.

The dependencies are ``async`` though they never wait: FastAPI runs a plain ``def`` dependency in
its thread pool, two thread hops on every request for what takes microseconds. Code that is not a
dependency (a WebSocket route) calls the plain functions, :func:`manager_of` and :func:`check_auth`:
an ``async`` check called without ``await`` would check nothing."""

from __future__ import annotations

import hmac

from starlette.requests import HTTPConnection

from slicer.core.errors import Unauthorized
from slicer.core.manager import Manager


def manager_of(request: HTTPConnection) -> Manager:
    return request.app.state.manager


async def manager(request: HTTPConnection) -> Manager:
    return manager_of(request)


async def require_auth(request: HTTPConnection) -> None:
    check_auth(request)


def check_auth(request: HTTPConnection) -> None:
    token: str | None = request.app.state.token
    if token is None:
        return
    if token_matches(request.headers.get("authorization", ""), token):
        return
    if request.app.state.sessions.authenticates(request):  # the web console's own calls (slicer.api.sessions)
        return
    raise Unauthorized("missing or invalid bearer token (Authorization: Bearer <token>)")


def token_matches(header: str, token: str) -> bool:
    scheme, _, value = header.partition(" ")
    # compare_digest: the time taken must not reveal how much of the token matched
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())
