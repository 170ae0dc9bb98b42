"""The asynchronous client, :class:`AsyncSlicerClient`: the SDK's methods written once.

``_sync.py`` (:class:`SlicerClient`) is generated from this file by unasync; edit here, then run
``python -m slicer.client._unasync`` (tests/unit/test_client_unasync.py fails while it is stale).
Requests that return JSON are described once in :class:`slicer.client._base.Calls`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterable, AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx

from slicer.client import _models as m
from slicer.client._base import Call, Calls, Settings, check, exec_params
from slicer.client._duplex import async_duplex_transport
from slicer.client._errors import APIError, ConnectionFailed, WaitTimeoutError, error_for
from slicer.client._flavour import AsyncWebSocket, async_extract_tar, async_sleep, async_upload_body, async_ws_connect
from slicer.client._transfer import CHUNK, Progress, Source, local_chunks, tar_stream


class AsyncSlicerClient:
    """A client for one Slicer daemon (``SLICER_URL`` / ``SLICER_TOKEN`` or defaults); examples
    in :mod:`slicer.client`."""

    def __init__(self, url: str | None = None, token: str | None = None, token_file: str | None = None,
                 timeout: float = 60.0) -> None:
        self.settings = Settings.resolve(url, token, token_file)
        transport = httpx.AsyncHTTPTransport(uds=self.settings.uds) if self.settings.uds else None
        self._http = httpx.AsyncClient(base_url=self.settings.base_url, headers=self.settings.headers(),
                                       transport=transport, timeout=timeout)
        # An exec whose stdin streams: the body goes on while the output comes back (see _duplex).
        self._duplex = httpx.AsyncClient(base_url=self.settings.base_url, headers=self.settings.headers(),
                                         transport=async_duplex_transport(self.settings.base_url, self.settings.uds),
                                         timeout=timeout)

    async def __aenter__(self) -> AsyncSlicerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._duplex.aclose()

    # -- plumbing ---------------------------------------------------------------------------------
    def _unreachable(self, e: httpx.TransportError) -> ConnectionFailed:
        return ConnectionFailed(f"cannot reach the Slicer daemon at {self.settings.base_url}: {e}")

    async def _call(self, call: Call) -> Any:
        try:
            resp = await self._http.request(call.method, call.path, params=call.params, json=call.json,
                                            timeout=call.timeout)
        except httpx.TransportError as e:
            raise self._unreachable(e) from e
        return call.parse(check(resp))

    async def _stream(self, method: str, path: str, duplex: bool = False, **kw: Any) -> httpx.Response:
        """A streamed answer (the caller closes it); an error answer is read and raised.
        ``duplex``: the request's body keeps streaming while the answer is read."""
        http = self._duplex if duplex else self._http
        try:
            req = http.build_request(method, path, timeout=None, **kw)
            resp = await http.send(req, stream=True)
        except httpx.TransportError as e:
            raise self._unreachable(e) from e
        if resp.status_code >= 300:
            await resp.aread()
            await resp.aclose()
            raise error_for(resp.status_code, resp.content)
        return resp

    # -- daemon and nodes -------------------------------------------------------------------------
    async def info(self) -> m.Info:
        return await self._call(Calls.info())

    async def host_groups(self) -> list[m.HostGroup]:
        return await self._call(Calls.host_groups())

    async def nodes(self, group: str | None = None, tag: str | None = None,
                    tag_prefix: str | None = None) -> list[m.Node]:
        return await self._call(Calls.nodes(group, tag, tag_prefix))

    async def get_node(self, hostname: str) -> m.Node:
        return await self._call(Calls.get_node(hostname))

    async def create_node(self, group: str, *, wait: str | None = None, timeout: str | None = None,
                          **fields: Any) -> m.CreatedNode:
        """Fields as in the API: cpus, ram_bytes, userdata, import_user, ssh_keys, tags, secrets,
        persistent. ``wait="agent"`` or ``"userdata"`` returns once the VM is ready."""
        return await self._call(Calls.create_node(group, wait, timeout, **fields))

    async def delete_node(self, group: str, hostname: str) -> dict:
        return await self._call(Calls.delete_node(group, hostname))

    async def logs(self, hostname: str, lines: int = 20) -> str:
        return await self._call(Calls.logs(hostname, lines))

    async def health(self, hostname: str) -> m.Health:
        return await self._call(Calls.health(hostname))

    async def pause(self, hostname: str) -> str:
        return await self._call(Calls.power(hostname, "pause"))

    async def resume(self, hostname: str) -> str:
        return await self._call(Calls.power(hostname, "resume"))

    async def shutdown(self, hostname: str, action: str = "shutdown") -> str:
        return await self._call(Calls.power(hostname, action))

    async def suspend(self, hostname: str) -> str:
        """Save the VM's memory and device state to the host's disk and stop it."""
        return await self._call(Calls.suspend(hostname))

    async def restore(self, hostname: str, wait: str | None = "agent", timeout: str | None = None) -> str:
        """Bring a suspended VM back where it was (``wait="agent"``: once its agent answers)."""
        return await self._call(Calls.restore(hostname, wait, timeout))

    async def relaunch(self, hostname: str, wait: str | None = "agent", timeout: str | None = None) -> m.CreatedNode:
        """Boot a shut-down (or crashed) VM again from its disk."""
        return await self._call(Calls.relaunch(hostname, wait, timeout))

    async def tags(self, hostname: str, add: list[str] | None = None, remove: list[str] | None = None,
                   replace: list[str] | None = None) -> m.Tags:
        """The VM's tags; with ``add``/``remove`` or ``replace``, changed first (at once)."""
        return await self._call(Calls.tags(hostname, add, remove, replace))

    async def commit(self, hostname: str, tags: list[str] | None = None, labels: dict[str, str] | None = None,
                     cache_key: str | None = None) -> m.Commit:
        """Freeze a stopped persistent VM's disk into an immutable commit (the VM goes on on top)."""
        return await self._call(Calls.commit(hostname, tags, labels, cache_key))

    async def commits(self, tags: list[str] | None = None, cache_key: str | None = None,
                      source: str | None = None) -> list[m.Commit]:
        return await self._call(Calls.commits(tags, cache_key, source))

    async def delete_commit(self, commit_id: str) -> None:
        """Refused (409) while a VM or a later commit reads through it."""
        await self._call(Calls.delete_commit(commit_id))

    async def fork_commit(self, commit_id: str, wait: str = "agent", timeout: str | None = None,
                          **body: Any) -> m.Fork:
        """Boot a new VM from a commit (body: tags, tag_mode, secrets, persistent, vcpu, ram_bytes, fixups)."""
        return await self._call(Calls.fork_commit(commit_id, wait, timeout, **body))

    async def fork(self, hostname: str, count: int = 1, wait: str | None = "agent", timeout: str | None = None,
                   **body: Any) -> list[m.Fork]:
        """``count`` live copies of a running VM: its memory, processes and files (body: tags)."""
        return await self._call(Calls.fork(hostname, count, wait, timeout, **body))

    async def storage(self) -> m.Storage:
        """Templates, disks and saved states, with the bytes each takes on the host."""
        return await self._call(Calls.storage())

    async def build_template(self, group: str) -> m.TemplateUsage:
        """Build the host group's template now, if it has no current one."""
        return await self._call(Calls.build_template(group))

    async def stats(self, hostname: str | None = None) -> m.NodeStats | list[m.NodeStats]:
        return await self._call(Calls.stats(hostname))

    # -- exec -------------------------------------------------------------------------------------
    async def exec(self, hostname: str, cmd: str, *, stdin: bytes | None = None, **options: Any) -> m.ExecResult:
        """Run ``cmd`` and return its whole output (``args``, ``env``, ``uid``, ``gid``, ``cwd``,
        ``shell``, ``stdio`` as in the API)."""
        params = exec_params(cmd, **options) + [("buffered", "true")]
        if stdin is not None:
            params.append(("stdin", "true"))
        resp = await self._stream("POST", f"/vm/{hostname}/exec", params=params, content=stdin)
        try:
            return m.ExecResult.model_validate(json.loads(await resp.aread()))
        finally:
            await resp.aclose()

    async def exec_stream(self, hostname: str, cmd: str, *, stdin: AsyncIterable[bytes] | bytes | None = None,
                          **options: Any) -> AsyncIterator[m.ExecFrame]:
        """Frames as the command produces them; the last one has ``type == "exit"``. A ``stdin``
        stream goes on being sent while the output comes back (a pipe, an endless producer)."""
        params = exec_params(cmd, **options)
        if stdin is not None:
            params.append(("stdin", "true"))
        resp = await self._stream("POST", f"/vm/{hostname}/exec", params=params, content=stdin,
                                  duplex=stdin is not None and not isinstance(stdin, bytes))
        async for frame in _frames(resp):
            yield frame

    async def exec_background(self, hostname: str, cmd: str, **options: Any) -> m.BackgroundExec:
        return await self._call(Calls.exec_background(hostname, exec_params(cmd, **options)))

    async def background_execs(self, hostname: str) -> list[m.BackgroundExec]:
        return await self._call(Calls.background(hostname, "", "list"))

    async def background_info(self, hostname: str, exec_id: str) -> m.BackgroundExec:
        return await self._call(Calls.background(hostname, exec_id))

    async def background_logs(self, hostname: str, exec_id: str, follow: bool = False,
                              from_id: int | None = None) -> AsyncIterator[m.ExecFrame]:
        params = {"follow": str(follow).lower(), **({"from_id": from_id} if from_id else {})}
        resp = await self._stream("GET", f"/vm/{hostname}/exec/{exec_id}/logs", params=params)
        async for frame in _frames(resp):
            yield frame

    async def background_kill(self, hostname: str, exec_id: str, signal: str = "TERM", grace_ms: int = 5000) -> dict:
        return await self._call(Calls.background(hostname, exec_id, "kill", signal=signal, grace_ms=grace_ms))

    async def background_wait(self, hostname: str, exec_id: str, timeout: int = 30) -> dict:
        return await self._call(Calls.background(hostname, exec_id, "wait", timeout=timeout))

    async def background_delete(self, hostname: str, exec_id: str) -> dict:
        return await self._call(Calls.background(hostname, exec_id, "delete"))

    # -- files ------------------------------------------------------------------------------------
    async def upload(self, hostname: str, source: Source, path: str, *, tar: bool = False,
                     uid: int | None = None, gid: int | None = None, permissions: str | None = None,
                     progress: Progress | None = None) -> dict:
        """Copy a local file (or bytes, or an iterable of chunks; a tar stream with ``tar=True``)
        to ``path`` in the VM, streamed. A local directory is sent as a tar of its contents
        and lands in ``path``."""
        if isinstance(source, str | Path) and Path(source).is_dir():
            source, tar = tar_stream(Path(source)), True
        params = {k: v for k, v in (("path", path), ("uid", uid), ("gid", gid), ("permissions", permissions),
                                     ("mode", "tar" if tar else "binary")) if v is not None}
        chunks = local_chunks(source, progress)
        ctype = "application/x-tar" if tar else "application/octet-stream"
        resp = await self._stream("POST", f"/vm/{hostname}/cp", params=params, content=async_upload_body(chunks),
                                  headers={"Content-Type": ctype})
        try:
            return json.loads(await resp.aread())
        finally:
            await resp.aclose()

    async def download(self, hostname: str, path: str, dest: str | Path | None = None, *, tar: bool = False,
                       progress: Progress | None = None) -> bytes | None:
        """Copy ``path`` out of the VM into ``dest`` (streamed), or return its bytes. With
        ``tar=True`` and a ``dest`` directory, the tree is extracted there (safely)."""
        params = {"path": path, "mode": "tar" if tar else "binary"}
        resp = await self._stream("GET", f"/vm/{hostname}/cp", params=params)
        done = 0
        try:
            if dest is None:
                return await resp.aread()
            if tar:
                await async_extract_tar(resp.aiter_raw(CHUNK), Path(dest))
                return None
            with open(dest, "wb") as f:
                async for chunk in resp.aiter_raw(CHUNK):
                    f.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done)
            return None
        finally:
            await resp.aclose()

    async def wait_ready(self, hostname: str, userdata: bool = False, timeout: float = 300) -> m.Health:
        """Poll the agent until it answers (and userdata ran, if asked); WaitTimeoutError after."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                h = await self.health(hostname)
                if not userdata or h.userdata_ran:
                    return h
            except APIError as e:
                if e.status == 404:
                    raise
            if time.monotonic() > deadline:
                raise WaitTimeoutError(408, f"{hostname} not ready within {timeout:g}s", "timeout")
            await async_sleep(0.5)

    async def readdir(self, hostname: str, path: str) -> list[dict]:
        return await self._call(Calls.fs(hostname, "readdir", path))

    async def stat(self, hostname: str, path: str) -> dict:
        return await self._call(Calls.fs(hostname, "stat", path))

    async def mkdir(self, hostname: str, path: str, recursive: bool = False, mode: str | None = None) -> dict:
        kw: dict[str, Any] = {"recursive": recursive, **({"mode": mode} if mode else {})}
        return await self._call(Calls.fs(hostname, "mkdir", path, **kw))

    async def remove(self, hostname: str, path: str, recursive: bool = False) -> dict:
        return await self._call(Calls.fs(hostname, "remove", path, recursive=recursive))

    # -- secrets ----------------------------------------------------------------------------------
    async def secrets(self) -> list[m.Secret]:
        return await self._call(Calls.secrets())

    async def create_secret(self, name: str, data: bytes, permissions: str = "0600", uid: int = 0,
                            gid: int = 0) -> m.Secret:
        return await self._call(Calls.create_secret(name, data, permissions, uid, gid))

    async def update_secret(self, name: str, **changes: Any) -> m.Secret:
        return await self._call(Calls.update_secret(name, **changes))

    async def delete_secret(self, name: str) -> None:
        await self._call(Calls.delete_secret(name))

    # -- Slicer Proxy (/proxy/v1) -----------------------------------------------------------------
    async def proxy_clients(self) -> list[m.ProxyClient]:
        """The proxy's clients (never their tokens)."""
        return await self._call(Calls.proxy_clients())

    async def create_proxy_client(self, name: str, token: str | None = None) -> m.ProxyClientToken:
        """A client of the proxy; ``.token`` (made as ``spt_…`` unless given) is in this answer only."""
        return await self._call(Calls.create_proxy_client(name, token))

    async def delete_proxy_client(self, name: str) -> None:
        """Drop the client's token and every rule of it."""
        await self._call(Calls.delete_proxy_client(name))

    async def proxy_rules(self, client: str) -> list[m.ProxyAllowRule]:
        """The client's allow rules, in the order they are tried (first match wins)."""
        return await self._call(Calls.proxy_rules(client))

    async def proxy_secrets(self) -> list[m.ProxySecret]:
        """The proxy's secrets: name, host, type and times, never the value."""
        return await self._call(Calls.proxy_secrets())

    async def create_proxy_secret(self, name: str, host: str, value: str, type: str | None = None,
                                  force: bool = False, source_file: str | None = None) -> m.ProxySecret:
        """A credential the proxy adds for ``host`` (``type`` bearer, the default, or basic with
        ``user:password``); ``force`` replaces one of that name."""
        return await self._call(Calls.create_proxy_secret(name, host, value, type, force, source_file))

    async def delete_proxy_secret(self, name: str) -> None:
        """Rules naming the secret stop matching (they never become plain allows)."""
        await self._call(Calls.delete_proxy_secret(name))

    async def add_proxy_allow(self, client: str, host: str, secret: str | None = None,
                              methods: list[str] | None = None, paths: list[str] | None = None,
                              ports: list[int] | None = None, ttl_seconds: int | None = None,
                              passthrough: bool = False) -> m.ProxyAllowRule:
        """Append a rule to the client's list; ``ttl_seconds`` gives it an ``expires``."""
        return await self._call(Calls.add_proxy_allow(client, host, secret, methods, paths, ports, ttl_seconds,
                                                      passthrough))

    async def remove_proxy_allow(self, client: str, host: str) -> None:
        """Remove every rule of the client for ``host`` (``*.example.com`` and ``*`` too)."""
        await self._call(Calls.remove_proxy_allow(client, host))

    async def revoke_proxy_allow(self, client: str, host: str, methods: list[str] | None = None,
                                 paths: list[str] | None = None, ports: list[int] | None = None,
                                 passthrough: bool = False) -> None:
        """Remove the one rule with this host, methods, paths, ports and passthrough."""
        await self._call(Calls.revoke_proxy_allow(client, host, methods, paths, ports, passthrough))

    async def proxy_audit(self, client: str | None = None, since: str | datetime | None = None,
                          limit: int = 100) -> list[m.ProxyAuditEntry]:
        """The proxies' decisions, oldest first: the newest ``limit``, of ``client``, from ``since``
        (RFC 3339 text, or a datetime; a naive one is taken as UTC)."""
        return await self._call(Calls.proxy_audit(client, _rfc3339(since), limit))

    # -- WebSockets -------------------------------------------------------------------------------
    def shell(self, hostname: str, **query: Any) -> AsyncWebSocket:
        """A ``websockets`` connection speaking Slicer's shell frames (see docs/api.md)."""
        url = self.settings.ws_url(f"/vm/{hostname}/shell?{urlencode(query)}")
        return async_ws_connect(url, self.settings.uds, self.settings.headers())

    def forward(self, hostname: str, upstream: str) -> AsyncWebSocket:
        """A ``websockets`` connection carrying one TCP connection to ``upstream`` in the VM."""
        headers = {**self.settings.headers(), "X-Inlets-Upstream": upstream}
        url = self.settings.ws_url(f"/vm/{hostname}/forward")
        return async_ws_connect(url, self.settings.uds, headers, max_size=None)


def _rfc3339(when: str | datetime | None) -> str | None:
    if not isinstance(when, datetime):
        return when
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def _frames(resp: httpx.Response) -> AsyncIterator[m.ExecFrame]:
    """NDJSON exec frames of a streamed response, which is closed at the end."""
    try:
        async for line in resp.aiter_lines():
            if line:
                yield m.ExecFrame.model_validate_json(line)
    finally:
        await resp.aclose()
