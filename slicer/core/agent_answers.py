"""The agent's answers as the host reads them: its errors mapped to the API's (the guest may not
choose the daemon's status), bodies read whole up to a cap, lines of a streamed answer, and a
download whose bytes come on the bulk port."""

from __future__ import annotations

import asyncio
import contextlib
import json as jsonlib
from collections.abc import AsyncIterator

import httpx

from slicer.agent import protocol
from slicer.channel.bulk import BulkError
from slicer.channel.duplex import DuplexResponse
from slicer.core.error_codes import ErrorCode
from slicer.core.errors import AgentUnreachable, SlicerError

# The guest is untrusted: it may not choose the daemon's status, nor pose as the daemon (a
# `vm_not_found` from inside the VM). Only the request errors the agent reports pass through, with
# the codes it uses (slicer/agent); 403 means the guest user lacks a right (a state of the guest,
# not of the API client's token) and is 409; the exec ring budget's 503 is the one documented
# retry-later. Anything else is 502 `agent_error` with the guest's message, bounded.
PASSED_STATUSES = {400, 404, 409, 410, 413}
MAPPED = {(403, "permission_denied"): 409, (503, "budget_exhausted"): 503}
AGENT_CODES = protocol.ERROR_CODES - {code for _, code in MAPPED}
MAX_MESSAGE = 1000


def agent_error(resp: httpx.Response) -> SlicerError:
    """The agent's JSON error as a core error: its status and code if they are a request error
    the agent makes (above), otherwise 502 ``agent_error``; the message is bounded and printable."""
    status = resp.status_code
    try:
        body = resp.json()
        message, code = str(body["error"]), body.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        message, code = resp.text, None
    message = "".join(c if c.isprintable() else " " for c in message[:MAX_MESSAGE]).strip()
    if status == 413 and code is None:  # the agent's HTTP server refusing a body
        code = "too_large"
    known = (status in PASSED_STATUSES and code in AGENT_CODES) or (status, code) in MAPPED
    if known:
        err = SlicerError(message or f"the agent answered {status}", code)
        err.status = MAPPED.get((status, code), status)
        return err
    err = SlicerError(f"the agent failed (it answered {status}): {message or 'no message'}", ErrorCode.AGENT_ERROR)
    err.status = 502
    return err


# The most of an agent's answer the host reads whole (health, identity, secrets, fs listings);
# the guest is untrusted, and anything bigger is streamed by its route.
MAX_ANSWER = 16 * 1024 * 1024
MAX_SMALL_ANSWER = 64 * 1024  # health and power


async def read_capped(resp: httpx.Response | DuplexResponse, limit: int) -> bytes:
    """The body of ``resp``, or an error once it passes ``limit`` bytes (the stream is closed)."""
    body = bytearray()
    try:
        async for chunk in resp.aiter_raw():
            body += chunk
            if len(body) > limit:
                raise AgentUnreachable(f"the agent's answer passed {limit} bytes; it was cut off")
    finally:
        await resp.aclose()
    return bytes(body)


def parse_json(body: bytes) -> dict | list:
    try:
        value = jsonlib.loads(body)
    except ValueError as e:
        raise AgentUnreachable(f"the agent answered with something that is not JSON: {e}") from None
    if not isinstance(value, dict | list):
        raise AgentUnreachable("the agent answered with JSON that is not an object or a list")
    return value


async def read_lines(resp: httpx.Response, limit: int) -> AsyncIterator[bytes]:
    """The answer's lines; a line past ``limit`` bytes is the guest's garbage, not an answer."""
    pending = bytearray()
    async for chunk in resp.aiter_raw():
        pending += chunk
        while (end := pending.find(b"\n")) >= 0:
            yield bytes(pending[:end])
            del pending[:end + 1]
        if len(pending) > limit:
            raise AgentUnreachable(f"the agent's answer passed {limit} bytes without a line's end")
    if pending:
        yield bytes(pending)


class BulkDownload:
    """A download whose bytes come on the bulk port: the agent's answer (its headers; no body)
    with the transfer as its body, as the routes relay an ``httpx.Response``. The answer is read
    to its end meanwhile: if it breaks (the agent failed midway), the download ends there rather
    than wait for frames that will not come."""

    def __init__(self, resp: httpx.Response, chunks: AsyncIterator[bytes], release) -> None:
        self._resp = resp
        self._chunks = chunks
        self._release = release
        self._answer = asyncio.ensure_future(read_capped(resp, MAX_SMALL_ANSWER))
        self._frame: asyncio.Future | None = None
        self.status_code = resp.status_code
        self.headers = {k.lower(): v for k, v in resp.headers.items() if k.lower() != "content-length"}
        if size := resp.headers.get("x-slicer-content-length"):
            self.headers["content-length"] = size

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        while True:
            self._frame = frame = asyncio.ensure_future(anext(self._chunks))
            try:
                await asyncio.wait({frame, self._answer}, return_when=asyncio.FIRST_COMPLETED)
                if not frame.done() and self._answer.exception() is None:
                    await asyncio.wait({frame})  # a clean answer may end before its last frames arrive
            finally:  # a reader that stops waiting (its client left) leaves no read behind on the port
                if not frame.done():
                    frame.cancel()
                    with contextlib.suppress(BaseException):
                        await frame
            if frame.cancelled():  # the agent's answer broke before the transfer ended
                raise BulkError(f"the agent broke the copy off: {self._answer.exception()}")
            try:
                yield frame.result()
            except StopAsyncIteration:
                break
        await self._answer  # the agent finished cleanly

    async def aclose(self) -> None:
        try:
            if self._frame is not None and not self._frame.done():
                self._frame.cancel()
                with contextlib.suppress(BaseException):
                    await self._frame
            self._answer.cancel()
            with contextlib.suppress(BaseException):
                await self._answer
            with contextlib.suppress(Exception):
                await self._chunks.aclose()  # type: ignore[attr-defined]
            await self._resp.aclose()
        finally:
            release, self._release = self._release, lambda: None  # once: a second would free another copy's claim
            release()
