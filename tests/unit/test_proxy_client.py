"""The SDK (async and sync) and ``slicer proxy …`` against the daemon's real ``/proxy/v1`` routes,
in-process over httpx.ASGITransport (for the sync client and so the CLI, driven on an event loop
of its own). No daemon, no proxy, no QEMU."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from typer.testing import CliRunner

from slicer.api.app import create_app
from slicer.cli import _common as cli_common
from slicer.cli import app as cli_app
from slicer.cli import proxy as proxy_cli
from slicer.client import (
    AsyncSlicerClient,
    BadRequestError,
    ConflictError,
    NotFoundError,
    ProxyAllowRule,
    ProxyClientToken,
    SlicerClient,
)
from tests.unit.conftest import Lab

BASE = "http://127.0.0.1"  # a Host the daemon's RequestGuard accepts
API_TOKEN = "unit-token"
SECRET_VALUE = "ghp_NEVER_SHOWN_0123456789"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[FastAPI, Path]]:
    """The API app on an unstarted manager (the proxy routes need only its data directory)."""
    lab = Lab(tmp_path)
    m = lab.manager()
    try:
        yield create_app(m, token=API_TOKEN), m.data_dir
    finally:
        m.store.close()
        shutil.rmtree(lab.data_dir, ignore_errors=True)


class SyncASGI(httpx.BaseTransport):
    """httpx.ASGITransport for a sync client: each request run to its end on a private loop."""

    def __init__(self, app: FastAPI) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.loop = asyncio.new_event_loop()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def go() -> httpx.Response:
            resp = await self.inner.handle_async_request(request)
            return httpx.Response(resp.status_code, headers=resp.headers, content=await resp.aread())
        return self.loop.run_until_complete(go())

    def close(self) -> None:
        self.loop.close()


def sync_client(app: FastAPI) -> SlicerClient:
    c = SlicerClient(BASE, token=API_TOKEN)
    c._http.close()
    c._http = httpx.Client(transport=SyncASGI(app), base_url=BASE, headers=c.settings.headers())
    return c


def async_client(app: FastAPI) -> AsyncSlicerClient:
    c = AsyncSlicerClient(BASE, token=API_TOKEN)
    c._http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE,
                                headers=c.settings.headers())
    return c


def write_audit(data_dir: Path, *entries: dict) -> None:
    """Lines as slicer.proxy.audit.AuditLog writes them."""
    d = data_dir / "proxy"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "audit-10.0.0.1.jsonl", "a") as f:
        for e in entries:
            f.write(json.dumps(e, separators=(",", ":")) + "\n")


def stamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- SDK -------------------------------------------------------------------------------------------
def test_sync_sdk_clients_secrets_and_rules(daemon: tuple[FastAPI, Path]) -> None:
    app, _ = daemon
    with sync_client(app) as c:
        made = c.create_proxy_client("agent-1")
        assert isinstance(made, ProxyClientToken) and made.token.startswith("spt_") and len(made.token) > 20
        assert [x.name for x in c.proxy_clients()] == ["agent-1"]
        assert "token" not in c.proxy_clients()[0].model_dump()  # shown once: never listed
        with pytest.raises(ConflictError) as dup:
            c.create_proxy_client("agent-1")
        assert dup.value.status == 409
        with pytest.raises(ConflictError):
            c.create_proxy_client("agent-2", token=made.token)  # a token is one client's
        assert c.create_proxy_client("agent-3", token="my-own-token-123").token == "my-own-token-123"

        s = c.create_proxy_secret("gh", "api.github.com", SECRET_VALUE)
        assert (s.name, s.host, s.type) == ("gh", "api.github.com", "bearer")
        with pytest.raises(ConflictError):
            c.create_proxy_secret("gh", "api.github.com", "other")
        replaced = c.create_proxy_secret("gh", "api.github.com", SECRET_VALUE + "2", force=True)
        assert replaced.updated_at
        with pytest.raises(BadRequestError) as oauth:
            c.create_proxy_secret("claude", "api.anthropic.com", "{}", type="oauth-claude")
        assert oauth.value.code == "unsupported"
        with pytest.raises(BadRequestError):
            c.create_proxy_secret("b", "example.com", "no-colon", type="basic")
        assert [x.name for x in c.proxy_secrets()] == ["gh"]

        rule = c.add_proxy_allow("agent-1", "api.github.com", secret="gh", methods=["GET"], paths=["/repos/*"],
                                 ttl_seconds=3600)
        assert isinstance(rule, ProxyAllowRule) and rule.secret == "gh" and rule.methods == ["GET"]
        expires = datetime.strptime(rule.expires or "", "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        assert timedelta(minutes=59) < expires - datetime.now(UTC) <= timedelta(hours=1)
        assert c.add_proxy_allow("agent-1", "db.internal", ports=[5432], passthrough=True).passthrough is True
        with pytest.raises(ConflictError):
            c.add_proxy_allow("agent-1", "api.github.com", methods=["get"], paths=["/repos/*"])
        with pytest.raises(BadRequestError) as unknown:
            c.add_proxy_allow("nobody", "example.com")
        assert unknown.value.code == "proxy_client_not_found"
        assert [r.host for r in c.proxy_rules("agent-1")] == ["api.github.com", "db.internal"]

        # revoke by tuple: the one rule with these filters (case aside), not its neighbour
        c.add_proxy_allow("agent-1", "api.github.com", methods=["POST"])
        c.revoke_proxy_allow("agent-1", "api.github.com", methods=["get"], paths=["/repos/*"])
        assert [(r.host, r.methods) for r in c.proxy_rules("agent-1")] == [
            ("db.internal", None), ("api.github.com", ["POST"])]
        with pytest.raises(NotFoundError) as gone:
            c.revoke_proxy_allow("agent-1", "api.github.com", methods=["GET"])
        assert gone.value.code == "proxy_rule_not_found"
        c.revoke_proxy_allow("agent-1", "db.internal", ports=[5432], passthrough=True)

        c.delete_proxy_secret("gh")
        with pytest.raises(NotFoundError):
            c.delete_proxy_secret("gh")
        c.delete_proxy_client("agent-1")
        with pytest.raises(NotFoundError):
            c.proxy_rules("agent-1")


def test_remove_by_host_escapes_wildcards(daemon: tuple[FastAPI, Path]) -> None:
    app, _ = daemon
    with sync_client(app) as c:
        c.create_proxy_client("w")
        for host in ("*.example.com", "*", "example.com"):
            c.add_proxy_allow("w", host)
        c.add_proxy_allow("w", "*", methods=["GET"])
        c.remove_proxy_allow("w", "*.example.com")
        assert [r.host for r in c.proxy_rules("w")] == ["*", "example.com", "*"]
        c.remove_proxy_allow("w", "*")  # every rule for "*", and only those
        assert [r.host for r in c.proxy_rules("w")] == ["example.com"]
        with pytest.raises(NotFoundError):
            c.remove_proxy_allow("w", "*")


def test_no_answer_carries_a_secrets_value(daemon: tuple[FastAPI, Path]) -> None:
    app, _ = daemon
    seen: list[bytes] = []
    with sync_client(app) as c:
        c._http.event_hooks["response"] = [lambda r: seen.append(r.read())]
        c.create_proxy_client("a")
        c.create_proxy_secret("s", "example.com", SECRET_VALUE)
        c.create_proxy_secret("s", "example.com", SECRET_VALUE, force=True)
        c.create_proxy_secret("u", "example.com", "user:" + SECRET_VALUE, type="basic")
        c.proxy_secrets()
        c.add_proxy_allow("a", "example.com", secret="s")
        c.proxy_rules("a")
    assert len(seen) == 7
    assert not any(SECRET_VALUE.encode() in body for body in seen)


async def test_async_sdk_and_audit(daemon: tuple[FastAPI, Path]) -> None:
    app, data_dir = daemon
    now = datetime.now(UTC)
    write_audit(data_dir,
                {"msg": "allow", "client": "a", "method": "GET", "scheme": "https", "host": "api.github.com",
                 "port": 443, "path": "/repos/x", "inject": "gh", "status": 200,
                 "time": stamp(now - timedelta(hours=2))},
                {"msg": "deny", "client": "b", "host": "evil.example", "port": 443, "reason": "no-rule",
                 "time": stamp(now - timedelta(minutes=5))},
                {"msg": "allow", "client": "a", "method": "POST", "host": "api.github.com", "port": 443,
                 "path": "/graphql", "status": 201, "time": stamp(now - timedelta(minutes=1))})
    async with async_client(app) as c:
        made = await c.create_proxy_client("a")
        assert made.token.startswith("spt_")
        await c.add_proxy_allow("a", "*.example.com", ttl_seconds=60)
        await c.remove_proxy_allow("a", "*.example.com")
        assert await c.proxy_rules("a") == []

        everything = await c.proxy_audit()
        assert [e.msg for e in everything] == ["allow", "deny", "allow"]  # oldest first
        recent = await c.proxy_audit(since=now - timedelta(minutes=10))  # a datetime...
        assert [(e.client, e.msg) for e in recent] == [("b", "deny"), ("a", "allow")]
        text = await c.proxy_audit(client="a", since=stamp(now - timedelta(hours=3)))  # ...or RFC 3339 text
        assert [e.path for e in text] == ["/repos/x", "/graphql"] and text[0].inject == "gh"
        assert [e.path for e in await c.proxy_audit(limit=1)] == ["/graphql"]  # the newest
        with pytest.raises(BadRequestError):
            await c.proxy_audit(since="yesterday")


# -- CLI -------------------------------------------------------------------------------------------
@pytest.fixture
def cli(daemon: tuple[FastAPI, Path], monkeypatch: pytest.MonkeyPatch):
    """``slicer …`` in-process, its client wired to the app; returns (invoke, data_dir)."""
    app, data_dir = daemon
    urls: list[str | None] = []

    def wired(url: str | None, token: str | None, token_file: str | None) -> SlicerClient:
        urls.append(url)
        return sync_client(app)

    monkeypatch.setattr(proxy_cli, "client", wired)
    # wide tables, whatever COLUMNS the console saw when slicer.cli was first imported (pytest-xdist)
    monkeypatch.setattr(cli_common.out, "_width", 200)
    runner = CliRunner()

    def invoke(*args: str, stdin: str | None = None):
        return runner.invoke(cli_app, ["proxy", *args, "--url", "http://unused:1"], input=stdin,
                             env={"COLUMNS": "200"}, catch_exceptions=False)

    invoke.urls = urls  # type: ignore[attr-defined]
    return invoke, data_dir


def test_cli_client_token_is_printed_once_and_bare(cli) -> None:
    invoke, _ = cli
    r = invoke("client", "create", "agent-1")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip().startswith("spt_") and len(r.stdout.strip().split()) == 1
    assert "shown only this once" in r.stderr
    assert invoke.urls == ["http://unused:1"]  # --url reaches client(), like every client command
    r = invoke("client", "create", "agent-2", "--set-token", "given-token-1")
    assert r.stdout == "given-token-1\n"
    r = invoke("client", "create", "agent-1")
    assert r.exit_code == 1 and "already exists" in r.stderr and "HTTP 409" in r.stderr
    r = invoke("client", "list")
    assert "agent-1" in r.stdout and "agent-2" in r.stdout and "spt_" not in r.stdout
    assert invoke("client", "delete", "agent-2").exit_code == 0
    assert [c["name"] for c in json.loads(invoke("client", "list", "--json").stdout)] == ["agent-1"]


def test_cli_secrets_from_a_file_or_stdin(cli, tmp_path: Path) -> None:
    invoke, _ = cli
    f = tmp_path / "token"
    f.write_text(SECRET_VALUE + "\n\n")
    r = invoke("secret", "create", "gh", "--host", "api.github.com", "--value-file", str(f))
    assert r.exit_code == 0, r.stderr
    assert SECRET_VALUE not in r.stdout
    r = invoke("secret", "create", "basic", "--host", "example.com", "--type", "basic", "--value-file", "-",
               stdin="me:" + SECRET_VALUE + "\n")
    assert r.exit_code == 0, r.stderr
    r = invoke("secret", "create", "gh", "--host", "api.github.com", "--value", "x")
    assert r.exit_code == 1 and "force replaces it" in r.stderr
    assert invoke("secret", "create", "gh", "--host", "api.github.com", "--value", "x", "--force").exit_code == 0
    r = invoke("secret", "create", "x", "--host", "example.com")
    assert r.exit_code == 2 and "--value or --value-file" in r.stderr
    r = invoke("secret", "create", "o", "--host", "api.x.ai", "--type", "oauth-xai", "--value", "{}")
    assert r.exit_code == 1 and "unsupported" in r.stderr
    listed = invoke("secret", "list", "--json").stdout
    assert SECRET_VALUE not in listed
    assert [(s["name"], s["type"]) for s in json.loads(listed)] == [("gh", "bearer"), ("basic", "basic")]
    assert invoke("secret", "delete", "gh").exit_code == 0
    assert invoke("secret", "delete", "gh").exit_code == 1


def test_cli_allow_rules_and_revoke(cli) -> None:
    invoke, _ = cli
    invoke("client", "create", "a")
    invoke("secret", "create", "gh", "--host", "api.github.com", "--value", SECRET_VALUE)
    r = invoke("allow", "a", "--host", "api.github.com", "--secret", "gh", "--method", "GET", "--method", "HEAD",
               "--path", "/repos/*", "--ttl", "1h")
    assert r.exit_code == 0, r.stderr
    assert "until" in r.stdout
    assert invoke("allow", "a", "--host", "db.internal", "--port", "5432", "--passthrough").exit_code == 0
    assert invoke("allow", "a", "--host", "*.example.com").exit_code == 0
    r = invoke("allow", "a", "--host", "x.com", "--ttl", "soon")
    assert r.exit_code == 2 and "30s, 10m, 1h or 2d" in r.stderr

    table = invoke("rules", "a").stdout
    for header in ("HOST", "SECRET", "MODE", "METHODS", "PORTS", "PATHS", "EXPIRES"):
        assert header in table
    lines = {line.split()[1]: line.split()[2:] for line in table.splitlines() if line.startswith("│")}
    assert lines["api.github.com"][:5] == ["│", "gh", "│", "mitm", "│"]
    assert "GET,HEAD" in lines["api.github.com"] and "/repos/*" in lines["api.github.com"]
    assert "passthrough" in lines["db.internal"] and "5432" in lines["db.internal"]
    assert "never" in lines["*.example.com"] and "80,443" in lines["*.example.com"]
    rules = json.loads(invoke("rules", "a", "--json").stdout)
    assert rules[0]["expires"] and rules[0]["methods"] == ["GET", "HEAD"]

    # with filters: one rule by its tuple; without: every rule for the host
    assert invoke("allow", "a", "--host", "*.example.com", "--method", "POST").exit_code == 0
    r = invoke("revoke", "a", "--host", "api.github.com", "--method", "HEAD", "--method", "get", "--path", "/repos/*")
    assert r.exit_code == 0, r.stderr
    r = invoke("revoke", "a", "--host", "db.internal", "--port", "5432", "--passthrough")
    assert r.exit_code == 0, r.stderr
    assert [x["host"] for x in json.loads(invoke("rules", "a", "--json").stdout)] == ["*.example.com"] * 2
    assert invoke("revoke", "a", "--host", "*.example.com").exit_code == 0
    assert json.loads(invoke("rules", "a", "--json").stdout) == []
    r = invoke("revoke", "a", "--host", "*.example.com")
    assert r.exit_code == 1 and "no rule" in r.stderr


def test_cli_audit(cli) -> None:
    invoke, data_dir = cli
    now = datetime.now(UTC)
    write_audit(data_dir,
                {"msg": "allow", "client": "a", "method": "GET", "host": "old.example", "port": 443, "path": "/",
                 "status": 200, "time": stamp(now - timedelta(hours=2))},
                {"msg": "deny", "client": "b", "host": "evil.example", "port": 443, "reason": "no-rule",
                 "time": stamp(now - timedelta(minutes=5))},
                {"msg": "allow", "client": "a", "method": "GET", "host": "api.github.com", "port": 443,
                 "path": "/repos/x", "inject": "gh", "status": 200, "time": stamp(now - timedelta(minutes=1))})
    r = invoke("audit", "--since", "10m")
    assert r.exit_code == 0, r.stderr
    assert "old.example" not in r.stdout and "reason=no-rule" in r.stdout and "inject=gh" in r.stdout
    found = json.loads(invoke("audit", "--client", "a", "--json").stdout)
    assert [e["host"] for e in found] == ["old.example", "api.github.com"]
    since = stamp(now - timedelta(minutes=3))
    assert [e["host"] for e in json.loads(invoke("audit", "--since", since, "--json").stdout)] == ["api.github.com"]
    assert len(json.loads(invoke("audit", "--limit", "1", "--json").stdout)) == 1
    r = invoke("audit", "--since", "yesterday")
    assert r.exit_code == 1 and "RFC 3339" in r.stderr


def test_ttl_durations() -> None:
    assert [proxy_cli.parse_ttl(t) for t in ("90", "30s", "10m", "1h", "2d", "1h30m")] == [
        90, 30, 600, 3600, 172800, 5400]
    for bad in ("", "1x", "h", "1h 2m", "-1s"):
        with pytest.raises(ValueError):
            proxy_cli.parse_ttl(bad)
