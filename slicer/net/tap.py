"""TAP devices opened by the daemon and handed to the VMM as a file descriptor.

The VMM gets no path and needs no privilege to use it. A TAP normally goes with the last
descriptor to it, but the VMM holding that descriptor can mark it persistent and give it an
owner (``TUNSETPERSIST``, ``TUNSETOWNER`` need no capability once attached): so the daemon
deletes every TAP it made when its VM ends (:func:`delete_tap`, and a sweep at start), creates
each one exclusively (never attaching to a device someone left behind) and owned by the daemon's
uid, which no VMM runs as, so no other uid can attach to it by name.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct

from slicer.net.system import run

TUNSETIFF = 0x400454CA
TUNSETOWNER = 0x400454CC
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000  # lets virtio-net offload checksums and segmentation to the host
IFF_TUN_EXCL = 0x8000  # create only: EBUSY if a device of that name exists


def open_tap(name: str) -> int:
    """Create the TAP ``name`` and return a descriptor attached to it (close-on-exec); EBUSY if
    a device of that name exists already (held by a VM on its way out, or left behind)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_TUN_EXCL
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
        fcntl.ioctl(fd, TUNSETOWNER, os.geteuid())
    except OSError:
        os.close(fd)
        raise
    return fd


async def delete_tap(name: str) -> None:
    """Delete the TAP ``name`` if it is still there (whatever its VMM made of it)."""
    await run("ip", "link", "del", "dev", name, check=False)


async def tap_names() -> list[str]:
    """The TAP/TUN devices of the daemon's network namespace."""
    out = await run("ip", "-j", "link", "show", "type", "tun", check=False)
    try:
        return [link["ifname"] for link in json.loads(out or "[]")]
    except (ValueError, KeyError, TypeError):
        return []
