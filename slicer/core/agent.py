"""The host's client for one VM's guest agent: HTTP over a channel stream (httpx)."""

from __future__ import annotations

import json as jsonlib
from urllib.parse import urlencode

import httpx

from slicer.channel.duplex import DuplexResponse, duplex_request
from slicer.channel.host import Channel, ChannelError, ChannelTransport
from slicer.channel.websocket import StreamWebSocket, WebSocketRejected
from slicer.channel.yamux import AGENT_PORT
from slicer.core.errors import AgentUnreachable, SlicerError, UpstreamUnreachable

# The guest is untrusted: it may not choose the daemon's status, nor pose as the daemon (a
# `vm_not_found` from inside the VM). Only the request errors the agent reports pass through, with
# the codes it uses (slicer/agent); 403 means the guest user lacks a right (a state of the guest,
# not of the API client's token) and is 409; the exec ring budget's 503 is the one documented
# retry-later. Anything else is 502 `agent_error` with the guest's message, bounded.
PASSED_STATUSES = {400, 404, 409, 410, 413}
AGENT_CODES = {"bad_request", "invalid_request", "copy_failed", "fs_error", "not_found", "invalid_cwd", "unsafe_tar",
               "exec_failed", "is_directory", "not_a_directory", "not_empty", "exists", "unsafe_path",
               "unsafe_session", "gone", "too_large"}
MAPPED = {(403, "permission_denied"): 409, (503, "budget_exhausted"): 503}
MAX_MESSAGE = 1000


def agent_error(resp: httpx.Response) -> SlicerError:
    """The agent's JSON error as a core error: its status and code if they are a request error
    the agent makes (above), otherwise 502 ``agent_error``; the message is bounded and printable."""
    status = resp.status_code
    try:
        body = resp.json()
        message, code = str(body["error"]), body.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        message, code = resp.text, None
    message = "".join(c if c.isprintable() else " " for c in message[:MAX_MESSAGE]).strip()
    if status == 413 and code is None:  # the agent's HTTP server refusing a body
        code = "too_large"
    known = (status in PASSED_STATUSES and code in AGENT_CODES) or (status, code) in MAPPED
    if known:
        err = SlicerError(message or f"the agent answered {status}", code)
        err.status = MAPPED.get((status, code), status)
        return err
    err = SlicerError(f"the agent failed (it answered {status}): {message or 'no message'}", "agent_error")
    err.status = 502
    return err


# The most of an agent's answer the host reads whole (health, identity, secrets, fs listings);
# the guest is untrusted, and anything bigger is streamed by its route.
MAX_ANSWER = 16 * 1024 * 1024
MAX_SMALL_ANSWER = 64 * 1024  # health and power


async def read_capped(resp: httpx.Response | DuplexResponse, limit: int) -> bytes:
    """The body of ``resp``, or an error once it passes ``limit`` bytes (the stream is closed)."""
    body = bytearray()
    try:
        async for chunk in resp.aiter_raw():
            body += chunk
            if len(body) > limit:
                raise AgentUnreachable(f"the agent's answer passed {limit} bytes; it was cut off")
    finally:
        await resp.aclose()
    return bytes(body)


def parse_json(body: bytes) -> dict | list:
    try:
        value = jsonlib.loads(body)
    except ValueError as e:
        raise AgentUnreachable(f"the agent answered with something that is not JSON: {e}") from None
    if not isinstance(value, dict | list):
        raise AgentUnreachable("the agent answered with JSON that is not an object or a list")
    return value


class AgentClient:
    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.http = httpx.AsyncClient(
            transport=ChannelTransport(channel, AGENT_PORT), base_url="http://agent", timeout=30.0
        )

    async def _request(self, method: str, path: str, timeout: float, **kw) -> tuple[int, bytes]:
        """A small request: its status and (capped) body."""
        req = self.http.build_request(method, path, timeout=timeout, **kw)
        try:
            resp = await self.http.send(req, stream=True)
            return resp.status_code, await read_capped(resp, MAX_SMALL_ANSWER)
        except httpx.HTTPError as e:
            raise AgentUnreachable(f"agent did not answer: {e}") from e

    async def health(self, timeout: float = 10.0) -> dict:
        status, body = await self._request("GET", "/health", timeout)
        if status != 200:
            raise AgentUnreachable(f"agent health answered {status}")
        answer = parse_json(body)
        if not isinstance(answer, dict):
            raise AgentUnreachable("agent health answered with JSON that is not an object")
        return answer

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

    async def open_exec(self, params: list[tuple[str, str]], stdin=None) -> httpx.Response | DuplexResponse:
        """Start a command; the caller reads (and must close) the streamed response.
        With ``stdin``, the body goes on streaming in while the output streams out."""
        if stdin is None:
            return await self.send("POST", "/exec", params=params, timeout=None)
        try:
            stream = await self.channel.open(AGENT_PORT)
            resp = await duplex_request(stream, "POST", "/exec?" + urlencode(params), stdin)
        except ConnectionError as e:
            raise AgentUnreachable(f"agent did not answer: {e}") from e
        if resp.status_code >= 300:
            body = await read_capped(resp, MAX_SMALL_ANSWER)
            raise agent_error(httpx.Response(resp.status_code, content=body))
        return resp

    async def websocket(self, target: str) -> StreamWebSocket:
        """A WebSocket to one of the agent's routes (e.g. ``/shell?uid=0``)."""
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

    async def power(self, action: str, timeout: float = 5.0) -> None:
        status, body = await self._request("POST", "/power", timeout, params={"action": action})
        if status != 200:
            raise AgentUnreachable(f"agent refused {action}: {body[:200].decode(errors='replace')}")

    async def aclose(self) -> None:
        await self.http.aclose()
        self.channel.disconnect()
