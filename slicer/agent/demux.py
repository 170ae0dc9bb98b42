"""Guest end of the channel: the virtio-serial port, the HELLO handshake and the stream bridge.

A virtio-serial port behaves unlike a socket: while no host is connected, ``read`` returns 0
at once and ``poll`` reports POLLHUP, so we wait (without spinning) for POLLHUP to clear;
writes made while the host is away would reach the *next* host, which is why the host
discards everything before our ``SLICER-READY <nonce>``.

Reads use non-blocking ``readv`` into 4 KiB buffers: the port hands back at most one 4 KiB
buffer per read, and big single reads are measured to be an order of magnitude slower.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
from collections.abc import Callable

from slicer.channel.yamux import AGENT_PORT, HELLO, READY, ProtocolError, Session, Stream

READ_BUFFERS = 16
READ_BUFFER_SIZE = 4096
WRITE_HIGH_WATER = 512 * 1024
HUP_POLL_INTERVAL = 0.05


class VirtioPort:
    """Non-blocking reads and buffered writes on a virtio-serial character device."""

    def __init__(self, path: str, on_data: Callable[[bytes], None], on_state: Callable[[bool], None]):
        self._path = path
        self._on_data = on_data
        self._on_state = on_state
        self._loop = asyncio.get_running_loop()
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        # One buffer seen as 16 page-sized views: readv fills them in one call, one copy out.
        self._buf = bytearray(READ_BUFFERS * READ_BUFFER_SIZE)
        view = memoryview(self._buf)
        self._bufs = [view[i * READ_BUFFER_SIZE : (i + 1) * READ_BUFFER_SIZE] for i in range(READ_BUFFERS)]
        self._out = bytearray()
        self._writing = False
        self._can_write = asyncio.Event()
        self._can_write.set()
        self.connected = False
        self._loop.call_soon(self._check_hup)

    def _check_hup(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        hup = any(ev & select.POLLHUP for _, ev in poller.poll(0))
        if hup:
            self._loop.call_later(HUP_POLL_INTERVAL, self._check_hup)
            return
        self.connected = True
        self._on_state(True)
        self._loop.add_reader(self._fd, self._readable)

    def _disconnected(self) -> None:
        self._loop.remove_reader(self._fd)
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        self._out.clear()
        self._can_write.set()
        self.connected = False
        self._on_state(False)
        self._loop.call_later(HUP_POLL_INTERVAL, self._check_hup)

    def _readable(self) -> None:
        try:
            n = os.readv(self._fd, self._bufs)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EINTR):
                return
            n = 0
        if n == 0:
            self._disconnected()
            return
        self._on_data(bytes(self._buf[:n]))

    def write(self, data: bytes) -> None:
        if not self.connected:
            return  # nobody to deliver to: the next host starts a fresh session anyway
        self._out += data
        if not self._writing:
            self._flush()

    def _flush(self) -> None:
        while self._out:
            try:
                n = os.write(self._fd, self._out[:65536])
            except BlockingIOError:
                break
            except OSError:
                self._out.clear()
                break
            del self._out[:n]
        if self._out and not self._writing:
            self._loop.add_writer(self._fd, self._flush)
            self._writing = True
        elif not self._out and self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        if len(self._out) < WRITE_HIGH_WATER:
            self._can_write.set()
        else:
            self._can_write.clear()

    async def drain(self) -> None:
        await self._can_write.wait()


class Demux:
    """Accepts host sessions on the port and bridges each stream to its ``CONNECT`` target."""

    def __init__(self, port_path: str, agent_socket: str) -> None:
        self._port_path = port_path
        self._agent_socket = agent_socket
        self.agent_ready = asyncio.Event()
        self._scan = bytearray()
        self._session: Session | None = None
        self._port: VirtioPort | None = None

    async def start(self) -> None:
        self._port = VirtioPort(self._port_path, self._on_data, self._on_state)

    def _on_state(self, connected: bool) -> None:
        self._end_session("host disconnected")
        self._scan.clear()

    def _end_session(self, reason: str) -> None:
        if self._session is not None:
            self._session.connection_lost(reason)
            self._session = None

    def _on_data(self, data: bytes) -> None:
        if self._session is not None:
            try:
                self._session.feed(data)
                return
            except ProtocolError:
                # Perhaps a new host connected without us seeing the hang-up: look for its HELLO.
                data = bytes(self._session._buf)
                self._end_session("protocol error")
        self._scan += data
        start = self._scan.find(HELLO)
        end = self._scan.find(b"\n", start) if start >= 0 else -1
        if end < 0:
            if len(self._scan) > 65536:
                del self._scan[:-64]
            return
        if not self.agent_ready.is_set():
            return  # answered by set_agent_ready(): READY means the agent can serve at once
        nonce = bytes(self._scan[start + len(HELLO) : end])
        rest = bytes(self._scan[end + 1 :])
        self._scan.clear()
        assert self._port is not None
        self._port.write(READY + nonce + b"\n")
        self._session = Session(self._port.write, self._port.drain, client=False, on_stream=self._bridge)
        if rest:
            self._on_data(rest)

    def set_agent_ready(self) -> None:
        self.agent_ready.set()
        if self._session is None and self._scan:
            self._on_data(b"")

    async def _bridge(self, stream: Stream) -> None:
        try:
            line = (await stream.readline()).decode(errors="replace").strip()
            target = line.removeprefix("CONNECT ").strip()
            if not line.startswith("CONNECT ") or not target:
                raise OSError(f"bad handshake {line!r}")
            if target == str(AGENT_PORT):
                reader, writer = await asyncio.open_unix_connection(self._agent_socket)
            elif target.startswith("unix:"):
                reader, writer = await asyncio.open_unix_connection(target[5:])
            else:
                host, _, port = target.rpartition(":")
                reader, writer = await asyncio.open_connection(host.strip("[]") or "127.0.0.1", int(port))
        except (OSError, ValueError, TimeoutError, ProtocolError) as e:
            try:
                await stream.write(f"ERR {e}\n".encode())
                await stream.close()
            except ConnectionError:
                pass
            return
        try:
            await stream.write(f"OK {target}\n".encode())
            await pump(stream, reader, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()


async def pump(stream: Stream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy bytes both ways between a yamux stream and a socket until both directions end."""

    async def to_socket() -> None:
        while chunk := await stream.read(262144):
            writer.write(chunk)
            await writer.drain()
        if stream.reset_by:
            raise ConnectionResetError
        if writer.can_write_eof():
            writer.write_eof()

    async def to_stream() -> None:
        while chunk := await reader.read(262144):
            await stream.write(chunk)
        await stream.close()

    tasks = [asyncio.ensure_future(to_socket()), asyncio.ensure_future(to_stream())]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in pending:
            t.cancel()
        for t in done:
            if t.exception() and not isinstance(t.exception(), ConnectionError):
                raise t.exception()  # type: ignore[misc]
        if any(t.exception() for t in done):
            stream.reset()
    finally:
        for t in tasks:
            t.cancel()

