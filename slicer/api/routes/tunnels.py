"""WebSocket routes: ``/vm/{hostname}/forward`` (raw TCP bytes) and ``/vm/{hostname}/shell``."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect

from slicer.api.deps import check_auth, manager_of
from slicer.api.errors import error_response
from slicer.channel.websocket import MessageTooBig
from slicer.channel.yamux import Stream
from slicer.core.errors import BadRequest, SlicerError

router = APIRouter()


async def deny(ws: WebSocket, err: SlicerError) -> None:
    """Refuse the upgrade with a JSON error and the right status, like any other route."""
    await ws.send_denial_response(error_response(err.status, err.message, err.code))


async def client_messages(ws: WebSocket):
    """The client's messages as bytes, until it disconnects."""
    while True:
        msg = await ws.receive()
        if msg["type"] == "websocket.disconnect":
            return
        if data := msg.get("bytes") or (msg.get("text") or "").encode():
            yield data


async def until_either(*coros) -> None:
    """Run both directions of a relay; when one ends, stop the other."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def relay(ws: WebSocket, stream: Stream) -> None:
    """Binary WebSocket messages <-> stream bytes, until either side ends."""

    async def ws_to_stream() -> None:
        try:
            async for data in client_messages(ws):
                await stream.write(data)
        finally:
            with contextlib.suppress(ConnectionError):
                await stream.close()

    async def stream_to_ws() -> None:
        while chunk := await stream.read(65536):
            await ws.send_bytes(chunk)

    try:
        await until_either(ws_to_stream(), stream_to_ws())
    finally:
        stream.reset()
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await ws.close()


@router.websocket("/vm/{hostname}/forward")
async def forward(ws: WebSocket, hostname: str) -> None:
    """One WebSocket per TCP connection; the target is ``X-Inlets-Upstream`` (``host:port``
    or ``unix:/path`` inside the VM). Bytes are relayed as binary messages, unframed."""
    try:
        check_auth(ws)
        target = ws.headers.get("x-inlets-upstream", "").strip()
        if not target:
            raise BadRequest("X-Inlets-Upstream header is required (host:port or unix:/path)", "invalid_target")
        stream = await manager_of(ws).open_stream(hostname, target)
    except SlicerError as e:
        await deny(ws, e)
        return
    await ws.accept()
    await relay(ws, stream)


@router.websocket("/vm/{hostname}/shell")
async def shell(ws: WebSocket, hostname: str) -> None:
    """Slicer's shell frames (type byte, u32 length, payload) relayed to a PTY in the VM.
    Query: uid, gid, shell, cwd."""
    try:
        check_auth(ws)
        agent = await manager_of(ws).agent(hostname)
        session = await agent.shell([(k, v) for k, v in ws.query_params.multi_items()
                                     if k in ("uid", "gid", "shell", "cwd")])
    except SlicerError as e:
        await deny(ws, e)
        return
    await ws.accept()

    async def client_to_vm() -> None:
        async for data in client_messages(ws):
            await session.send(data)

    async def vm_to_client() -> None:
        try:
            while (msg := await session.recv()) is not None:
                await ws.send_bytes(msg)
        except MessageTooBig as e:
            with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                await ws.close(1009, str(e)[:120])  # 1009: message too big

    try:
        await until_either(client_to_vm(), vm_to_client())
    finally:
        await session.close()
        session.stream.reset()
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await ws.close()
