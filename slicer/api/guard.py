"""Checks every request passes before any route sees it.

- Browsers may not drive the API: a state-changing request or a WebSocket upgrade that carries
  an ``Origin`` other than the API's own is refused (a web page can send those without asking,
  and would otherwise reach the VMs through a daemon on the user's loopback).
- No NUL in the path or query: no path, argument or name in a VM can hold one, and C code in
  the guest would cut the string short there."""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from slicer.api.errors import error_response

SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def _same_origin(origin: str, host: str) -> bool:
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and bool(host) and parts.netloc.lower() == host.lower()


def _has_nul(scope: Scope) -> bool:
    raw = scope.get("raw_path") or scope.get("path", "").encode()
    query = scope.get("query_string", b"")
    return any(b"\0" in part or b"%00" in part.lower() for part in (raw, query))


class RequestGuard:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http" and _has_nul(scope):
            await error_response(400, "NUL bytes are not allowed in the path or query", "invalid_request")(
                scope, receive, send)
            return
        if kind in ("http", "websocket"):
            headers = Headers(scope=scope)
            origin = headers.get("origin")
            risky = kind == "websocket" or scope["method"] not in SAFE_METHODS
            if origin is not None and risky and not _same_origin(origin, headers.get("host", "")):
                message = f"cross-origin request refused: Origin {origin[:100]!r} is not this API"
                if kind == "websocket":  # closing before accepting makes the server answer 403
                    await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
                    return
                await error_response(403, message, "cross_origin")(scope, receive, send)
                return
        await self.app(scope, receive, send)
