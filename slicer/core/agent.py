"""The host's client for one VM's guest agent: HTTP over a channel stream (httpx).

One method per endpoint of ``slicer.agent.protocol`` (the contract both ends share); each builds
its method and path from that table, so no other host code spells an agent path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json as jsonlib
from collections.abc import AsyncIterable, Mapping, Sequence
from typing import Any, cast
from urllib.parse import urlencode

import httpx

from slicer.agent import protocol, sessions
from slicer.agent.protocol import ENDPOINTS
from slicer.channel.bulk import BulkError, BulkLink, new_token
from slicer.channel.duplex import DuplexResponse, duplex_request
from slicer.channel.host import Channel, ChannelError, ChannelTransport
from slicer.channel.websocket import StreamWebSocket, WebSocketRejected
from slicer.channel.yamux import AGENT_PORT
from slicer.core import telemetry
from slicer.core.agent_answers import (
    MAX_ANSWER,
    MAX_SMALL_ANSWER,
    BulkDownload,
    agent_error,
    parse_json,
    read_capped,
    read_lines,
)
from slicer.core.error_codes import ErrorCode
from slicer.core.errors import AgentUnreachable, SlicerError, UpstreamUnreachable

# The agent's answers that send a copy through the channel instead of the bulk port.
BULK_FALLBACK = (ErrorCode.BULK_BUSY, ErrorCode.BULK_UNAVAILABLE)
# Seconds a chunk of an SDK's chunked copy waits for the bulk port another copy holds (then: the
# channel). The SDKs send four chunks at once: each is faster waiting its turn on the port, where
# it also gets its digest, than crawling through the channel. Other copies never wait (a slow
# download would hold up every other).
BULK_WAIT = 3.0


# A query as the API received it (repeated keys kept) or as a mapping; passed through to the agent.
Query = Sequence[tuple[str, str]] | Mapping[str, str]


def _uid(params: dict[str, str], uid: int | None) -> dict[str, str]:
    """``uid``: the guest user whose rights the agent works with (the agent's rule for paths without one)."""
    if uid is not None:
        params["uid"] = str(uid)
    return params


def _items(params: Query) -> list[tuple[str, str]]:
    return list(params.items()) if isinstance(params, Mapping) else list(params)


class AgentClient:
    def __init__(self, channel: Channel, bulk: BulkLink | None = None) -> None:
        self.channel = channel
        self.http = httpx.AsyncClient(
            transport=ChannelTransport(channel, AGENT_PORT), base_url="http://agent", timeout=30.0
        )
        self.bulk = bulk  # the VM's bulk port, if its machine has one
        self._bulk_agent: bool | None = None  # whether the agent holds its end (asked once)

    # --- the generic layer: one request, streamed or read whole ----------------------------------

    async def _request(self, method: str, path: str, timeout: float, **kw) -> tuple[int, bytes]:
        """A small request: its status and (capped) body."""
        req = self.http.build_request(method, path, timeout=timeout, **kw)
        try:
            resp = await self.http.send(req, stream=True)
            return resp.status_code, await read_capped(resp, MAX_SMALL_ANSWER)
        except httpx.HTTPError as e:
            raise AgentUnreachable(f"agent did not answer: {e}") from e

    async def send(self, method: str, path: str, *, params=None, content=None, json=None,
                   timeout=httpx.USE_CLIENT_DEFAULT) -> httpx.Response:
        """A streamed request to the agent; the caller reads and closes the response.
        ``timeout=None``: none (a command may run silently for as long as it likes).
        A non-2xx answer becomes the agent's error (same status and code)."""
        req = self.http.build_request(method, path, params=params, content=content, json=json, timeout=timeout)
        try:
            resp = await self.http.send(req, stream=True)
        except httpx.WriteError as e:
            raise UpstreamUnreachable(
                f"the agent stopped reading the request body (a failed write in the guest, e.g. a full disk?): {e}"
            ) from e
        except httpx.HTTPError as e:
            raise AgentUnreachable(f"agent did not answer: {e}") from e
        if resp.status_code >= 300:
            body = await read_capped(resp, MAX_SMALL_ANSWER)
            raise agent_error(httpx.Response(resp.status_code, content=body))
        return resp

    async def call(self, method: str, path: str, **kw) -> dict | list:
        """A request whose JSON answer is read whole (up to MAX_ANSWER bytes)."""
        resp = await self.send(method, path, **kw)
        try:
            return parse_json(await read_capped(resp, MAX_ANSWER))
        except httpx.HTTPError as e:
            raise AgentUnreachable(f"agent did not answer: {e}") from e

    async def _stream(self, name: str, path_params: Mapping[str, str] | None = None, **kw) -> httpx.Response:
        """The endpoint ``name``'s streamed answer (the caller reads and closes it); no timeout."""
        endpoint = ENDPOINTS[name]
        return await self.send(endpoint.method, endpoint.url(**(path_params or {})), timeout=None, **kw)

    async def _call(self, name: str, path_params: Mapping[str, str] | None = None, **kw) -> Any:
        """The endpoint ``name``'s JSON answer, read whole. The guest's word: callers check its shape
        where they rely on it."""
        endpoint = ENDPOINTS[name]
        return await self.call(endpoint.method, endpoint.url(**(path_params or {})), **kw)

    # --- status and power ------------------------------------------------------------------------

    async def health(self, timeout: float = 10.0) -> protocol.Health:
        endpoint = ENDPOINTS["health"]
        status, body = await self._request(endpoint.method, endpoint.path, timeout)
        if status != 200:
            raise AgentUnreachable(f"agent health answered {status}")
        answer = parse_json(body)
        if not isinstance(answer, dict):
            raise AgentUnreachable("agent health answered with JSON that is not an object")
        return cast(protocol.Health, answer)

    async def stats(self, timeout: float = 5.0) -> protocol.Stats:
        return await self._call("stats", timeout=timeout)

    async def power(self, action: str, timeout: float = 5.0) -> None:
        endpoint = ENDPOINTS["power"]
        status, body = await self._request(endpoint.method, endpoint.path, timeout, params={"action": action})
        if status != 200:
            raise AgentUnreachable(f"agent refused {action}: {body[:200].decode(errors='replace')}")

    # --- exec ------------------------------------------------------------------------------------

    async def open_exec(self, params: Query, stdin: AsyncIterable[bytes] | None = None
                        ) -> httpx.Response | DuplexResponse:
        """Start a command; the caller reads (and must close) the streamed response.
        With ``stdin``, the body goes on streaming in while the output streams out."""
        endpoint = ENDPOINTS["exec"]
        if stdin is None:
            return await self.send(endpoint.method, endpoint.path, params=params, timeout=None)
        try:
            stream = await self.channel.open(AGENT_PORT)
            resp = await duplex_request(stream, endpoint.method, endpoint.path + "?" + urlencode(params), stdin)
        except ConnectionError as e:
            raise AgentUnreachable(f"agent did not answer: {e}") from e
        if resp.status_code >= 300:
            body = await read_capped(resp, MAX_SMALL_ANSWER)
            raise agent_error(httpx.Response(resp.status_code, content=body))
        return resp

    async def list_execs(self, timeout: float = 30.0) -> list[protocol.ExecInfo]:
        return await self._call("list_execs", timeout=timeout)

    async def exec_status(self, exec_id: str) -> protocol.ExecInfo:
        return await self._call("exec_status", {"exec_id": exec_id})

    async def reap_exec(self, exec_id: str) -> protocol.Reaped:
        return await self._call("reap_exec", {"exec_id": exec_id})

    async def exec_logs(self, exec_id: str, params: Query = ()) -> httpx.Response:
        """The exec's NDJSON frames (query: ``follow``, ``from_id``, ``stdio``), streamed."""
        return await self._stream("exec_logs", {"exec_id": exec_id}, params=params)

    async def kill_exec(self, exec_id: str, signal: str = "TERM", grace_ms: int = 5000) -> protocol.Killed:
        body: protocol.KillRequest = {"signal": signal, "grace_ms": grace_ms}
        return await self._call("kill_exec", {"exec_id": exec_id}, json=body)

    async def wait_exit(self, exec_id: str, timeout: int = 30) -> protocol.Exited:
        """Wait up to ``timeout`` seconds (in the guest) for the exec to end."""
        return await self._call("wait_exit", {"exec_id": exec_id}, params={"timeout": timeout}, timeout=timeout + 30)

    # --- files -----------------------------------------------------------------------------------

    async def cp_in(self, params: Query, content: AsyncIterable[bytes]) -> protocol.Copied:
        """Copy ``content`` (a file's bytes or a tar, as ``params``' mode says) into the guest:
        its bytes on the bulk port when the VM has one free, else through the channel."""
        chunk = any(k == "path" and sessions.is_chunk(v) for k, v in _items(params))
        link = await self._bulk_link("in", wait=BULK_WAIT if chunk else 0.0)
        if link is not None:
            try:
                answer = await self._cp_in_bulk(link, params, content)
            finally:
                link.release("in")
            if answer is not None:
                telemetry.COPIES.labels("in", "bulk").inc()
                return answer
        telemetry.COPIES.labels("in", "channel").inc()
        return await self._call("cp_in", params=params, content=content, timeout=None)

    async def cp_out(self, params: Query) -> httpx.Response | BulkDownload:
        """A file's bytes or a tar from the guest, streamed (on the bulk port where it can)."""
        link = await self._bulk_link("out")
        if link is not None:
            token = new_token()
            try:
                resp = await self._stream("cp_out", params=[*_items(params), ("bulk", token.hex())])
            except BaseException as e:
                link.release("out")
                if not isinstance(e, SlicerError) or e.code not in BULK_FALLBACK:
                    raise
            else:
                telemetry.COPIES.labels("out", "bulk").inc()
                return BulkDownload(resp, link.receive(token), lambda: link.release("out"))
        telemetry.COPIES.labels("out", "channel").inc()
        return await self._stream("cp_out", params=params)

    async def _bulk_link(self, direction: str, wait: float = 0.0) -> BulkLink | None:
        """The bulk port, claimed for one copy in ``direction``; None: use the channel (no port,
        an agent without its end, or another copy still using it after ``wait`` seconds)."""
        if self.bulk is None:
            return None
        if self._bulk_agent is None:
            try:
                self._bulk_agent = (await self.health()).get("bulk") is True
            except SlicerError:
                return None
        if not self._bulk_agent or not await self.bulk.claim(direction, wait):
            return None
        return self.bulk

    async def _cp_in_bulk(self, link: BulkLink, params: Query, content: AsyncIterable[bytes]) -> protocol.Copied | None:
        """The upload with its bytes on the bulk port, sent once the agent says it reads them;
        None if the agent cannot take it there (nothing of ``content`` was read yet)."""
        token = new_token()
        endpoint = ENDPOINTS["cp_in"]
        try:
            resp = await self.send(endpoint.method, endpoint.path, params=[*_items(params), ("bulk", token.hex())],
                                   content=b"", timeout=None)
        except SlicerError as e:
            if e.code in BULK_FALLBACK:
                return None
            raise
        lines = read_lines(resp, MAX_SMALL_ANSWER)
        sender: asyncio.Task | None = None
        answer: asyncio.Future | None = None
        try:
            ready = jsonlib.loads(await anext(lines))
            if ready.get("ready") is not True:
                raise AgentUnreachable("the agent did not take the copy on the bulk port")
            lanes = ready.get("lanes", 1)  # the ports the agent reads this upload from (striped)
            sender = asyncio.ensure_future(link.send(token, content, digest=ready.get("digest") is True,
                                                     lanes=lanes if isinstance(lanes, int) else 1))
            answer = asyncio.ensure_future(anext(lines))
            await asyncio.wait({sender, answer}, return_when=asyncio.FIRST_COMPLETED)
            if sender.done() and sender.exception() is not None:
                raise sender.exception()  # type: ignore[misc]  (the client left, or the port broke)
            final = jsonlib.loads(await answer)
            status, body = final.get("status"), final.get("answer")
        except (StopAsyncIteration, ValueError, AttributeError, httpx.HTTPError) as e:
            raise AgentUnreachable(f"the agent's answer to a copy broke off: {e}") from e
        except BulkError as e:
            raise UpstreamUnreachable(f"the copy's bulk transfer broke off: {e}") from e
        finally:
            for task in (sender, answer):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
            await resp.aclose()
        if status != 200:
            raise agent_error(httpx.Response(status if isinstance(status, int) else 502,
                                             content=jsonlib.dumps(body).encode()))
        if not isinstance(body, dict):
            raise AgentUnreachable("the agent answered a copy with JSON that is not an object")
        return cast(protocol.Copied, body)

    async def readdir(self, path: str, uid: int | None = None) -> list[protocol.DirEntry]:
        return await self._call("readdir", params=_uid({"path": path}, uid))

    async def stat(self, path: str, uid: int | None = None) -> protocol.DirEntry:
        return await self._call("stat", params=_uid({"path": path}, uid))

    async def mkdir(self, path: str, recursive: bool = False, mode: str | None = None,
                    uid: int | None = None) -> protocol.Created:
        body: protocol.MkdirRequest = {"path": path, "recursive": recursive}
        if mode is not None:
            body["mode"] = mode
        if uid is not None:
            body["uid"] = uid
        return await self._call("mkdir", json=body)

    async def remove(self, path: str, recursive: bool = False, uid: int | None = None) -> protocol.Removed:
        params = _uid({"path": path, "recursive": "true" if recursive else "false"}, uid)
        return await self._call("remove", params=params)

    async def watch(self, params: Query) -> httpx.Response:
        """Server-Sent Events of filesystem changes, streamed."""
        return await self._stream("watch", params=params)

    async def shell(self, params: Query) -> StreamWebSocket:
        """A WebSocket to a PTY in the guest (query: uid, gid, shell, cwd)."""
        return await self.websocket(ENDPOINTS["shell"].path + "?" + urlencode(params))

    async def websocket(self, target: str) -> StreamWebSocket:
        """A WebSocket to one of the agent's routes (``target``: its path and query)."""
        try:
            stream = await self.channel.open(AGENT_PORT)
        except ChannelError as e:
            raise AgentUnreachable(f"agent did not answer: {e}") from e
        ws = StreamWebSocket(stream)
        try:
            await ws.handshake(target)
        except WebSocketRejected as e:
            stream.reset()
            raise agent_error(httpx.Response(e.status, content=e.body)) from None
        except ConnectionError as e:
            stream.reset()
            raise AgentUnreachable(f"agent did not answer: {e}") from e
        return ws

    # --- provisioning ----------------------------------------------------------------------------

    async def identity(self, body: protocol.Identity, timeout: float = 30.0) -> protocol.IdentityReset:
        """Make a restored or forked guest itself (slicer.core.identity builds ``body``)."""
        return await self._call("identity", json=body, timeout=timeout)

    async def settle(self, timeout: float) -> protocol.Settled:
        """Wait for the guest's boot chores and sync (before a template is saved)."""
        return await self._call("settle", timeout=timeout)

    async def put_secrets(self, secrets: Mapping[str, protocol.Secret]) -> protocol.SecretsSynced:
        """Make the guest's secrets exactly ``secrets``."""
        return await self._call("put_secrets", json=dict(secrets))

    async def put_ssh_keys(self, keys: Sequence[str], user: str | None = None) -> protocol.KeysInstalled:
        body: protocol.SshKeys = {"keys": list(keys)}
        if user is not None:
            body["user"] = user
        return await self._call("put_ssh_keys", json=body)

    async def userdata(self, script: str) -> protocol.UserdataStatus:
        """Run ``script`` once per disk, as root, in the background."""
        return await self._call("userdata", json={"script": script})

    async def put_ca(self, pem: str, timeout: float = 60.0) -> protocol.CAInstalled:
        """Make the guest trust the certificates of ``pem`` (its group's bundle, slicer.core.ca):
        /runner/ca.crt and the system's trust store; nothing is written when it already holds them."""
        return await self._call("put_ca", content=pem.encode(), timeout=timeout)

    async def aclose(self) -> None:
        await self.http.aclose()
        self.channel.disconnect()
        if self.bulk is not None:
            self.bulk.close()
