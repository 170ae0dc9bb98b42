"""Host end of a VM's channel: the unix socket QEMU serves, the handshake, and streams.

:class:`Channel` owns one connection and one yamux session; :meth:`Channel.open` gives a
stream already connected to a port inside the guest. If the guest restarted its side (a
reboot, a restore), streams stop being acknowledged: the channel then drops the connection,
and the next :meth:`Channel.open` reconnects with a fresh nonce. QEMU discards what the guest
had not read when we disconnect, so a new connection never sees the old one's bytes.

:class:`ChannelTransport` plugs a channel into httpx, so the agent's HTTP API is used like any
other: ``httpx.AsyncClient(transport=ChannelTransport(ch), base_url="http://agent")``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import typing
from datetime import UTC, datetime

import httpcore
import httpx

from slicer.channel.budget import GLOBAL_FRAME_RATE, FrameBudget
from slicer.channel.yamux import INITIAL_WINDOW, READY, Session, Stream, StreamClosed, connect_answer

log = logging.getLogger(__name__)

HANDSHAKE_LIMIT = 8 * 1024 * 1024  # stale guest bytes kept while looking for the READY line
# Bounds on what one guest can make the daemon do or hold (its guest root is untrusted):
# frames parsed per second (reading pauses beyond it, so a flood of tiny frames cannot take the
# event loop from the other VMs) and bytes queued towards a guest that does not read them.
FRAME_RATE = 20_000
MAX_OUTBOUND = 32 * 1024 * 1024
# ... and all guests together: GLOBAL_FRAME_RATE shared equally by the VMs sending (budget.py).
FRAMES = FrameBudget(GLOBAL_FRAME_RATE, FRAME_RATE)


class ChannelError(ConnectionError):
    """The guest side of the channel is not answering."""


class _Protocol(asyncio.Protocol):
    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.transport: asyncio.Transport | None = None
        self.can_write = asyncio.Event()
        self.can_write.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.channel._on_data(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.can_write.set()
        self.channel._on_lost(self)

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()


class Channel:
    """One VM's channel. Safe to share between tasks; every stream has its own owner."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._proto: _Protocol | None = None
        self._session: Session | None = None
        self._nonce = b""
        self._pending = bytearray()
        self._ready: asyncio.Event = asyncio.Event()
        self._lock = asyncio.Lock()
        self._frames = FRAMES.member()
        self.first_byte_at: float | None = None  # loop time of the first guest byte (for bench)
        # Why the guest's side was last cut off (a flood, a protocol error); cleared by the
        # next good handshake.
        self.fault: str | None = None
        self.last_stream_at: datetime | None = None  # a stream last opened: the API's last_agent_call

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, proto = await loop.create_unix_connection(lambda: _Protocol(self), self.socket_path)
        except OSError as e:
            raise ChannelError(f"cannot connect to channel {self.socket_path}: {e}") from e
        self._proto = proto
        self._session = None
        self._pending.clear()
        self._ready = asyncio.Event()
        self._nonce = secrets.token_hex(8).encode()
        assert proto.transport is not None
        proto.transport.write(b"SLICER-HELLO " + self._nonce + b"\n")

    def _send(self, proto: _Protocol, data: bytes) -> None:
        # Written at once, not gathered for the end of the loop's turn: measured, gathering the
        # frames of a stream's opening saved the guest nothing and cost the API path 1-1.5 ms.
        transport = proto.transport
        if proto is not self._proto or transport is None or transport.is_closing():
            return
        transport.write(data)
        if transport.get_write_buffer_size() > MAX_OUTBOUND:
            # Only answers the guest never reads pile up like this (streams wait for drain).
            asyncio.get_running_loop().call_soon(self.cut_off, f"the guest left {MAX_OUTBOUND >> 20} MiB unread")
            transport.abort()

    def _on_data(self, proto: _Protocol, data: bytes) -> None:
        if proto is not self._proto:
            return
        if self.first_byte_at is None:
            self.first_byte_at = asyncio.get_running_loop().time()
        if self._session is not None:
            session = self._session
            before = session.frames
            try:
                session.feed(data)
            except Exception as e:
                self.cut_off(f"the guest broke the channel protocol: {e}")
                return
            self._throttle(proto, session.frames - before)
            return
        marker = READY + self._nonce + b"\n"
        start = max(0, len(self._pending) - len(marker) + 1)  # only where the marker can newly be
        self._pending += data
        i = self._pending.find(marker, start)
        if i < 0:
            if len(self._pending) > HANDSHAKE_LIMIT:
                del self._pending[: -len(marker)]
            return
        rest = bytes(self._pending[i + len(marker) :])
        self._pending.clear()
        self._session = Session(lambda b: self._send(proto, b), proto.can_write.wait, client=True)
        self.fault = None
        self._ready.set()
        if rest:
            self._on_data(proto, rest)

    def _throttle(self, proto: _Protocol, frames: int) -> None:
        """Pause reading while the guest is over its frame budget."""
        debt = self._frames.spend(frames)
        if debt > 0 and proto.transport is not None and not proto.transport.is_closing():
            proto.transport.pause_reading()
            asyncio.get_running_loop().call_later(debt, self._resume, proto)

    def _resume(self, proto: _Protocol) -> None:
        if proto is self._proto and proto.transport is not None and not proto.transport.is_closing():
            proto.transport.resume_reading()

    def cut_off(self, reason: str) -> None:
        """Drop a guest that misbehaves; the next :meth:`open` starts over with a fresh handshake."""
        if self.fault != reason:
            log.warning("%s: channel cut off: %s", self.socket_path, reason)
        self.fault = reason
        self.disconnect()

    def _on_lost(self, proto: _Protocol) -> None:
        if proto is self._proto:
            self._drop("channel connection lost")

    def _drop(self, reason: str) -> None:
        if self._session is not None:
            self._session.connection_lost(reason)
        self._session = None
        self._proto = None

    def disconnect(self) -> None:
        """Drop the connection; the next :meth:`open` reconnects and handshakes again."""
        proto = self._proto
        self._drop("disconnected by host")
        if proto is not None and proto.transport is not None:
            proto.transport.close()

    async def session(self, timeout: float) -> Session:
        """The live session, connecting and handshaking first if needed."""
        async with self._lock:
            if self._session is not None and not self._session.closed:
                return self._session
            if self._proto is None:
                await self._connect()
            ready = self._ready
        try:
            await asyncio.wait_for(ready.wait(), timeout)
        except TimeoutError:
            # Whoever held the guest's end when we said hello may be gone (an agent that was
            # restarted never saw it): the next call connects and says hello again.
            async with self._lock:
                if self._ready is ready and not ready.is_set():
                    self.disconnect()
            raise ChannelError(f"guest agent did not answer the channel within {timeout:.1f}s") from None
        if self._session is None:
            raise ChannelError("channel closed during handshake")
        return self._session

    async def open(self, port: int | str, timeout: float = 10.0) -> Stream:
        """A stream connected to ``port`` (or ``unix:/path``) inside the guest."""
        stream, session = await self.begin(port, timeout)
        await self.confirm(stream, session, port, timeout)
        return stream

    async def begin(self, port: int | str, timeout: float = 10.0) -> tuple[Stream, Session]:
        """A stream to ``port`` that may be written at once, before the guest has said it is
        connected: what is written follows the SYN and the ``CONNECT`` in the same burst, two
        round trips through the guest saved. The caller then calls :meth:`confirm` before it
        trusts what it reads."""
        session = await self.session(timeout)
        stream = session.start_stream()
        try:
            await stream.write(f"CONNECT {port}\n".encode())
        except StreamClosed as e:
            raise ChannelError(str(e)) from e
        self.last_stream_at = datetime.now(UTC)
        return stream, session

    async def confirm(self, stream: Stream, session: Session, port: int | str, timeout: float) -> None:
        """Wait for the guest to acknowledge a stream :meth:`begin` opened and to say ``OK``."""
        try:
            await session.confirm_stream(stream, timeout)
        except StreamClosed as e:
            # An unacknowledged SYN means the guest restarted its end: start over next time.
            if self._session is session:
                self.disconnect()
            raise ChannelError(str(e)) from e
        try:
            await asyncio.wait_for(connect_answer(stream, port), timeout)
        except (StreamClosed, TimeoutError) as e:
            stream.reset()
            raise ChannelError(str(e) or f"CONNECT {port} timed out") from e

    @property
    def open_streams(self) -> int:
        """Streams open to the guest now (exec, cp, shell, forwards, agent calls)."""
        return self._session.stream_count if self._session is not None and not self._session.closed else 0

    @property
    def connected(self) -> bool:
        return self._session is not None and not self._session.closed


class _StreamAdapter(httpcore.AsyncNetworkStream):
    """A channel stream as httpcore's connection. The stream is opened by the request's first
    write, so its SYN, its ``CONNECT`` and the request leave back to back; the guest's ACK and
    ``OK`` are awaited before anything is read."""

    def __init__(self, channel: Channel, port: int, timeout: float) -> None:
        self._channel = channel
        self._port = port
        self._timeout = timeout
        self._stream: Stream | None = None
        self._confirm: typing.Coroutine[None, None, None] | None = None
        self._unconfirmed = 0  # bytes written before the guest confirmed

    async def _opened(self) -> Stream:
        if self._stream is None:
            try:
                self._stream, session = await self._channel.begin(self._port, self._timeout)
            except ChannelError as e:
                raise httpcore.ConnectError(str(e)) from e
            self._confirm = self._channel.confirm(self._stream, session, self._port, self._timeout)
        return self._stream

    async def _confirmed(self) -> Stream:
        stream = await self._opened()
        if self._confirm is not None:
            confirm, self._confirm = self._confirm, None
            try:
                await confirm
            except ChannelError as e:
                raise httpcore.ConnectError(str(e)) from e
        return stream

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        stream = await self._confirmed()
        try:  # asyncio.timeout, not wait_for: no task per read
            async with asyncio.timeout(timeout):
                return await stream.read(max_bytes)
        except TimeoutError:  # httpcore's own, so that httpx (and our callers) see a timeout, not a crash
            raise httpcore.ReadTimeout(f"the guest sent nothing for {timeout}s") from None

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        stream = await self._opened()
        # Within the window every stream starts with, a write cannot wait for the guest; past
        # it, one to a guest that refused the stream would wait for ever.
        self._unconfirmed += len(buffer)
        if self._unconfirmed > PIPELINED:
            await self._confirmed()
        try:  # asyncio.timeout, not wait_for: no task per write
            async with asyncio.timeout(timeout):
                await stream.write(buffer)
        except TimeoutError:
            raise httpcore.WriteTimeout(f"the guest took nothing for {timeout}s") from None
        except StreamClosed as e:
            await self._confirmed()  # a guest that refused the stream: a ConnectError, as it was
            raise httpcore.WriteError(f"the guest closed the stream while we were sending: {e}") from e

    async def aclose(self) -> None:
        if self._confirm is not None:
            self._confirm.close()  # never awaited: the request failed before its answer was read
        if self._stream is None:
            return
        try:
            await self._stream.close()
        except ConnectionError:
            pass
        if not self._stream.remote_closed:
            self._stream.reset()


class _ChannelBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, channel: Channel, port: int) -> None:
        self._channel = channel
        self._port = port

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        return _StreamAdapter(self._channel, self._port, timeout or 10.0)

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise httpcore.ConnectError("unix sockets are reached through connect_tcp on the channel")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


MAX_STREAMS = 128
PIPELINED = INITIAL_WINDOW // 2  # bytes of a request sent before the guest confirms its stream


class ChannelTransport(httpx.AsyncHTTPTransport):
    """An httpx transport whose connections are channel streams to one guest port."""

    def __init__(self, channel: Channel, port: int) -> None:
        # verify=False: no TLS on a channel, and the default loads the system's CA bundle
        # (~0.1 s of CPU for every VM's agent client).
        super().__init__(verify=False)
        # One stream per request: a pooled stream would not survive a guest restart.
        # Up to MAX_STREAMS requests at once per VM (httpcore's default is 10: ten long execs
        # would lock a VM's health checks out).
        self._pool = httpcore.AsyncConnectionPool(
            max_connections=MAX_STREAMS, max_keepalive_connections=0, network_backend=_ChannelBackend(channel, port)
        )
