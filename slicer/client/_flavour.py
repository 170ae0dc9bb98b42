"""What differs between the two clients beyond ``async``/``await``, as pairs: ``async_x`` is
used in ``_async.py``, and unasync renames it to ``x`` in the generated ``_sync.py``
(the renames are listed in :mod:`slicer.client._unasync`)."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slicer.client._transfer import CHUNK, ChunkReader

if TYPE_CHECKING:
    from websockets.asyncio.client import connect as AsyncWebSocket  # noqa: N812 (awaitable, async with)
    from websockets.sync.client import ClientConnection as WebSocket
else:
    AsyncWebSocket = WebSocket = Any

SPOOL_IN_MEMORY = 16 << 20  # an async tar download is spooled to a temporary file past this


async def async_sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


def sleep(seconds: float) -> None:
    time.sleep(seconds)


async def async_upload_body(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:  # local file reads: small and quick, no need for a thread
        yield chunk


def upload_body(chunks: Iterable[bytes]) -> Iterable[bytes]:
    return chunks


def extract_tar(chunks: Iterator[bytes], dest: Path) -> None:
    """Extract a streamed tar made by a guest into ``dest``, member by member under our own
    rules (see :mod:`slicer.client._tar`): nothing lands outside ``dest``."""
    from slicer.client._tar import extract

    extract(ChunkReader(chunks), dest)


async def async_extract_tar(chunks: AsyncIterator[bytes], dest: Path) -> None:
    """:func:`extract_tar` for an async stream: spooled first, then extracted in a thread so the
    event loop never waits on the disk."""
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
        async for chunk in chunks:
            spool.write(chunk)
        spool.seek(0)
        await asyncio.to_thread(extract_tar, iter(lambda: spool.read(CHUNK), b""), dest)


def ws_connect(url: str, uds: str | None, headers: dict[str, str], **options: Any) -> WebSocket:
    from websockets.sync.client import connect, unix_connect

    if uds:
        return unix_connect(uds, url, additional_headers=headers, **options)
    return connect(url, additional_headers=headers, **options)


def async_ws_connect(url: str, uds: str | None, headers: dict[str, str], **options: Any) -> AsyncWebSocket:
    """Not a coroutine: websockets' ``connect`` is awaited or used with ``async with``."""
    from websockets.asyncio.client import connect, unix_connect

    if uds:
        return unix_connect(uds, url, additional_headers=headers, **options)
    return connect(url, additional_headers=headers, **options)
