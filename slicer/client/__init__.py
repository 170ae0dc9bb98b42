"""Python SDK for the Slicer API: :class:`SlicerClient` (sync) and :class:`AsyncSlicerClient`.

Both read ``SLICER_URL`` (an http URL or a unix socket path), ``SLICER_TOKEN`` or
``SLICER_TOKEN_FILE`` (default ``/var/lib/slicer/auth/token``) unless given arguments, and raise
:class:`APIError` subclasses carrying ``status``, ``error`` and ``code``.
"""

from slicer.client._async import AsyncSlicerClient
from slicer.client._errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    ConnectionFailed,
    ForbiddenError,
    GoneError,
    NotFoundError,
    ServerError,
    SlicerError,
    UnsafeArchive,
    WaitTimeoutError,
)
from slicer.client._models import (
    BackgroundExec,
    Commit,
    CreatedNode,
    ExecFrame,
    ExecResult,
    Fork,
    Health,
    HostGroup,
    Info,
    Node,
    NodeStats,
    Secret,
    Tags,
)
from slicer.client._sync import SlicerClient

__all__ = [
    "UnsafeArchive",
    "APIError", "AsyncSlicerClient", "AuthenticationError", "BackgroundExec", "BadRequestError", "ConflictError",
    "ConnectionFailed", "CreatedNode", "ExecFrame", "ExecResult", "ForbiddenError", "GoneError", "Health",
    "HostGroup", "Info", "Node", "NodeStats", "NotFoundError", "Secret", "ServerError", "SlicerClient",
    "SlicerError", "WaitTimeoutError", "Commit", "Fork", "Tags",
]
