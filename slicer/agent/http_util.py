"""What the agent's HTTP handlers share: errors, JSON bodies, streaming until the client leaves."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from slicer.agent import background
from slicer.agent.bulk import BulkPort

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Handlers = dict[str, Handler]  # endpoint name (slicer.agent.protocol) -> handler
TRUE = ("1", "true", "yes")


@dataclass
class Context:
    """What the handlers of one server share."""
    started: float  # the agent's start (time.monotonic), for its uptime
    registry: background.Registry = field(default_factory=background.Registry)
    bulk: BulkPort | None = None  # the copies' own port, where the VM has one


def error(message: str, code: str, status: int) -> web.Response:
    return web.json_response({"error": message, "code": code}, status=status)


def flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in TRUE


async def json_body(request: web.Request):
    try:
        return await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text='{"error": "body is not JSON", "code": "invalid_request"}',
                                 content_type="application/json") from None


async def once(coro: Awaitable) -> AsyncIterator:
    """An async iterator of one item: ``coro``'s result (to pass a call through until_disconnect)."""
    yield await coro


async def until_disconnect(request: web.Request, items) -> AsyncIterator:
    """Yield from ``items`` until it ends or the client goes away. aiohttp 3.8 (Debian's) does
    not cancel a handler whose client left, and a silent stream never fails a write, so we
    look at the transport whenever nothing has come for a second."""
    it = items.__aiter__()
    pending = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(it.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=1.0)
            if not done:
                if request.transport is None or request.transport.is_closing():
                    return
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        if hasattr(it, "aclose"):
            await it.aclose()


async def stream(request: web.Request, items, headers: dict[str, str]) -> web.StreamResponse:
    """A streamed answer of ``items`` (bytes or text), ended when they end or the client goes away."""
    resp = web.StreamResponse(headers=headers)
    await resp.prepare(request)
    async with contextlib.aclosing(until_disconnect(request, items)) as chunks:
        async for chunk in chunks:
            await resp.write(chunk.encode() if isinstance(chunk, str) else chunk)
    await resp.write_eof()
    return resp


# -- blocking files over a request or a response, for worker threads (tarfile) -------------------
class BodyReader(io.RawIOBase):
    """A blocking file over an aiohttp request body, for use from a worker thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, content) -> None:
        self._loop = loop
        self._content = content

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = asyncio.run_coroutine_threadsafe(self._content.read(len(b)), self._loop).result()
        b[: len(data)] = data
        return len(data)


class ResponseWriter(io.RawIOBase):
    """A blocking file over an aiohttp StreamResponse, for use from a worker thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, response) -> None:
        self._loop = loop
        self._response = response

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        data = bytes(b)
        asyncio.run_coroutine_threadsafe(self._response.write(data), self._loop).result()
        return len(data)
