"""Full-duplex HTTP/1.1 over a channel stream (``h11``): the request body keeps flowing to the
guest while the response flows back. httpx sends the whole body before it reads the answer,
which deadlocks a process that writes more than the buffers hold before its stdin ends
(``cat`` of a large input, an interactive program)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator

import h11

from slicer.channel.yamux import Stream


class DuplexResponse:
    """The part of ``httpx.Response`` the API needs: status, headers, streamed body, close."""

    def __init__(self, stream: Stream, conn: h11.Connection, response: h11.Response, sender: asyncio.Task) -> None:
        self._stream = stream
        self._conn = conn
        self._sender = sender
        self.status_code = response.status_code
        self.headers = {k.decode().lower(): v.decode() for k, v in response.headers}

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError:
                return  # the stream ended mid-body: the agent went away
            if event is h11.NEED_DATA:
                data = await self._stream.read(262144)
                self._conn.receive_data(data)
                continue
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_raw()])

    async def aclose(self) -> None:
        self._sender.cancel()
        with contextlib.suppress(BaseException):
            await self._sender
        self._stream.reset()


async def duplex_request(stream: Stream, method: str, target: str, body: AsyncIterable[bytes]) -> DuplexResponse:
    """Send ``method target`` with a chunked ``body`` on ``stream``; returns once the response
    head has arrived, while the body goes on being sent in the background."""
    conn = h11.Connection(h11.CLIENT)
    head = h11.Request(method=method, target=target,
                       headers=[("Host", "agent"), ("Transfer-Encoding", "chunked"), ("Connection", "close")])
    await stream.write(conn.send(head))

    async def send_body() -> None:
        try:
            async for chunk in body:
                if chunk:
                    await stream.write(conn.send(h11.Data(data=chunk)))
        except asyncio.CancelledError:
            raise
        except Exception:
            stream.reset()  # the body broke off (its client left): the guest's end is told, not left waiting
            raise
        await stream.write(conn.send(h11.EndOfMessage()))

    sender = asyncio.ensure_future(send_body())
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.read(262144)
                if not data and sender.done() and sender.exception():
                    raise sender.exception()  # type: ignore[misc]
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                return DuplexResponse(stream, conn, event, sender)
            if isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("the agent closed the stream before answering")
    except BaseException:
        sender.cancel()
        stream.reset()
        raise
