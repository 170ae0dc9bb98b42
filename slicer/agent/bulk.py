"""Guest end of the bulk port: a copy's bytes on a virtio-serial port of their own.

Through the channel a copy crosses the demux, yamux, a unix socket and aiohttp's parser, which
caps it near 18 MB/s under TCG; on a port of its own it is read and written by one thread in
large blocks (shared/DESIGN.md measures the port at 70-90 MB/s). The copy is still asked for on
the channel (``POST/GET /cp?...&bulk=TOKEN``, answered there as usual); only its bytes go here,
framed as :mod:`slicer.channel.bulk` says. One copy per direction at a time; a copy that finds
its direction taken answers ``bulk_busy`` and the host sends it through the channel instead.

Reads and writes poll with a timeout so that a copy whose request went away (watched by
``_transfer``) stops within a second rather than blocking a thread for ever. Each read or
write holds its direction's lock from its last look at ``cancelled`` to its end, and a new copy
takes that lock once before it says it is ready: from then on, a cancelled copy's thread can
no longer take the new copy's bytes (the host sends them only once told ready).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import threading
import time
from collections.abc import AsyncIterator, Callable

from slicer.channel.bulk import ABORT, DIGEST, DIGEST_SIZE, END, FRAME, MAX_FRAME, MAX_SKIP, header, port_name

PORTS_DIR = "/dev/virtio-ports"
POLL_MS = 250
IDLE_TIMEOUT = 60.0  # seconds a transfer may wait for the host without a byte moving
WATCH_INTERVAL = 0.5  # how often a transfer looks whether its request went away
READ_BUFFERS = 32
READ_BUFFER_SIZE = 4096
CHUNK = 1 << 20  # what a source hands out at a time
MAX_LANES = 2  # ports an upload may be striped over (slicer.channel.bulk.BulkLink.send)


class BulkError(Exception):
    pass


class BulkBusy(BulkError):
    pass


class _Port:
    """Blocking-with-timeout reads and writes on the port's descriptor, for worker threads."""

    def __init__(self, fd: int, cancelled: threading.Event, lock: threading.Lock) -> None:
        self.fd = fd
        self.cancelled = cancelled
        self.lock = lock  # the direction's: see the module's docstring

    def _wait(self, events: int) -> None:
        poller = select.poll()
        poller.register(self.fd, events)
        deadline = time.monotonic() + IDLE_TIMEOUT
        while not self.cancelled.is_set():
            for _, ev in poller.poll(POLL_MS):
                if ev & events:
                    return
                if ev & select.POLLHUP:  # no host on the other end (yet): not an end of data
                    self.cancelled.wait(0.05)
            if time.monotonic() > deadline:
                raise BulkError(f"the host moved nothing for {IDLE_TIMEOUT:g}s")
        raise BulkError("the copy was cancelled")

    def _do(self, events: int, op: Callable[[], int]) -> int:
        """``op()`` once the port is ready for ``events``, under the direction's lock."""
        while True:
            self._wait(events)
            with self.lock:
                if self.cancelled.is_set():
                    raise BulkError("the copy was cancelled")
                try:
                    return op()
                except BlockingIOError:
                    continue

    def readv(self, views: list[memoryview]) -> int:
        while (n := self._do(select.POLLIN, lambda: os.readv(self.fd, views))) == 0:
            self.cancelled.wait(0.05)  # 0: the host is away for now
        return n

    def sendfile(self, fd: int, offset: int, count: int) -> int:
        return self._do(select.POLLOUT, lambda: os.sendfile(self.fd, fd, offset, count))

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[self._do(select.POLLOUT, lambda v=view: os.write(self.fd, v)):]


def send_file(port: _Port, token: bytes, fd: int, size: int) -> None:
    """A file's ``size`` bytes as one transfer, its frames' payloads by ``sendfile`` (no copy
    through Python: twice as fast as writes under TCG). A file that shrinks meanwhile aborts."""
    port.write(header(token))
    offset = 0
    while offset < size:
        frame = min(MAX_FRAME, size - offset)
        port.write(FRAME.pack(frame))
        end = offset + frame
        while offset < end:
            if (n := port.sendfile(fd, offset, end - offset)) == 0:
                port.write(FRAME.pack(ABORT))
                raise BulkError("the file shrank while it was sent")
            offset += n
    port.write(FRAME.pack(END))


class _Lane:
    """One port of a transfer from the host: its header found once, the bytes read past it
    while looking for it handed out first."""

    def __init__(self, port: _Port) -> None:
        self.port = port
        self.found = False  # this transfer's header read
        self._spill = b""  # read past the header while looking for it: the payload's first bytes

    def read_some(self, view: memoryview) -> int:
        if self._spill:
            n = min(len(view), len(self._spill))
            view[:n], self._spill = self._spill[:n], self._spill[n:]
            return n
        return self.port.readv([view])

    def read_payload(self, view: memoryview) -> int:
        """Into ``view`` (payload only: never past the current frame), in port-sized pieces."""
        if self._spill:
            return self.read_some(view)
        return self.port.readv([view[at:at + READ_BUFFER_SIZE] for at in range(0, len(view), READ_BUFFER_SIZE)])

    def read_exact(self, n: int) -> bytes:
        out = bytearray(n)
        view, got = memoryview(out), 0
        while got < n:
            got += self.read_some(view[got:])
        return bytes(out)

    def skip_to_header(self, token: bytes) -> None:
        """Discard what comes before this transfer's header (a cancelled copy's leftovers)."""
        mark, seen, skipped = header(token), bytearray(), 0
        block = memoryview(bytearray(READ_BUFFER_SIZE))
        while (at := seen.find(mark)) < 0:
            if len(seen) >= len(mark):
                skipped += len(seen) - len(mark) + 1
                del seen[:len(seen) - len(mark) + 1]
            if skipped > MAX_SKIP:
                raise BulkError("no header for this copy on the bulk port")
            seen += block[:self.port.readv([block])]
        self._spill = bytes(seen[at + len(mark):])
        self.found = True


class _Reader:
    """The payload of one transfer from the host, read in worker threads straight into the
    caller's buffer: a read never asks a port for more than the current frame still holds, so
    payload bytes are copied once (the port's buffers to ours) and headers are read apart.
    Striped over several lanes (slicer.channel.bulk.BulkLink.send), frame k is read from lane
    k % lanes, and so are the digest and end frames that follow the last one."""

    def __init__(self, ports: list[_Port], token: bytes) -> None:
        self.lanes = [_Lane(p) for p in ports]
        self.token = token
        self._turn = 0  # the frame to read next (its lane: _turn % lanes)
        self._lane = self.lanes[0]  # the current frame's
        self._left = 0  # of the current frame; 0: between frames
        self.done = False
        self.digest: str | None = None  # the payload's SHA-256 (hex), if the host sent it

    def _next_frame(self) -> int:
        """The length of the next frame (its lane's turn), or 0 at the transfer's end."""
        lane = self.lanes[self._turn % len(self.lanes)]
        if not lane.found:
            lane.skip_to_header(self.token)
        while True:
            (length,) = FRAME.unpack(lane.read_exact(FRAME.size))
            if length == END:
                return 0
            if length == DIGEST:
                self.digest = lane.read_exact(DIGEST_SIZE).hex()
                continue
            if length == ABORT or length > MAX_FRAME:
                raise BulkError("the host broke the copy off")
            self._lane, self._turn = lane, self._turn + 1
            return length

    def readinto(self, buf: memoryview) -> int:
        """Fill ``buf`` with payload as far as the ports give; 0 at the end of the transfer."""
        got = 0
        while got < len(buf) and not self.done:
            if self._left == 0:
                self._left = self._next_frame()
                if self._left == 0:
                    self.done = True
                    break
            end = got + min(self._left, len(buf) - got, READ_BUFFERS * READ_BUFFER_SIZE)
            n = self._lane.read_payload(buf[got:end])
            got += n
            self._left -= n
        return got


class Source:
    """A host→guest transfer as the copy handlers read a request body: ``async for`` chunks, or
    ``read(n)`` (what :class:`slicer.agent.http_util.BodyReader` calls). A chunk is a view of one
    buffer that the next read reuses: its reader writes or copies it before asking again (as
    ``receive_file`` and ``BodyReader`` do)."""

    def __init__(self, reader: _Reader) -> None:
        self._reader = reader
        self._buf = memoryview(bytearray(CHUNK))

    async def read(self, n: int = -1) -> memoryview:
        view = self._buf[:CHUNK if n < 0 else min(n, CHUNK)]
        got = await asyncio.to_thread(self._reader.readinto, view)
        return view[:got]

    def iter_chunked(self, _size: int) -> Source:
        return self

    @property
    def digest(self) -> str | None:
        """The SHA-256 the host sent of everything read (once read to its end), if it did."""
        return self._reader.digest if self._reader.done else None

    async def __aiter__(self) -> AsyncIterator[memoryview]:
        while chunk := await self.read(CHUNK):
            yield chunk


class Sink:
    """A guest→host transfer as a copy handler writes a response: ``await write(data)``;
    buffered into frames of up to 1 MiB, each written by a worker thread."""

    def __init__(self, port: _Port, token: bytes) -> None:
        self._port = port
        self._buffer = bytearray(header(token))

    async def write(self, data: bytes) -> None:
        for at in range(0, len(data), MAX_FRAME):
            part = data[at:at + MAX_FRAME]
            self._buffer += FRAME.pack(len(part))
            self._buffer += part
        if len(self._buffer) >= CHUNK:
            await self._flush()

    async def _flush(self) -> None:
        data, self._buffer = bytes(self._buffer), bytearray()
        if data:
            await asyncio.to_thread(self._port.write, data)

    async def close(self, ok: bool) -> None:
        self._buffer += FRAME.pack(END if ok else ABORT)
        await self._flush()


def _passes(lock: threading.Lock) -> bool:
    """Take and give back ``lock`` (in a worker thread: never left held if the caller goes)."""
    if lock.acquire(timeout=5):
        lock.release()
        return True
    return False


class BulkPort:
    """The port, opened once by the agent with its further lanes (slicer.channel.bulk.port_name,
    where the VM's layout has them); None when the VM has none (an older VM's layout)."""

    def __init__(self, ports_dir: str = PORTS_DIR) -> None:
        def open_lane(lane: int) -> int:
            return os.open(os.path.join(ports_dir, port_name(lane)), os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)

        self.fds = [open_lane(0)]
        for lane in range(1, MAX_LANES):
            try:
                self.fds.append(open_lane(lane))
            except OSError:  # none (an older layout), or held: the lanes so far still serve
                break
        self._busy = {"in": False, "out": False}
        self._locks = {"in": threading.Lock(), "out": threading.Lock()}

    @classmethod
    def open(cls, ports_dir: str = PORTS_DIR) -> BulkPort | None:
        try:
            return cls(ports_dir)
        except OSError:
            return None

    @contextlib.asynccontextmanager
    async def _transfer(self, direction: str, gone: Callable[[], bool]) -> AsyncIterator[list[_Port]]:
        """One transfer in ``direction``; cancelled (its worker stops) when ``gone()`` says the
        request went away: aiohttp does not cancel a handler whose client left."""
        if self._busy[direction]:
            raise BulkBusy(f"the bulk port is busy ({direction})")
        self._busy[direction] = True
        cancelled = threading.Event()
        lock = self._locks[direction]

        async def watch() -> None:
            while not cancelled.is_set():
                await asyncio.sleep(WATCH_INTERVAL)
                if gone():
                    cancelled.set()

        watcher = asyncio.ensure_future(watch())
        try:
            if not await asyncio.to_thread(_passes, lock):  # a cancelled copy's thread is out of its last read
                raise BulkBusy(f"the bulk port is still held ({direction})")
            yield [_Port(fd, cancelled, lock) for fd in self.fds]
        finally:
            cancelled.set()  # a worker still polling sees it within POLL_MS
            watcher.cancel()
            self._busy[direction] = False

    @contextlib.asynccontextmanager
    async def source(self, token: bytes, gone: Callable[[], bool]) -> AsyncIterator[Source]:
        # A copy refused before its body was read leaves the rest on the port: the host stops
        # sending when it gets the answer, and the next copy skips to its own header.
        async with self._transfer("in", gone) as lanes:
            yield Source(_Reader(lanes, token))

    @property
    def lanes(self) -> int:
        return len(self.fds)

    @contextlib.asynccontextmanager
    async def sending(self, gone: Callable[[], bool]) -> AsyncIterator[_Port]:
        """The port's guest→host direction for one transfer (see :func:`send_file`)."""
        async with self._transfer("out", gone) as lanes:
            yield lanes[0]

    @contextlib.asynccontextmanager
    async def sink(self, token: bytes, gone: Callable[[], bool]) -> AsyncIterator[Sink]:
        async with self._transfer("out", gone) as lanes:
            sink = Sink(lanes[0], token)
            try:
                yield sink
            except BaseException:
                with contextlib.suppress(BulkError, OSError):
                    await asyncio.wait_for(sink.close(ok=False), 5)
                raise
            await sink.close(ok=True)
