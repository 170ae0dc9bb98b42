"""The host's channel (slicer.channel.host) against a guest end made here from the same yamux
code: an agent call sends its request without waiting for the guest's OK (one trip through the
guest, not three), and a guest that refuses or never acknowledges the stream still ends the call
with a connect error, not a hang."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from slicer.channel import host
from slicer.channel.host import Channel, ChannelTransport
from slicer.channel.yamux import HELLO, READY, Session, Stream

ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n{\"ok\": true}"


class Guest:
    """The guest's end of a channel socket: the handshake, then a yamux server whose streams
    answer ``CONNECT`` as ``behaviour`` says: ``ok`` (then one HTTP answer), ``refuse``, ``silent``."""

    def __init__(self, path: Path, behaviour: str = "ok") -> None:
        self.path = path
        self.behaviour = behaviour
        self.reads: list[bytes] = []  # what each read of the socket brought, after the handshake
        self.bodies: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, str(self.path))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = await reader.readline()
        assert hello.startswith(HELLO)
        writer.write(READY + hello[len(HELLO):])
        if self.behaviour == "silent":  # its end restarted after the handshake: nothing is acknowledged
            while data := await reader.read(1 << 20):
                self.reads.append(data)
            return
        session = Session(writer.write, writer.drain, client=False, on_stream=self._stream)
        while data := await reader.read(1 << 20):
            self.reads.append(data)
            session.feed(data)

    async def _stream(self, stream: Stream) -> None:
        line = await stream.readline()
        assert line == b"CONNECT 1\n"
        if self.behaviour == "refuse":
            await stream.write(b"ERR no agent listening\n")
            await stream.close()
            return
        # The whole request first, and only then OK: a host that waited for OK before sending
        # would wait for ever.
        request = bytearray()
        while b"\r\n\r\n" not in request:
            request += await stream.read()
        head, _, body = bytes(request).partition(b"\r\n\r\n")
        sizes = [int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")]
        while len(body) < (sizes[0] if sizes else 0):
            body += await stream.read()
        self.bodies.append(body)
        await stream.write(b"OK 1\n" + ANSWER)
        await stream.close()


async def client_for(tmp_path: Path, behaviour: str) -> tuple[Guest, Channel, httpx.AsyncClient]:
    guest = Guest(tmp_path / "channel.sock", behaviour)
    await guest.start()
    channel = Channel(str(guest.path))
    return guest, channel, httpx.AsyncClient(transport=ChannelTransport(channel, 1), base_url="http://agent")


async def test_an_agent_call_sends_its_request_before_the_guest_says_ok(tmp_path: Path):
    guest, channel, client = await client_for(tmp_path, "ok")
    async with client, asyncio.timeout(10):
        for body in (b"", b"x" * 5000):
            r = await client.post("/exec", content=body, timeout=5)
            assert r.status_code == 200 and r.json() == {"ok": True}
            assert guest.bodies[-1] == body


@pytest.mark.parametrize("size", [0, 2 * host.PIPELINED])
async def test_a_refused_stream_is_a_connect_error_even_with_a_body_past_the_window(tmp_path: Path, size: int):
    guest, channel, client = await client_for(tmp_path, "refuse")
    async with client, asyncio.timeout(10):
        with pytest.raises(httpx.ConnectError, match="no agent listening"):
            await client.post("/exec", content=b"y" * size, timeout=5)
        assert channel.connected  # refused, not broken: the next call may go elsewhere


async def test_a_stream_the_guest_never_acknowledges_drops_the_channel(tmp_path: Path):
    guest, channel, client = await client_for(tmp_path, "silent")
    async with client, asyncio.timeout(10):
        await channel.session(5)
        with pytest.raises(httpx.ConnectError, match="did not acknowledge"):
            await client.get("/health", timeout=0.5)
        assert b"CONNECT 1\n" in guest.reads[0] and not channel.connected  # the next call starts over
