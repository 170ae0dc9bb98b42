"""Dependencies shared by the routes: the manager and the bearer-token check."""

from __future__ import annotations

import hmac

from starlette.requests import HTTPConnection

from slicer.core.errors import Unauthorized
from slicer.core.manager import Manager


def manager(request: HTTPConnection) -> Manager:
    return request.app.state.manager


def require_auth(request: HTTPConnection) -> None:
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
