"""The SDK's duplex transports against a server that echoes a body while it is still coming: more
than every buffer holds goes through both ways at once (httpx's own transport, which sends the
whole body first, deadlocks here), and an endless body does not keep a finished answer open."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from slicer.client._duplex import AsyncDuplexTransport, DuplexTransport

BLOCK = 64 << 10
TOTAL = 24 << 20  # far beyond socket buffers on both sides


async def _echo(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    await resp.prepare(request)
    async for chunk in request.content.iter_any():
        await resp.write(chunk)
    await resp.write_eof()
    return resp


async def _first_then_done(request: web.Request) -> web.Response:
    await request.content.readany()
    return web.Response(text="done")


def _app() -> web.Application:
    app = web.Application()
    app.router.add_post("/echo", _echo)
    app.router.add_post("/first", _first_then_done)
    return app


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    """The app on a unix socket, served by a loop of its own in a thread."""
    sock = str(tmp_path / "s.sock")
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(_app())
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.UnixSite(runner, sock).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield sock
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def _blocks(seed: bytes) -> Iterator[bytes]:
    for i in range(TOTAL // BLOCK):
        yield hashlib.sha256(seed + i.to_bytes(4, "big")).digest() * (BLOCK // 32)


def _digest(blocks: Iterator[bytes]) -> str:
    h = hashlib.sha256()
    for b in blocks:
        h.update(b)
    return h.hexdigest()


def test_sync_body_and_answer_flow_at_once(server: str):
    with httpx.Client(transport=DuplexTransport(uds=server), base_url="http://slicer", timeout=30) as c:
        with c.stream("POST", "/echo", content=_blocks(b"a")) as resp:
            assert resp.status_code == 200
            got = _digest(resp.iter_raw())
    assert got == _digest(_blocks(b"a"))


def test_sync_endless_body_ends_with_the_answer(server: str):
    endless = itertools.repeat(os.urandom(BLOCK))
    with httpx.Client(transport=DuplexTransport(uds=server), base_url="http://slicer", timeout=30) as c:
        resp = c.post("/first", content=endless)
    assert resp.status_code == 200 and resp.text == "done"


async def test_async_body_and_answer_flow_at_once(server: str):
    async def body() -> AsyncIterator[bytes]:
        for block in _blocks(b"b"):
            yield block

    async with httpx.AsyncClient(transport=AsyncDuplexTransport(uds=server), base_url="http://slicer",
                                 timeout=30) as c:
        async with c.stream("POST", "/echo", content=body()) as resp:
            h = hashlib.sha256()
            async for chunk in resp.aiter_raw():
                h.update(chunk)
    assert resp.status_code == 200 and h.hexdigest() == _digest(_blocks(b"b"))


def test_an_unreachable_daemon_is_a_connect_error(tmp_path: Path):
    with httpx.Client(transport=DuplexTransport(uds=str(tmp_path / "none.sock")), base_url="http://slicer") as c:
        with pytest.raises(httpx.ConnectError):
            c.post("/echo", content=iter([b"x"]))
