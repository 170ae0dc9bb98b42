"""QEMU's stdout and stderr, bounded: ``qemu.log`` (and ``qemu.log.1``, one rotation) never
exceeds ``LOG_MAX`` each, whatever a guest makes QEMU print and whether or not a daemon runs.

QEMU outlives the daemon (a new daemon adopts it), so its stderr cannot be a file it appends to
for ever, nor an anonymous pipe that dies with the daemon. It is a FIFO in the VM's run
directory (``qemu.log.pipe``, 0600), opened **non-blocking** for QEMU: the daemon reads it and
appends to ``qemu.log`` with rotation; a daemon that restarts opens the FIFO again by path and
goes on. While no daemon reads, QEMU's writes fail (``EPIPE``: QEMU ignores SIGPIPE) or, with a
reader that is behind, find the pipe full (``EAGAIN``): the message is dropped and QEMU never
blocks. The reader takes at most ``RATE`` bytes a second (then it pauses and QEMU's writes are
dropped), so a guest that makes QEMU print in a loop costs the event loop little.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

LOG_MAX = 1 << 20  # qemu.log's bound (and qemu.log.1's)
RATE = 1 << 20  # bytes a second the daemon takes from one QEMU's stderr
FIFO = "qemu.log.pipe"
LOG = "qemu.log"

log = logging.getLogger(__name__)
_readers: dict[Path, _Reader] = {}


class _Reader:
    """The daemon's end of one VM's FIFO, appending what comes to the bounded log."""

    def __init__(self, run_dir: Path, loop: asyncio.AbstractEventLoop) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOG
        self.loop = loop
        self.fd = os.open(run_dir / FIFO, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self.size = self.path.stat().st_size if self.path.exists() else 0
        self.window, self.taken = loop.time(), 0
        self.paused: asyncio.TimerHandle | None = None
        loop.add_reader(self.fd, self.drain)

    def drain(self) -> None:
        """Read what is there (within the rate) into the log; at end of file (no QEMU holds the
        FIFO any more), close."""
        now = self.loop.time()
        if now - self.window >= 1.0:
            self.window, self.taken = now, 0
        while self.fd >= 0 and self.taken < RATE:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.close()
                return
            self.taken += len(data)
            self._append(data)
        if self.fd >= 0 and self.paused is None:  # over the rate: come back in the next window
            self.loop.remove_reader(self.fd)
            self.paused = self.loop.call_later(max(0.0, self.window + 1.0 - now), self._resume)

    def _resume(self) -> None:
        self.paused = None
        if self.fd >= 0:
            self.loop.add_reader(self.fd, self.drain)

    def _append(self, data: bytes) -> None:
        if self.size + len(data) > LOG_MAX:
            with contextlib.suppress(OSError):
                os.replace(self.path, self.path.with_name(LOG + ".1"))
            self.size = 0
            data = data[-LOG_MAX:]
        try:
            with open(self.path, "ab") as f:
                f.write(data)
        except OSError as e:  # a full disk must not take the daemon's loop with it
            log.debug("%s: %s", self.path, e)
        self.size += len(data)

    def close(self) -> None:
        if self.paused is not None:
            self.paused.cancel()
            self.paused = None
        if self.fd >= 0:
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
        if _readers.get(self.run_dir) is self:
            del _readers[self.run_dir]


@contextlib.contextmanager
def qemu_output(run_dir: Path) -> Iterator[int]:
    """The descriptor to give QEMU as stdout and stderr (closed here once it has been handed
    over); the daemon's reader starts first. Call on the event loop's thread."""
    loop = asyncio.get_running_loop()
    close(run_dir)
    fifo = run_dir / FIFO
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo, 0o600)
    with open(run_dir / LOG, "wb"):  # this QEMU's output only (an earlier one's may be in qemu.log.1)
        pass
    _readers[run_dir] = _Reader(run_dir, loop)
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def reattach(run_dir: Path) -> None:
    """After adopting a QEMU an earlier daemon started: read its FIFO again (if it has one)."""
    if run_dir in _readers or not (run_dir / FIFO).exists():
        return
    try:
        _readers[run_dir] = _Reader(run_dir, asyncio.get_running_loop())
    except OSError as e:
        log.warning("%s: cannot read QEMU's output: %s", run_dir, e)


def flush(run_dir: Path) -> None:
    """Take what QEMU has written so far into ``qemu.log`` (before reading it)."""
    if (reader := _readers.get(run_dir)) is not None:
        reader.drain()


def close(run_dir: Path) -> None:
    if (reader := _readers.get(run_dir)) is not None:
        reader.close()
