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


class DuplexStreamingResponse(StreamingResponse):
    """A streamed answer to a request whose body is still coming in (an exec's stdin): that body is
    the route's to read, so nothing else may call ``receive``. Starlette's own StreamingResponse
    listens there for the client's disconnect under ASGI < 2.4 (uvicorn says 2.3) and would
    swallow the body's chunks: the command would wait for input that never comes. A client that
    leaves ends the body with ClientDisconnect instead, which resets the agent's stream."""

    async def __call__(self, scope, receive, send) -> None:
        await self.stream_response(send)


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
