"""Checks every request passes before any route sees it.

- Browsers may not drive the API: a state-changing request or a WebSocket upgrade that carries
  an ``Origin`` other than the API's own is refused (a web page can send those without asking,
  and would otherwise reach the VMs through a daemon on the user's loopback).
- Only the Host values this API expects (DNS rebinding): a page on ``evil.example`` whose name
  is rebound to 127.0.0.1 sends ``Host: evil.example``; IP literals (no name to rebind),
  ``localhost``, the bind address and ``api.allowed_hosts`` are served, anything else is 403.
  Over a unix socket there is no browser, and no check.
- No NUL in the path or query: no path, argument or name in a VM can hold one, and C code in
  the guest would cut the string short there."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
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


def host_name(host: str) -> str:
    """The name in a Host header, without its port (``[::1]:8080`` -> ``::1``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class HostRule:
    """Which Host headers the API serves (see the module's docstring)."""

    def __init__(self, bind_address: str = "127.0.0.1", allowed: Iterable[str] = (), unix_socket: bool = False):
        self.any = unix_socket or "*" in allowed
        self.names = {"localhost", host_name(bind_address), *(host_name(a) for a in allowed)}

    def allows(self, host: str | None) -> bool:
        if self.any or not host:  # no Host at all: not a browser
            return True
        name = host_name(host)
        if name in self.names:
            return True
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False


class RequestGuard:
    def __init__(self, app: ASGIApp, hosts: HostRule | None = None) -> None:
        self.app = app
        self.hosts = hosts or HostRule()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http" and _has_nul(scope):
            await error_response(400, "NUL bytes are not allowed in the path or query", "invalid_request")(
                scope, receive, send)
            return
        if kind in ("http", "websocket"):
            headers = Headers(scope=scope)
            host = headers.get("host")
            if not self.hosts.allows(host):
                message = (f"Host {host[:100]!r} is not this API's: use its address or localhost, or list the name "
                           "in api.allowed_hosts")
                await _refuse(kind, message, "host_not_allowed", scope, receive, send)
                return
            origin = headers.get("origin")
            risky = kind == "websocket" or scope["method"] not in SAFE_METHODS
            if origin is not None and risky and not _same_origin(origin, headers.get("host", "")):
                message = f"cross-origin request refused: Origin {origin[:100]!r} is not this API"
                await _refuse(kind, message, "cross_origin", scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _refuse(kind: str, message: str, code: str, scope: Scope, receive: Receive, send: Send) -> None:
    if kind == "websocket":  # closing before accepting makes the server answer 403
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
        return
    await error_response(403, message, code)(scope, receive, send)
