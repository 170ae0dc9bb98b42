"""Run a client method, sync or async, against an httpx.MockTransport that records the request."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from slicer.client import AsyncSlicerClient, SlicerClient

URL = "http://slicer.test"
TOKEN = "unit-token"
Handler = Callable[[httpx.Request], httpx.Response]


@dataclass
class Seen:
    """What the client sent."""

    requests: list[httpx.Request] = field(default_factory=list)

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]

    def body(self) -> Any:
        return json.loads(self.last.content) if self.last.content else None


def answering(status: int = 200, payload: Any = None, text: str | None = None) -> Handler:
    def handle(request: httpx.Request) -> httpx.Response:
        request.read()
        if text is not None:
            return httpx.Response(status, text=text)
        return httpx.Response(status, json=payload)
    return handle


def run(flavour: str, method: str, *args: Any, handler: Handler, **kwargs: Any) -> tuple[Any, Seen]:
    """``client.method(*args, **kwargs)`` on a sync or async client; iterators are drained."""
    seen = Seen()

    def record(request: httpx.Request) -> httpx.Response:
        seen.requests.append(request)
        return handler(request)

    transport = httpx.MockTransport(record)
    if flavour == "sync":
        with SlicerClient(URL, token=TOKEN) as client:
            client._http.close()
            client._http = httpx.Client(base_url=URL, headers=client.settings.headers(), transport=transport)
            result = getattr(client, method)(*args, **kwargs)
            if inspect.isgenerator(result):
                result = list(result)
        return result, seen

    async def go() -> Any:
        async with AsyncSlicerClient(URL, token=TOKEN) as client:
            await client._http.aclose()
            client._http = httpx.AsyncClient(base_url=URL, headers=client.settings.headers(), transport=transport)
            result = getattr(client, method)(*args, **kwargs)
            if inspect.isasyncgen(result):
                return [x async for x in result]
            return await result

    return asyncio.run(go()), seen
