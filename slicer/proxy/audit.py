"""One audit line per decision: key=value on stdout as Slicer's proxy writes it, and the same as
JSON in ``proxy/audit-<bind>.jsonl`` (rotated at a few MiB) for ``GET /proxy/v1/audit``; with
counts of allows and denies per client for ``/metrics``."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from slicer.proxy.state import proxy_dir

ROTATE_BYTES = 4 << 20
FIELD_LIMIT = 512  # paths and hosts come from guests: bounded, and never a line break
KEYS = ("msg", "client", "method", "scheme", "host", "port", "path", "inject", "status", "mode", "reason",
        "bytes", "duration_ms", "suppressed")
# Denials are written at most this often per client (a guest looping on refused requests would
# otherwise push everyone's lines out of the rotated file); the next line written says how many
# were left out, and /metrics counts them all.
DENY_RATE, DENY_BURST = 20.0, 200.0


def _clean(value: object) -> object:
    if isinstance(value, str):
        value = value[:FIELD_LIMIT]
        return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in value)
    return value


def logfmt(entry: dict) -> str:
    parts = []
    for key in KEYS:
        value = entry.get(key)
        if value in (None, ""):
            continue
        text = str(value)
        if not text or any(c in text for c in ' "=\\'):
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def audit_files(data_dir: Path) -> list[Path]:
    d = proxy_dir(data_dir)
    return sorted(d.glob("audit-*.jsonl.1")) + sorted(d.glob("audit-*.jsonl"))


class AuditLog:
    """The proxy's writer (thread-safe: mitmproxy's hooks run on one loop, but be plain about it)."""

    def __init__(self, data_dir: Path, bind: str, stream=sys.stdout) -> None:
        self.dir = proxy_dir(data_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"audit-{bind}.jsonl"
        self.counters_path = self.dir / f"counters-{bind}.json"
        self.stream = stream
        self.counts: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._dirty = False
        self._buckets: dict[str, tuple[float, float]] = {}  # client → (allowance, when)
        self._suppressed: Counter[str] = Counter()

    def _admit(self, client: str) -> bool:
        now = time.monotonic()
        allowance, then = self._buckets.get(client, (DENY_BURST, now))
        allowance = min(DENY_BURST, allowance + (now - then) * DENY_RATE)
        admitted = allowance >= 1
        self._buckets[client] = (allowance - 1 if admitted else allowance, now)
        return admitted

    def write(self, **entry: object) -> None:
        entry = {k: _clean(v) for k, v in entry.items() if v not in (None, "")}
        entry["time"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        client = str(entry.get("client", ""))
        with self._lock:
            self.counts[(str(entry.get("msg")), client)] += 1
            self._dirty = True
            if entry.get("msg") == "deny" and not self._admit(client):
                self._suppressed[client] += 1
                return
            if self._suppressed[client]:
                entry["suppressed"] = self._suppressed.pop(client)
            print(logfmt(entry), file=self.stream, flush=True)
            line = json.dumps(entry, separators=(",", ":")) + "\n"
            try:
                if self.path.exists() and self.path.stat().st_size > ROTATE_BYTES:
                    os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                with os.fdopen(fd, "a") as f:
                    f.write(line)
            except OSError as e:
                print(f"audit file {self.path}: {e}", file=sys.stderr)

    def flush_counters(self) -> None:
        """Write the counts for the daemon's /metrics (called about once a second)."""
        with self._lock:
            if not self._dirty:
                return
            doc = [{"decision": d, "client": c, "count": n} for (d, c), n in self.counts.items()]
            self._dirty = False
        tmp = self.counters_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.counters_path)


def read_audit(data_dir: Path, client: str | None = None, since: float | None = None, limit: int = 100) -> list[dict]:
    """The newest ``limit`` entries (oldest first), optionally of one client and after ``since``."""
    found: list[dict] = []
    for path in audit_files(data_dir):
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if client is not None and entry.get("client") != client:
                continue
            if since is not None and _epoch(entry.get("time", "")) < since:
                continue
            found.append(entry)
    found.sort(key=lambda e: e.get("time", ""))
    return found[-limit:] if limit else []


def read_counters(data_dir: Path) -> Counter[tuple[str, str]]:
    total: Counter[tuple[str, str]] = Counter()
    for path in proxy_dir(data_dir).glob("counters-*.json"):
        try:
            for row in json.loads(path.read_text()):
                total[(str(row["decision"]), str(row["client"]))] += int(row["count"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return total


def _epoch(stamp: str) -> float:
    try:
        return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return 0.0


