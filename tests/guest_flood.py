"""A hostile guest, run as root inside a VM by tests/test_hostile.py (standard library only).

It kills the agent's channel process, takes the virtio port before init restarts the agent,
and for ``SECONDS`` per phase: (1) floods PINGs and never reads the answers; (2) poses as the
agent (answers the host's hello) and answers every request with an endless body; (3) writes
window updates and garbage. Then it exits, and init's agent gets the port back.
Usage: ``python3 guest_flood.py SECONDS``.
"""

import os
import re
import signal
import struct
import sys
import time

PORT = "/dev/virtio-ports/slicer.0"
HEADER = struct.Struct(">BBHII")
DATA, WINDOW, PING = 0, 1, 2
SYN, ACK = 1, 2


def channel_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().split(b"\0")[1:3] == [b"-m", b"slicer.agent"]:
                        pids.append(int(entry))
            except (OSError, IndexError):
                pass
    return pids


def take_port() -> int:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for pid in channel_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            return os.open(PORT, os.O_RDWR | os.O_NONBLOCK)
        except OSError:
            time.sleep(0.005)
    sys.exit("could not take the port")


def write_some(fd: int, data: bytes, until: float = 0.0) -> None:
    """Write ``data`` whole (frames must stay whole) unless ``until`` passes first."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except OSError:  # the host is not reading (or not connected): keep pushing
            if time.monotonic() > until:
                return
            time.sleep(0.001)


def pings(fd: int, until: float) -> None:
    batch = b"".join(HEADER.pack(0, PING, SYN, 0, i) for i in range(4096))
    while time.monotonic() < until:
        write_some(fd, batch)


def fake_agent(fd: int, until: float) -> None:
    """Answer the host's hello, then every stream it opens with an endless HTTP answer."""
    buf = b""
    streams: list[int] = []
    head = b"OK 0\nHTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 999999999999\r\n\r\n"
    filler = b"[" * 60000
    while time.monotonic() < until:
        try:
            buf += os.read(fd, 65536)
        except (BlockingIOError, OSError):
            pass
        if (m := re.search(rb"SLICER-HELLO ([0-9a-f]+)\n", buf)) is not None:
            write_some(fd, b"SLICER-READY " + m.group(1) + b"\n", until)
            buf = buf[m.end():]
            streams.clear()
        while len(buf) >= HEADER.size:  # host frames (after a hello); their payloads are skipped
            _, ftype, flags, sid, length = HEADER.unpack_from(buf)
            size = HEADER.size + (length if ftype == DATA else 0)
            if len(buf) < size:
                break
            if flags & SYN and sid not in streams:
                streams.append(sid)
                write_some(fd, HEADER.pack(0, WINDOW, ACK, sid, 0) + HEADER.pack(0, DATA, 0, sid, len(head)) + head,
                           until)
            buf = buf[size:]
        for sid in streams[-4:]:  # never stops, whatever the host reads or resets
            write_some(fd, HEADER.pack(0, DATA, 0, sid, len(filler)) + filler, until)
        if len(buf) > 1 << 20:
            buf = buf[-4096:]


def garbage(fd: int, until: float) -> None:
    updates = b"".join(HEADER.pack(0, WINDOW, 0, 1 + 2 * (i % 64), 1 << 20) for i in range(2048))
    while time.monotonic() < until:
        write_some(fd, updates)
        write_some(fd, os.urandom(65536))


def main() -> None:
    seconds = float(sys.argv[1])
    fd = take_port()
    print("flood: port taken", flush=True)
    for phase in (pings, fake_agent, garbage):
        phase(fd, time.monotonic() + seconds)
    os.close(fd)


if __name__ == "__main__":
    main()
