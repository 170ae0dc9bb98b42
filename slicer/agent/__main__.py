"""Agent entry point: the channel demultiplexer, which runs the HTTP server as a child process.

Two processes so that a transfer uses two vCPUs (framing here, HTTP there) instead of
queueing both on one Python thread. The channel opens first (cheap); the host's HELLO is
answered only once the server accepts connections (aiohttp takes seconds to import under TCG),
so the guest's first byte on the channel means "ready".
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from slicer.agent import AGENT_SOCKET, PORT_PATH
from slicer.agent.demux import Demux

STARTED = time.monotonic()


def log(msg: str) -> None:
    print(f"slicer-agent: {msg}", file=sys.stderr, flush=True)


async def accepting(path: str) -> bool:
    try:
        _, writer = await asyncio.open_unix_connection(path)
    except OSError:
        return False
    writer.close()
    return True


async def run_server() -> asyncio.subprocess.Process:
    env = {**os.environ, "SLICER_AGENT_STARTED": str(STARTED)}
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "slicer.agent.server", env=env)


async def main() -> None:
    demux = Demux(os.environ.get("SLICER_PORT", PORT_PATH), AGENT_SOCKET)
    await demux.start()
    log(f"channel open on {PORT_PATH}")
    while True:
        server = await run_server()
        while not await accepting(AGENT_SOCKET):
            if server.returncode is not None:
                break
            await asyncio.sleep(0.05)
        else:
            demux.set_agent_ready()
            log("ready")
        code = await server.wait()
        log(f"HTTP server exited ({code}); restarting it")
        await asyncio.sleep(0.5)


if __name__ == "__main__":
    asyncio.run(main())
