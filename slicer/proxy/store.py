"""The daemon's side of ``/proxy/v1``: every change validated, then written to the state file the
proxies read (so a change applies to the next connection, with nothing restarted)."""

from __future__ import annotations

import hmac
import re
import secrets
import time
from pathlib import Path

from slicer.core.error_codes import ErrorCode
from slicer.core.errors import BadRequest, Conflict, NotFound
from slicer.proxy import state as st
from slicer.proxy.rules import HOST, METHOD, Rule, normal_host, rfc3339

NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
TOKEN = re.compile(r"^[\x21-\x7e]{8,512}$")  # printable, no spaces: it travels as a proxy password
MAX_VALUE = 64 << 10
MAX_FILTERS = 64
MAX_RULES = 1024  # per client


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise BadRequest(f"{what} must be 1-128 letters, digits, '.', '_' or '-'", ErrorCode.INVALID_NAME)
    return value


def _host(value: object) -> str:
    host = normal_host(value) if isinstance(value, str) else ""
    if len(host) > 253 or not HOST.fullmatch(host):
        raise BadRequest(f"host must be a DNS name, '*.suffix' or '*', not {value!r}", ErrorCode.INVALID_REQUEST)
    return host


def _strings(body: dict, key: str, check) -> tuple[str, ...]:
    items = body.get(key) or []
    if not isinstance(items, list) or len(items) > MAX_FILTERS:
        raise BadRequest(f"{key} must be a list of at most {MAX_FILTERS} strings", ErrorCode.INVALID_REQUEST)
    for item in items:
        if not isinstance(item, str) or not check(item):
            raise BadRequest(f"{key}: {item!r} is not valid", ErrorCode.INVALID_REQUEST)
    return tuple(items)


def _path_ok(p: str) -> bool:
    return p == "*" or (p.startswith("/") and len(p) <= 2048 and p.isprintable() and " " not in p)


def _ports(body: dict) -> tuple[int, ...]:
    ports = body.get("ports") or []
    if not isinstance(ports, list) or len(ports) > MAX_FILTERS or not all(
            isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in ports):
        raise BadRequest("ports must be a list of TCP ports (1-65535)", ErrorCode.INVALID_REQUEST)
    return tuple(ports)


def _tuple(body: dict) -> Rule:
    """The rule a request names (its filters validated), without client, secret or expiry."""
    passthrough = body.get("passthrough", False)
    if not isinstance(passthrough, bool):
        raise BadRequest("passthrough must be true or false", ErrorCode.INVALID_REQUEST)
    return Rule(host=_host(body.get("host")), methods=_strings(body, "methods", METHOD.fullmatch),
                paths=_strings(body, "paths", _path_ok), ports=_ports(body), passthrough=passthrough)


class ProxyStore:
    def __init__(self, data_dir: Path) -> None:
        self.path = st.state_path(data_dir)
        self.state = st.load(self.path)

    def _save(self) -> None:
        st.save(self.path, self.state)

    def _client(self, name: str, status: int = 404) -> st.Client:
        client = self.state.clients.get(name)
        if client is None:
            error = NotFound if status == 404 else BadRequest
            raise error(f"proxy client {name!r} not found", ErrorCode.PROXY_CLIENT_NOT_FOUND)
        return client

    def _gc(self) -> None:
        now = time.time()
        if any(r.expired(now) for c in self.state.clients.values() for r in c.rules):
            for c in self.state.clients.values():
                c.rules = [r for r in c.rules if not r.expired(now)]
            self._save()

    # -- clients ----------------------------------------------------------------------------------
    def list_clients(self) -> list[dict]:
        return [{"name": c.name, "created_at": rfc3339(c.created_at)} for c in self.state.clients.values()]

    def create_client(self, body: dict) -> dict:
        name = _name(body.get("name"), "name")
        token = body.get("token") or f"spt_{secrets.token_urlsafe(32)}"
        if not isinstance(token, str) or not TOKEN.fullmatch(token):
            raise BadRequest("token must be 8-512 printable characters with no spaces", ErrorCode.INVALID_REQUEST)
        if name in self.state.clients:
            raise Conflict(f"proxy client {name!r} already exists")
        digest = st.token_digest(token)
        if any(hmac.compare_digest(digest, c.token_sha256) for c in self.state.clients.values()):
            raise Conflict("that token is already another client's")
        client = st.Client(name, digest, time.time())
        self.state.clients[name] = client
        self._save()
        return {"name": name, "token": token, "created_at": rfc3339(client.created_at)}

    def delete_client(self, name: str) -> None:
        self._client(name)
        del self.state.clients[name]
        self._save()

    def rules(self, name: str) -> list[dict]:
        self._gc()
        return [r.to_api() for r in self._client(name).rules]

    # -- secrets ----------------------------------------------------------------------------------
    @staticmethod
    def _secret_json(s: st.Secret) -> dict:
        d = {"name": s.name, "host": s.host, "type": s.type, "created_at": rfc3339(s.created_at)}
        if s.updated_at:
            d["updated_at"] = rfc3339(s.updated_at)
        return d

    def list_secrets(self) -> list[dict]:
        return [self._secret_json(s) for s in self.state.secrets.values()]

    def create_secret(self, body: dict) -> dict:
        name, host = _name(body.get("name"), "name"), _host(body.get("host"))
        kind = body.get("type") or "bearer"
        if kind not in st.KNOWN_TYPES:
            raise BadRequest(f"type must be one of {', '.join(st.KNOWN_TYPES)}", ErrorCode.INVALID_REQUEST)
        if kind not in st.INJECTABLE:
            raise BadRequest(f"secret type {kind} (OAuth token refresh) is not supported yet; use bearer or basic",
                             ErrorCode.UNSUPPORTED)
        value = body.get("value")
        if not isinstance(value, str) or not value or len(value) > MAX_VALUE:
            raise BadRequest(f"value must be a non-empty string of at most {MAX_VALUE} bytes",
                             ErrorCode.INVALID_REQUEST)
        if not value.isprintable():  # it becomes a header: no CR/LF smuggled into the upstream request
            raise BadRequest("value must be printable text (no line breaks or control characters)",
                             ErrorCode.INVALID_REQUEST)
        if kind == "basic" and ":" not in value:
            raise BadRequest("a basic secret's value is user:password", ErrorCode.INVALID_REQUEST)
        for key in ("source_file", "force"):
            if key in body and not isinstance(body[key], str if key == "source_file" else bool):
                raise BadRequest(f"{key} has the wrong type", ErrorCode.INVALID_REQUEST)
        old = self.state.secrets.get(name)
        if old is not None and not body.get("force"):
            raise Conflict(f"proxy secret {name!r} already exists (force replaces it)")
        now = time.time()
        secret = st.Secret(name, host, kind, value, old.created_at if old else now, now if old else 0.0)
        self.state.secrets[name] = secret
        self._save()
        return self._secret_json(secret)

    def delete_secret(self, name: str) -> None:
        if name not in self.state.secrets:
            raise NotFound(f"proxy secret {name!r} not found", ErrorCode.PROXY_SECRET_NOT_FOUND)
        del self.state.secrets[name]  # rules naming it stop matching (the proxy skips them)
        self._save()

    # -- allow rules ------------------------------------------------------------------------------
    def add_allow(self, body: dict) -> dict:
        self._gc()
        client = self._client(_name(body.get("client"), "client"), status=400)
        rule = _tuple(body)
        secret = body.get("secret") or ""
        if secret:
            _name(secret, "secret")
            if secret not in self.state.secrets:
                raise BadRequest(f"proxy secret {secret!r} not found", ErrorCode.PROXY_SECRET_NOT_FOUND)
        if rule.passthrough and (secret or rule.methods or rule.paths):
            raise BadRequest("a passthrough rule splices TCP: it cannot have a secret, methods or paths",
                             ErrorCode.INVALID_REQUEST)
        ttl = body.get("ttl_seconds") or 0
        if not isinstance(ttl, int) or isinstance(ttl, bool) or not 0 <= ttl <= 10 * 365 * 86400:
            raise BadRequest("ttl_seconds must be a whole number of seconds (0: no expiry)", ErrorCode.INVALID_REQUEST)
        now = time.time()
        rule = Rule(rule.host, secret, rule.methods, rule.paths, rule.ports, now + ttl if ttl else 0.0,
                    rule.passthrough, now)
        if any(r.duplicates(rule) for r in client.rules):
            raise Conflict(f"client {client.name} already has a rule for {rule.host} with these methods and paths")
        if len(client.rules) >= MAX_RULES:
            raise BadRequest(f"a client has at most {MAX_RULES} rules", ErrorCode.LIMIT_EXCEEDED)
        client.rules.append(rule)
        self._save()
        return rule.to_api()

    def remove_host(self, client_name: str, host: str) -> None:
        host = _host(host)
        client = self._client(_name(client_name, "client"))
        kept = [r for r in client.rules if r.host != host]
        if len(kept) == len(client.rules):
            raise NotFound(f"client {client.name} has no rule for {host}", ErrorCode.PROXY_RULE_NOT_FOUND)
        client.rules = kept
        self._save()

    def revoke(self, body: dict) -> None:
        client = self._client(_name(body.get("client"), "client"))
        wanted = _tuple(body)
        for i, r in enumerate(client.rules):
            if r.same_tuple(wanted):
                del client.rules[i]
                self._save()
                return
        raise NotFound(f"client {client.name} has no rule with that host, methods, paths, ports and passthrough",
                       ErrorCode.PROXY_RULE_NOT_FOUND)
