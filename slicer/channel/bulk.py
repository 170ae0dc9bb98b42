"""The bulk port: a second virtio-serial port per VM that carries only copies' bytes.

A copy is asked for on the channel as ever (``POST/GET /cp``) with ``bulk=<32 hex>``, a token
of that copy; its bytes go on this port as one *transfer*: the header ``SLBK`` + the token's 16
bytes, then frames of a 4-byte big-endian length and that many bytes (1 to 1 MiB), ended by a
frame of length 0, or of 0xFFFFFFFF when the sender broke off. An upload the agent asked a digest
of (a chunk of the SDKs' chunked copy) has, just before its end, a frame of length 0xFFFFFFFE and
the payload's 32-byte SHA-256: hashed here at the host's speed, it spares the guest reading the
chunk again to check it (slicer.agent.upload). One transfer per direction at a time. A reader
discards whatever precedes its transfer's header (a cancelled copy's leftovers), up to a bound.
This end (:class:`BulkLink`) is the host's: standard library and asyncio only, like the rest of
the channel; the guest's is :mod:`slicer.agent.bulk`.

The guest is not trusted: what it writes is read only during a copy the host asked for, in
frames no larger than 1 MiB, and a reader that finds no header soon enough gives up.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import struct
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path

MAGIC = b"SLBK"
FRAME = struct.Struct(">I")
END, ABORT, DIGEST = 0, 0xFFFFFFFF, 0xFFFFFFFE
DIGEST_SIZE = 32  # a SHA-256
MAX_FRAME = 1 << 20
MAX_SKIP = 64 << 20  # leftovers a reader passes over looking for its header
FRAMES_PER_SECOND = 2000  # a guest's frames read per second and download (small ones cost the loop)
PORT_NAME = "slicer.bulk"
STRIPE_FRAME = 256 << 10  # an upload's frame when striped: lanes take turns often enough to both be filling


def port_name(lane: int) -> str:
    """The virtio-serial name of the bulk port's ``lane`` (0: the port itself)."""
    return PORT_NAME if lane == 0 else f"{PORT_NAME}{lane}"
CONNECT_TIMEOUT = 5.0


def header(token: bytes) -> bytes:
    return MAGIC + token


def new_token() -> bytes:
    return secrets.token_bytes(16)


class BulkError(ConnectionError):
    """The transfer broke (the guest broke it off, sent garbage, or went away)."""


class BulkLink:
    """The host's end of one VM's bulk port (its QEMU chardev sockets, one per lane), opened on
    first use. ``claim`` hands a direction to one copy at a time; a copy that finds it taken
    may wait for it a while, then goes through the channel instead. Downloads use lane 0; an
    upload may be striped over every lane the agent reads (:meth:`send`)."""

    def __init__(self, socket_paths: list[Path]) -> None:
        self.socket_paths = socket_paths
        self._streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None] = [None] * len(self.socket_paths)
        self._connecting = asyncio.Lock()
        self._busy = {"in": False, "out": False}
        self._freed: dict[str, asyncio.Event] = {}  # set when a direction is released

    @property
    def lanes(self) -> int:
        return len(self.socket_paths)

    async def _connect(self, lane: int = 0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with self._connecting:
            stream = self._streams[lane]
            if stream is None or stream[1].is_closing():
                try:
                    stream = await asyncio.wait_for(
                        asyncio.open_unix_connection(str(self.socket_paths[lane]), limit=MAX_FRAME * 2),
                        CONNECT_TIMEOUT)
                except (OSError, TimeoutError) as e:
                    raise BulkError(f"bulk port: cannot connect: {e}") from e
                self._streams[lane] = stream
            return stream

    def _broken(self, writer: asyncio.StreamWriter | None = None) -> None:
        """Drop the connections (``writer``'s only, if it is still a current one: the other
        direction may have made a new one meanwhile)."""
        for lane, stream in enumerate(self._streams):
            if stream is not None and (writer is None or stream[1] is writer):
                stream[1].close()
                self._streams[lane] = None

    async def claim(self, direction: str, wait: float = 0.0) -> bool:
        """Take ``direction`` ("in" or "out") for one copy; False if another copy still holds it
        after ``wait`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while self._busy[direction]:
            freed = self._freed.setdefault(direction, asyncio.Event())
            freed.clear()
            try:
                await asyncio.wait_for(freed.wait(), deadline - loop.time())
            except TimeoutError:
                return False
        self._busy[direction] = True
        return True

    def release(self, direction: str) -> None:
        self._busy[direction] = False
        if (freed := self._freed.get(direction)) is not None:
            freed.set()

    async def send(self, token: bytes, chunks: AsyncIterable[bytes], digest: bool = False, lanes: int = 1) -> int:
        """Write ``chunks`` as one transfer (with ``digest``, their SHA-256 before its end);
        returns the bytes sent. Broken off (cancelled, or ``chunks`` failing: its client left), it
        ends with an abort frame, so the guest stops.

        Over ``lanes`` > 1 ports (as many as the agent said it reads), each lane carries the
        transfer's header, frames take turns (frame k on lane k % lanes, STRIPE_FRAME bytes
        each), the digest follows the last frame on the next lane's turn, and every lane ends
        with its own end frame: the guest reads the lanes in turn, and one reader's wait for a
        lane no longer stalls the other lanes' filling."""
        lanes = max(1, min(lanes, self.lanes))
        writers = [(await self._connect(lane))[1] for lane in range(lanes)]
        frame_size = MAX_FRAME if lanes == 1 else STRIPE_FRAME
        sent, turn = 0, 0
        pending = bytearray()  # small chunks (a client's) gathered into big frames: fewer reads in the guest
        hasher = hashlib.sha256() if digest else None

        async def flush() -> None:
            nonlocal turn
            writer = writers[turn % lanes]
            writer.write(FRAME.pack(len(pending)))
            writer.write(pending)
            if hasher is not None:
                hasher.update(pending)
            pending.clear()
            turn += 1
            await writer.drain()

        try:
            for writer in writers:
                writer.write(header(token))
            async for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    room = frame_size - len(pending)
                    pending += view[:room]
                    sent += min(room, len(view))
                    view = view[room:]
                    if len(pending) >= frame_size:
                        await flush()
            if pending:
                await flush()
            if hasher is not None:
                writers[turn % lanes].write(FRAME.pack(DIGEST) + hasher.digest())
            for writer in writers:
                writer.write(FRAME.pack(END))
            for writer in writers:
                await writer.drain()
        except (ConnectionError, OSError) as e:
            for writer in writers:
                self._broken(writer)
            raise BulkError(f"bulk port: {e}") from e
        except BaseException:
            # Frames are written whole before each drain, so an abort frame follows a whole one.
            for writer in writers:
                if not writer.is_closing():
                    writer.write(FRAME.pack(ABORT))
            raise
        return sent

    async def receive(self, token: bytes) -> AsyncIterator[bytes]:
        """The payload of the guest's transfer with ``token``, frame by frame."""
        reader, writer = await self._connect(0)
        mark = header(token)
        try:
            skipped = 0
            while True:  # up to the header: what came before is a cancelled copy's
                try:
                    await reader.readuntil(mark)
                    break
                except asyncio.LimitOverrunError as e:
                    skipped += e.consumed
                    if skipped > MAX_SKIP:
                        raise BulkError("no header for this copy on the bulk port") from None
                    await reader.readexactly(e.consumed)
            loop, started, frames = asyncio.get_running_loop(), asyncio.get_running_loop().time(), 0
            while True:
                frames += 1
                if frames > FRAMES_PER_SECOND * (loop.time() - started + 1):  # tiny frames: paced
                    await asyncio.sleep(1 / FRAMES_PER_SECOND)
                (length,) = FRAME.unpack(await reader.readexactly(FRAME.size))
                if length == END:
                    return
                if length == ABORT:
                    raise BulkError("the guest broke the copy off")
                if length > MAX_FRAME:
                    raise BulkError(f"bulk port: a frame of {length} bytes")
                yield await reader.readexactly(length)
        except BulkError:
            raise
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            self._broken(writer)
            raise BulkError(f"bulk port: {e}") from e

    def close(self) -> None:
        self._broken()
