"""The SDK's exceptions, one tree with a single root:

    SlicerClientError            anything this SDK raises (catch this one)
    ├── APIError                 the daemon answered with an error: status, error, code
    │   ├── BadRequestError      400
    │   ├── AuthenticationError  401
    │   ├── ForbiddenError       403
    │   ├── NotFoundError        404
    │   ├── WaitTimeoutError     408
    │   ├── ConflictError        409
    │   ├── GoneError            410
    │   └── ServerError          5xx
    ├── ConnectionFailed         the daemon could not be reached
    └── UnsafeArchive            a guest's tar would write outside its destination (also a ValueError)

``SlicerError`` is the root's older name, kept for code that imports it from ``slicer.client``. It
is *not* ``slicer.core.errors.SlicerError``: that one is the daemon's own (an error carrying the
HTTP status it is answered with) and never leaves the daemon; a client sees it as an
:class:`APIError`.
"""

from __future__ import annotations

import json


class SlicerClientError(Exception):
    """Root of everything the SDK raises."""


SlicerError = SlicerClientError  # the root's older name (public since the first SDK)


class APIError(SlicerClientError):
    """The daemon answered with an error: ``status``, ``error`` (message) and ``code``."""

    def __init__(self, status: int, error: str, code: str) -> None:
        super().__init__(f"{status} {code}: {error}")
        self.status = status
        self.error = error
        self.code = code


class BadRequestError(APIError):
    """400: the request was invalid."""


class AuthenticationError(APIError):
    """401: missing or wrong token."""


class ForbiddenError(APIError):
    """403: e.g. deleting a service."""


class NotFoundError(APIError):
    """404: no such VM, group, path, secret…"""


class ConflictError(APIError):
    """409: e.g. the VM is paused, or the secret exists."""


class WaitTimeoutError(APIError):
    """408: the VM was not ready in time (and was removed)."""


class GoneError(APIError):
    """410: the background exec was reaped."""


class ServerError(APIError):
    """5xx: the daemon or the agent failed."""


class UnsafeArchive(SlicerClientError, ValueError):
    """A tar from a guest would write outside its destination, or holds a device or FIFO."""


class ConnectionFailed(SlicerClientError):
    """The daemon could not be reached."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError, 401: AuthenticationError, 403: ForbiddenError, 404: NotFoundError,
    408: WaitTimeoutError, 409: ConflictError, 410: GoneError,
}


def error_for(status: int, body: bytes) -> APIError:
    """The exception for an error answer: its class by status, message and code from the
    API's ``{"error", "code"}`` body (or the raw body, bounded, when it is not that)."""
    try:
        data = json.loads(body)
        message, code = data.get("error") or body.decode(errors="replace"), data.get("code") or "error"
    except (ValueError, AttributeError):
        message, code = body.decode(errors="replace")[:500] or f"HTTP {status}", "error"
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else APIError)
    return cls(status, message, code)
