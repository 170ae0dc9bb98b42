"""httpx transports that keep sending a request's body while its response comes back.

httpx (through httpcore) sends the whole body before it reads the answer. An exec whose stdin is
a stream (a pipe into ``slicer vm exec``) can then deadlock: the command writes more than the
buffers between it and us hold before its input ends (``gzip`` of a large input), so it stops
reading, so our send blocks, so nobody reads its output. These transports speak HTTP/1.1 with
``h11`` (httpx's own dependency), one connection per request, the body sent by a thread (sync) or
a task (async) while the caller reads the response. Plain HTTP and unix sockets only: an
``https`` URL gets httpx's usual transport (see :func:`duplex_transport`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Iterator

import h11
import httpx

READ = 65536
SKIP = {b"content-length", b"transfer-encoding", b"connection", b"host"}


def _head(request: httpx.Request) -> h11.Request:
    headers = [(b"Host", request.url.netloc or b"slicer")]
    headers += [(k, v) for k, v in request.headers.raw if k.lower() not in SKIP]
    headers += [(b"Transfer-Encoding", b"chunked"), (b"Connection", b"close")]
    return h11.Request(method=request.method, target=request.url.raw_path, headers=headers)


def _response(event: h11.Response, stream: httpx.SyncByteStream | httpx.AsyncByteStream) -> httpx.Response:
    return httpx.Response(event.status_code, headers=event.headers, stream=stream,
                          extensions={"http_version": b"HTTP/1.1"})


# -- sync --------------------------------------------------------------------------------------
class _Connection:
    """One h11 connection used by two threads: ours reads, the sender sends. h11 keeps one state
    machine for both directions, so each call into it holds the lock; socket I/O never does."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.h11 = h11.Connection(h11.CLIENT)
        self.lock = threading.Lock()

    def send(self, event: h11.Event) -> None:
        with self.lock:
            data = self.h11.send(event)
        if data:
            self.sock.sendall(data)

    def next_event(self) -> h11.Event | type[h11.NEED_DATA]:
        while True:
            with self.lock:
                event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = self.sock.recv(READ)
            with self.lock:
                self.h11.receive_data(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class _Body(httpx.SyncByteStream):
    def __init__(self, conn: _Connection) -> None:
        self.conn = conn

    def __iter__(self) -> Iterator[bytes]:
        while True:
            event = self.conn.next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return

    def close(self) -> None:
        self.conn.close()


class DuplexTransport(httpx.BaseTransport):
    def __init__(self, uds: str | None = None) -> None:
        self.uds = uds

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            if self.uds:
                sock = socket.socket(socket.AF_UNIX)
                sock.connect(self.uds)
            else:
                sock = socket.create_connection((request.url.host, request.url.port or 80))
        except OSError as e:
            raise httpx.ConnectError(str(e), request=request) from e
        conn = _Connection(sock)
        try:
            conn.send(_head(request))
            threading.Thread(target=self._send_body, args=(conn, request), daemon=True).start()
            while not isinstance(event := conn.next_event(), h11.Response):
                if isinstance(event, h11.ConnectionClosed):
                    raise httpx.RemoteProtocolError("the daemon closed the connection before answering",
                                                    request=request)
        except (OSError, h11.ProtocolError) as e:
            conn.close()
            raise httpx.ReadError(str(e), request=request) from e
        except BaseException:
            conn.close()
            raise
        return _response(event, _Body(conn))

    @staticmethod
    def _send_body(conn: _Connection, request: httpx.Request) -> None:
        # Daemon thread: a stdin that never ends must not keep the process alive once we are done.
        with contextlib.suppress(OSError, h11.ProtocolError):  # the answer ended and the socket closed
            for chunk in request.stream:  # type: ignore[union-attr]
                if chunk:
                    conn.send(h11.Data(data=chunk))
            conn.send(h11.EndOfMessage())


# -- async -------------------------------------------------------------------------------------
class _AsyncBody(httpx.AsyncByteStream):
    def __init__(self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 sender: asyncio.Task) -> None:
        self.conn, self.reader, self.writer, self.sender = conn, reader, writer, sender

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            event = await _next_event(self.conn, self.reader)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return

    async def aclose(self) -> None:
        self.sender.cancel()
        with contextlib.suppress(BaseException):
            await self.sender
        self.writer.close()


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Event:
    while (event := conn.next_event()) is h11.NEED_DATA:
        conn.receive_data(await reader.read(READ))
    return event


class AsyncDuplexTransport(httpx.AsyncBaseTransport):
    def __init__(self, uds: str | None = None) -> None:
        self.uds = uds

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            if self.uds:
                reader, writer = await asyncio.open_unix_connection(self.uds)
            else:
                reader, writer = await asyncio.open_connection(request.url.host, request.url.port or 80)
        except OSError as e:
            raise httpx.ConnectError(str(e), request=request) from e
        conn = h11.Connection(h11.CLIENT)  # one event loop: no lock needed between sender and reader

        async def send_body() -> None:
            with contextlib.suppress(OSError, h11.ProtocolError):
                async for chunk in request.stream:  # type: ignore[union-attr]
                    if chunk:
                        writer.write(conn.send(h11.Data(data=chunk)))
                        await writer.drain()
                writer.write(conn.send(h11.EndOfMessage()))
                await writer.drain()

        writer.write(conn.send(_head(request)))
        sender = asyncio.ensure_future(send_body())
        try:
            while not isinstance(event := await _next_event(conn, reader), h11.Response):
                if isinstance(event, h11.ConnectionClosed):
                    raise httpx.RemoteProtocolError("the daemon closed the connection before answering",
                                                    request=request)
        except BaseException as e:
            sender.cancel()
            writer.close()
            if isinstance(e, OSError | h11.ProtocolError):
                raise httpx.ReadError(str(e), request=request) from e
            raise
        return _response(event, _AsyncBody(conn, reader, writer, sender))


def duplex_transport(base_url: str, uds: str | None) -> httpx.BaseTransport:
    if base_url.startswith("https:"):
        return httpx.HTTPTransport()
    return DuplexTransport(uds)


def async_duplex_transport(base_url: str, uds: str | None) -> httpx.AsyncBaseTransport:
    if base_url.startswith("https:"):
        return httpx.AsyncHTTPTransport()
    return AsyncDuplexTransport(uds)
