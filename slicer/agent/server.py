"""The agent's HTTP API (aiohttp), served on a root-only unix socket inside the guest."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import tarfile
import time

from aiohttp import web

from slicer.agent import (
    AGENT_SOCKET,
    AGENT_VERSION,
    background,
    copyv1,
    files,
    identity,
    meter,
    paths,
    provision,
    runtime,
    shell,
    upload,
    watch,
)
from slicer.agent.execute import ExecError, ExecRequest, kill_group, open_cwd, run_buffered, spawn, stream_frames

STREAM_CHUNK = 65536


async def _once(coro):
    """An async iterator of one item: ``coro``'s result (to pass a call through until_disconnect)."""
    yield await coro


async def until_disconnect(request: web.Request, items):
    """Yield from ``items`` until it ends or the client goes away. aiohttp 3.8 (Debian's) does
    not cancel a handler whose client left, and a silent stream never fails a write, so we
    look at the transport whenever nothing has come for a second."""
    it = items.__aiter__()
    pending = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(it.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=1.0)
            if not done:
                if request.transport is None or request.transport.is_closing():
                    return
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        if hasattr(it, "aclose"):
            await it.aclose()


def error(message: str, code: str, status: int) -> web.Response:
    return web.json_response({"error": message, "code": code}, status=status)


def _system_uptime() -> int:
    with open("/proc/uptime") as f:
        return int(float(f.read().split()[0]))


def make_app(started: float) -> web.Application:
    routes = web.RouteTableDef()
    registry = background.Registry()

    @routes.get("/health")
    async def health(request: web.Request) -> web.Response:
        # aiohttp answers HEAD for GET routes with the same status and no body.
        ran, code = provision.userdata_status()
        return web.json_response(
            {
                "hostname": socket.gethostname(),
                "agent_uptime": int(time.monotonic() - started),
                "agent_version": AGENT_VERSION,
                "system_uptime": _system_uptime(),
                "userdata_ran": ran,
                "userdata_exit_code": code,
            }
        )

    def background_call(fn):
        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                entry = registry.get(request.match_info["exec_id"])
                return await fn(request, entry)
            except ExecError as e:
                return error(str(e), e.code, e.status)
            except ValueError as e:
                return error(f"bad request: {e}", "invalid_request", 400)
        return handler

    @routes.get("/exec")
    async def list_background(request: web.Request) -> web.Response:
        return web.json_response([e.info() for e in registry.entries.values()])

    async def bg_info(request, entry):
        return web.json_response(entry.info())

    async def bg_reap(request, entry):
        return web.json_response(registry.reap(entry))

    async def bg_logs(request, entry):
        follow = request.query.get("follow", "").lower() in ("1", "true", "yes")
        from_id = int(request.query.get("from_id") or 0)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        async with contextlib.aclosing(until_disconnect(request, registry.frames(entry, from_id, follow))) as frames:
            async for line in frames:
                await resp.write(line)
        await resp.write_eof()
        return resp

    async def bg_kill(request, entry):
        body = await request.json() if request.can_read_body else {}
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        return web.json_response(await registry.kill(entry, str(body.get("signal") or "TERM"),
                                                     int(body.get("grace_ms") or 5000)))

    async def bg_wait(request, entry):
        timeout = min(max(float(request.query.get("timeout") or 30), 0), 600)
        return web.json_response(await registry.wait_exit(entry, timeout))

    routes.get("/exec/{exec_id}")(background_call(bg_info))
    routes.delete("/exec/{exec_id}")(background_call(bg_reap))
    routes.get("/exec/{exec_id}/logs")(background_call(bg_logs))
    routes.post("/exec/{exec_id}/kill")(background_call(bg_kill))
    routes.get("/exec/{exec_id}/wait-exit")(background_call(bg_wait))

    async def json_body(request: web.Request):
        try:
            return await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text='{"error": "body is not JSON", "code": "invalid_request"}',
                                     content_type="application/json") from None

    @routes.put("/secrets")
    async def put_secrets(request: web.Request) -> web.Response:
        body = await json_body(request)
        try:
            return web.json_response(await asyncio.to_thread(provision.sync_secrets, body))
        except (ValueError, KeyError, TypeError, OSError) as e:
            return error(f"cannot install secrets: {e}", "invalid_request", 400)

    @routes.put("/ssh-keys")
    async def put_keys(request: web.Request) -> web.Response:
        body = await json_body(request)
        try:
            return web.json_response(provision.install_keys(list(body.get("keys") or []),
                                                            body.get("user") or provision.DEFAULT_USER))
        except files.FileError as e:
            return error(f"cannot install keys: {e}", e.code, e.status)
        except (KeyError, TypeError, OSError) as e:
            return error(f"cannot install keys: {e}", "invalid_request", 400)

    @routes.post("/userdata")
    async def userdata(request: web.Request) -> web.Response:
        body = await json_body(request)
        script = body.get("script") if isinstance(body, dict) else None
        if not isinstance(script, str):
            return error("script is required", "invalid_request", 400)
        return web.json_response({"status": provision.start_userdata(script)})

    @routes.post("/identity")
    async def reset_identity(request: web.Request) -> web.Response:
        body = await json_body(request)
        try:
            return web.json_response(await asyncio.to_thread(identity.reset, body))
        except (ValueError, KeyError, TypeError, OSError, subprocess.CalledProcessError) as e:
            return error(f"cannot reset the identity: {e}", "invalid_request", 400)

    @routes.post("/settle")
    async def settle(request: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(identity.settle))

    @routes.get("/stats")
    async def stats(request: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(meter.snapshot))

    @routes.post("/power")
    async def power(request: web.Request) -> web.Response:
        action = request.query.get("action", "shutdown")
        if action not in ("shutdown", "reboot"):
            return error(f"unknown action {action!r}", "bad_request", 400)
        # PID 1 (slicer-init, or the image's init) does the orderly part. It stops every
        # process, this one too: signal it only once the answer is on its way.
        asyncio.get_running_loop().call_later(0.3, os.kill, 1, runtime.pid1_signal(action))
        return web.json_response({"message": f"{action} started"})

    @routes.post("/exec")
    async def execute(request: web.Request) -> web.StreamResponse:
        try:
            req = ExecRequest.from_query(request.query)
            ring = registry.check_budget(req.ring_bytes) if req.background else 0
            proc = await spawn(req)
        except ExecError as e:
            return error(str(e), e.code, e.status)
        if req.background:
            entry = registry.start(req, proc, ring)
            return web.json_response({"exec_id": entry.exec_id, "pid": proc.pid, "started_at": entry.started_at,
                                      "ring_bytes": ring}, status=201)
        stdin = request.content.iter_chunked(STREAM_CHUNK) if req.stdin else None
        if req.buffered:
            # Nothing is written until the end, so the client's leaving shows only on the transport.
            async with contextlib.aclosing(until_disconnect(request, _once(run_buffered(req, proc, stdin)))) as done:
                async for result in done:
                    return web.json_response(result)
            kill_group(proc)  # the client left first
            return web.Response(status=499)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        # aclosing: if the client goes away the handler is cancelled and the process killed
        # leaving early (client gone) closes the frames, which kills the process group
        async with contextlib.aclosing(until_disconnect(request, stream_frames(req, proc, stdin))) as frames:
            async for line in frames:
                await resp.write(line)
        await resp.write_eof()
        return resp

    @routes.post("/cp")
    async def copy_in(request: web.Request) -> web.Response:
        q = request.query
        try:
            perms = files.parse_permissions(q.get("permissions"))
            uid, gid = files.parse_id(q.get("uid"), "uid"), files.parse_id(q.get("gid"), "gid")
            path = files.require_path(q.get("path"), uid)
            mode = q.get("mode") or "binary"
            if mode in ("cp-v1-binary", "cp-v1-tar"):  # cp-like destinations (slicer.agent.copyv1)
                kind = "file" if mode == "cp-v1-binary" else "directory"
                if q.get("source_type", kind) != kind:
                    raise files.FileError(f"{mode} copies a {kind}, not a {q.get('source_type')}", "invalid_request")
                dir_only = str(q.get("path", "")).endswith("/")  # "dir/": a directory that must exist
                kind, path = copyv1.upload_target(path + ("/" if dir_only else ""), kind, q.get("source_name", ""),
                                                  q.get("copy_contents", "").lower() in ("1", "true", "yes"))
                mode = "binary" if kind == "file" else "tar"
            elif mode not in ("binary", "tar"):
                raise files.FileError(f"invalid mode: {mode} (binary, tar, cp-v1-binary or cp-v1-tar)",
                                      "invalid_request")
            if mode == "tar":
                reader = files.BodyReader(asyncio.get_running_loop(), request.content)
                count = await asyncio.to_thread(files.extract_tar, reader, path, perms, uid, gid,
                                                q.getall("exclude", []))
                return web.json_response({"path": path, "mode": "tar", "entries": count})
            with upload.upload_path(path, uid, gid) as (dir_fd, target):  # an SDK's chunk goes via its session
                size = await files.receive_file(target, request.content.iter_chunked(files.CHUNK), perms, uid, gid,
                                                dir_fd=dir_fd)
            return web.json_response({"path": path, "mode": "binary", "size": size})
        except files.FileError as e:
            return error(str(e), e.code, e.status)
        except (OSError, tarfile.TarError) as e:
            return error(f"copy to {q.get('path')} failed: {e}", "copy_failed", 400)

    @routes.get("/cp")
    async def copy_out(request: web.Request) -> web.StreamResponse:
        """A file's bytes or a tar, read under the agent's rule for paths (slicer.agent.paths),
        or with the rights of ``uid`` when the request names one."""
        q = request.query
        tree: files.Entry | None = None
        try:
            uid = files.parse_id(q.get("uid"), "uid")
            path = files.require_path(q.get("path"), uid)
            mode = q.get("mode") or "binary"
            meta: dict[str, str] = {}
            if mode in copyv1.MODES:
                kind = await paths.run_as(uid, copyv1.download_kind, path, mode)
                meta = copyv1.source_headers(path, kind)
                if kind == "directory":  # its contents, named relative to it
                    tree, base, contents = await paths.run_as(uid, files.Entry.of, path, True), ".", True
            elif mode == "tar":  # the path itself (a symlink as such), named by its basename
                base, contents = os.path.basename(path) or ".", False
                tree = await paths.run_as(uid, files.Entry.of, path, False)
            elif mode != "binary":
                raise files.FileError(f"invalid mode: {mode} (binary, tar or cp-v1-binary|tar|recursive)",
                                      "invalid_request")
            if tree is None:
                f, size, fmode = await paths.run_as(uid, files.open_for_sending, path)
        except files.FileError as e:
            return error(str(e), e.code, e.status)
        except PermissionError as e:
            return error(f"{q.get('path')}: {e.strerror}", "permission_denied", 403)
        except OSError as e:
            return error(f"copy from {q.get('path')} failed: {e}", "copy_failed", 400)
        if tree is not None:
            try:
                resp = web.StreamResponse(headers={"Content-Type": "application/x-tar", **meta})
                await resp.prepare(request)
                writer = files.ResponseWriter(asyncio.get_running_loop(), resp)
                await paths.run_as(uid, files.write_tar, writer, tree, base,
                                   q.getall("exclude", []) if contents else [], contents)
            finally:
                tree.close()
            await resp.write_eof()
            return resp
        with f:
            resp = web.StreamResponse(headers={
                "Content-Type": "application/octet-stream", "X-Slicer-File-Mode": f"{fmode:04o}", **meta,
            })
            resp.content_length = size
            await resp.prepare(request)
            while chunk := f.read(files.CHUNK):
                await resp.write(chunk)
        await resp.write_eof()
        return resp

    @routes.get("/shell")
    async def shell_session(request: web.Request) -> web.StreamResponse:
        q = request.query
        try:
            uid, gid = files.parse_id(q.get("uid"), "uid") or 0, files.parse_id(q.get("gid"), "gid")
            cwd_fd = await open_cwd(q.get("cwd") or None, uid)
            try:
                session = shell.ShellSession(uid, gid, q.get("shell", ""), cwd_fd)
            finally:
                if cwd_fd is not None:
                    os.close(cwd_fd)
        except files.FileError as e:
            return error(str(e), e.code, e.status)
        except ExecError as e:
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

    def fs_call(fn):
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
    async def readdir(request):
        uid = files.parse_id(request.query.get("uid"), "uid")
        return await paths.run_as(uid, files.fs_readdir, files.require_path(request.query.get("path"), uid))

    async def stat_(request):
        uid = files.parse_id(request.query.get("uid"), "uid")
        return await paths.run_as(uid, files.fs_stat, files.require_path(request.query.get("path"), uid))

    async def mkdir(request):
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

    async def remove(request):
        uid = files.parse_id(request.query.get("uid"), "uid")
        path = files.require_path(request.query.get("path"), uid)
        recursive = request.query.get("recursive", "").lower() in ("1", "true", "yes")
        await paths.run_as(uid, files.fs_remove, path, recursive)
        return {"path": path, "removed": True}

    @routes.get("/fs/watch")
    async def fs_watch(request: web.Request) -> web.StreamResponse:
        try:
            w = watch.Watch(request.query)
            w.open()
        except watch.WatchError as e:
            return error(str(e), e.code, e.status)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        async with contextlib.aclosing(until_disconnect(request, w.events())) as blocks:
            async for block in blocks:
                await resp.write(block.encode())
        await resp.write_eof()
        return resp

    routes.get("/fs/readdir")(fs_call(readdir))
    routes.get("/fs/stat")(fs_call(stat_))
    routes.post("/fs/mkdir")(fs_call(mkdir))
    routes.delete("/fs/remove")(fs_call(remove))

    app = web.Application(client_max_size=1 << 20)
    app.add_routes(routes)
    return app


async def serve(path: str, started: float) -> web.AppRunner:
    runner = web.AppRunner(make_app(started), access_log=None)
    await runner.setup()
    if os.path.exists(path):
        os.unlink(path)
    old = os.umask(0o177)  # the socket is born 0600: only root in the guest can reach the agent
    try:
        await web.UnixSite(runner, path).start()
    finally:
        os.umask(old)
    return runner


async def main() -> None:
    started = float(os.environ.get("SLICER_AGENT_STARTED") or time.monotonic())
    await serve(AGENT_SOCKET, started)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
