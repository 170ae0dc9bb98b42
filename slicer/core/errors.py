"""One error family for everything the core can refuse or fail at.

Each class carries the HTTP status and the machine-readable ``code`` the API renders as
``{"error": message, "code": code}``; the core itself knows nothing of HTTP.
"""

from __future__ import annotations


class SlicerError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code


class BadRequest(SlicerError):
    status, code = 400, "bad_request"


class Unauthorized(SlicerError):
    status, code = 401, "unauthorized"


class Forbidden(SlicerError):
    status, code = 403, "forbidden"


class NotFound(SlicerError):
    status, code = 404, "not_found"


class Conflict(SlicerError):
    status, code = 409, "conflict"


class TooLarge(SlicerError):
    status, code = 413, "too_large"


class UnsupportedMediaType(SlicerError):
    status, code = 415, "unsupported_media_type"


class InsufficientStorage(SlicerError):
    status, code = 507, "insufficient_storage"


class WaitTimeout(SlicerError):
    status, code = 408, "timeout"


class AgentUnreachable(SlicerError):
    status, code = 503, "agent_unavailable"


class UpstreamUnreachable(SlicerError):
    status, code = 502, "upstream_unreachable"


class BadGateway(SlicerError):
    """Something the daemon depends on outside it failed (a registry, for instance)."""

    status, code = 502, "bad_gateway"


class Unavailable(SlicerError):
    status, code = 503, "unavailable"
