"""The proxy's state: one JSON file under the daemon's data directory (``proxy/state.json``, 0600
in a 0700 directory), written by the daemon atomically and read by every ``slicer proxy up``.

Clients' tokens are kept as SHA-256 digests (a token is shown once, when it is made); secrets'
values are kept as given, since the proxy must send them upstream, and never leave the host.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from slicer.proxy.rules import Rule

VERSION = 1
INJECTABLE = ("bearer", "basic")  # the OAuth types need token refresh, not built yet (refused clearly)
KNOWN_TYPES = INJECTABLE + ("oauth-claude", "oauth-codex", "oauth-github-copilot", "oauth-xai", "github-app-user",
                            "github-app", "oauth-client-creds")


def proxy_dir(data_dir: Path) -> Path:
    return data_dir / "proxy"


def state_path(data_dir: Path) -> Path:
    return proxy_dir(data_dir) / "state.json"


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Client:
    name: str
    token_sha256: str
    created_at: float
    rules: list[Rule] = field(default_factory=list)


@dataclass
class Secret:
    name: str
    host: str
    type: str
    value: str
    created_at: float
    updated_at: float = 0.0


@dataclass
class State:
    clients: dict[str, Client] = field(default_factory=dict)
    secrets: dict[str, Secret] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "version": VERSION,
            "clients": {n: {"token_sha256": c.token_sha256, "created_at": c.created_at,
                            "rules": [r.to_record() for r in c.rules]} for n, c in self.clients.items()},
            "secrets": {n: {"host": s.host, "type": s.type, "value": s.value, "created_at": s.created_at,
                            "updated_at": s.updated_at} for n, s in self.secrets.items()},
        }

    @classmethod
    def from_json(cls, doc: dict) -> State:
        if doc.get("version") != VERSION:
            raise ValueError(f"proxy state version {doc.get('version')!r}, expected {VERSION}")
        clients = {n: Client(n, c["token_sha256"], float(c["created_at"]), [Rule.from_json(r) for r in c["rules"]])
                   for n, c in doc.get("clients", {}).items()}
        secrets = {n: Secret(n, s["host"], s["type"], s["value"], float(s["created_at"]), float(s["updated_at"]))
                   for n, s in doc.get("secrets", {}).items()}
        return cls(clients, secrets)


def load(path: Path) -> State:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return State()
    return State.from_json(json.loads(text))


def save(path: Path, state: State) -> None:
    """Write ``state`` so that a crash leaves the old file or the new one, never half of either."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state.to_json(), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
