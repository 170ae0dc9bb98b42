"""The agent's provisioning endpoints: identity, settle, secrets, SSH keys, CA
certificates, userdata and power."""

from __future__ import annotations

import asyncio
import os
import subprocess

from aiohttp import web

from slicer.agent import catrust, files, identity, provision, runtime
from slicer.agent.http_util import Context, Handlers, error, json_body

POWER_ACTIONS = ("shutdown", "reboot")


async def put_secrets(request: web.Request) -> web.Response:
    body = await json_body(request)
    try:
        return web.json_response(await asyncio.to_thread(provision.sync_secrets, body))
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        return error(f"cannot install secrets: {e}", "invalid_request", 400)


async def put_ssh_keys(request: web.Request) -> web.Response:
    body = await json_body(request)
    try:
        return web.json_response(provision.install_keys(list(body.get("keys") or []),
                                                        body.get("user") or provision.DEFAULT_USER))
    except files.FileError as e:
        return error(f"cannot install keys: {e}", e.code, e.status)
    except (KeyError, TypeError, AttributeError, OSError) as e:
        return error(f"cannot install keys: {e}", "invalid_request", 400)


async def userdata(request: web.Request) -> web.Response:
    body = await json_body(request)
    script = body.get("script") if isinstance(body, dict) else None
    if not isinstance(script, str):
        return error("script is required", "invalid_request", 400)
    return web.json_response({"status": provision.start_userdata(script)})


async def put_ca(request: web.Request) -> web.Response:
    if (request.content_length or 0) > catrust.MAX_BUNDLE:
        return error(f"the CA bundle is larger than {catrust.MAX_BUNDLE} bytes", "too_large", 413)
    body = await request.read()  # the server's client_max_size (1 MiB) bounds it too
    try:
        return web.json_response(await asyncio.to_thread(catrust.install, body))
    except catrust.CATrustError as e:
        return error(f"cannot install the CA certificates: {e}", "invalid_request", 400)
    except files.FileError as e:
        return error(f"cannot install the CA certificates: {e}", e.code, e.status)
    except OSError as e:
        return error(f"cannot install the CA certificates: {e}", "fs_error", 409)


async def reset_identity(request: web.Request) -> web.Response:
    body = await json_body(request)
    try:
        return web.json_response(await asyncio.to_thread(identity.reset, body))
    except (ValueError, KeyError, TypeError, AttributeError, OSError, subprocess.CalledProcessError) as e:
        return error(f"cannot reset the identity: {e}", "invalid_request", 400)


async def settle(request: web.Request) -> web.Response:
    return web.json_response(await asyncio.to_thread(identity.settle))


async def power(request: web.Request) -> web.Response:
    action = request.query.get("action", "shutdown")
    if action not in POWER_ACTIONS:
        return error(f"unknown action {action!r} (shutdown or reboot)", "invalid_request", 400)
    # PID 1 (slicer-init, or the image's init) does the orderly part. It stops every
    # process, this one too: signal it only once the answer is on its way.
    asyncio.get_running_loop().call_later(0.3, os.kill, 1, runtime.pid1_signal(action))
    return web.json_response({"message": f"{action} started"})


def handlers(ctx: Context) -> Handlers:
    return {"identity": reset_identity, "settle": settle, "put_secrets": put_secrets, "put_ssh_keys": put_ssh_keys,
            "userdata": userdata, "power": power, "put_ca": put_ca}
