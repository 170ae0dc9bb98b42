"""The agent's filesystem endpoints: readdir, stat, mkdir, remove and watch (inotify as SSE)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from slicer.agent import files, paths, watch
from slicer.agent.http_util import Context, Handler, Handlers, error, flag, stream

SSE = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


def answers_json(fn: Callable[[web.Request], Awaitable[object]]) -> Handler:
    """``fn``'s result as JSON, its errors as the agent's JSON errors."""
    async def handler(request: web.Request) -> web.Response:
        try:
            return web.json_response(await fn(request))
        except files.FileError as e:
            return error(str(e), e.code, e.status)
        except ValueError as e:
            return error(f"bad request: {e}", "invalid_request", 400)
        except PermissionError as e:
            return error(f"{request.query.get('path') or 'path'}: {e.strerror}", "permission_denied", 403)
        except OSError as e:
            return error(str(e), "fs_error", 400)
    return handler


# Each runs under the agent's rule for paths (slicer.agent.paths), or as ``uid`` when given.
async def readdir(request: web.Request) -> list[dict]:
    uid = files.parse_id(request.query.get("uid"), "uid")
    return await paths.run_as(uid, files.fs_readdir, files.require_path(request.query.get("path"), uid))


async def stat(request: web.Request) -> dict:
    uid = files.parse_id(request.query.get("uid"), "uid")
    return await paths.run_as(uid, files.fs_stat, files.require_path(request.query.get("path"), uid))


async def mkdir(request: web.Request) -> dict:
    body = await request.json()
    if not isinstance(body, dict):
        raise files.FileError("body must be a JSON object", "invalid_request")
    uid = body.get("uid")
    if uid is not None and (not isinstance(uid, int) or isinstance(uid, bool) or not 0 <= uid < 2**32):
        raise files.FileError("uid must be a number", "invalid_request")
    path = files.require_path(body.get("path"), uid)
    await paths.run_as(uid, files.fs_mkdir, path, bool(body.get("recursive")),
                       files.parse_permissions(body.get("mode")))
    return {"path": path, "created": True}


async def remove(request: web.Request) -> dict:
    uid = files.parse_id(request.query.get("uid"), "uid")
    path = files.require_path(request.query.get("path"), uid)
    await paths.run_as(uid, files.fs_remove, path, flag(request, "recursive"))
    return {"path": path, "removed": True}


async def fs_watch(request: web.Request) -> web.StreamResponse:
    try:
        w = watch.Watch(request.query)
        w.open()
    except watch.WatchError as e:
        return error(str(e), e.code, e.status)
    return await stream(request, w.events(), SSE)


def handlers(ctx: Context) -> Handlers:
    return {"readdir": answers_json(readdir), "stat": answers_json(stat), "mkdir": answers_json(mkdir),
            "remove": answers_json(remove), "watch": fs_watch}
