# GENERATED from _async.py by `python -m slicer.client._unasync`: do not edit.
"""The synchronous client, :class:`SlicerClient`: the methods of :class:`AsyncSlicerClient`, not
awaited (this file is generated from ``_async.py``; change that one).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx

from slicer.client import _models as m
from slicer.client._base import Call, Calls, Settings, check, exec_params
from slicer.client._duplex import duplex_transport
from slicer.client._errors import APIError, ConnectionFailed, WaitTimeoutError, error_for
from slicer.client._flavour import WebSocket, extract_tar, sleep, upload_body, ws_connect
from slicer.client._transfer import CHUNK, Progress, Source, local_chunks, tar_stream


class SlicerClient:
    """A client for one Slicer daemon (``SLICER_URL`` / ``SLICER_TOKEN`` or defaults); examples
    in :mod:`slicer.client`."""

    def __init__(self, url: str | None = None, token: str | None = None, token_file: str | None = None,
                 timeout: float = 60.0) -> None:
        self.settings = Settings.resolve(url, token, token_file)
        transport = httpx.HTTPTransport(uds=self.settings.uds) if self.settings.uds else None
        self._http = httpx.Client(base_url=self.settings.base_url, headers=self.settings.headers(),
                                       transport=transport, timeout=timeout)
        # An exec whose stdin streams: the body goes on while the output comes back (see _duplex).
        self._duplex = httpx.Client(base_url=self.settings.base_url, headers=self.settings.headers(),
                                         transport=duplex_transport(self.settings.base_url, self.settings.uds),
                                         timeout=timeout)

    def __enter__(self) -> SlicerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()
        self._duplex.close()

    # -- plumbing ---------------------------------------------------------------------------------
    def _unreachable(self, e: httpx.TransportError) -> ConnectionFailed:
        return ConnectionFailed(f"cannot reach the Slicer daemon at {self.settings.base_url}: {e}")

    def _call(self, call: Call) -> Any:
        try:
            resp = self._http.request(call.method, call.path, params=call.params, json=call.json,
                                            timeout=call.timeout)
        except httpx.TransportError as e:
            raise self._unreachable(e) from e
        return call.parse(check(resp))

    def _stream(self, method: str, path: str, duplex: bool = False, **kw: Any) -> httpx.Response:
        """A streamed answer (the caller closes it); an error answer is read and raised.
        ``duplex``: the request's body keeps streaming while the answer is read."""
        http = self._duplex if duplex else self._http
        try:
            req = http.build_request(method, path, timeout=None, **kw)
            resp = http.send(req, stream=True)
        except httpx.TransportError as e:
            raise self._unreachable(e) from e
        if resp.status_code >= 300:
            resp.read()
            resp.close()
            raise error_for(resp.status_code, resp.content)
        return resp

    # -- daemon and nodes -------------------------------------------------------------------------
    def info(self) -> m.Info:
        return self._call(Calls.info())

    def host_groups(self) -> list[m.HostGroup]:
        return self._call(Calls.host_groups())

    def nodes(self, group: str | None = None, tag: str | None = None,
                    tag_prefix: str | None = None) -> list[m.Node]:
        return self._call(Calls.nodes(group, tag, tag_prefix))

    def get_node(self, hostname: str) -> m.Node:
        return self._call(Calls.get_node(hostname))

    def create_node(self, group: str, *, wait: str | None = None, timeout: str | None = None,
                          **fields: Any) -> m.CreatedNode:
        """Fields as in the API: cpus, ram_bytes, userdata, import_user, ssh_keys, tags, secrets,
        persistent. ``wait="agent"`` or ``"userdata"`` returns once the VM is ready."""
        return self._call(Calls.create_node(group, wait, timeout, **fields))

    def delete_node(self, group: str, hostname: str) -> dict:
        return self._call(Calls.delete_node(group, hostname))

    def logs(self, hostname: str, lines: int = 20) -> str:
        return self._call(Calls.logs(hostname, lines))

    def health(self, hostname: str) -> m.Health:
        return self._call(Calls.health(hostname))

    def pause(self, hostname: str) -> str:
        return self._call(Calls.power(hostname, "pause"))

    def resume(self, hostname: str) -> str:
        return self._call(Calls.power(hostname, "resume"))

    def shutdown(self, hostname: str, action: str = "shutdown") -> str:
        return self._call(Calls.power(hostname, action))

    def suspend(self, hostname: str) -> str:
        """Save the VM's memory and device state to the host's disk and stop it."""
        return self._call(Calls.suspend(hostname))

    def restore(self, hostname: str, wait: str | None = "agent", timeout: str | None = None) -> str:
        """Bring a suspended VM back where it was (``wait="agent"``: once its agent answers)."""
        return self._call(Calls.restore(hostname, wait, timeout))

    def relaunch(self, hostname: str, wait: str | None = "agent", timeout: str | None = None) -> m.CreatedNode:
        """Boot a shut-down (or crashed) VM again from its disk."""
        return self._call(Calls.relaunch(hostname, wait, timeout))

    def tags(self, hostname: str, add: list[str] | None = None, remove: list[str] | None = None,
                   replace: list[str] | None = None) -> m.Tags:
        """The VM's tags; with ``add``/``remove`` or ``replace``, changed first (at once)."""
        return self._call(Calls.tags(hostname, add, remove, replace))

    def commit(self, hostname: str, tags: list[str] | None = None, labels: dict[str, str] | None = None,
                     cache_key: str | None = None) -> m.Commit:
        """Freeze a stopped persistent VM's disk into an immutable commit (the VM goes on on top)."""
        return self._call(Calls.commit(hostname, tags, labels, cache_key))

    def commits(self, tags: list[str] | None = None, cache_key: str | None = None,
                      source: str | None = None) -> list[m.Commit]:
        return self._call(Calls.commits(tags, cache_key, source))

    def delete_commit(self, commit_id: str) -> None:
        """Refused (409) while a VM or a later commit reads through it."""
        self._call(Calls.delete_commit(commit_id))

    def fork_commit(self, commit_id: str, wait: str = "agent", timeout: str | None = None,
                          **body: Any) -> m.Fork:
        """Boot a new VM from a commit (body: tags, tag_mode, secrets, persistent, vcpu, ram_bytes, fixups)."""
        return self._call(Calls.fork_commit(commit_id, wait, timeout, **body))

    def fork(self, hostname: str, count: int = 1, wait: str | None = "agent", timeout: str | None = None,
                   **body: Any) -> list[m.Fork]:
        """``count`` live copies of a running VM: its memory, processes and files (body: tags)."""
        return self._call(Calls.fork(hostname, count, wait, timeout, **body))

    def storage(self) -> m.Storage:
        """Templates, disks and saved states, with the bytes each takes on the host."""
        return self._call(Calls.storage())

    def build_template(self, group: str) -> m.TemplateUsage:
        """Build the host group's template now, if it has no current one."""
        return self._call(Calls.build_template(group))

    def stats(self, hostname: str | None = None) -> m.NodeStats | list[m.NodeStats]:
        return self._call(Calls.stats(hostname))

    # -- exec -------------------------------------------------------------------------------------
    def exec(self, hostname: str, cmd: str, *, stdin: bytes | None = None, **options: Any) -> m.ExecResult:
        """Run ``cmd`` and return its whole output (``args``, ``env``, ``uid``, ``gid``, ``cwd``,
        ``shell``, ``stdio`` as in the API)."""
        params = exec_params(cmd, **options) + [("buffered", "true")]
        if stdin is not None:
            params.append(("stdin", "true"))
        resp = self._stream("POST", f"/vm/{hostname}/exec", params=params, content=stdin)
        try:
            return m.ExecResult.model_validate(json.loads(resp.read()))
        finally:
            resp.close()

    def exec_stream(self, hostname: str, cmd: str, *, stdin: Iterable[bytes] | bytes | None = None,
                          **options: Any) -> Iterator[m.ExecFrame]:
        """Frames as the command produces them; the last one has ``type == "exit"``. A ``stdin``
        stream goes on being sent while the output comes back (a pipe, an endless producer)."""
        params = exec_params(cmd, **options)
        if stdin is not None:
            params.append(("stdin", "true"))
        resp = self._stream("POST", f"/vm/{hostname}/exec", params=params, content=stdin,
                                  duplex=stdin is not None and not isinstance(stdin, bytes))
        for frame in _frames(resp):
            yield frame

    def exec_background(self, hostname: str, cmd: str, **options: Any) -> m.BackgroundExec:
        return self._call(Calls.exec_background(hostname, exec_params(cmd, **options)))

    def background_execs(self, hostname: str) -> list[m.BackgroundExec]:
        return self._call(Calls.background(hostname, "", "list"))

    def background_info(self, hostname: str, exec_id: str) -> m.BackgroundExec:
        return self._call(Calls.background(hostname, exec_id))

    def background_logs(self, hostname: str, exec_id: str, follow: bool = False,
                              from_id: int | None = None) -> Iterator[m.ExecFrame]:
        params = {"follow": str(follow).lower(), **({"from_id": from_id} if from_id else {})}
        resp = self._stream("GET", f"/vm/{hostname}/exec/{exec_id}/logs", params=params)
        for frame in _frames(resp):
            yield frame

    def background_kill(self, hostname: str, exec_id: str, signal: str = "TERM", grace_ms: int = 5000) -> dict:
        return self._call(Calls.background(hostname, exec_id, "kill", signal=signal, grace_ms=grace_ms))

    def background_wait(self, hostname: str, exec_id: str, timeout: int = 30) -> dict:
        return self._call(Calls.background(hostname, exec_id, "wait", timeout=timeout))

    def background_delete(self, hostname: str, exec_id: str) -> dict:
        return self._call(Calls.background(hostname, exec_id, "delete"))

    # -- files ------------------------------------------------------------------------------------
    def upload(self, hostname: str, source: Source, path: str, *, tar: bool = False,
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
        resp = self._stream("POST", f"/vm/{hostname}/cp", params=params, content=upload_body(chunks),
                                  headers={"Content-Type": ctype})
        try:
            return json.loads(resp.read())
        finally:
            resp.close()

    def download(self, hostname: str, path: str, dest: str | Path | None = None, *, tar: bool = False,
                       progress: Progress | None = None) -> bytes | None:
        """Copy ``path`` out of the VM into ``dest`` (streamed), or return its bytes. With
        ``tar=True`` and a ``dest`` directory, the tree is extracted there (safely)."""
        params = {"path": path, "mode": "tar" if tar else "binary"}
        resp = self._stream("GET", f"/vm/{hostname}/cp", params=params)
        done = 0
        try:
            if dest is None:
                return resp.read()
            if tar:
                extract_tar(resp.iter_raw(CHUNK), Path(dest))
                return None
            with open(dest, "wb") as f:
                for chunk in resp.iter_raw(CHUNK):
                    f.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done)
            return None
        finally:
            resp.close()

    def wait_ready(self, hostname: str, userdata: bool = False, timeout: float = 300) -> m.Health:
        """Poll the agent until it answers (and userdata ran, if asked); WaitTimeoutError after."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                h = self.health(hostname)
                if not userdata or h.userdata_ran:
                    return h
            except APIError as e:
                if e.status == 404:
                    raise
            if time.monotonic() > deadline:
                raise WaitTimeoutError(408, f"{hostname} not ready within {timeout:g}s", "timeout")
            sleep(0.5)

    def readdir(self, hostname: str, path: str) -> list[dict]:
        return self._call(Calls.fs(hostname, "readdir", path))

    def stat(self, hostname: str, path: str) -> dict:
        return self._call(Calls.fs(hostname, "stat", path))

    def mkdir(self, hostname: str, path: str, recursive: bool = False, mode: str | None = None) -> dict:
        kw: dict[str, Any] = {"recursive": recursive, **({"mode": mode} if mode else {})}
        return self._call(Calls.fs(hostname, "mkdir", path, **kw))

    def remove(self, hostname: str, path: str, recursive: bool = False) -> dict:
        return self._call(Calls.fs(hostname, "remove", path, recursive=recursive))

    # -- secrets ----------------------------------------------------------------------------------
    def secrets(self) -> list[m.Secret]:
        return self._call(Calls.secrets())

    def create_secret(self, name: str, data: bytes, permissions: str = "0600", uid: int = 0,
                            gid: int = 0) -> m.Secret:
        return self._call(Calls.create_secret(name, data, permissions, uid, gid))

    def update_secret(self, name: str, **changes: Any) -> m.Secret:
        return self._call(Calls.update_secret(name, **changes))

    def delete_secret(self, name: str) -> None:
        self._call(Calls.delete_secret(name))

    # -- Slicer Proxy (/proxy/v1) -----------------------------------------------------------------
    def proxy_clients(self) -> list[m.ProxyClient]:
        """The proxy's clients (never their tokens)."""
        return self._call(Calls.proxy_clients())

    def create_proxy_client(self, name: str, token: str | None = None) -> m.ProxyClientToken:
        """A client of the proxy; ``.token`` (made as ``spt_…`` unless given) is in this answer only."""
        return self._call(Calls.create_proxy_client(name, token))

    def delete_proxy_client(self, name: str) -> None:
        """Drop the client's token and every rule of it."""
        self._call(Calls.delete_proxy_client(name))

    def proxy_rules(self, client: str) -> list[m.ProxyAllowRule]:
        """The client's allow rules, in the order they are tried (first match wins)."""
        return self._call(Calls.proxy_rules(client))

    def proxy_secrets(self) -> list[m.ProxySecret]:
        """The proxy's secrets: name, host, type and times, never the value."""
        return self._call(Calls.proxy_secrets())

    def create_proxy_secret(self, name: str, host: str, value: str, type: str | None = None,
                                  force: bool = False, source_file: str | None = None) -> m.ProxySecret:
        """A credential the proxy adds for ``host`` (``type`` bearer, the default, or basic with
        ``user:password``); ``force`` replaces one of that name."""
        return self._call(Calls.create_proxy_secret(name, host, value, type, force, source_file))

    def delete_proxy_secret(self, name: str) -> None:
        """Rules naming the secret stop matching (they never become plain allows)."""
        self._call(Calls.delete_proxy_secret(name))

    def add_proxy_allow(self, client: str, host: str, secret: str | None = None,
                              methods: list[str] | None = None, paths: list[str] | None = None,
                              ports: list[int] | None = None, ttl_seconds: int | None = None,
                              passthrough: bool = False) -> m.ProxyAllowRule:
        """Append a rule to the client's list; ``ttl_seconds`` gives it an ``expires``."""
        return self._call(Calls.add_proxy_allow(client, host, secret, methods, paths, ports, ttl_seconds,
                                                      passthrough))

    def remove_proxy_allow(self, client: str, host: str) -> None:
        """Remove every rule of the client for ``host`` (``*.example.com`` and ``*`` too)."""
        self._call(Calls.remove_proxy_allow(client, host))

    def revoke_proxy_allow(self, client: str, host: str, methods: list[str] | None = None,
                                 paths: list[str] | None = None, ports: list[int] | None = None,
                                 passthrough: bool = False) -> None:
        """Remove the one rule with this host, methods, paths, ports and passthrough."""
        self._call(Calls.revoke_proxy_allow(client, host, methods, paths, ports, passthrough))

    def proxy_audit(self, client: str | None = None, since: str | datetime | None = None,
                          limit: int = 100) -> list[m.ProxyAuditEntry]:
        """The proxies' decisions, oldest first: the newest ``limit``, of ``client``, from ``since``
        (RFC 3339 text, or a datetime; a naive one is taken as UTC)."""
        return self._call(Calls.proxy_audit(client, _rfc3339(since), limit))

    # -- WebSockets -------------------------------------------------------------------------------
    def shell(self, hostname: str, **query: Any) -> WebSocket:
        """A ``websockets`` connection speaking Slicer's shell frames (see docs/api.md)."""
        url = self.settings.ws_url(f"/vm/{hostname}/shell?{urlencode(query)}")
        return ws_connect(url, self.settings.uds, self.settings.headers())

    def forward(self, hostname: str, upstream: str) -> WebSocket:
        """A ``websockets`` connection carrying one TCP connection to ``upstream`` in the VM."""
        headers = {**self.settings.headers(), "X-Inlets-Upstream": upstream}
        url = self.settings.ws_url(f"/vm/{hostname}/forward")
        return ws_connect(url, self.settings.uds, headers, max_size=None)


def _rfc3339(when: str | datetime | None) -> str | None:
    if not isinstance(when, datetime):
        return when
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _frames(resp: httpx.Response) -> Iterator[m.ExecFrame]:
    """NDJSON exec frames of a streamed response, which is closed at the end."""
    try:
        for line in resp.iter_lines():
            if line:
                yield m.ExecFrame.model_validate_json(line)
    finally:
        resp.close()
