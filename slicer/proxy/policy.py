"""The proxy's side of the rules: who is asking (the token in ``Proxy-Authorization``) and what
the first matching rule says, read from the state file as the daemon changes it."""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from slicer.proxy import state as st
from slicer.proxy.rules import Rule, host_matches

log = logging.getLogger("slicer.proxy")


@dataclass(frozen=True)
class Decision:
    allow: bool
    reason: str = ""  # why not: host-not-allowed, path-not-allowed, no-rule, ...
    rule: Rule | None = None
    inject: str = ""  # the Authorization header the upstream gets ("" keeps none)
    secret: str = ""  # the injected secret's name (for the audit line, never its value)


def header_value(secret: st.Secret) -> str:
    if secret.type == "basic":
        return "Basic " + base64.b64encode(secret.value.encode()).decode()
    return "Bearer " + secret.value


def proxy_password(header: str) -> str | None:
    """The password of ``Proxy-Authorization: Basic b64(user:password)`` (the user is ignored)."""
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, ValueError):  # ValueError: non-ASCII input (UnicodeDecodeError is one too)
        return None
    user, sep, password = decoded.partition(":")
    return password if sep else None


class Policy:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self.state = st.State()
        self.refresh()

    def refresh(self) -> None:
        """Reload the file if the daemon replaced it (a stat per decision: changes apply at once)."""
        try:
            s = os.stat(self.path)
            stamp = (s.st_ino, s.st_mtime_ns, s.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp:
            return
        try:
            self.state = st.load(self.path)
            self._stamp = stamp
        except (OSError, ValueError, KeyError, TypeError) as e:  # keep the last good rules
            log.error("proxy state %s unreadable, keeping the previous rules: %s", self.path, e)

    def client(self, proxy_authorization: str) -> tuple[str, str] | None:
        """The client whose token is the header's password, and that token's digest."""
        password = proxy_password(proxy_authorization)
        if not password:
            return None
        digest = st.token_digest(password)
        self.refresh()
        for c in self.state.clients.values():
            if hmac.compare_digest(digest, c.token_sha256):
                return c.name, digest
        return None

    def holds(self, client: str, digest: str) -> bool:
        """Whether ``client`` still exists with the token a tunnel was opened with."""
        self.refresh()
        c = self.state.clients.get(client)
        return c is not None and hmac.compare_digest(digest, c.token_sha256)

    def _usable(self, client: str, host: str, port: int) -> list[tuple[Rule, st.Secret | None]]:
        """The client's rules that admit host:port, in order: unexpired, and whose secret (if any)
        still exists and is meant for this host (a ``*`` rule never carries a secret elsewhere)."""
        self.refresh()
        c = self.state.clients.get(client)
        if c is None:
            return []
        now, found = time.time(), []
        for rule in c.rules:
            if rule.expired(now) or not rule.admits(host, port):
                continue
            secret = self.state.secrets.get(rule.secret) if rule.secret else None
            if rule.secret and (secret is None or not host_matches(secret.host, host)):
                continue
            found.append((rule, secret))
        return found

    def connect(self, client: str, host: str, port: int) -> Decision:
        """A CONNECT: the first rule for host:port decides between splicing and intercepting."""
        usable = self._usable(client, host, port)
        if not usable:
            return Decision(False, "host-not-allowed")
        return Decision(True, rule=usable[0][0])

    def request(self, client: str, host: str, port: int, method: str, path: str) -> Decision:
        """A request (inside an intercepted tunnel, or plain HTTP): the first rule that allows it."""
        usable = [(r, s) for r, s in self._usable(client, host, port) if not r.passthrough]
        if not usable:
            return Decision(False, "host-not-allowed")
        for rule, secret in usable:
            if rule.allows(method, path):
                if secret is None:
                    return Decision(True, rule=rule)
                return Decision(True, rule=rule, inject=header_value(secret), secret=secret.name)
        return Decision(False, "path-not-allowed")
