"""The agent's ``shell`` endpoint: a PTY (slicer.agent.shell) behind a WebSocket of shell frames."""

from __future__ import annotations

import asyncio
import contextlib
import os

from aiohttp import web

from slicer.agent import files, shell
from slicer.agent.execute import ExecError, open_cwd
from slicer.agent.http_util import Context, Handlers, error


async def _open_session(q) -> shell.ShellSession:
    uid, gid = files.parse_id(q.get("uid"), "uid") or 0, files.parse_id(q.get("gid"), "gid")
    cwd_fd = await open_cwd(q.get("cwd") or None, uid)
    try:
        return shell.ShellSession(uid, gid, q.get("shell", ""), cwd_fd)
    finally:
        if cwd_fd is not None:
            os.close(cwd_fd)


async def shell_session(request: web.Request) -> web.StreamResponse:
    try:
        session = await _open_session(request.query)
    except (files.FileError, ExecError) as e:
        return error(str(e), e.code, e.status)
    except OSError as e:
        return error(str(e), "invalid_request", 400)
    ws = web.WebSocketResponse(max_msg_size=1 << 20)
    await ws.prepare(request)

    async def pump_output() -> None:
        async for data in session.output():
            await ws.send_bytes(shell.encode(shell.DATA, data))
        # the shell exited: tell the client (payload: exit code) and end the session
        await ws.send_bytes(shell.encode(shell.SESSION_CLOSE, str(session.exit_code).encode()))
        await ws.close()

    output = asyncio.ensure_future(pump_output())
    try:
        async for msg in ws:
            if msg.type != web.WSMsgType.BINARY:
                continue
            frames = shell.decode(msg.data)
            if any(ftype == shell.HEARTBEAT for ftype, _ in frames):
                await ws.send_bytes(shell.encode(shell.HEARTBEAT))
            if not all(session.handle(ftype, payload) for ftype, payload in frames):
                break
    except ValueError:
        pass  # a malformed frame ends the session
    finally:
        session.hang_up()  # client gone or done: the shell gets SIGHUP, like a closed terminal
        with contextlib.suppress(Exception):
            await asyncio.wait_for(output, 5)
    return ws


def handlers(ctx: Context) -> Handlers:
    return {"shell": shell_session}
