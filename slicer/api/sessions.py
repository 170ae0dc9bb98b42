"""The web console's sessions: a random id in an HttpOnly, SameSite=Strict cookie, kept in the
daemon's memory (a restart signs everyone out; the id is worth nothing elsewhere).

A request authenticated by the cookie rather than the bearer header must also not be forgeable
by another site: SameSite=Strict keeps browsers from sending it cross-site, and a state-changing
request or WebSocket must carry an ``Origin`` (which RequestGuard has checked is the API's own),
so a browser that sends neither SameSite nor Origin gets nothing done with it.
"""

from __future__ import annotations

import secrets
import time

from starlette.requests import HTTPConnection

COOKIE = "slicer_session"
LIFETIME = 12 * 3600
MAX_SESSIONS = 1024
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


class Sessions:
    def __init__(self) -> None:
        self._expiry: dict[str, float] = {}

    def open(self) -> str:
        now = time.monotonic()
        self._expiry = {k: t for k, t in self._expiry.items() if t > now}
        while len(self._expiry) >= MAX_SESSIONS:  # the oldest goes first
            del self._expiry[min(self._expiry, key=self._expiry.__getitem__)]
        sid = secrets.token_urlsafe(32)
        self._expiry[sid] = now + LIFETIME
        return sid

    def close(self, sid: str | None) -> None:
        if sid:
            self._expiry.pop(sid, None)

    def valid(self, sid: str | None) -> bool:
        return bool(sid) and self._expiry.get(sid, 0.0) > time.monotonic()

    def authenticates(self, request: HTTPConnection) -> bool:
        """Whether ``request`` may act by its session cookie (see the module's docstring)."""
        if not self.valid(request.cookies.get(COOKIE)):
            return False
        risky = request.scope["type"] == "websocket" or request.scope.get("method") not in SAFE_METHODS
        return not risky or request.headers.get("origin") is not None
