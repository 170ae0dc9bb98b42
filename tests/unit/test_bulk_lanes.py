"""An upload striped over the bulk port's lanes (slicer.channel.bulk.BulkLink.send with
lanes=2), read back by the guest's reader over the same number of pipes: every byte in order,
the digest, leftovers of an earlier transfer skipped, an abort on any lane."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import threading
from pathlib import Path

import pytest

from slicer.agent import bulk as guest_bulk
from slicer.channel.bulk import ABORT, FRAME, STRIPE_FRAME, BulkLink, header, new_token


async def _sent(payload: list[bytes], lanes: int, digest: bool = False, socket_lanes: int = 2,
                fail_after: int | None = None) -> tuple[bytes, list[bytes]]:
    """(token, what each lane's socket got) for one transfer of ``payload``."""
    got = [bytearray() for _ in range(socket_lanes)]
    done = [asyncio.Event() for _ in range(socket_lanes)]

    def serve(lane: int):
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(1 << 16):
                got[lane].extend(data)
            done[lane].set()
        return handle

    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"bulk{lane}.sock" for lane in range(socket_lanes)]
        servers = [await asyncio.start_unix_server(serve(lane), str(p)) for lane, p in enumerate(paths)]
        link = BulkLink(paths)
        token = new_token()

        async def chunks():
            for i, p in enumerate(payload):
                if fail_after is not None and i == fail_after:
                    raise RuntimeError("the client left")
                yield p

        if fail_after is None:
            assert await link.send(token, chunks(), digest=digest, lanes=lanes) == sum(map(len, payload))
        else:
            with pytest.raises(RuntimeError):
                await link.send(token, chunks(), digest=digest, lanes=lanes)
        link.close()
        for lane in range(min(max(lanes, 1), socket_lanes)):
            await asyncio.wait_for(done[lane].wait(), 5)
        for s in servers:
            s.close()
    return token, [bytes(g) for g in got]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.close(fd)


def _received(token: bytes, wires: list[bytes]) -> tuple[bytes, guest_bulk._Reader]:
    """What the guest's reader makes of ``wires`` (one pipe per lane, as the ports would be)."""
    pipes = [os.pipe() for _ in wires]
    feeders = [threading.Thread(target=_write_all, args=(w, wire)) for (_, w), wire in zip(pipes, wires, strict=True)]
    for f in feeders:
        f.start()
    cancelled, lock = threading.Event(), threading.Lock()
    reader = guest_bulk._Reader([guest_bulk._Port(r, cancelled, lock) for r, _ in pipes], token)
    out, buf = bytearray(), memoryview(bytearray(1 << 20))
    try:
        while n := reader.readinto(buf):
            out += buf[:n]
    finally:
        cancelled.set()
        for f in feeders:
            f.join()
        for r, _ in pipes:
            os.close(r)
    return bytes(out), reader


@pytest.mark.parametrize("sizes", [[], [1], [STRIPE_FRAME], [STRIPE_FRAME + 1], [3, 70_000, 1 << 20, (3 << 19) + 5]])
@pytest.mark.parametrize("digest", [False, True])
async def test_a_striped_upload_arrives_whole_and_in_order(sizes, digest):
    payload = [os.urandom(n) for n in sizes]
    whole = b"".join(payload)
    token, wires = await _sent(payload, lanes=2, digest=digest)
    frames = -(-len(whole) // STRIPE_FRAME)
    assert all(w.startswith(header(token)) for w in wires)  # each lane carries the header
    if frames >= 2:  # the second lane carried payload: more than its header and end frame
        assert len(wires[1]) > len(header(token)) + FRAME.size
    got, reader = await asyncio.to_thread(_received, token, wires)
    assert got == whole and reader.done
    assert reader.digest == (hashlib.sha256(whole).hexdigest() if digest else None)


async def test_an_agent_with_one_lane_gets_an_unstriped_upload_and_a_link_never_exceeds_its_lanes():
    payload = [os.urandom(3 << 20)]
    token, wires = await _sent(payload, lanes=1)
    assert wires[1] == b""  # lane 1 untouched
    got, _ = await asyncio.to_thread(_received, token, wires[:1])
    assert got == payload[0]
    token, wires = await _sent(payload, lanes=99, socket_lanes=2)  # a guest's claim is bounded by the VM's lanes
    got, _ = await asyncio.to_thread(_received, token, wires)
    assert got == payload[0]


async def test_leftovers_of_a_cancelled_transfer_on_either_lane_are_skipped():
    payload = [os.urandom(600_000)]
    token, wires = await _sent(payload, lanes=2)
    junk = [header(new_token()) + FRAME.pack(STRIPE_FRAME) + os.urandom(5000), os.urandom(777)]
    got, _ = await asyncio.to_thread(_received, token, [j + w for j, w in zip(junk, wires, strict=True)])
    assert got == payload[0]


async def test_a_client_that_leaves_aborts_every_lane_and_the_reader_says_so():
    payload = [os.urandom(STRIPE_FRAME)] * 5
    token, wires = await _sent(payload, lanes=2, fail_after=3)
    assert all(w.endswith(FRAME.pack(ABORT)) for w in wires)
    with pytest.raises(guest_bulk.BulkError, match="broke the copy off"):
        await asyncio.to_thread(_received, token, wires)


def test_layout_2_gives_the_bulk_port_a_second_lane_and_layout_1_keeps_its_machine():
    from slicer.vmm.base import LAYOUT, VMSpec
    from slicer.vmm.qemu import QemuDriver

    spec = VMSpec(name="v", cpus=2, ram_bytes=256 << 20, kernel=Path("/k"), initrd=Path("/i"),
                  base_disk=Path("/b"), disk=Path("/d"), disk_size=1 << 30, run_dir=Path("/run/v"),
                  ip_cidr="10.0.0.2/24", gateway="10.0.0.1", layout=1)
    driver = QemuDriver("tcg", binary="/bin/true")
    ports = [a for a in driver.command(spec) if a.startswith("virtserialport")]
    assert spec.bulk_sockets == [Path("/run/v/bulk.sock")]
    assert ports == ["virtserialport,chardev=channel0,name=slicer.0",
                     "virtserialport,chardev=bulk0,name=slicer.bulk"]  # as before lanes: its saved states restore
    spec.layout = LAYOUT
    assert LAYOUT == 2 and spec.bulk_sockets == [Path("/run/v/bulk.sock"), Path("/run/v/bulk1.sock")]
    ports = [a for a in driver.command(spec) if a.startswith("virtserialport")]
    assert ports[1:] == ["virtserialport,chardev=bulk0,name=slicer.bulk",
                         "virtserialport,chardev=bulk1,name=slicer.bulk1"]
    spec.layout = 0
    assert [a for a in driver.command(spec) if a.startswith("virtserialport")] == ports[:1]


async def test_a_copy_waits_a_little_for_a_held_port_and_then_does_without():
    link = BulkLink([Path("/nonexistent/bulk.sock")])
    assert await link.claim("in") and not await link.claim("in")  # no wait: taken
    assert await link.claim("out")  # the other direction is its own
    waiter = asyncio.ensure_future(link.claim("in", wait=5))
    other = asyncio.ensure_future(link.claim("in", wait=0.2))
    assert await asyncio.wait_for(other, 5) is False  # gave up: the channel, then
    assert not waiter.done()
    link.release("in")
    assert await asyncio.wait_for(waiter, 1) is True  # took it when the first let go
    assert not await link.claim("in", wait=0.05)
