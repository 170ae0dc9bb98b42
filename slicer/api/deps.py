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
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    # compare_digest: the time taken must not reveal how much of the token matched
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise Unauthorized("missing or invalid bearer token (Authorization: Bearer <token>)")
