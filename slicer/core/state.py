"""The record of what should exist: one SQLite row per node, each write its own transaction."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    hostname   TEXT PRIMARY KEY,
    hostgroup  TEXT NOT NULL,
    kind       TEXT NOT NULL CHECK (kind IN ('service', 'sandbox')),
    ip         TEXT NOT NULL,
    cpus       INTEGER NOT NULL,
    ram_bytes  INTEGER NOT NULL,
    persistent INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    disk       TEXT NOT NULL,
    spec       TEXT NOT NULL DEFAULT '{}',
    template   TEXT NOT NULL DEFAULT '',
    suspended  TEXT NOT NULL DEFAULT ''
);
"""
# Columns added after the first release: (name, definition), added to older databases at open.
ADDED_COLUMNS = [("template", "TEXT NOT NULL DEFAULT ''"), ("suspended", "TEXT NOT NULL DEFAULT ''")]


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat()


@dataclass
class NodeRecord:
    hostname: str
    hostgroup: str
    kind: str  # "service" (from the YAML count) or "sandbox" (created through the API)
    ip: str
    cpus: int
    ram_bytes: int
    persistent: bool
    created_at: str
    disk: str
    # What the create request asked for that later stages act on (userdata, keys, tags, …).
    spec: dict = field(default_factory=dict)
    template: str = ""  # the template whose disk backs this node's disk, if any
    # "" running or stopped; "api" suspended on request; "shutdown" suspended with the daemon
    suspended: str = ""

    @property
    def tags(self) -> list[str]:
        return list(self.spec.get("tags") or [])


class StateStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # It holds userdata and keys: root's eyes only (SQLite gives its -wal/-shm files the same mode).
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        for f in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            with contextlib.suppress(FileNotFoundError):
                f.chmod(0o600)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(nodes)")}
        for name, definition in ADDED_COLUMNS:
            if name not in have:
                self._db.execute(f"ALTER TABLE nodes ADD COLUMN {name} {definition}")
        self._lock = threading.Lock()

    def put(self, rec: NodeRecord) -> None:
        row = asdict(rec)
        row["persistent"] = int(rec.persistent)
        row["spec"] = json.dumps(rec.spec)
        cols = ", ".join(row)
        marks = ", ".join(f":{c}" for c in row)
        with self._lock, self._db:
            self._db.execute(f"INSERT OR REPLACE INTO nodes ({cols}) VALUES ({marks})", row)

    def delete(self, hostname: str) -> None:
        with self._lock, self._db:
            self._db.execute("DELETE FROM nodes WHERE hostname = ?", (hostname,))

    def all(self) -> list[NodeRecord]:
        with self._lock:
            cur = self._db.execute(
                "SELECT hostname, hostgroup, kind, ip, cpus, ram_bytes, persistent, created_at, disk, spec, "
                "template, suspended FROM nodes ORDER BY hostgroup, created_at"
            )
            rows = cur.fetchall()
        return [
            NodeRecord(h, g, k, ip, c, r, bool(p), ca, d, json.loads(s), t, su)
            for h, g, k, ip, c, r, p, ca, d, s, t, su in rows
        ]

    def close(self) -> None:
        self._db.close()
