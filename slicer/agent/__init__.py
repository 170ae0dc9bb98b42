"""The guest agent: runs inside every VM, reached only over the channel.

Guest-side code: imports the standard library, ``slicer.channel.yamux`` and Debian's
python3-aiohttp, never host-side modules.
"""

from slicer.channel import PORT_NAME  # not yamux: the helpers must not import asyncio

AGENT_VERSION = "0.1.0"
PORT_PATH = f"/dev/virtio-ports/{PORT_NAME}"
AGENT_SOCKET = "/run/slicer/agent.sock"
USERDATA_SENTINEL = "/etc/slicer/userdata-ran"
