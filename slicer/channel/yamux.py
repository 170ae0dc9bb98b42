"""A yamux stream multiplexer (HashiCorp's spec), on asyncio, standard library only.

Both ends use this module: the daemon over the VM's channel socket, the guest agent over
``/dev/virtio-ports/…``. The session is I/O-free: its owner feeds it received bytes with
:meth:`Session.feed` and gives it a ``send`` callable plus an awaitable ``drain`` for
back-pressure, so each side can read its file descriptor the fastest way it has.

Frame header (12 bytes, big endian): version (0), type, flags, stream id, length.
Types: Data (0), WindowUpdate (1), Ping (2), GoAway (3). Flags: SYN, ACK, FIN, RST.
Every stream has a receive window (256 KiB to start); a sender never has more than the
peer's window in flight, so one stalled reader cannot block the others.

Before the yamux session starts, the host sends ``SLICER-HELLO <nonce>\\n`` and the guest
answers ``SLICER-READY <nonce>\\n``; the host discards anything before that answer (bytes the
guest wrote while no host was connected). Each stream then opens with Firecracker's
hybrid-vsock handshake: ``CONNECT <port>\\n`` → ``OK <port>\\n``.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable

VERSION = 0
TYPE_DATA, TYPE_WINDOW_UPDATE, TYPE_PING, TYPE_GO_AWAY = 0, 1, 2, 3
FLAG_SYN, FLAG_ACK, FLAG_FIN, FLAG_RST = 1, 2, 4, 8
GO_AWAY_NORMAL, GO_AWAY_PROTOCOL_ERROR, GO_AWAY_INTERNAL_ERROR = 0, 1, 2

HEADER = struct.Struct(">BBHII")
HEADER_SIZE = HEADER.size
INITIAL_WINDOW = 256 * 1024  # the spec's starting window; every stream begins with it
# What we grant each stream right away (the SYN/ACK frame carries the extra as a window
# delta): under TCG the host<->guest round trip is long enough that 256 KiB caps a stream
# at a few MB/s.
STREAM_WINDOW = 4 * 1024 * 1024
MAX_DATA_FRAME = 64 * 1024

HELLO = b"SLICER-HELLO "
READY = b"SLICER-READY "
AGENT_PORT = 0  # CONNECT 0 reaches the agent itself; no TCP service can listen on port 0.
# Frames a peer may send per second that make us answer (a ping, or a SYN we refuse); more is
# a flood (a peer that never reads our answers would have them pile up), and ends the session.
ANSWER_RATE = 1000


class ProtocolError(Exception):
    """The peer sent something that is not valid yamux; the session is closed."""


class StreamClosed(ConnectionError):
    """The stream or its session is closed (or was reset by the peer)."""


def encode_header(ftype: int, flags: int, stream_id: int, length: int) -> bytes:
    return HEADER.pack(VERSION, ftype, flags, stream_id, length)


class Stream:
    """One bidirectional byte stream of a session.

    ``read`` returns ``b""`` at end of stream; ``write`` waits while the peer's window is full;
    ``close`` half-closes (FIN); ``reset`` aborts both directions (RST).
    """

    def __init__(self, session: Session, stream_id: int) -> None:
        self._session = session
        self.id = stream_id
        self._recv: deque[bytes] = deque()
        self._recv_size = 0  # bytes buffered, counted against our receive window
        self._recv_window = STREAM_WINDOW  # what the peer may still send us (after our grant)
        self._consumed = 0  # read by the application, not yet returned in a window update
        self._send_window = INITIAL_WINDOW
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._established = asyncio.Event()
        self.remote_closed = False  # peer sent FIN
        self.local_closed = False  # we sent FIN
        self.reset_by: str | None = None

    # -- application side -------------------------------------------------------------------
    async def read(self, n: int = 65536) -> bytes:
        while not self._recv:
            if self.remote_closed or self.reset_by:
                return b""
            self._readable.clear()
            await self._readable.wait()
        chunk = self._recv[0]
        if len(chunk) <= n:
            self._recv.popleft()
        else:
            self._recv[0] = chunk[n:]
            chunk = chunk[:n]
        self._recv_size -= len(chunk)
        self._consumed += len(chunk)
        if self._consumed >= STREAM_WINDOW // 4 and not (self.remote_closed or self.reset_by):
            delta, self._consumed = self._consumed, 0
            self._recv_window += delta
            self._session._send_frame(TYPE_WINDOW_UPDATE, 0, self.id, delta)
        return chunk

    async def readline(self, limit: int = 4096) -> bytes:
        """Read up to and including ``\\n`` (used for the CONNECT handshake only)."""
        buf = b""
        while not buf.endswith(b"\n"):
            if len(buf) >= limit:
                raise ProtocolError("line too long")
            c = await self.read(1)
            if not c:
                break
            buf += c
        return buf

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.reset_by or self.local_closed:
                raise StreamClosed(f"stream {self.id} is closed")
            if self._send_window == 0:
                self._writable.clear()
                await self._writable.wait()
                continue
            n = min(len(view), self._send_window, MAX_DATA_FRAME)
            self._send_window -= n
            self._session._send_frame(TYPE_DATA, 0, self.id, n, bytes(view[:n]))
            view = view[n:]
            await self._session._drain()

    async def close(self) -> None:
        if self.local_closed or self.reset_by:
            return
        self.local_closed = True
        self._session._send_frame(TYPE_WINDOW_UPDATE, FLAG_FIN, self.id, 0)
        self._session._maybe_forget(self)
        await self._session._drain()

    def reset(self) -> None:
        if self.reset_by:
            return
        self._session._send_frame(TYPE_WINDOW_UPDATE, FLAG_RST, self.id, 0)
        self._on_reset("local")

    @property
    def closed(self) -> bool:
        return bool(self.reset_by) or (self.local_closed and self.remote_closed)

    # -- session side -----------------------------------------------------------------------
    def _on_data(self, payload: bytes) -> None:
        if len(payload) > self._recv_window:
            raise ProtocolError(f"stream {self.id} exceeded its receive window")
        self._recv_window -= len(payload)
        if payload:
            self._recv.append(payload)
            self._recv_size += len(payload)
            self._readable.set()

    def _on_window(self, delta: int) -> None:
        self._send_window += delta
        if self._send_window > 0:
            self._writable.set()

    def _on_fin(self) -> None:
        self.remote_closed = True
        self._readable.set()

    def _on_reset(self, by: str) -> None:
        self.reset_by = by
        self._readable.set()
        self._writable.set()
        self._established.set()
        self._session._forget(self)


class TokenBucket:
    """``rate`` events a second, up to ``rate`` at once; ``spend`` says how long the caller is
    in debt (0: within budget)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.at = time.monotonic()

    def spend(self, n: float) -> float:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate) - n
        self.at = now
        return max(0.0, -self.tokens / self.rate)


class Session:
    """A yamux session over one byte pipe.

    ``send(data)`` must queue bytes without blocking; ``drain()`` waits while too much is queued.
    The host is the client (odd stream ids), the guest the server (even ids, unused here).
    ``on_stream`` is awaited in a task for each stream the peer opens.
    """

    def __init__(
        self,
        send: Callable[[bytes], None],
        drain: Callable[[], Awaitable[None]],
        *,
        client: bool,
        on_stream: Callable[[Stream], Awaitable[None]] | None = None,
    ) -> None:
        self._send = send
        self._drain_fn = drain
        self._on_stream = on_stream
        self._next_id = 1 if client else 2
        self._streams: dict[int, Stream] = {}
        self._buf = bytearray()
        self._pings: dict[int, asyncio.Future[None]] = {}
        self._ping_id = 0
        self._tasks: set[asyncio.Task] = set()
        self._peer_max_id = 0  # highest stream id the peer opened
        self._answers = TokenBucket(ANSWER_RATE)
        self.frames = 0  # frames received (the owner rate-limits its reads on it)
        self.closed = False
        self.close_reason = ""
        self.done = asyncio.Event()

    # -- I/O ----------------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Parse received bytes; a protocol error closes the session and is re-raised."""
        if self.closed:
            return
        self._buf += data
        try:
            self._parse()
        except ProtocolError as e:
            self.go_away(GO_AWAY_PROTOCOL_ERROR, str(e))
            raise

    def _parse(self) -> None:
        buf = self._buf
        pos = 0
        answers = 0
        while len(buf) - pos >= HEADER_SIZE:
            version, ftype, flags, sid, length = HEADER.unpack_from(buf, pos)
            if version != VERSION:
                raise ProtocolError(f"bad version {version}")
            if ftype == TYPE_DATA:
                if length > STREAM_WINDOW:
                    raise ProtocolError(f"data frame of {length} bytes")
                if len(buf) - pos - HEADER_SIZE < length:
                    break
                payload = bytes(buf[pos + HEADER_SIZE : pos + HEADER_SIZE + length])
                pos += HEADER_SIZE + length
                answers += self._on_stream_frame(ftype, flags, sid, length, payload)
            elif ftype == TYPE_WINDOW_UPDATE:
                pos += HEADER_SIZE
                answers += self._on_stream_frame(ftype, flags, sid, length, b"")
            elif ftype == TYPE_PING:
                pos += HEADER_SIZE
                if sid != 0:
                    raise ProtocolError("ping on a stream")
                if flags & FLAG_SYN:
                    answers += 1
                    self._send_frame(TYPE_PING, FLAG_ACK, 0, length)
                elif flags & FLAG_ACK and (fut := self._pings.pop(length, None)) and not fut.done():
                    fut.set_result(None)
            elif ftype == TYPE_GO_AWAY:
                pos += HEADER_SIZE
                self._shutdown(f"peer went away (code {length})")
                break
            else:
                raise ProtocolError(f"unknown frame type {ftype}")
            self.frames += 1
        del buf[:pos]
        if answers and self._answers.spend(answers) > 0:
            raise ProtocolError(f"more than {ANSWER_RATE} pings or refused streams a second")

    def _on_stream_frame(self, ftype: int, flags: int, sid: int, length: int, payload: bytes) -> int:
        """Handle one frame of a stream; returns how many frames it made us answer."""
        if sid == 0:
            raise ProtocolError("stream frame on stream 0")
        stream = self._streams.get(sid)
        ours = (sid % 2 == 1) == (self._next_id % 2 == 1)
        if flags & FLAG_SYN:
            if stream is not None or (not ours and sid <= self._peer_max_id):
                raise ProtocolError(f"duplicate SYN for stream {sid}")
            if ours:
                raise ProtocolError(f"peer opened stream {sid} with our parity")
            self._peer_max_id = sid
            if self._on_stream is None:
                self._send_frame(TYPE_WINDOW_UPDATE, FLAG_RST, sid, 0)
                return 1
            stream = Stream(self, sid)
            stream._established.set()
            self._streams[sid] = stream
            self._send_frame(TYPE_WINDOW_UPDATE, FLAG_ACK, sid, STREAM_WINDOW - INITIAL_WINDOW)
            self._spawn(self._on_stream(stream))
        if stream is None:
            # A stream that was never opened is an error; frames still in flight for one we
            # closed or reset (the peer has our FIN or RST by now) are dropped unanswered.
            if sid >= self._next_id if ours else sid > self._peer_max_id:
                raise ProtocolError(f"frame for stream {sid}, which was never opened")
            return 0
        if flags & FLAG_ACK:
            stream._established.set()
        if ftype == TYPE_DATA:
            stream._on_data(payload)
        elif length:
            stream._on_window(length)
        if flags & FLAG_FIN:
            stream._on_fin()
            self._maybe_forget(stream)
        if flags & FLAG_RST:
            stream._on_reset("peer")
        return 0

    def _send_frame(self, ftype: int, flags: int, sid: int, length: int, payload: bytes = b"") -> None:
        if self.closed:
            raise StreamClosed(self.close_reason or "session closed")
        self._send(encode_header(ftype, flags, sid, length) + payload if payload else
                   encode_header(ftype, flags, sid, length))

    async def _drain(self) -> None:
        if self.closed:
            raise StreamClosed(self.close_reason or "session closed")
        await self._drain_fn()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _maybe_forget(self, stream: Stream) -> None:
        if stream.local_closed and stream.remote_closed:
            self._forget(stream)

    def _forget(self, stream: Stream) -> None:
        self._streams.pop(stream.id, None)

    # -- public -------------------------------------------------------------------------------
    def start_stream(self) -> Stream:
        """Open a stream without waiting for the peer's ACK: the spec lets data follow the SYN
        at once (see :meth:`confirm_stream`)."""
        sid = self._next_id
        self._next_id += 2
        stream = Stream(self, sid)
        self._streams[sid] = stream
        self._send_frame(TYPE_WINDOW_UPDATE, FLAG_SYN, sid, STREAM_WINDOW - INITIAL_WINDOW)
        return stream

    async def open_stream(self, timeout: float = 10.0) -> Stream:
        """Open a stream and wait for the peer's ACK."""
        stream = self.start_stream()
        await self.confirm_stream(stream, timeout)
        return stream

    async def confirm_stream(self, stream: Stream, timeout: float) -> None:
        """Wait for the ACK of a stream :meth:`start_stream` opened (StreamClosed if refused)."""
        sid = stream.id
        try:
            await asyncio.wait_for(stream._established.wait(), timeout)
        except TimeoutError:
            stream.reset()
            raise StreamClosed(f"peer did not acknowledge stream {sid} within {timeout}s") from None
        if stream.reset_by:
            raise StreamClosed(f"peer refused stream {sid}")

    async def ping(self, timeout: float = 5.0) -> None:
        self._ping_id = (self._ping_id + 1) & 0xFFFFFFFF
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pings[self._ping_id] = fut
        self._send_frame(TYPE_PING, FLAG_SYN, 0, self._ping_id)
        await asyncio.wait_for(fut, timeout)

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    def go_away(self, code: int = GO_AWAY_NORMAL, reason: str = "") -> None:
        if not self.closed:
            try:
                self._send_frame(TYPE_GO_AWAY, 0, 0, code)
            except Exception:
                pass
        self._shutdown(reason or "closed")

    def connection_lost(self, reason: str = "connection lost") -> None:
        self._shutdown(reason)

    def _shutdown(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        for stream in list(self._streams.values()):
            stream._on_reset("session")
        self._streams.clear()
        for fut in self._pings.values():
            if not fut.done():
                fut.set_exception(StreamClosed(reason))
        self._pings.clear()
        self.done.set()


async def connect_answer(stream: Stream, port: int | str) -> None:
    """Client half of the hybrid-vsock handshake, once ``CONNECT <port>`` is sent: the guest's
    ``OK <port>``, or the reason it refused."""
    line = await stream.readline()
    if not line.startswith(b"OK "):
        reason = line.decode(errors="replace").strip() or "stream closed"
        raise StreamClosed(f"guest refused CONNECT {port}: {reason}")
