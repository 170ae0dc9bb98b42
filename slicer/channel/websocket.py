"""A WebSocket client (``wsproto``) over a channel stream, to reach the agent's WebSocket
routes (the shell) without a socket of our own."""

from __future__ import annotations

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    RejectData,
    Request,
)

from slicer.channel.yamux import Stream

# The guest is untrusted: a message (shell output comes in chunks of a few KiB) or a refusal's
# body past these sizes ends the WebSocket.
MAX_MESSAGE = 1024 * 1024
MAX_REJECT_BODY = 64 * 1024


class MessageTooBig(ConnectionError):
    pass


class WebSocketRejected(Exception):
    """The server answered the upgrade with an HTTP error."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"upgrade refused with {status}")
        self.status = status
        self.body = body


class StreamWebSocket:
    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self._ws = WSConnection(ConnectionType.CLIENT)
        self._events: list = []
        self._parts: list[bytes] = []
        self._size = 0  # of the message in _parts
        self.closed = False

    async def _fill(self) -> bool:
        data = await self.stream.read(65536)
        self._ws.receive_data(data or None)
        self._events.extend(self._ws.events())
        return bool(data)

    async def handshake(self, target: str, host: str = "agent") -> None:
        await self.stream.write(self._ws.send(Request(host=host, target=target)))
        status, body = 0, b""
        while True:
            while self._events:
                event = self._events.pop(0)
                if isinstance(event, AcceptConnection):
                    return
                if isinstance(event, RejectConnection):
                    status = event.status_code
                    if not event.has_body:
                        raise WebSocketRejected(status, b"")
                elif isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished or len(body) > MAX_REJECT_BODY:
                        raise WebSocketRejected(status, body)
            if not await self._fill():
                raise WebSocketRejected(status or 502, body or b"connection closed during the upgrade")

    async def recv(self) -> bytes | None:
        """The next whole message (text is returned encoded), or None once closed."""
        while True:
            while self._events:
                event = self._events.pop(0)
                if isinstance(event, Message):
                    data = event.data if isinstance(event, BytesMessage) else event.data.encode()
                    self._parts.append(bytes(data))
                    self._size += len(data)
                    if self._size > MAX_MESSAGE:
                        self.stream.reset()
                        self.closed = True
                        raise MessageTooBig(f"the guest sent a WebSocket message over {MAX_MESSAGE} bytes")
                    if event.message_finished:
                        self._size = 0
                        msg, self._parts = b"".join(self._parts), []
                        return msg
                elif isinstance(event, Ping):
                    await self.stream.write(self._ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    if not self.closed:
                        self.closed = True
                        await self.stream.write(self._ws.send(event.response()))
                    return None
            if self.closed or not await self._fill():
                self.closed = True
                return None

    async def send(self, data: bytes) -> None:
        await self.stream.write(self._ws.send(BytesMessage(data=data)))

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                await self.stream.write(self._ws.send(CloseConnection(code=1000)))
                await self.stream.close()
            except ConnectionError:
                pass
