"""Local ends of file copies, shared by both clients: reading a file (or bytes, or chunks) to
send, packing a directory as a streamed tar, and extracting a guest's tar safely."""

from __future__ import annotations

import os
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

CHUNK = 256 * 1024
Progress = Callable[[int], None]
Source = str | Path | bytes | Iterable[bytes]  # what upload() sends


def local_chunks(source: Source, progress: Progress | None) -> Iterator[bytes]:
    """``source`` in chunks, reporting the bytes sent so far to ``progress``."""
    done = 0
    if isinstance(source, bytes):
        source = [source]
    if isinstance(source, str | Path):
        with open(source, "rb") as f:
            while chunk := f.read(CHUNK):
                done += len(chunk)
                if progress:
                    progress(done)
                yield chunk
        return
    for chunk in source:
        done += len(chunk)
        if progress:
            progress(done)
        yield chunk


def tar_stream(directory: Path) -> Iterator[bytes]:
    """A tar of ``directory``'s contents, made in a thread and read in chunks: never whole."""
    r, w = os.pipe()

    def produce() -> None:
        with os.fdopen(w, "wb") as f, tarfile.open(fileobj=f, mode="w|") as tf:
            tf.add(directory, arcname=".")

    threading.Thread(target=produce, daemon=True).start()
    with os.fdopen(r, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


class ChunkReader:
    """A file-like ``read`` over an iterator of chunks (for tarfile's stream mode)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            try:
                self._buf += next(self._chunks)
            except StopIteration:
                break
        data, self._buf = (self._buf, b"") if n < 0 else (self._buf[:n], self._buf[n:])
        return data
