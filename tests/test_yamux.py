"""The yamux framing on its own: two sessions joined in memory (pure logic, no VM)."""

from __future__ import annotations

import asyncio
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slicer.channel import yamux
from slicer.channel.yamux import (
    FLAG_SYN,
    STREAM_WINDOW,
    TYPE_DATA,
    TYPE_WINDOW_UPDATE,
    ProtocolError,
    Session,
    Stream,
    StreamClosed,
    encode_header,
)


class Pair:
    """A client and a server session whose bytes reach each other on the next loop turn."""

    def __init__(self, on_stream, chunking: int | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.wire: list[bytes] = []
        self.chunking = chunking
        self.client = Session(self._to_server, self._drain, client=True)
        self.server = Session(self._to_client, self._drain, client=False, on_stream=on_stream)

    async def _drain(self) -> None:
        await asyncio.sleep(0)

    def _deliver(self, session: Session, data: bytes) -> None:
        if self.chunking:  # split arbitrarily, as a byte pipe may
            i = 0
            while i < len(data):
                n = random.randint(1, self.chunking)
                self.loop.call_soon(session.feed, data[i : i + n])
                i += n
        else:
            self.loop.call_soon(session.feed, data)

    def _to_server(self, data: bytes) -> None:
        self.wire.append(data)
        self._deliver(self.server, data)

    def _to_client(self, data: bytes) -> None:
        self._deliver(self.client, data)


def holding_pair() -> tuple[Pair, dict[int, Stream]]:
    """A Pair whose server side keeps every stream it accepts, by id, for the test to use."""
    streams: dict[int, Stream] = {}

    async def hold(stream: Stream) -> None:
        streams[stream.id] = stream

    return Pair(hold), streams


async def read_all(stream: Stream) -> bytes:
    out = bytearray()
    while chunk := await stream.read():
        out += chunk
    return bytes(out)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_header_is_twelve_bytes_big_endian():
    h = encode_header(TYPE_DATA, FLAG_SYN, 7, 300)
    assert h == bytes([0, 0, 0, 1]) + struct.pack(">II", 7, 300)


def test_echo_and_half_close():
    async def main():
        async def echo(stream: Stream) -> None:
            data = await read_all(stream)
            await stream.write(data.upper())
            await stream.close()

        pair = Pair(echo)
        s = await pair.client.open_stream()
        assert s.id % 2 == 1
        await s.write(b"hello yamux")
        await s.close()
        assert await read_all(s) == b"HELLO YAMUX"

    run(main())


def test_flow_control_blocks_writer_at_window_and_resumes():
    async def main():
        pair, received = holding_pair()
        s = await pair.client.open_stream()
        writer = asyncio.ensure_future(s.write(b"x" * (STREAM_WINDOW * 3)))
        await asyncio.sleep(0.05)
        assert not writer.done(), "writer must stop at the peer's window"
        assert s._send_window == 0
        peer = received[s.id]
        got = bytearray()
        while len(got) < STREAM_WINDOW * 3:
            got += await peer.read()
        await asyncio.wait_for(writer, 5)
        assert bytes(got) == b"x" * (STREAM_WINDOW * 3)

    run(main())


def test_stalled_stream_does_not_block_another():
    async def main():
        pair, streams = holding_pair()
        stalled = await pair.client.open_stream()
        busy = await pair.client.open_stream()
        stall_task = asyncio.ensure_future(stalled.write(b"s" * (STREAM_WINDOW * 4)))
        payload = random.randbytes(3 * STREAM_WINDOW)

        async def send() -> None:
            await busy.write(payload)
            await busy.close()

        sender = asyncio.ensure_future(send())
        await asyncio.sleep(0)
        got = await read_all(streams[busy.id])
        await sender
        assert got == payload
        assert not stall_task.done()
        stall_task.cancel()

    run(main())


def test_reset_wakes_reader_and_refuses_writes():
    async def main():
        pair, streams = holding_pair()
        s = await pair.client.open_stream()
        await asyncio.sleep(0)
        reader = asyncio.ensure_future(streams[s.id].read())
        s.reset()
        assert await asyncio.wait_for(reader, 2) == b""
        assert streams[s.id].reset_by == "peer"
        with pytest.raises(StreamClosed):
            await s.write(b"late")

    run(main())


def test_ping_round_trip():
    async def main():
        pair = Pair(None)
        await pair.client.ping(timeout=2)

    run(main())


def test_stream_refused_without_handler_and_session_close_resets_streams():
    async def main():
        pair = Pair(None)
        with pytest.raises(StreamClosed):
            await pair.client.open_stream(timeout=2)

        async def hold(stream: Stream) -> None:
            await asyncio.sleep(10)

        pair = Pair(hold)
        s = await pair.client.open_stream()
        pair.client.connection_lost("test")
        assert await s.read() == b""
        assert s.reset_by == "session"
        with pytest.raises(StreamClosed):
            await pair.client.open_stream()

    run(main())


def test_window_overrun_is_a_protocol_error():
    async def main():
        pair, streams = holding_pair()
        s = await pair.client.open_stream()
        await asyncio.sleep(0)
        frame = encode_header(TYPE_DATA, 0, s.id, STREAM_WINDOW) + bytes(STREAM_WINDOW)
        pair.server.feed(frame)  # exactly the window: fine
        with pytest.raises(ProtocolError):
            pair.server.feed(encode_header(TYPE_DATA, 0, s.id, 1) + b"!")
        assert pair.server.closed
        assert streams[s.id].reset_by == "session"

    run(main())


@settings(max_examples=40, deadline=None)
@given(
    payloads=st.lists(st.binary(min_size=0, max_size=200_000), min_size=1, max_size=8),
    write_sizes=st.lists(st.integers(min_value=1, max_value=70_000), min_size=1, max_size=5),
    chunking=st.sampled_from([None, 1, 7, 4096]),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_interleavings_deliver_every_byte_in_order(payloads, write_sizes, chunking, seed):
    if chunking == 1:
        payloads = [p[:3000] for p in payloads]  # byte-at-a-time delivery is slow; keep it small

    async def main():
        rng = random.Random(seed)
        results: dict[int, bytes] = {}

        async def collect(stream: Stream) -> None:
            results[stream.id] = await read_all(stream)
            await stream.close()

        pair = Pair(collect, chunking=chunking)
        streams = [await pair.client.open_stream() for _ in payloads]

        async def send(stream: Stream, data: bytes) -> None:
            i = 0
            while i < len(data):
                n = rng.choice(write_sizes)
                await stream.write(data[i : i + n])
                i += n
                if rng.random() < 0.3:
                    await asyncio.sleep(0)
            await stream.close()

        await asyncio.gather(*(send(s, p) for s, p in zip(streams, payloads, strict=True)))
        for s in streams:
            assert await read_all(s) == b""
        for _ in range(1000):
            if len(results) == len(streams):
                break
            await asyncio.sleep(0.001)
        for s, p in zip(streams, payloads, strict=True):
            assert results[s.id] == p
        assert pair.client.stream_count == 0

    run(main())


@settings(max_examples=300, deadline=None)
@given(garbage=st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=20))
def test_malformed_frames_close_the_session_cleanly(garbage):
    async def main():
        pair = Pair(lambda s: asyncio.sleep(0))
        live = await pair.client.open_stream()
        await asyncio.sleep(0.01)
        for chunk in garbage:
            try:
                pair.server.feed(chunk)
            except ProtocolError:
                assert pair.server.closed
                break
        await asyncio.sleep(0.01)
        if pair.server.closed:
            # every stream of a closed session is reset, and new ones are refused
            with pytest.raises(StreamClosed):
                await pair.server.open_stream(timeout=0.1)
        await asyncio.sleep(0)
        assert live.id == 1

    run(main())


@pytest.mark.parametrize(
    "frame",
    [
        bytes([1]) + bytes(11),  # version 1
        encode_header(9, 0, 1, 0),  # unknown type
        encode_header(TYPE_DATA, 0, 0, 0),  # data on stream 0
        encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0),  # peer used our parity
        encode_header(TYPE_DATA, 0, 1, STREAM_WINDOW * 2),  # absurd length
        encode_header(yamux.TYPE_PING, FLAG_SYN, 5, 0),  # ping on a stream
    ],
)
def test_each_kind_of_bad_frame_is_a_protocol_error(frame):
    async def main():
        sent: list[bytes] = []
        session = Session(sent.append, lambda: asyncio.sleep(0), client=True, on_stream=None)
        with pytest.raises(ProtocolError):
            session.feed(frame)
        assert session.closed
        assert sent and sent[-1][1] == yamux.TYPE_GO_AWAY  # the peer is told why

    run(main())
