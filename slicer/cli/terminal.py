"""The interactive parts of the CLI: a raw local terminal for ``vm shell`` and local
listeners for ``vm forward``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import struct
import sys
import termios
import threading
import tty

DATA, WINDOW, SHUTDOWN, HEARTBEAT, CLOSE = 1, 2, 3, 4, 5


def frame(ftype: int, payload: bytes = b"") -> bytes:
    return struct.pack(">BI", ftype, len(payload)) + payload


def _window() -> bytes:
    try:
        cols, rows = os.get_terminal_size(sys.stdout.fileno())
    except OSError:
        cols, rows = 80, 24
    return frame(WINDOW, struct.pack(">II", cols, rows))


def run_shell(ws) -> int:
    """Bridge this terminal to a shell WebSocket; returns the shell's exit status."""
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    code = 0
    old_winch = signal.getsignal(signal.SIGWINCH)
    stop = threading.Event()

    def keys() -> None:
        with contextlib.suppress(Exception):
            while not stop.is_set() and (data := os.read(fd, 4096)):
                ws.send(frame(DATA, data))

    def heartbeat() -> None:
        while not stop.wait(30):
            with contextlib.suppress(Exception):
                ws.send(frame(HEARTBEAT))

    try:
        if saved is not None:
            tty.setraw(fd, termios.TCSANOW)  # keep typeahead: TCSAFLUSH would drop it
        ws.send(_window())
        signal.signal(signal.SIGWINCH, lambda *_: ws.send(_window()))
        threading.Thread(target=keys, daemon=True).start()
        threading.Thread(target=heartbeat, daemon=True).start()
        for msg in ws:
            if not isinstance(msg, bytes) or len(msg) < 5:
                continue
            ftype, payload = msg[0], msg[5:]
            if ftype == DATA:
                os.write(sys.stdout.fileno(), payload)
            elif ftype == CLOSE:
                code = int(payload or b"0") if payload.strip().lstrip(b"-").isdigit() else 0
                break
    except Exception:
        code = code or 1
    finally:
        stop.set()
        signal.signal(signal.SIGWINCH, old_winch)
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)  # the terminal as we found it
        with contextlib.suppress(Exception):
            ws.close()
    return code


async def _carry(ws, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Carry one local connection over its WebSocket, both ways, until either side ends."""
    async def up() -> None:
        while data := await reader.read(65536):
            await ws.send(data)
        await ws.close()

    async def down() -> None:
        async for msg in ws:
            writer.write(msg if isinstance(msg, bytes) else msg.encode())
            await writer.drain()

    tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), 1)


class _Forwarder:
    """The local listeners of ``vm forward`` and the connections they carry into one VM."""

    def __init__(self, ac, hostname: str, err) -> None:
        self.ac, self.hostname, self.err = ac, hostname, err
        self.connections: set[asyncio.Task] = set()
        self.servers: list[asyncio.AbstractServer] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: str) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        try:
            try:
                ws = await self.ac.forward(self.hostname, target)
            except Exception as e:
                self.err.print(f"[red]{target}: {e}[/red]")
                writer.close()
                return
            await _carry(ws, reader, writer)
        except asyncio.CancelledError:  # Ctrl-C: cut, and end quietly (asyncio's stream
            writer.transport.abort()    # callback reports a cancelled task as an error)
        finally:
            self.connections.discard(task)

    async def listen(self, addr: str, port: int | None, target: str, unix_paths: list[str]) -> None:
        """Listen on (addr, port), or on a local unix socket (addr, None), for ``target``."""
        if port is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(addr)
            server = await asyncio.start_unix_server(lambda r, w: self.handle(r, w, target), addr)
            unix_paths.append(addr)
            where = addr
        else:
            server = await asyncio.start_server(lambda r, w: self.handle(r, w, target), addr, port)
            where = f"{addr}:{port}"
        self.servers.append(server)
        self.err.print(f"forwarding {where} → {self.hostname} {target} (Ctrl-C to stop)")

    async def close(self) -> None:
        """Stop listening and cut every open connection (not drained)."""
        for server in self.servers:
            server.close()
        for task in list(self.connections):
            task.cancel()
        if self.connections:
            await asyncio.wait(list(self.connections), timeout=2)


def forward_ports(client, hostname: str, specs: list[tuple[str, int | None, str]]) -> None:
    """Listen on each (addr, port), or on a local unix socket (path, None), and carry every
    connection to its target in the VM (``host:port`` or ``unix:/path``)."""
    from rich.console import Console

    from slicer.client import AsyncSlicerClient

    err = Console(stderr=True, soft_wrap=True)
    settings = client.settings
    unix_paths: list[str] = []

    async def serve() -> None:
        # Ctrl-C (or SIGTERM) ends it at once: open connections are cut, not drained, and no
        # WebSocket close handshake is waited for.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with AsyncSlicerClient(settings.base_url if not settings.uds else settings.uds,
                                     token=settings.token) as ac:
            forwarder = _Forwarder(ac, hostname, err)
            for addr, port, target in specs:
                await forwarder.listen(addr, port, target, unix_paths)
            await stop.wait()
            await forwarder.close()

    try:
        with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
            asyncio.run(serve())
    finally:
        for path in unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
