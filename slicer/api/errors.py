"""Every error leaves the API as JSON ``{"error": "...", "code": "..."}`` with its status."""

from __future__ import annotations

import errno
import logging
import sqlite3

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from slicer.api.models import describe_validation
from slicer.core.errors import SlicerError

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 408: "timeout", 409: "conflict", 413: "too_large", 415: "unsupported_media_type",
}


def error_response(status: int, message: str, code: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "code": code}, status_code=status, headers=headers)


NO_SPACE = "No space left on device"


def out_of_space(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) is the data directory's file system being full."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
            return True
        if NO_SPACE in str(exc):  # a helper's words (qemu-img, a migration)
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _no_space(request: Request) -> JSONResponse:
    log.error("%s %s: the data directory's file system is full", request.method, request.url.path)
    return error_response(507, "the host's data directory is full: free space (or grow it) and try again",
                          "insufficient_storage")


def install(app: FastAPI) -> None:
    @app.exception_handler(SlicerError)
    async def _slicer(request: Request, exc: SlicerError) -> JSONResponse:
        if exc.status == 500 and out_of_space(exc):
            return _no_space(request)
        if exc.status >= 500 and exc.status != 503:  # 503: not ready yet, not a fault of ours
            log.error("%s %s: %s", request.method, request.url.path, exc.message)
        return error_response(exc.status, exc.message, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, describe_validation(exc.errors()), "invalid_request")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, message, _HTTP_CODES.get(exc.status_code, "error"),
                              getattr(exc, "headers", None))

    # Registered by class (not as the catch-all, which Starlette re-raises after answering, and
    # the server then drops the connection): a full disk is an answer, not a crash.
    @app.exception_handler(OSError)
    @app.exception_handler(sqlite3.Error)
    async def _storage(request: Request, exc: Exception) -> JSONResponse:
        if out_of_space(exc):
            return _no_space(request)
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(500, f"internal error: {exc}", "internal_error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if out_of_space(exc):
            return _no_space(request)
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(500, f"internal error: {exc}", "internal_error")
