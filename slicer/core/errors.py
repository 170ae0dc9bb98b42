"""One error family for everything the core can refuse or fail at.

Each class carries the HTTP status and the machine-readable ``code`` (an :class:`ErrorCode`) the
API renders as ``{"error": message, "code": code}``; the core itself knows nothing of HTTP.
"""

from __future__ import annotations

from slicer.core.error_codes import ErrorCode


class SlicerError(Exception):
    status = 500
    code = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, code: ErrorCode | str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code


class BadRequest(SlicerError):
    status, code = 400, ErrorCode.BAD_REQUEST


class Unauthorized(SlicerError):
    status, code = 401, ErrorCode.UNAUTHORIZED


class Forbidden(SlicerError):
    status, code = 403, ErrorCode.FORBIDDEN


class NotFound(SlicerError):
    status, code = 404, ErrorCode.NOT_FOUND


class Conflict(SlicerError):
    status, code = 409, ErrorCode.CONFLICT


class TooLarge(SlicerError):
    status, code = 413, ErrorCode.TOO_LARGE


class UnsupportedMediaType(SlicerError):
    status, code = 415, ErrorCode.UNSUPPORTED_MEDIA_TYPE


class InsufficientStorage(SlicerError):
    status, code = 507, ErrorCode.INSUFFICIENT_STORAGE


class WaitTimeout(SlicerError):
    status, code = 408, ErrorCode.TIMEOUT


class AgentUnreachable(SlicerError):
    status, code = 503, ErrorCode.AGENT_UNAVAILABLE


class UpstreamUnreachable(SlicerError):
    status, code = 502, ErrorCode.UPSTREAM_UNREACHABLE


class BadGateway(SlicerError):
    """Something the daemon depends on outside it failed (a registry, for instance)."""

    status, code = 502, ErrorCode.BAD_GATEWAY


class Unavailable(SlicerError):
    status, code = 503, ErrorCode.UNAVAILABLE
