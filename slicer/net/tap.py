"""TAP devices opened by the daemon and handed to the VMM as a file descriptor.

The TAP lives as long as a descriptor to it is open: QEMU holds it, so the device goes away
with the VM's process and nothing is left behind by a crash. The VMM gets no path and needs
no privilege to open it.
"""

from __future__ import annotations

import fcntl
import os
import struct

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000  # lets virtio-net offload checksums and segmentation to the host


def open_tap(name: str) -> int:
    """Create the TAP ``name`` and return a descriptor attached to it (close-on-exec)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    except OSError:
        os.close(fd)
        raise
    return fd
