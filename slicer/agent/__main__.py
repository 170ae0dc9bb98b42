"""Agent entry point: the channel demultiplexer.

The HTTP server (``slicer.agent.server``) is a second process, started by init at the same
time as this one: a transfer then uses two vCPUs (framing here, HTTP there), and the two
interpreters start in parallel (aiohttp alone takes seconds to import under TCG). The host's
HELLO is answered only once the server accepts connections, so the guest's first byte on the
channel means "ready".
"""

from __future__ import annotations

import asyncio
import os
import sys

from slicer.agent import AGENT_SOCKET, PORT_PATH
from slicer.agent.demux import Demux


def log(msg: str) -> None:
    print(f"slicer-agent: {msg}", file=sys.stderr, flush=True)


async def accepting(path: str) -> bool:
    try:
        _, writer = await asyncio.open_unix_connection(path)
    except OSError:
        return False
    writer.close()
    return True


async def main() -> None:
    demux = Demux(os.environ.get("SLICER_PORT", PORT_PATH), AGENT_SOCKET)
    await demux.start()
    log(f"channel open on {PORT_PATH}")
    while not await accepting(AGENT_SOCKET):
        await asyncio.sleep(0.05)
    demux.set_agent_ready()
    log("ready")
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
