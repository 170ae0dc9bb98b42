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

from slicer.core.records import NodeKind, NodeSpec, Suspended

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
    suspended  TEXT NOT NULL DEFAULT '',
    paused     INTEGER NOT NULL DEFAULT 0,
    identity_pending INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS commits (
    commit_id         TEXT PRIMARY KEY,
    source_hostname   TEXT NOT NULL,
    source_host_group TEXT NOT NULL,
    created_at        TEXT NOT NULL,
    mode              TEXT NOT NULL,
    tags              TEXT NOT NULL DEFAULT '[]',
    labels            TEXT NOT NULL DEFAULT '{}',
    cache_key         TEXT NOT NULL DEFAULT '',
    cpus              INTEGER NOT NULL,
    ram_bytes         INTEGER NOT NULL,
    spec              TEXT NOT NULL DEFAULT '{}'
);
"""
# Columns added after the first release: (name, definition), added to older databases at open.
ADDED_COLUMNS = [("template", "TEXT NOT NULL DEFAULT ''"), ("suspended", "TEXT NOT NULL DEFAULT ''"),
                 ("paused", "INTEGER NOT NULL DEFAULT 0"), ("identity_pending", "INTEGER NOT NULL DEFAULT 0")]


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat()


@dataclass
class NodeRecord:
    hostname: str
    hostgroup: str
    kind: NodeKind
    ip: str
    cpus: int
    ram_bytes: int
    persistent: bool
    created_at: str
    disk: str
    # What the create request asked for that later stages act on (userdata, keys, tags, …).
    spec: NodeSpec = field(default_factory=NodeSpec)
    # The template it was restored from, while it uses any of it: a sandbox's disk is an overlay
    # on the template's; every clone's RAM maps the template's file (own_disk: only that).
    template: str = ""
    suspended: Suspended = Suspended.NO
    # paused on request (POST /pause): a paused QEMU a new daemon adopts stays paused only then;
    # otherwise its vCPUs stopped because its daemon died between a restore and the resume
    paused: bool = False
    # Restored from a template and not yet given its own identity: until a reset succeeds, every
    # boot of it (a restore of its saved state, an adoption, a cold boot of its copied disk) gets
    # the full reset, since each still holds the template's name, address, machine-id and keys.
    identity_pending: bool = False

    @property
    def tags(self) -> list[str]:
        return list(self.spec.tags)

    @property
    def own_disk(self) -> bool:
        """Its disk rests on nothing of a template's, even when it was restored from one (it starts
        as a copy of the template's): a service's or a persistent VM's, which outlive templates."""
        return self.persistent or self.kind == NodeKind.SERVICE


@dataclass
class CommitRecord:
    """A VM's disk frozen as an immutable parent (see :mod:`slicer.core.commits`)."""

    commit_id: str
    source_hostname: str
    source_host_group: str
    created_at: str
    tags: list[str]
    labels: dict[str, str]
    cache_key: str
    cpus: int
    ram_bytes: int
    spec: NodeSpec = field(default_factory=NodeSpec)  # the source's, for its children (keys, secrets, ...)
    mode: str = "disk"

    def view(self) -> dict:
        return {"commit_id": self.commit_id, "source_hostname": self.source_hostname,
                "source_host_group": self.source_host_group, "created_at": self.created_at, "mode": self.mode,
                "tags": self.tags, "labels": self.labels, "cache_key": self.cache_key}


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
        if rec.kind == NodeKind.POOL:
            # A warm pool's VM is never recorded: a daemon that restarts finds its run dir named
            # by no record and removes it, QEMU and all (the pool fills again). It is recorded
            # once a create takes it and it becomes a sandbox.
            return
        row = asdict(rec)
        row["persistent"] = int(rec.persistent)
        row["paused"] = int(rec.paused)
        row["identity_pending"] = int(rec.identity_pending)
        row["spec"] = json.dumps(rec.spec.to_dict())
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
                "template, suspended, paused, identity_pending FROM nodes ORDER BY hostgroup, created_at"
            )
            rows = cur.fetchall()
        return [
            NodeRecord(h, g, NodeKind(k), ip, c, r, bool(p), ca, d, NodeSpec.from_dict(json.loads(s)), t,
                       Suspended(su), bool(pa), bool(pending))
            for h, g, k, ip, c, r, p, ca, d, s, t, su, pa, pending in rows
        ]

    def put_commit(self, rec: CommitRecord) -> None:
        row = asdict(rec)
        row["spec"] = rec.spec.to_dict()
        for key in ("tags", "labels", "spec"):
            row[key] = json.dumps(row[key])
        cols = ", ".join(row)
        marks = ", ".join(f":{c}" for c in row)
        with self._lock, self._db:
            self._db.execute(f"INSERT OR REPLACE INTO commits ({cols}) VALUES ({marks})", row)

    def delete_commit(self, commit_id: str) -> None:
        with self._lock, self._db:
            self._db.execute("DELETE FROM commits WHERE commit_id = ?", (commit_id,))

    def commits(self, commit_id: str | None = None) -> list[CommitRecord]:
        """Every commit, oldest first; or the one called ``commit_id`` (if it exists)."""
        where, args = ("WHERE commit_id = ?", (commit_id,)) if commit_id is not None else ("", ())
        with self._lock:
            self._db.row_factory = sqlite3.Row
            try:
                rows = self._db.execute(f"SELECT * FROM commits {where} ORDER BY created_at", args).fetchall()
            finally:
                self._db.row_factory = None
        found = []
        for row in rows:
            values = dict(row)
            for key in ("tags", "labels", "spec"):
                values[key] = json.loads(values[key])
            values["spec"] = NodeSpec.from_dict(values["spec"])
            found.append(CommitRecord(**values))
        return found

    def commit(self, commit_id: str) -> CommitRecord | None:
        found = self.commits(commit_id)
        return found[0] if found else None

    def close(self) -> None:
        self._db.close()
