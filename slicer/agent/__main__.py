"""Agent entry point: open the channel first (cheap), then start the HTTP server (aiohttp is
slow to import under TCG). The host's HELLO is answered only once the server listens, so the
guest's first byte on the channel means "ready"."""

from __future__ import annotations

import asyncio
import os
import sys
import time

from slicer.agent import AGENT_SOCKET, PORT_PATH
from slicer.agent.demux import Demux

STARTED = time.monotonic()


async def main() -> None:
    demux = Demux(os.environ.get("SLICER_PORT", PORT_PATH), AGENT_SOCKET)
    await demux.start()
    print(f"slicer-agent: channel open on {PORT_PATH}", file=sys.stderr, flush=True)
    from slicer.agent import server  # deferred: importing aiohttp takes seconds under TCG

    await server.serve(AGENT_SOCKET, STARTED)
    demux.set_agent_ready()
    print("slicer-agent: ready", file=sys.stderr, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
