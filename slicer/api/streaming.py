"""Relaying the agent's streamed answers to our clients."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
from fastapi import Request
from fastapi.responses import StreamingResponse

from slicer.channel.duplex import DuplexResponse


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class BodyThenDisconnect:
    """A request body read as it comes (an exec's stdin), then its client's disconnect watched:
    while the body streams, nothing but it may call ``receive`` (its chunks would be lost)."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.ended = asyncio.Event()

    async def chunks(self):
        async for chunk in self.request.stream():  # ClientDisconnect if the client leaves meanwhile
            yield chunk
        self.ended.set()

    async def disconnected(self) -> None:
        """Returns once the body has ended and then the client went away."""
        await self.ended.wait()
        await _disconnected(self.request)


class DuplexStreamingResponse(StreamingResponse):
    """A streamed answer to a request whose body is still coming in (an exec's stdin).
    Starlette's own StreamingResponse listens on ``receive`` for the client's disconnect under
    ASGI < 2.4 (uvicorn says 2.3) and would swallow the body's chunks: the command would wait
    for input that never comes. Here the disconnect is watched only once the body has ended; a
    client that leaves before ends the body with ClientDisconnect, which resets the agent's
    stream. Either way the answer stops and closing it ends the command."""

    def __init__(self, content, body: BodyThenDisconnect, **kw) -> None:
        super().__init__(content, **kw)
        self.body = body

    async def __call__(self, scope, receive, send) -> None:
        answer = asyncio.ensure_future(self.stream_response(send))
        gone = asyncio.ensure_future(self.body.disconnected())
        try:
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (answer, gone):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
        if answer.done() and not answer.cancelled() and answer.exception() is not None:
            raise answer.exception()  # type: ignore[misc]


class ClientGone(Exception):
    """The client left before the answer was there."""


async def unless_client_leaves(request: Request, coro):
    """``await coro``, cancelled if the client goes away first (raises :class:`ClientGone`):
    a request waiting on a guest that answers only at the end (a buffered exec) must not
    outlive its client. Only for requests whose body has been read (it listens on ``receive``)."""
    work = asyncio.ensure_future(coro)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            with contextlib.suppress(BaseException):
                await work
            raise ClientGone()
        return work.result()
    finally:
        gone.cancel()


async def relay(resp: httpx.Response | DuplexResponse, request: Request | None = None):
    """The agent's streamed body, closed when done or when our client goes away.

    A silent stream (``sleep 600``) never fails a write, so with ``request`` given each read
    races the client's disconnect: when the client goes, the pending read is cancelled and the
    agent's stream closed, and the agent kills the process when its stream closes."""
    chunks = resp.aiter_raw().__aiter__()
    gone = asyncio.ensure_future(_disconnected(request)) if request is not None else None
    try:
        while True:
            read = asyncio.ensure_future(chunks.__anext__())
            if gone is not None:
                await asyncio.wait({read, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not read.done():
                    read.cancel()
                    with contextlib.suppress(BaseException):
                        await read
                    return
            try:
                chunk = await read
            except StopAsyncIteration:
                return
            yield chunk
    except (httpx.HTTPError, ConnectionError):
        pass  # the agent went away: nobody left to tell
    finally:
        if gone is not None:
            gone.cancel()
        await resp.aclose()
