"""The SDK's exceptions: every HTTP error of the API becomes one of these."""

from __future__ import annotations


class SlicerError(Exception):
    """Base of everything the SDK raises."""


class APIError(SlicerError):
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


class UnsafeArchive(SlicerError, ValueError):
    """A tar from a guest would write outside its destination, or holds a device or FIFO."""


class ConnectionFailed(SlicerError):
    """The daemon could not be reached."""


_BY_STATUS = {400: BadRequestError, 401: AuthenticationError, 403: ForbiddenError, 404: NotFoundError,
              408: WaitTimeoutError, 409: ConflictError, 410: GoneError}


def error_for(status: int, body: bytes) -> APIError:
    import json

    try:
        data = json.loads(body)
        message, code = data.get("error") or body.decode(errors="replace"), data.get("code") or "error"
    except (ValueError, AttributeError):
        message, code = body.decode(errors="replace")[:500] or f"HTTP {status}", "error"
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else APIError)
    return cls(status, message, code)
