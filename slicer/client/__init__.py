"""Python SDK for the Slicer API: :class:`SlicerClient` (sync) and :class:`AsyncSlicerClient`.

Both read ``SLICER_URL`` (an http URL or a unix socket path), ``SLICER_TOKEN`` or
``SLICER_TOKEN_FILE`` (default ``/var/lib/slicer/auth/token``) unless given arguments. Everything
they raise is a :class:`SlicerClientError` (``SlicerError`` is its older name); an error answer
of the daemon is an :class:`APIError` subclass carrying ``status``, ``error`` and ``code``.
The async client is the written one; the sync client is generated from it (same methods).

>>> with SlicerClient() as c:
...     vm = c.create_node("vm", wait="agent")
...     print(c.exec(vm.hostname, "uname -a").stdout)
...     c.delete_node("vm", vm.hostname)

>>> async with AsyncSlicerClient() as c:
...     vm = await c.create_node("vm", wait="agent")
...     async for frame in c.exec_stream(vm.hostname, "uname -a"):
...         print(frame.stdout, end="")
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
    SlicerClientError,
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
    ProxyAllowRule,
    ProxyAuditEntry,
    ProxyClient,
    ProxyClientToken,
    ProxySecret,
    Secret,
    Tags,
)
from slicer.client._sync import SlicerClient

__all__ = [
    "UnsafeArchive",
    "APIError", "AsyncSlicerClient", "AuthenticationError", "BackgroundExec", "BadRequestError", "ConflictError",
    "ConnectionFailed", "CreatedNode", "ExecFrame", "ExecResult", "ForbiddenError", "GoneError", "Health",
    "HostGroup", "Info", "Node", "NodeStats", "NotFoundError", "Secret", "ServerError", "SlicerClient",
    "SlicerClientError", "SlicerError", "WaitTimeoutError", "Commit", "Fork", "Tags", "ProxyAllowRule",
    "ProxyAuditEntry", "ProxyClient", "ProxyClientToken", "ProxySecret",
]
