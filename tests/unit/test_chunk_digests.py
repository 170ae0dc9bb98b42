"""The SDKs' chunked copy with digests from the host: the bulk port's digest frame, end to end
between the host's sender and the guest's reader (finalise's use of it: test_chunk_stripe.py)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import threading
from pathlib import Path

from slicer.agent import bulk as guest_bulk
from slicer.agent import sessions
from slicer.channel.bulk import BulkLink, new_token


async def _sent(payload: list[bytes], digest: bool) -> tuple[bytes, bytes]:
    """(token, every byte a BulkLink wrote for one transfer of ``payload``)."""
    got = bytearray()
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            got.extend(data)
        done.set()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bulk.sock"
        server = await asyncio.start_unix_server(serve, str(path))
        link = BulkLink([path])
        token = new_token()

        async def chunks():
            for p in payload:
                yield p

        assert await link.send(token, chunks(), digest=digest) == sum(map(len, payload))
        link.close()
        await asyncio.wait_for(done.wait(), 5)
        server.close()
    return token, bytes(got)


def _received(token: bytes, wire: bytes) -> tuple[bytes, guest_bulk._Reader]:
    """What the guest's reader makes of ``wire`` (fed through a pipe, as the port would)."""
    r, w = os.pipe()
    feeder = threading.Thread(target=_write_all, args=(w, wire))
    feeder.start()
    reader = guest_bulk._Reader([guest_bulk._Port(r, threading.Event(), threading.Lock())], token)
    out, buf = bytearray(), memoryview(bytearray(1 << 20))
    while n := reader.readinto(buf):
        out += buf[:n]
    feeder.join()
    os.close(r)
    return bytes(out), reader


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.close(fd)


async def test_an_upload_asked_for_its_digest_carries_it_and_the_payload_is_unchanged():
    payload = [os.urandom(n) for n in (1, 70_000, 1 << 20, 3 << 19)]
    whole = b"".join(payload)
    token, wire = await _sent(payload, digest=True)
    got, reader = await asyncio.to_thread(_received, token, wire)
    assert got == whole and reader.digest == hashlib.sha256(whole).hexdigest()
    token, wire = await _sent(payload, digest=False)  # not asked: none sent, the same payload
    got, reader = await asyncio.to_thread(_received, token, wire)
    assert got == whole and reader.digest is None


def test_only_a_sessions_chunks_ask_for_a_digest():
    s = f"/root/.slicer-upload-{'a' * 32}"
    assert sessions.is_chunk(f"{s}/chunks/000000.chunk")
    assert not sessions.is_chunk(f"{s}/manifest.json") and not sessions.is_chunk("/root/file.chunk")


def test_the_guest_helper_imports_no_asyncio():
    """``slicer-agent upload`` runs once per chunked copy: under TCG asyncio alone took a second
    of its start (the helper took 2.4 s; finalise of 64 MiB, 3.5 s)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    code = (f"import sys; sys.path.insert(0, {str(root)!r}); import slicer.agent.upload; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('asyncio', 'concurrent', 'aiohttp')))")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
