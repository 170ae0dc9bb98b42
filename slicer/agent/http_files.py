"""The agent's copy endpoints: ``cp_in`` (a file or a tar into the guest) and ``cp_out``."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import tarfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from slicer.agent import bulk, copyv1, files, paths, sessions, stripe, tars, upload
from slicer.agent.http_util import BodyReader, Context, Handlers, ResponseWriter, error


async def _cp_in(q, content) -> web.Response:
    """Copy ``content`` (the request's body, or a bulk transfer's) as ``q`` says."""
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
            reader = BodyReader(asyncio.get_running_loop(), content)
            count = await asyncio.to_thread(tars.extract_tar, reader, path, perms, uid, gid,
                                            q.getall("exclude", []))
            return web.json_response({"path": path, "mode": "tar", "entries": count})
        with upload.upload_path(path, uid, gid) as (dir_fd, target):  # an SDK's chunk goes via its session
            if dir_fd is not None and (index := stripe.index_of(path)) is not None:  # into its slot
                size = await stripe.receive(dir_fd, index, content, uid, gid)
            elif sessions.is_chunk(path):
                raise files.FileError(f"{path}: a chunk goes to <session>/chunks/NNNNNN.chunk, NNNNNN below "
                                      f"{stripe.MAX_SLOTS}", "invalid_request")
            else:
                size = await files.receive_file(target, content.iter_chunked(files.CHUNK), perms, uid, gid,
                                                dir_fd=dir_fd)
        return web.json_response({"path": path, "mode": "binary", "size": size})
    except files.FileError as e:
        return error(str(e), e.code, e.status)
    except (OSError, tarfile.TarError) as e:
        return error(f"copy to {q.get('path')} failed: {e}", "copy_failed", 400)


def _gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


def _bulk_token(port: bulk.BulkPort | None, q) -> bytes | web.Response:
    """The transfer's token a ``bulk=`` copy names, or the error answer why it cannot be one."""
    if port is None:
        return error("this VM has no bulk port", "bulk_unavailable", 409)
    token = q.get("bulk", "")
    if len(token) != 32 or any(c not in "0123456789abcdef" for c in token):
        return error("bulk must be 32 hex digits", "invalid_request", 400)
    return bytes.fromhex(token)


async def _cp_in_bulk(port: bulk.BulkPort | None, request: web.Request) -> web.StreamResponse:
    """An upload whose bytes come on the bulk port: ``{"ready": true}`` once they may, then the
    copy's own answer (see slicer.agent.protocol.CpQuery)."""
    if isinstance(token := _bulk_token(port, request.query), web.Response):
        return token
    assert port is not None
    try:
        async with port.source(token, lambda: _gone(request)) as source:
            resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await resp.prepare(request)
            # a chunk of an SDK's chunked copy: the host sends its digest too (see slicer.agent.stripe)
            chunk = sessions.is_chunk(str(request.query.get("path", "")))
            ready = {"ready": True, **({"digest": True} if chunk else {}),
                     **({"lanes": port.lanes} if port.lanes > 1 else {})}  # an upload may be striped over them
            await resp.write(json.dumps(ready).encode() + b"\n")
            try:
                answer = await _cp_in(request.query, source)
            except bulk.BulkError as e:
                answer = error(f"copy to {request.query.get('path')} failed: {e}", "copy_failed", 400)
    except bulk.BulkBusy as e:
        return error(str(e), "bulk_busy", 409)
    assert isinstance(answer, web.Response) and answer.body is not None
    await resp.write(b'{"status": %d, "answer": %s}\n' % (answer.status, bytes(answer.body)))
    await resp.write_eof()
    return resp


@dataclass
class Download:
    """What ``cp_out`` sends, opened: its headers, its size (None: a tar, as long as it comes out),
    how to write its bytes into the response, and how to let go of what it holds open."""
    headers: dict[str, str]
    size: int | None
    write: Callable[[web.StreamResponse], Awaitable[None]]
    close: Callable[[], None]
    fd: int | None = None  # a regular file's descriptor (sent by sendfile on the bulk port)


async def _tar(uid: int | None, path: str, contents: bool, excludes: list[str], meta: dict[str, str]) -> Download:
    """``path`` as a tar: its contents named relative to it, or the path itself (a symlink as
    such) named by its basename."""
    tree = await paths.run_as(uid, files.Entry.of, path, contents)
    base = "." if contents else os.path.basename(path) or "."

    async def write(resp: web.StreamResponse) -> None:
        writer = ResponseWriter(asyncio.get_running_loop(), resp)
        await paths.run_as(uid, tars.write_tar, writer, tree, base, excludes if contents else [], contents)

    return Download({"Content-Type": "application/x-tar", **meta}, None, write, tree.close)


async def _file(uid: int | None, path: str, meta: dict[str, str]) -> Download:
    f, size, fmode = await paths.run_as(uid, files.open_for_sending, path)

    async def write(resp: web.StreamResponse) -> None:
        while chunk := f.read(files.CHUNK):
            await resp.write(chunk)

    headers = {"Content-Type": "application/octet-stream", "X-Slicer-File-Mode": f"{fmode:04o}", **meta}
    regular = stat.S_ISREG(os.fstat(f.fileno()).st_mode)
    return Download(headers, size, write, f.close, f.fileno() if regular else None)


async def _open_download(q) -> Download:
    """What ``q`` asks for, read under the agent's rule for paths (slicer.agent.paths), or with
    the rights of ``uid`` when it names one."""
    uid = files.parse_id(q.get("uid"), "uid")
    path = files.require_path(q.get("path"), uid)
    mode = q.get("mode") or "binary"
    excludes = q.getall("exclude", [])
    if mode in copyv1.MODES:
        kind = await paths.run_as(uid, copyv1.download_kind, path, mode)
        meta = copyv1.source_headers(path, kind)
        return await (_tar(uid, path, True, excludes, meta) if kind == "directory" else _file(uid, path, meta))
    if mode == "tar":
        return await _tar(uid, path, False, excludes, {})
    if mode == "binary":
        return await _file(uid, path, {})
    raise files.FileError(f"invalid mode: {mode} (binary, tar or cp-v1-binary|tar|recursive)", "invalid_request")


async def cp_out(request: web.Request, port: bulk.BulkPort | None = None) -> web.StreamResponse:
    """A file's bytes or a tar; with ``bulk``, sent on the bulk port (``port``)."""
    q = request.query
    token = _bulk_token(port, q) if "bulk" in q else None
    if isinstance(token, web.Response):
        return token
    try:
        download = await _open_download(q)
    except files.FileError as e:
        return error(str(e), e.code, e.status)
    except PermissionError as e:
        return error(f"{q.get('path')}: {e.strerror}", "permission_denied", 403)
    except OSError as e:
        return error(f"copy from {q.get('path')} failed: {e}", "copy_failed", 400)
    if token is not None:
        assert port is not None
        return await _cp_out_bulk(port, token, request, download)
    resp = web.StreamResponse(headers=download.headers)
    if download.size is not None:
        resp.content_length = download.size
    try:
        await resp.prepare(request)
        await download.write(resp)
    finally:
        download.close()
    await resp.write_eof()
    return resp


async def _cp_out_bulk(port: bulk.BulkPort, token: bytes, request: web.Request,
                       download: Download) -> web.StreamResponse:
    """The download's headers here (its size as ``X-Slicer-Content-Length``), its bytes on the
    bulk port; a failure midway ends the transfer with an abort frame."""
    regular = download.fd is not None and download.size is not None  # sent by sendfile, its size known
    resp = web.StreamResponse(headers=download.headers)
    if regular:
        resp.headers["X-Slicer-Content-Length"] = str(download.size)
    try:
        if regular:
            async with port.sending(lambda: _gone(request)) as out:
                await resp.prepare(request)
                await asyncio.to_thread(bulk.send_file, out, token, download.fd, download.size)
        else:
            async with port.sink(token, lambda: _gone(request)) as sink:
                await resp.prepare(request)
                await download.write(sink)  # type: ignore[arg-type]  (it writes as a response does)
    except bulk.BulkBusy as e:
        return error(str(e), "bulk_busy", 409)
    finally:
        download.close()
    await resp.write_eof()
    return resp


def handlers(ctx: Context) -> Handlers:
    async def cp_in(request: web.Request) -> web.StreamResponse:
        if "bulk" in request.query:
            return await _cp_in_bulk(ctx.bulk, request)
        return await _cp_in(request.query, request.content)

    async def cp_out_(request: web.Request) -> web.StreamResponse:
        return await cp_out(request, ctx.bulk)

    return {"cp_in": cp_in, "cp_out": cp_out_}
