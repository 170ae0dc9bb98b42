"""Error answers become the SDK's exceptions, all under one root that is not the daemon's."""

from __future__ import annotations

import httpx
import pytest

import slicer.client as sdk
from slicer.client import (
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
    UnsafeArchive,
    WaitTimeoutError,
)
from slicer.core import errors as core_errors
from tests.unit.client_harness import answering, run

FLAVOURS = ["sync", "async"]
BY_STATUS = [(400, BadRequestError), (401, AuthenticationError), (403, ForbiddenError), (404, NotFoundError),
             (408, WaitTimeoutError), (409, ConflictError), (410, GoneError), (413, APIError), (500, ServerError),
             (502, ServerError), (507, ServerError)]


@pytest.mark.parametrize(("status", "cls"), BY_STATUS)
def test_status_maps_to_its_exception(status: int, cls: type[APIError]) -> None:
    body = {"error": "it went wrong", "code": "some_code"}
    for flavour in FLAVOURS:
        with pytest.raises(APIError) as e:
            run(flavour, "info", handler=answering(status, body))
        assert type(e.value) is cls
        assert (e.value.status, e.value.error, e.value.code) == (status, "it went wrong", "some_code")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_streamed_call_raises_the_same(flavour: str) -> None:
    with pytest.raises(ConflictError) as e:
        run(flavour, "exec", "vm-1", "true", handler=answering(409, {"error": "vm-1 is paused", "code": "paused"}))
    assert e.value.code == "paused"


def test_a_body_that_is_not_the_api_error_shape_is_kept_as_the_message() -> None:
    with pytest.raises(ServerError) as e:
        run("sync", "info", handler=lambda r: httpx.Response(502, text="Bad Gateway from a proxy"))
    assert (e.value.error, e.value.code) == ("Bad Gateway from a proxy", "error")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_an_unreachable_daemon_is_connection_failed(flavour: str) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(ConnectionFailed, match="cannot reach the Slicer daemon"):
        run(flavour, "nodes", handler=refuse)
    with pytest.raises(ConnectionFailed):
        run(flavour, "download", "vm-1", "/x", handler=refuse)


def test_every_exception_has_one_root() -> None:
    raised = [APIError, BadRequestError, AuthenticationError, ForbiddenError, NotFoundError, ConflictError,
              WaitTimeoutError, GoneError, ServerError, ConnectionFailed, UnsafeArchive]
    assert all(issubclass(cls, SlicerClientError) for cls in raised)
    assert SlicerClientError.__bases__ == (Exception,)
    assert issubclass(UnsafeArchive, ValueError)


def test_slicer_error_is_the_roots_old_name_not_the_daemons_error() -> None:
    assert sdk.SlicerError is SlicerClientError
    assert "SlicerError" in sdk.__all__ and "SlicerClientError" in sdk.__all__
    assert not issubclass(core_errors.SlicerError, SlicerClientError)
    assert not issubclass(SlicerClientError, core_errors.SlicerError)
