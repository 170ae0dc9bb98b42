"""What the sync and async clients share: where the daemon is, the token, and every
non-streaming call as a plain description (method, path, query, body, how to read the answer)."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from slicer.client import _models as m
from slicer.client._errors import error_for

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_TOKEN_FILE = "/var/lib/slicer/auth/token"


@dataclass
class Settings:
    base_url: str
    uds: str | None
    token: str | None

    @classmethod
    def resolve(cls, url: str | None = None, token: str | None = None, token_file: str | None = None) -> Settings:
        """Arguments first, then ``SLICER_URL``, ``SLICER_TOKEN``, ``SLICER_TOKEN_FILE``, then the
        daemon's token file on this host if it is readable (``$SLICER_DATA_DIR/auth/token``, else
        /var/lib/slicer/auth/token). A URL that is a path is a unix socket."""
        url = url or os.environ.get("SLICER_URL") or DEFAULT_URL
        uds = None
        if url.startswith("unix:") or url.startswith("/"):
            uds, url = url.removeprefix("unix:"), "http://slicer"
        token = token or os.environ.get("SLICER_TOKEN")
        if not token:
            data_dir = os.environ.get("SLICER_DATA_DIR")
            default = os.path.join(data_dir, "auth", "token") if data_dir else DEFAULT_TOKEN_FILE
            path = token_file or os.environ.get("SLICER_TOKEN_FILE") or default
            try:
                token = open(path).read().strip() or None
            except OSError:
                if token_file:
                    raise
                token = None
        return cls(url.rstrip("/"), uds, token)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def ws_url(self, path: str) -> str:
        return self.base_url.replace("http://", "ws://").replace("https://", "wss://") + path


def check(resp: httpx.Response) -> httpx.Response:
    """Raise the SDK's error for a non-2xx answer (the body must have been read)."""
    if resp.status_code >= 300:
        raise error_for(resp.status_code, resp.content)
    return resp


@dataclass
class Call:
    method: str
    path: str
    params: Any = None
    json: Any = None
    parse: Callable[[httpx.Response], Any] = field(default=lambda r: r.json())
    timeout: float | None = 60.0


def _vm(hostname: str) -> str:
    return f"/vm/{quote(hostname, safe='')}"


def _list(model):
    return lambda r: [model.model_validate(x) for x in r.json()]


def _one(model):
    return lambda r: model.model_validate(r.json())


def _wait_params(wait: str | None, timeout: str | None) -> dict:
    return {k: v for k, v in (("wait", wait), ("timeout", timeout)) if v}


def _text(r: httpx.Response) -> str:
    return r.text


def _none(r: httpx.Response) -> None:
    return None


class Calls:
    """Every non-streaming operation of the API, described once for both clients."""

    @staticmethod
    def info() -> Call:
        return Call("GET", "/info", parse=_one(m.Info))

    @staticmethod
    def host_groups() -> Call:
        return Call("GET", "/hostgroup", parse=_list(m.HostGroup))

    @staticmethod
    def nodes(group: str | None = None, tag: str | None = None, tag_prefix: str | None = None) -> Call:
        params = {k: v for k, v in (("tag", tag), ("tag_prefix", tag_prefix)) if v is not None}
        path = f"/hostgroup/{quote(group, safe='')}/nodes" if group else "/nodes"
        return Call("GET", path, params=params, parse=_list(m.Node))

    @staticmethod
    def get_node(hostname: str) -> Call:
        return Call("GET", _vm(hostname), parse=_one(m.Node))

    @staticmethod
    def create_node(group: str, wait: str | None = None, timeout: str | None = None, **body: Any) -> Call:
        params = _wait_params(wait, timeout)
        body = {k: v for k, v in body.items() if v is not None}
        # the server waits up to `timeout` (default 5m when waiting); give the HTTP call longer
        return Call("POST", f"/hostgroup/{quote(group, safe='')}/nodes", params=params, json=body,
                    parse=_one(m.CreatedNode), timeout=None if wait else 120.0)

    @staticmethod
    def delete_node(group: str, hostname: str) -> Call:
        return Call("DELETE", f"/hostgroup/{quote(group, safe='')}/nodes/{quote(hostname, safe='')}")

    @staticmethod
    def logs(hostname: str, lines: int = 20) -> Call:
        return Call("GET", f"{_vm(hostname)}/logs", params={"lines": lines}, parse=lambda r: r.json()["content"])

    @staticmethod
    def health(hostname: str) -> Call:
        return Call("GET", f"{_vm(hostname)}/health", parse=_one(m.Health))

    @staticmethod
    def power(hostname: str, action: str) -> Call:
        if action in ("pause", "resume"):
            return Call("POST", f"{_vm(hostname)}/{action}", parse=_text)
        return Call("POST", f"{_vm(hostname)}/shutdown", params={"action": action}, parse=_text)

    @staticmethod
    def suspend(hostname: str) -> Call:
        return Call("POST", f"{_vm(hostname)}/suspend", parse=_text, timeout=None)

    @staticmethod
    def restore(hostname: str, wait: str | None = None, timeout: str | None = None) -> Call:
        params = _wait_params(wait, timeout)
        return Call("POST", f"{_vm(hostname)}/restore", params=params, parse=_text, timeout=None)

    @staticmethod
    def relaunch(hostname: str, wait: str | None = None, timeout: str | None = None) -> Call:
        params = _wait_params(wait, timeout)
        return Call("POST", f"{_vm(hostname)}/relaunch", params=params, parse=_one(m.CreatedNode), timeout=None)

    @staticmethod
    def tags(hostname: str, add: list[str] | None = None, remove: list[str] | None = None,
             replace: list[str] | None = None) -> Call:
        if add is None and remove is None and replace is None:
            return Call("GET", f"{_vm(hostname)}/tags", parse=_one(m.Tags))
        body = {k: v for k, v in (("add", add), ("remove", remove), ("replace", replace)) if v is not None}
        return Call("PATCH", f"{_vm(hostname)}/tags", json=body, parse=_one(m.Tags))

    @staticmethod
    def commit(hostname: str, tags: list[str] | None = None, labels: dict[str, str] | None = None,
               cache_key: str | None = None) -> Call:
        body = {k: v for k, v in (("tags", tags), ("labels", labels), ("cache_key", cache_key)) if v}
        return Call("POST", f"{_vm(hostname)}/commit", json=body, parse=_one(m.Commit), timeout=None)

    @staticmethod
    def commits(tags: list[str] | None = None, cache_key: str | None = None, source: str | None = None) -> Call:
        params = [("tag", t) for t in tags or []]
        params += [(k, v) for k, v in (("cache_key", cache_key), ("source", source)) if v]
        return Call("GET", "/vm/commits", params=params, parse=_list(m.Commit))

    @staticmethod
    def delete_commit(commit_id: str) -> Call:
        return Call("DELETE", f"/vm/commits/{quote(commit_id, safe='')}")

    @staticmethod
    def fork_commit(commit_id: str, wait: str = "agent", timeout: str | None = None, **body: Any) -> Call:
        params = {"wait": wait, **({"timeout": timeout} if timeout else {})}
        body = {k: v for k, v in body.items() if v is not None}
        return Call("POST", f"/vm/commits/{quote(commit_id, safe='')}/fork", params=params, json=body,
                    parse=_one(m.Fork), timeout=None)

    @staticmethod
    def fork(hostname: str, count: int = 1, wait: str | None = "agent", timeout: str | None = None,
             **body: Any) -> Call:
        params = _wait_params(wait, timeout)
        body = {"count": count, **{k: v for k, v in body.items() if v is not None}}
        return Call("POST", f"{_vm(hostname)}/fork", params=params, json=body, parse=_list(m.Fork), timeout=None)

    @staticmethod
    def storage() -> Call:
        return Call("GET", "/storage", parse=_one(m.Storage))

    @staticmethod
    def build_template(group: str) -> Call:
        return Call("POST", f"/hostgroup/{quote(group, safe='')}/template", parse=_one(m.TemplateUsage),
                    timeout=None)

    @staticmethod
    def stats(hostname: str | None = None) -> Call:
        if hostname:
            return Call("GET", f"/node/{quote(hostname, safe='')}/stats", parse=_one(m.NodeStats))
        return Call("GET", "/nodes/stats", parse=_list(m.NodeStats))

    @staticmethod
    def exec_background(hostname: str, params: list) -> Call:
        return Call("POST", f"{_vm(hostname)}/exec", params=params + [("background", "true")],
                    parse=_one(m.BackgroundExec))

    @staticmethod
    def background(hostname: str, exec_id: str, op: str = "", **params: Any) -> Call:
        path = f"{_vm(hostname)}/exec" + (f"/{quote(exec_id, safe='')}" if exec_id else "")
        if op == "list":
            return Call("GET", path, parse=_list(m.BackgroundExec))
        if op == "kill":
            return Call("POST", f"{path}/kill", json={"signal": params.get("signal", "TERM"),
                                                     "grace_ms": params.get("grace_ms", 5000)})
        if op == "wait":
            t = params.get("timeout", 30)
            return Call("GET", f"{path}/wait-exit", params={"timeout": t}, timeout=t + 30)
        if op == "delete":
            return Call("DELETE", path)
        return Call("GET", path, parse=_one(m.BackgroundExec))

    @staticmethod
    def fs(hostname: str, op: str, path: str, **kw: Any) -> Call:
        base = f"{_vm(hostname)}/fs/{op}"
        if op == "mkdir":
            return Call("POST", base, json={"path": path, **kw})
        if op == "remove":
            return Call("DELETE", base, params={"path": path, "recursive": str(kw.get("recursive", False)).lower()})
        return Call("GET", base, params={"path": path})

    @staticmethod
    def secrets() -> Call:
        return Call("GET", "/secrets", parse=_list(m.Secret))

    @staticmethod
    def create_secret(name: str, data: bytes, permissions: str = "0600", uid: int = 0, gid: int = 0) -> Call:
        return Call("POST", "/secrets", json={"name": name, "data": base64.b64encode(data).decode(),
                                              "permissions": permissions, "uid": uid, "gid": gid},
                    parse=_one(m.Secret))

    @staticmethod
    def update_secret(name: str, data: bytes | None = None, permissions: str | None = None,
                      uid: int | None = None, gid: int | None = None) -> Call:
        body: dict[str, Any] = {k: v for k, v in (("permissions", permissions), ("uid", uid), ("gid", gid))
                                if v is not None}
        if data is not None:
            body["data"] = base64.b64encode(data).decode()
        return Call("PATCH", f"/secrets/{quote(name, safe='')}", json=body, parse=_one(m.Secret))

    @staticmethod
    def delete_secret(name: str) -> Call:
        return Call("DELETE", f"/secrets/{quote(name, safe='')}", parse=_none)

    # -- Slicer Proxy (/proxy/v1) -----------------------------------------------------------------
    @staticmethod
    def proxy_clients() -> Call:
        return Call("GET", "/proxy/v1/clients", parse=_list(m.ProxyClient))

    @staticmethod
    def create_proxy_client(name: str, token: str | None = None) -> Call:
        body = {"name": name, **({"token": token} if token else {})}
        return Call("POST", "/proxy/v1/clients", json=body, parse=_one(m.ProxyClientToken))

    @staticmethod
    def delete_proxy_client(name: str) -> Call:
        return Call("DELETE", f"/proxy/v1/clients/{quote(name, safe='')}", parse=_none)

    @staticmethod
    def proxy_rules(client: str) -> Call:
        return Call("GET", f"/proxy/v1/clients/{quote(client, safe='')}", parse=_list(m.ProxyAllowRule))

    @staticmethod
    def proxy_secrets() -> Call:
        return Call("GET", "/proxy/v1/secrets", parse=_list(m.ProxySecret))

    @staticmethod
    def create_proxy_secret(name: str, host: str, value: str, type: str | None = None, force: bool = False,
                            source_file: str | None = None) -> Call:
        body: dict[str, Any] = {"name": name, "host": host, "value": value}
        body.update({k: v for k, v in (("type", type), ("source_file", source_file), ("force", force)) if v})
        return Call("POST", "/proxy/v1/secrets", json=body, parse=_one(m.ProxySecret))

    @staticmethod
    def delete_proxy_secret(name: str) -> Call:
        return Call("DELETE", f"/proxy/v1/secrets/{quote(name, safe='')}", parse=_none)

    @staticmethod
    def add_proxy_allow(client: str, host: str, secret: str | None = None, methods: list[str] | None = None,
                        paths: list[str] | None = None, ports: list[int] | None = None,
                        ttl_seconds: int | None = None, passthrough: bool = False) -> Call:
        body = _rule_body(client, host, methods, paths, ports, passthrough)
        body.update({k: v for k, v in (("secret", secret), ("ttl_seconds", ttl_seconds)) if v})
        return Call("POST", "/proxy/v1/allows", json=body, parse=_one(m.ProxyAllowRule))

    @staticmethod
    def remove_proxy_allow(client: str, host: str) -> Call:
        # every segment escaped: "*" goes as %2A, which the daemon decodes (as Go's client sends it)
        return Call("DELETE", f"/proxy/v1/allows/{quote(client, safe='')}/{quote(host, safe='')}", parse=_none)

    @staticmethod
    def revoke_proxy_allow(client: str, host: str, methods: list[str] | None = None, paths: list[str] | None = None,
                           ports: list[int] | None = None, passthrough: bool = False) -> Call:
        body = _rule_body(client, host, methods, paths, ports, passthrough)
        return Call("POST", "/proxy/v1/allows/revoke", json=body, parse=_none)

    @staticmethod
    def proxy_audit(client: str | None = None, since: str | None = None, limit: int = 100) -> Call:
        params = {"limit": limit, **{k: v for k, v in (("client", client), ("since", since)) if v}}
        return Call("GET", "/proxy/v1/audit", params=params, parse=_list(m.ProxyAuditEntry))


def _rule_body(client: str, host: str, methods: list[str] | None, paths: list[str] | None,
               ports: list[int] | None, passthrough: bool) -> dict[str, Any]:
    """An allow rule's tuple as Slicer's SDKs send it: empty filters left out."""
    body: dict[str, Any] = {"client": client, "host": host}
    body.update({k: list(v) for k, v in (("methods", methods), ("paths", paths), ("ports", ports)) if v})
    if passthrough:
        body["passthrough"] = True
    return body


def exec_params(cmd: str, args: list[str] | None = None, env: dict[str, str] | None = None, uid: int | None = None,
                gid: int | None = None, cwd: str | None = None, shell: str | None = None,
                stdio: str | None = None, ring_bytes: int | None = None) -> list[tuple[str, str]]:
    params: list[tuple[str, str]] = [("cmd", cmd)]
    params += [("args", a) for a in args or []]
    params += [("env", f"{k}={v}") for k, v in (env or {}).items()]
    for key, value in (("uid", uid), ("gid", gid), ("cwd", cwd), ("shell", shell), ("stdio", stdio),
                       ("ring_bytes", ring_bytes)):
        if value is not None:
            params.append((key, str(value)))
    return params
