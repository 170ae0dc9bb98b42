"""Allow rules and how a request matches one (Slicer's matching, with the open questions decided;
docs/proxy.md "Matching").

* host: exact, ``*.suffix`` (a name strictly under the suffix, not the suffix itself: TLS's own
  wildcard rule) or ``*``; case-insensitive, a trailing dot ignored;
* methods: any listed, case-insensitive; none listed: any;
* paths: exact, ``*``, or ``<prefix>/*`` (strictly under the prefix: ``/v1/*`` matches ``/v1/x``
  but neither ``/v1`` nor ``/v1/``); the query string is not part of the path; a path with dot
  segments or encoded slashes/dots never matches a path filter, since the upstream may resolve
  them to somewhere the filter did not name;
* ports: any listed; none listed: 80 and 443 only;
* expired rules (``expires`` passed) are skipped.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

DEFAULT_PORTS = (80, 443)
METHOD = re.compile(r"^[A-Za-z]{1,16}$")
HOST = re.compile(r"^(\*|(\*\.)?[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?)*)$")
# What an upstream might decode into a dot segment or a separator the filter did not see.
_SNEAKY = re.compile(r"%2[ef]|%5c|\\", re.IGNORECASE)


@dataclass(frozen=True)
class Rule:
    host: str
    secret: str = ""
    methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    expires: float = 0.0  # epoch seconds; 0: never
    passthrough: bool = False
    created: float = field(default=0.0, compare=False)

    @classmethod
    def from_json(cls, d: dict) -> Rule:
        return cls(host=d["host"], secret=d.get("secret", ""), methods=tuple(d.get("methods", ())),
                   paths=tuple(d.get("paths", ())), ports=tuple(d.get("ports", ())),
                   expires=float(d.get("expires_epoch", 0.0)), passthrough=bool(d.get("passthrough", False)),
                   created=float(d.get("created_epoch", 0.0)))

    def to_record(self) -> dict:
        """How the state file keeps it."""
        d = asdict(self)
        d["methods"], d["paths"], d["ports"] = list(self.methods), list(self.paths), list(self.ports)
        d["expires_epoch"], d["created_epoch"] = d.pop("expires"), d.pop("created")
        return d

    def to_api(self) -> dict:
        """Slicer's ``ProxyAllowRule``: empty fields omitted, ``expires`` in RFC 3339."""
        d: dict = {"host": self.host}
        if self.secret:
            d["secret"] = self.secret
        for key in ("methods", "paths", "ports"):
            if getattr(self, key):
                d[key] = list(getattr(self, key))
        if self.expires:
            d["expires"] = rfc3339(self.expires)
        if self.passthrough:
            d["passthrough"] = True
        return d

    def same_tuple(self, other: Rule) -> bool:
        """Revoke's identity: host, methods, paths, ports and passthrough, ignoring case (as Slicer's)."""
        return (self.host.lower() == other.host.lower() and _fold(self.methods) == _fold(other.methods)
                and _fold(self.paths) == _fold(other.paths)
                and sorted(self.ports) == sorted(other.ports) and self.passthrough == other.passthrough)

    def duplicates(self, other: Rule) -> bool:
        """Slicer's duplicate: the same host, methods and paths."""
        return (self.host.lower() == other.host.lower() and _fold(self.methods) == _fold(other.methods)
                and _fold(self.paths) == _fold(other.paths))

    def expired(self, now: float | None = None) -> bool:
        return bool(self.expires) and self.expires <= (time.time() if now is None else now)

    def admits(self, host: str, port: int) -> bool:
        """Whether a connection to host:port may use this rule (a CONNECT, before any request)."""
        return host_matches(self.host, host) and port in (self.ports or DEFAULT_PORTS)

    def allows(self, method: str, path: str) -> bool:
        """Whether a request on an admitted connection matches the rule's method and path filters."""
        if self.methods and method.upper() not in {m.upper() for m in self.methods}:
            return False
        return not self.paths or any(path_matches(p, path) for p in self.paths)


def _fold(items: tuple[str, ...]) -> list[str]:
    return sorted(i.upper() for i in items)


def normal_host(host: str) -> str:
    return host.strip().rstrip(".").lower()


def host_matches(pattern: str, host: str) -> bool:
    pattern, host = normal_host(pattern), normal_host(host)
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return pattern == host


def path_matches(pattern: str, path: str) -> bool:
    path = path.split("?", 1)[0]
    if pattern == "*":
        return True
    # "#" never belongs in a request; ";" parameters make "..;" a dot segment to some servers
    if "#" in path or _SNEAKY.search(path) or any(seg.split(";", 1)[0] in (".", "..") for seg in path.split("/")):
        return False
    if pattern.endswith("/*"):
        prefix = pattern[:-1]  # keeps the slash
        return path.startswith(prefix) and len(path) > len(prefix)
    return path == pattern


def rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
