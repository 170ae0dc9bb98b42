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
CONNECT_TIMEOUT = 5.0


def header(token: bytes) -> bytes:
    return MAGIC + token


def new_token() -> bytes:
    return secrets.token_bytes(16)


class BulkError(ConnectionError):
    """The transfer broke (the guest broke it off, sent garbage, or went away)."""


class BulkLink:
    """The host's end of one VM's bulk port (its QEMU chardev socket), opened on first use.
    ``claim`` hands a direction to one copy at a time, without waiting: a copy that finds it
    taken goes through the channel instead."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._connecting = asyncio.Lock()
        self._busy = {"in": False, "out": False}

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with self._connecting:
            if self._writer is None or self._writer.is_closing():
                try:
                    self._reader, self._writer = await asyncio.wait_for(
                        asyncio.open_unix_connection(str(self.socket_path), limit=MAX_FRAME * 2), CONNECT_TIMEOUT)
                except (OSError, TimeoutError) as e:
                    raise BulkError(f"bulk port: cannot connect: {e}") from e
            assert self._reader is not None and self._writer is not None
            return self._reader, self._writer

    def _broken(self, writer: asyncio.StreamWriter | None = None) -> None:
        """Drop the connection (``writer``'s only, if it is still the current one: the other
        direction may have made a new one meanwhile)."""
        if writer is not None and writer is not self._writer:
            return
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    def claim(self, direction: str) -> bool:
        """Take ``direction`` ("in" or "out") for one copy; False if another copy holds it."""
        if self._busy[direction]:
            return False
        self._busy[direction] = True
        return True

    def release(self, direction: str) -> None:
        self._busy[direction] = False

    async def send(self, token: bytes, chunks: AsyncIterable[bytes], digest: bool = False) -> int:
        """Write ``chunks`` as one transfer (with ``digest``, their SHA-256 before its end);
        returns the bytes sent. Broken off (cancelled, or ``chunks`` failing: its client left), it
        ends with an abort frame, so the guest stops."""
        _, writer = await self._connect()
        sent = 0
        pending = bytearray()  # small chunks (a client's) gathered into big frames: fewer reads in the guest
        hasher = hashlib.sha256() if digest else None

        async def flush() -> None:
            writer.write(FRAME.pack(len(pending)))
            writer.write(pending)
            if hasher is not None:
                hasher.update(pending)
            pending.clear()
            await writer.drain()

        try:
            writer.write(header(token))
            async for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    room = MAX_FRAME - len(pending)
                    pending += view[:room]
                    sent += min(room, len(view))
                    view = view[room:]
                    if len(pending) >= MAX_FRAME:
                        await flush()
            if pending:
                await flush()
            if hasher is not None:
                writer.write(FRAME.pack(DIGEST) + hasher.digest())
            writer.write(FRAME.pack(END))
            await writer.drain()
        except (ConnectionError, OSError) as e:
            self._broken(writer)
            raise BulkError(f"bulk port: {e}") from e
        except BaseException:
            # Frames are written whole before each drain, so an abort frame follows a whole one.
            if not writer.is_closing():
                writer.write(FRAME.pack(ABORT))
            raise
        return sent

    async def receive(self, token: bytes) -> AsyncIterator[bytes]:
        """The payload of the guest's transfer with ``token``, frame by frame."""
        reader, writer = await self._connect()
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
