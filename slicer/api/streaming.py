"""Relaying the agent's streamed answers to our clients."""

from __future__ import annotations

import asyncio

import httpx
from fastapi import Request

from slicer.channel.duplex import DuplexResponse


async def relay(resp: httpx.Response | DuplexResponse, request: Request | None = None):
    """The agent's streamed body, closed when done or when our client goes away.

    A silent stream (``sleep 600``) never fails a write, so with ``request`` given we also
    listen for the client's disconnect and close the agent's stream then: the agent kills
    the process when its stream closes."""

    async def watch() -> None:
        assert request is not None
        while (await request.receive())["type"] != "http.disconnect":
            pass
        await resp.aclose()

    watcher = asyncio.ensure_future(watch()) if request is not None else None
    try:
        async for chunk in resp.aiter_raw():
            yield chunk
    except (httpx.HTTPError, ConnectionError):
        pass  # closed by the watcher, or the agent went away: nobody left to tell
    finally:
        if watcher is not None:
            watcher.cancel()
        await resp.aclose()
