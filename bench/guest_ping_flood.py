"""A guest that floods the host with legal frames for ``SECONDS`` (run as root in a VM by
bench/flood.py; standard library only): it takes the agent's port, answers the host's hello,
and sends PING acknowledgements (for pings the host never sent): 12 bytes each, nothing to
answer, nothing that ends the session, so only the frame budgets hold it back.
Usage: ``python3 guest_ping_flood.py SECONDS``."""

import os
import re
import signal
import struct
import sys
import time

PORT = "/dev/virtio-ports/slicer.0"
HEADER = struct.Struct(">BBHII")
PING, ACK = 2, 2


def take_port() -> int:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        if f.read().split(b"\0")[1:3] == [b"-m", b"slicer.agent"]:
                            os.kill(int(entry), signal.SIGKILL)
                except (OSError, IndexError):
                    pass
        try:
            return os.open(PORT, os.O_RDWR | os.O_NONBLOCK)
        except OSError:
            time.sleep(0.005)
    sys.exit("could not take the port")


def main() -> None:
    until = time.monotonic() + float(sys.argv[1])
    fd = take_port()
    acks = b"".join(HEADER.pack(0, PING, ACK, 0, i) for i in range(4096))
    buf, session = b"", False
    while time.monotonic() < until:
        try:
            buf += os.read(fd, 65536)
        except OSError:
            pass
        if (m := re.search(rb"SLICER-HELLO ([0-9a-f]+)\n", buf)) is not None:
            view = memoryview(b"SLICER-READY " + m.group(1) + b"\n")
            session, buf = True, b""
        else:
            view = memoryview(acks if session else b"")
            buf = buf[-4096:]
            if not session:
                time.sleep(0.01)
        while view and time.monotonic() < until:  # frames stay whole
            try:
                view = view[os.write(fd, view):]
            except OSError:
                time.sleep(0.001)
    os.close(fd)


if __name__ == "__main__":
    main()
