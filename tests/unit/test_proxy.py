"""Slicer Proxy's rules, state and audit (slicer.proxy) and its API routes, in-process; the proxy
itself (mitmproxy, with real guests) is tested in tests/test_proxy.py."""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from pathlib import Path

import httpx
import pytest

from slicer.api.app import create_app
from slicer.core.errors import BadRequest, Conflict, NotFound
from slicer.proxy import state as st
from slicer.proxy.audit import AuditLog, logfmt, read_audit, read_counters
from slicer.proxy.policy import Policy, proxy_password
from slicer.proxy.rules import Rule, host_matches, path_matches
from slicer.proxy.store import ProxyStore
from tests.unit.conftest import Lab


@pytest.mark.parametrize(("pattern", "host", "ok"), [
    ("api.x.com", "api.x.com", True), ("api.x.com", "API.X.com.", True), ("api.x.com", "x.com", False),
    ("*.x.com", "a.x.com", True), ("*.x.com", "a.b.x.com", True), ("*.x.com", "x.com", False),
    ("*.x.com", "evilx.com", False), ("*", "anything.test", True),
])
def test_host_patterns(pattern: str, host: str, ok: bool) -> None:
    assert host_matches(pattern, host) is ok


@pytest.mark.parametrize(("pattern", "path", "ok"), [
    ("/v1/models", "/v1/models", True), ("/v1/models", "/v1/models?x=1", True), ("/v1/models", "/v1/models/", False),
    ("/v1/*", "/v1/chat", True), ("/v1/*", "/v1/", False), ("/v1/*", "/v1", False), ("/v1/*", "/v2/x", False),
    ("/v1/*", "/v1/../admin", False), ("/v1/*", "/v1/%2e%2e/admin", False), ("/v1/*", "/v1/a%2Fb", False),
    ("*", "/v1/../anything", True), ("/v1/*", "/v1/x#/../../admin", False), ("/v1/*", "/v1/..;/admin", False),
])
def test_path_patterns(pattern: str, path: str, ok: bool) -> None:
    assert path_matches(pattern, path) is ok


def test_a_rule_without_ports_admits_80_and_443_only() -> None:
    rule = Rule("api.x.com")
    assert rule.admits("api.x.com", 443) and rule.admits("api.x.com", 80) and not rule.admits("api.x.com", 8443)
    assert Rule("api.x.com", ports=(8443,)).admits("api.x.com", 8443)
    assert Rule("h", methods=("get",)).allows("GET", "/") and not Rule("h", methods=("GET",)).allows("POST", "/")


@pytest.fixture
def store(tmp_path: Path) -> ProxyStore:
    return ProxyStore(tmp_path)


def test_a_clients_token_is_shown_once_and_kept_as_a_digest(store: ProxyStore, tmp_path: Path) -> None:
    made = store.create_client({"name": "agent"})
    assert made["token"].startswith("spt_") and len(made["token"]) > 40
    assert store.list_clients() == [{"name": "agent", "created_at": made["created_at"]}]
    text = st.state_path(tmp_path).read_text()
    assert made["token"] not in text and st.token_digest(made["token"]) in text
    assert stat.S_IMODE(os.stat(st.state_path(tmp_path)).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(st.proxy_dir(tmp_path)).st_mode) == 0o700
    with pytest.raises(Conflict):
        store.create_client({"name": "agent"})
    store.create_client({"name": "b", "token": "given-token-1"})
    with pytest.raises(Conflict, match="token"):
        store.create_client({"name": "c", "token": "given-token-1"})
    for bad in ({"name": "../x"}, {"name": "ok", "token": "short"}, {"name": "ok", "token": "has space in it"}):
        with pytest.raises(BadRequest):
            store.create_client(bad)


def test_secrets_are_validated_and_their_values_never_listed(store: ProxyStore) -> None:
    meta = store.create_secret({"name": "openai", "host": "api.openai.com", "value": "sk-VALUE"})
    assert meta["type"] == "bearer" and "value" not in meta
    assert "sk-VALUE" not in json.dumps(store.list_secrets())
    with pytest.raises(Conflict):
        store.create_secret({"name": "openai", "host": "api.openai.com", "value": "other"})
    replaced = store.create_secret({"name": "openai", "host": "api.openai.com", "value": "sk-NEW", "force": True})
    assert replaced["updated_at"] and replaced["created_at"] == meta["created_at"]
    bad = [({"type": "basic", "value": "no-colon"}, "user:password"), ({"type": "oauth-claude"}, "not supported"),
           ({"type": "nope"}, "type must be"), ({"value": "a\r\nX-Evil: 1"}, "printable"), ({"host": "a b"}, "host")]
    for change, words in bad:
        with pytest.raises(BadRequest, match=words):
            store.create_secret({"name": "s", "host": "h.test", "value": "v", **change})


def test_allow_rules_validate_expire_and_come_off_by_host_or_tuple(store: ProxyStore) -> None:
    store.create_client({"name": "c"})
    store.create_secret({"name": "s", "host": "api.x.com", "value": "v"})
    rule = store.add_allow({"client": "c", "host": "api.x.com", "secret": "s", "methods": ["GET"],
                            "paths": ["/v1/*"], "ttl_seconds": 3600})
    assert rule["expires"].endswith("Z") and rule["secret"] == "s" and "passthrough" not in rule
    with pytest.raises(Conflict):
        store.add_allow({"client": "c", "host": "API.x.com", "methods": ["get"], "paths": ["/v1/*"]})
    for body, words in [({"client": "nobody", "host": "h"}, "client"), ({"client": "c", "host": "h", "secret": "x"},
                        "secret"), ({"client": "c", "host": "h", "passthrough": True, "paths": ["/"]}, "passthrough"),
                        ({"client": "c", "host": "h", "ports": [0]}, "ports"),
                        ({"client": "c", "host": "h", "ttl_seconds": -1}, "ttl")]:
        with pytest.raises(BadRequest, match=words):
            store.add_allow(body)
    store.add_allow({"client": "c", "host": "*.x.com", "ports": [22], "passthrough": True})
    store.add_allow({"client": "c", "host": "*"})
    assert [r["host"] for r in store.rules("c")] == ["api.x.com", "*.x.com", "*"]
    store.revoke({"client": "c", "host": "*.X.com", "ports": [22], "passthrough": True})
    with pytest.raises(NotFound):
        store.revoke({"client": "c", "host": "api.x.com"})  # no rule with empty filters for it
    store.remove_host("c", "*")
    with pytest.raises(NotFound):
        store.remove_host("c", "*")
    assert [r["host"] for r in store.rules("c")] == ["api.x.com"]
    store.add_allow({"client": "c", "host": "gone.test", "ttl_seconds": 1})
    st_rules = store.state.clients["c"].rules
    st_rules[-1] = Rule("gone.test", expires=time.time() - 1)
    assert [r["host"] for r in store.rules("c")] == ["api.x.com"]  # an expired rule is collected


def test_the_state_survives_a_new_store_and_a_torn_write(tmp_path: Path) -> None:
    store = ProxyStore(tmp_path)
    store.create_client({"name": "c", "token": "token-of-c"})
    store.add_allow({"client": "c", "host": "h.test"})
    st.state_path(tmp_path).with_suffix(".tmp").write_text("{half")  # a crash mid-write leaves this
    again = ProxyStore(tmp_path)
    assert [r["host"] for r in again.rules("c")] == ["h.test"]


def _auth(token: str) -> str:
    return "Basic " + base64.b64encode(f"anyone:{token}".encode()).decode()


def test_the_proxys_policy_follows_the_file_and_matches_first(tmp_path: Path) -> None:
    store = ProxyStore(tmp_path)
    store.create_client({"name": "c", "token": "token-of-c"})
    policy = Policy(st.state_path(tmp_path))
    found = policy.client(_auth("token-of-c"))
    assert found is not None and found[0] == "c" and policy.holds("c", found[1])
    assert policy.client(_auth("wrong-token")) is None and policy.client("Bearer token-of-c") is None
    assert proxy_password("Basic !!!") is None and proxy_password("Basic \u00e9") is None  # never an exception
    assert not policy.connect("c", "api.x.com", 443).allow
    store.create_secret({"name": "s", "host": "api.x.com", "value": "sk-1"})
    store.create_secret({"name": "b", "host": "*.x.com", "type": "basic", "value": "u:p"})
    store.add_allow({"client": "c", "host": "api.x.com", "secret": "s", "methods": ["GET"], "paths": ["/v1/*"]})
    store.add_allow({"client": "c", "host": "*", "secret": "b"})  # a wildcard rule: its secret only for *.x.com
    store.add_allow({"client": "c", "host": "ssh.x.com", "ports": [22], "passthrough": True})
    got = policy.request("c", "api.x.com", 443, "GET", "/v1/models")
    assert got.allow and got.inject == "Bearer sk-1" and got.secret == "s"
    got = policy.request("c", "api.x.com", 443, "POST", "/v1/models")  # the first rule refuses; the second allows
    assert got.inject == "Basic " + base64.b64encode(b"u:p").decode()
    assert not policy.connect("c", "evil.test", 443).allow  # "*" carries x.com's secret: not for evil.test
    assert policy.connect("c", "ssh.x.com", 22).rule.passthrough
    assert not policy.request("c", "ssh.x.com", 22, "GET", "/").allow  # passthrough: never an HTTP rule
    store.delete_secret("s")  # its rule stops matching; the next decides
    assert policy.request("c", "api.x.com", 443, "GET", "/v1/models").secret == "b"
    store.delete_client("c")
    assert policy.client(_auth("token-of-c")) is None and not policy.holds("c", found[1])
    store.create_client({"name": "c", "token": "new-token-of-c"})
    assert not policy.holds("c", found[1])  # a tunnel of the old token is not the new client's


def test_audit_lines_and_counts(tmp_path: Path) -> None:
    out: list[str] = []

    class Stream:
        def write(self, s: str) -> None:
            out.append(s)

        def flush(self) -> None:
            pass

    log = AuditLog(tmp_path, "10.0.0.1", stream=Stream())
    log.write(msg="allow", client="c", method="GET", host="h.test", port=443, path="/a b\n", status=200, inject="s")
    log.write(msg="deny", client="d", host="x.test", port=443, status=403, reason="host-not-allowed")
    log.flush_counters()
    line = "".join(out).splitlines()[0]
    assert line.startswith("msg=allow client=c method=GET host=h.test port=443 ") and 'path="/a b\\\\x0a"' in line
    assert [e["msg"] for e in read_audit(tmp_path)] == ["allow", "deny"]
    assert [e["client"] for e in read_audit(tmp_path, client="d")] == ["d"]
    assert read_audit(tmp_path, since=time.time() + 60) == [] and len(read_audit(tmp_path, limit=1)) == 1
    assert read_counters(tmp_path) == {("allow", "c"): 1, ("deny", "d"): 1}
    assert logfmt({"msg": "deny", "reason": 'a "q"'}) == 'msg=deny reason="a \\"q\\""'


async def test_the_routes_answer_in_slicers_shapes(lab: Lab) -> None:
    app = create_app(lab.manager(), token=None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as api:
        made = await api.post("/proxy/v1/clients", json={"name": "c"})
        assert made.status_code == 201 and set(made.json()) == {"name", "token", "created_at"}
        assert (await api.post("/proxy/v1/clients", json={"name": "c"})).status_code == 409
        s = await api.post("/proxy/v1/secrets", json={"name": "s", "host": "api.x.com", "value": "VALUE"})
        assert s.status_code == 201 and "VALUE" not in s.text
        r = await api.post("/proxy/v1/allows",
                           json={"client": "c", "host": "*.x.com", "secret": "s", "ttl_seconds": 60})
        assert r.status_code == 201 and set(r.json()) == {"host", "secret", "expires"}
        assert (await api.get("/proxy/v1/clients/c")).json() == [r.json()]
        assert (await api.delete("/proxy/v1/allows/c/%2A.x.com")).status_code == 204  # the Go SDK escapes *
        assert (await api.delete("/proxy/v1/allows/c/%2A.x.com")).json()["code"] == "proxy_rule_not_found"
        bad = await api.post("/proxy/v1/allows", json={"client": "nobody", "host": "h"})
        assert bad.status_code == 400 and bad.json()["code"] == "proxy_client_not_found"
        assert (await api.post("/proxy/v1/allows/revoke", json={"client": "c", "host": "h"})).status_code == 404
        assert (await api.delete("/proxy/v1/secrets/s")).status_code == 204
        assert (await api.get("/proxy/v1/secrets")).json() == []
        assert (await api.get("/proxy/v1/audit", params={"since": "yesterday"})).status_code == 400
        assert (await api.get("/proxy/v1/audit")).json() == []
        assert (await api.delete("/proxy/v1/clients/c")).status_code == 204


def test_a_client_flooding_denials_cannot_flush_the_audit_log(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, "10.0.0.1", stream=open(os.devnull, "w"))
    for _ in range(1000):
        log.write(msg="deny", client="noisy", host="x.test", port=443, status=403, reason="host-not-allowed")
    log.write(msg="deny", client="quiet", host="y.test", port=443, status=403, reason="host-not-allowed")
    entries = read_audit(tmp_path, limit=10000)
    noisy = [e for e in entries if e["client"] == "noisy"]
    assert 100 <= len(noisy) < 400 and [e["client"] for e in entries][-1] == "quiet"
    log.flush_counters()
    assert read_counters(tmp_path)[("deny", "noisy")] == 1000  # /metrics counts every one
    time.sleep(0.1)
    log.write(msg="deny", client="noisy", host="x.test", port=443, status=403)
    assert read_audit(tmp_path, client="noisy", limit=1)[0]["suppressed"] > 500
